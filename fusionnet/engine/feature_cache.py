"""Cache of each branch's pooled features, for training only the head when every trunk is frozen.

With frozen trunks and a deterministic pipeline the trunks compute the same features every epoch; computing them
once per split and training the head on the cached tensors gives the same result far faster. The cache is a
:class:`FeatureDataset` that the ordinary training loop consumes through the model's head path
(``forward_head_output``). On disk a cache is keyed per branch by its config, a hash of its weights, the
transform and the file list (paths, sizes, mtimes), so a second run starts instantly and any change recomputes.

Works with any model whose ``feature_extractors()`` (see :mod:`fusionnet.models.interface`) names its branches.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm

from fusionnet.data.datasets import LabelledData, as_dataset
from fusionnet.data.splits import eval_view
from fusionnet.models.branch import Branch
from fusionnet.utils.distributed import place
from fusionnet.utils.files import atomic_torch_save, files_fingerprint

CACHE_VERSION = 4  # 3: images upright by their EXIF orientation; 4: computed in channels-last memory format


def weights_hash(module: nn.Module) -> str:
    """sha256 over every tensor of a state dict (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _files_fingerprint(dataset: LabelledData) -> list:
    paths = dataset.paths
    if paths is None:  # not a file-backed dataset: key on its length and type only
        return [type(dataset).__name__, len(dataset)]
    return files_fingerprint(paths)


def cache_key(model: nn.Module, dataset, cfg=None) -> str:
    """What cached features depend on: the model's weights (or one branch's config and weights), the transform,
    the labels and the files. A branch's key leaves out its name, so equal branches of two models share a cache.
    ``cfg``: key the module's features as those of a branch with this config (the same weights)."""
    cfg = cfg if cfg is not None else getattr(model, "cfg", None)  # a Branch's config (models are not Branches)
    dataset = as_dataset(dataset)
    parts = {
        "version": CACHE_VERSION,
        "model": [{k: v for k, v in vars(cfg).items() if k != "name"} if cfg is not None else type(model).__name__,
                  weights_hash(model)],
        "transform": repr(dataset.transform),
        "labels": list(dataset.labels or []),
        "files": _files_fingerprint(dataset),
    }
    if dataset.store is not None:  # images read from a decoded-image cache (fusionnet.data.image_cache)
        parts["source"] = dataset.store.describe()
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class FeatureDataset(LabelledData):
    """Cached per-branch features as a dataset: item i is ({branch: (D_i,)}, label); batches collate to
    ({branch: (B, D_i)}, (B,)). Keeps the source dataset's ``labels`` and ``class_names``."""

    def __init__(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor,
                 class_names: list[str] | None = None) -> None:
        self.features, self.targets = dict(features), torch.as_tensor(labels)
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return {name: f[i] for name, f in self.features.items()}, self.targets[i]

    @property
    def labels(self) -> list[int]:
        return self.targets.tolist()

    def batches(self, sampler, batch_size: int, *, with_index: bool = False):
        """The batches a DataLoader with this ``sampler`` and ``batch_size`` would give (the same indices and
        values), gathered by tensor indexing instead of collating one sample at a time: ({branch: (B, D_i)}, (B,))
        [, indices (B,)]. A head epoch on cached features is dominated by that collation otherwise."""
        for idx in BatchSampler(sampler, batch_size, drop_last=False):
            idx = torch.as_tensor(idx, dtype=torch.long)
            batch = ({name: f[idx] for name, f in self.features.items()}, self.targets[idx])
            yield (*batch, idx) if with_index else batch


def cache_blocker(model) -> str | None:
    """None if the model's features can be cached now, else the reason they cannot."""
    extractors = model.feature_extractors()
    if not extractors:
        return f"{type(model).__name__} has no cacheable feature path"
    trainable = [f"{n}.{p}" for n, m in extractors.items() for p, t in m.named_parameters() if t.requires_grad]
    if trainable:
        return f"branch parameters are trainable ({trainable[0]} ...): features change while training"
    return None


@torch.no_grad()
def compute_features(extractors: Mapping[str, nn.Module], dataset, *, batch_size: int = 64,
                     device: torch.device | str = "auto", num_workers: int = 0, progress: Callable | None = None
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({branch: (N, D_i)}, labels (N,)) in dataset order, each extractor in eval mode on ``device``, in
    channels-last memory format as ``predict`` runs (the modules are converted in place): EfficientNet-Lite2 at
    64 px, batch 64, on two CPU cores: 101-128 vs 140-166 ms a batch, features equal to 3e-5."""
    modules = nn.ModuleDict(dict(extractors))
    was_training = modules.training
    device = place(modules, device)
    modules.to(memory_format=torch.channels_last)
    modules.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    labels = []
    try:
        for x, y in (progress(loader) if progress else loader):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            for name, module in modules.items():
                feats[name].append(module(x).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        modules.train(was_training)
    return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(labels)


def _save_untapped(module: nn.Module, features: torch.Tensor, labels: torch.Tensor, dataset, cache_dir: Path) -> None:
    """A branch with taps computed its trunk's own pooled output too (its first feature level, from the same trunk
    run): keep that under the key of the same branch without taps, so a model using the plain branch loads it."""
    if not isinstance(module, Branch) or not module.taps:
        return
    path = cache_dir / f"features-{cache_key(module, dataset, replace(module.cfg, taps=0))}.pt"
    if not path.is_file():
        atomic_torch_save({"features": features[:, module.levels()[0]].clone(), "labels": labels}, path)


def cached_features(model, dataset, *, cache_dir: str | os.PathLike | None, **kwargs) -> tuple[FeatureDataset, bool]:
    """The model's branch features for ``dataset``: from ``cache_dir`` where a matching file exists, else computed
    (and saved there when given), one file per branch, so equal branches of two models share files.
    Returns (features, hit): hit is True when nothing had to be computed."""
    extractors = dict(model.feature_extractors())
    names = as_dataset(dataset).class_names
    if cache_dir is None:
        feats, labels = compute_features(extractors, dataset, **kwargs)
        return FeatureDataset(feats, labels, names), False
    paths = {name: Path(cache_dir) / f"features-{cache_key(br, dataset)}.pt" for name, br in extractors.items()}
    feats, labels = {}, None
    for name, path in paths.items():
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                feats[name], labels = blob["features"], blob["labels"]
            except Exception:  # a damaged cache file is recomputed, never trusted
                feats.pop(name, None)
    missing = {name: m for name, m in extractors.items() if name not in feats}
    if missing:
        new, labels = compute_features(missing, dataset, **kwargs)
        for name in missing:
            atomic_torch_save({"features": new[name], "labels": labels}, paths[name])
            _save_untapped(missing[name], new[name], labels, dataset, Path(cache_dir))
        feats.update(new)
    return FeatureDataset({name: feats[name] for name in extractors}, labels, names), not missing


def fit_closed_form_on(model, splits, *, cache_dir, device: str = "auto", seed: int = 0,
                       log: Callable[[str], None] | None = None, num_workers: int = 0, progress: bool = False):
    """The fusion method's closed-form fit (:func:`fusionnet.engine.late_fit.fit_closed_form`; ``late``:
    :func:`fusionnet.engine.late_fit.fit_late_head`) on the training images of ``splits`` (a :class:`fusionnet.data.splits.Splits`), seen through
    the validation pipeline (un-augmented, as the frozen-trunk feature cache trains), features from the cache."""
    feats, _ = cached_features(model, _closed_form_views(splits)["train"], cache_dir=cache_dir, device=device,
                               batch_size=64, num_workers=num_workers, progress=_bar("train", progress))
    from fusionnet.engine.late_fit import fit_closed_form

    return fit_closed_form(model, feats.features, feats.targets, seed=seed, log=log, progress=progress)


def cache_closed_form_features(model, splits, *, cache_dir, device: str = "auto", num_workers: int = 0,
                               progress: bool = False) -> None:
    """Compute (or find) in ``cache_dir`` every feature file that :func:`fit_closed_form_on` and scoring through
    the cache read: the training images through the validation pipeline, val and test as they are (a closed-form
    entry's trunk pass, done before its fit moves to a thread of its own)."""
    for split, data in _closed_form_views(splits).items():
        cached_features(model, data, cache_dir=cache_dir, device=device, batch_size=64, num_workers=num_workers,
                        progress=_bar(split, progress))


def _closed_form_views(splits) -> dict:
    """{split: what a closed-form entry reads of it}: training images seen as validation ones; val, test (if any)."""
    views = {"train": eval_view(splits.train, splits.val), "val": splits.val}
    return views if splits.test is None else {**views, "test": splits.test}


def _bar(split: str, on: bool):
    return (lambda it: tqdm(it, desc=f"features ({split})", leave=False)) if on else None
