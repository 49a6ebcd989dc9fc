"""Running a trained model over a dataset: ``predict`` (probabilities in dataset order) and ``evaluate`` (metrics).

Works for any model through :mod:`fusionnet.models.interface`: image datasets go through ``model(x)``; a
:class:`fusionnet.engine.feature_cache.FeatureDataset` (cached branch features) goes through the model's head path.
Under ``torchrun`` every rank computes a shard and all ranks get all N rows, in dataset order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler
from tqdm.auto import tqdm

from fusionnet.utils.distributed import autocast, place, rank_world, to_device
from fusionnet.data.datasets import as_dataset
from fusionnet.errors import ConfigError, DataError
from fusionnet.engine.feature_cache import FeatureDataset
from fusionnet.models.interface import as_classifier
from fusionnet.utils.metrics import classification_metrics
from fusionnet.data.tta import check_tta, tta_probs


class _Indexed(Dataset):
    """Yields (x, y, index) so that predictions gathered from several ranks can be put back in order."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        return x, y, i


@dataclass
class Inference:
    """How :func:`predict` runs a model (every field a keyword of ``predict`` too)."""

    batch_size: int = 64
    amp: bool | str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on the CPU
    channels_last: bool | str = "auto"  # "auto": on the CPU (faster there), not on CUDA
    num_workers: int = 0
    progress: bool = False
    desc: str = "predict"  # the progress bar's label
    tta: str | None = None  # "flip" | "flip-zoom" (fusionnet.data.tta)
    tta_space: str = "prob"  # average the views' "prob"abilities or "logit"s


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, *, device: str | torch.device = "auto", batch_size: int = 64,
            amp: bool | str = "auto", channels_last: bool | str = "auto", num_workers: int = 0,
            progress: bool = False, desc: str = "predict", tta: str | None = None,
            tta_space: str = "prob") -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, K) float32, labels (N,)) in dataset order; the model runs on ``device`` (moved there).
    The keywords are :class:`Inference`'s fields (what each does is written there).

    The ``"auto"`` defaults are the fastest mode measured on each device that agrees with fp32 on that device
    (experiments/bench_throughput.py): on the CPU fp32 weights in channels-last memory format (the model is converted
    in place; outputs equal the contiguous ones to ~1e-6); on CUDA bf16 autocast in the contiguous format (H200,
    three Lite trunks at 128 px, batch 256: 13.5k img/s against 11.7k for fp32 channels-last and 6.9k for fp32
    contiguous; bf16 with channels-last 7.4k). ``amp=False`` gives fp32 on CUDA too. ``tta`` ("flip",
    "flip-zoom"; :mod:`fusionnet.data.tta`) averages each image's prediction over its views, in ``tta_space`` ("prob" or
    "logit"); it costs a forward pass per view.
    """
    how = Inference(batch_size=batch_size, amp=amp, channels_last=channels_last, num_workers=num_workers,
                    progress=progress, desc=desc, tta=tta, tta_space=tta_space)
    check_tta(tta, tta_space)
    if tta is not None and isinstance(data, FeatureDataset):
        raise ConfigError("test-time augmentation needs images; cached features cannot be flipped or cropped")
    if len(data) == 0:
        raise DataError("predict got an empty dataset; check the split's folder has images")
    device = place(model, device)
    if channels_last == "auto":
        channels_last = device.type != "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    clf = as_classifier(model)
    base = clf.forward_head if isinstance(data, FeatureDataset) else clf
    forward = lambda x: tta_probs(base, x, tta, tta_space)  # noqa: E731  (images or features -> probabilities)
    rank, world = rank_world()
    indexed = _Indexed(data)
    sampler = DistributedSampler(indexed, shuffle=False) if world > 1 else None
    if isinstance(data, FeatureDataset):  # cached features: whole batches by indexing
        loader = data.batches(sampler or SequentialSampler(data), batch_size, with_index=True)
    else:
        loader = DataLoader(indexed, batch_size=batch_size, sampler=sampler, num_workers=how.num_workers,
                            pin_memory=device.type == "cuda")
    probs, labels, index = [], [], []
    # predicting leaves the global random stream as it was (a DataLoader draws seeds from it): validating during
    # training then never shifts the training's own random numbers (dropout masks, augmentation order)
    with torch.random.fork_rng(devices=[]):
        _predict_batches(clf, loader, forward, probs, labels, index, device=device, amp=amp,
                         channels_last=channels_last, bar=dict(desc=how.desc, disable=not how.progress or rank != 0,
                                                               total=math.ceil(len(sampler or indexed) / batch_size)))
    p, y, i = torch.cat(probs), torch.cat(labels), torch.cat(index)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (p, y, i))
        p, y, i = (torch.cat([g[k] for g in gathered]) for k in range(3))
    order = torch.zeros(len(data), dtype=torch.long)
    order[i] = torch.arange(len(i))  # DistributedSampler pads with repeats: the last write per index wins
    return p[order], y[order]


def _predict_batches(clf, loader, forward, probs: list, labels: list, index: list, *, device, amp, channels_last,
                     bar: dict) -> None:
    """Run ``forward`` over the loader's batches in eval mode, appending probabilities, labels and indices."""
    was_training = clf.training
    clf.eval()
    try:
        for x, y, i in tqdm(loader, leave=False, **bar):
            x = to_device(x, device, non_blocking=True)
            if channels_last and isinstance(x, torch.Tensor):
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                out = forward(x)  # probabilities (B, K)
            probs.append(out.float().cpu())
            labels.append(torch.as_tensor(y))
            index.append(i)
    finally:
        clf.train(was_training)


def evaluate(model: nn.Module, data: Dataset, *, class_names: list[str] | None = None,
             device: str | torch.device = "auto", batch_size: int = 64, amp: bool | str = "auto",
             channels_last: bool | str = "auto", num_workers: int = 0, tta: str | None = None,
             progress: bool = False) -> dict:
    """Metrics (acc, macro_f1, nll, ece, per-class, confusion) of ``model`` on ``data`` (run as :func:`predict`
    runs it, with these of its keywords)."""
    probs, labels = predict(model, data, device=device, batch_size=batch_size, amp=amp, channels_last=channels_last,
                            num_workers=num_workers, tta=tta, progress=progress)
    names = class_names or as_dataset(data).class_names
    return classification_metrics(probs, labels, names)


def choose_prediction(model: nn.Module, val_data: Dataset, *, by: str = "nll",
                      device: str | torch.device = "auto") -> dict[str, dict]:
    """For a FusionNet with branch heads: what it should predict in eval mode (``FusionConfig.predict_with``: the
    fused head, the branch heads' soft vote, or both), chosen on ``val_data`` by ``by`` (nll: lowest; acc: highest;
    the first of ties in the order fused, branches, all). Returns each option's validation metrics and the choice
    under ``"chosen"``; the model predicts as before (set ``model.config.predict_with`` to the choice to keep it)."""
    from fusionnet.models.fusion import PREDICT_WITH

    scores, before = {}, model.config.predict_with
    try:
        for option in PREDICT_WITH:
            model.config.predict_with = option
            m = evaluate(model, val_data, device=device)
            scores[option] = {"acc": m["acc"], "nll": m["nll"]}
    finally:
        model.config.predict_with = before
    sign = 1.0 if by == "nll" else -1.0
    chosen = min(PREDICT_WITH, key=lambda o: (sign * scores[o][by], PREDICT_WITH.index(o)))
    return {**scores, "chosen": chosen}


def choose_and_save_prediction(model: nn.Module, val_data: Dataset, checkpoint: str, *, device="auto",
                               log=print) -> dict[str, dict]:
    """:func:`choose_prediction` by validation NLL, the choice also written into ``checkpoint`` (the model's
    best.pth), so that loading it predicts the same."""
    from fusionnet.models.checkpoints import set_config_fields

    scores = choose_prediction(model, val_data, device=device, by="nll")
    model.config.predict_with = scores["chosen"]  # the model in memory and its file predict alike
    set_config_fields(checkpoint, predict_with=scores["chosen"])
    log(f"predicts with {scores['chosen']!r}, chosen by validation NLL: " +
        ", ".join(f"{k} {v['nll']:.4f}" for k, v in scores.items() if k != "chosen"))
    return scores
