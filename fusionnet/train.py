"""The training loop: ``fit`` / ``evaluate`` / ``predict`` for any classifier returning logits.

It knows nothing about fusion. It uses these optional hooks of the model when a setting needs them:

* ``freeze_trunks(bool)`` and ``unfreeze_top_stages(k)`` / ``num_trunk_stages()`` for the frozen and gradual
  strategies;
* ``trunk_parameters()`` to give pretrained weights their own learning rate (``lr * trunk_lr_mult``);
* ``forward_features(x)`` / ``forward_head(features)`` for the feature cache;
* ``config.to_dict()`` and ``class_names`` so that checkpoints can rebuild the model.

A run folder holds ``best.pth`` (best validation score), ``final.pth`` (last epoch, with optimiser state for
resuming), ``history.json``, ``history.png`` (the curves) and ``train_config.json``; checkpoints and JSON are
written atomically. Under ``torchrun`` it trains with
DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from fusionnet import checkpoints as ckpt
from fusionnet.data import balanced_sampler, class_weights
from fusionnet.feature_cache import cached_features, supports_cache
from fusionnet.losses import make_loss
from fusionnet.metrics import classification_metrics

STRATEGIES = ("full", "frozen", "gradual")
MONITORS = {"acc": "max", "macro_f1": "max", "nll": "min", "ece": "min"}


@dataclass
class TrainConfig:
    """How to train. Every field is plain data and is written to ``train_config.json``."""

    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # the head's learning rate
    trunk_lr_mult: float = 0.1  # pretrained trunks learn at lr * this
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 0.5  # linear warm-up, then cosine decay to 0 over the remaining steps
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping
    label_smoothing: float = 0.0
    loss: str = "ce"  # ce | focal
    aux_weight: float = 0.3  # weight of each auxiliary head's loss (GoogLeNet aux heads; 0.3 as in the paper)
    focal_gamma: float = 2.0
    class_weighting: bool = False  # inverse-frequency class weights in the loss (focal: as alpha)
    balanced_sampling: bool = False  # oversample rare classes (WeightedRandomSampler)
    strategy: str = "full"  # full: train everything | frozen: head only | gradual: unfreeze from the top;
    # the strategy overrides the model's own freeze_trunks setting
    unfreeze_after: int = 1  # gradual: epochs with every trunk frozen
    unfreeze_every: int = 1  # gradual: epochs between unfreezing steps
    stages_per_step: int = 1  # gradual: trunk stages released per step, nearest the output first
    monitor: str = "macro_f1"  # acc | macro_f1 | nll | ece: the validation metric for best.pth and early stopping
    patience: int | None = None  # stop after this many epochs without improvement; None: never
    amp: bool | str = "auto"  # mixed precision: "auto" uses bf16 autocast on CUDA, nothing on CPU
    cache_features: bool | str = "auto"  # frozen strategy: "auto" caches when the train pipeline is deterministic;
    # True caches regardless, using the val pipeline on train images (no augmentation); False never caches
    cache_dir: str | None = None  # where cached features persist between runs (None: memory only)
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True  # a tqdm bar per epoch

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs!r}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}"),
            (self.optimizer in ("adamw", "sgd"), f"unknown optimizer {self.optimizer!r}; choose 'adamw' or 'sgd'"),
            (self.lr > 0, f"lr must be > 0, got {self.lr!r}"),
            (self.strategy in STRATEGIES, f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"),
            (self.monitor in MONITORS, f"unknown monitor {self.monitor!r}; choose one of {', '.join(MONITORS)}"),
            (self.loss in ("ce", "focal"), f"unknown loss {self.loss!r}; choose 'ce' or 'focal'"),
            (self.patience is None or self.patience >= 1, f"patience must be >= 1 or None, got {self.patience!r}"),
            (self.cache_features in ("auto", True, False),
             f"cache_features must be 'auto', True or False, got {self.cache_features!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    best_score: float
    stopped_early: bool
    out_dir: str | None
    used_cache: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def best_path(self) -> str | None:
        return str(Path(self.out_dir) / "best.pth") if self.out_dir else None

    @property
    def final_path(self) -> str | None:
        return str(Path(self.out_dir) / "final.pth") if self.out_dir else None


# ---- helpers ---------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device: str = "auto") -> torch.device:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on GPU); a no-op outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")
    return resolve_device(device)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Two parameter groups when the model names its trunk parameters: trunks at ``lr * trunk_lr_mult``."""
    trunk_fn = getattr(model, "trunk_parameters", None)
    if trunk_fn is not None:
        trunk = list(trunk_fn())
        ids = {id(p) for p in trunk}
        groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": cfg.lr, "name": "head"},
                  {"params": trunk, "lr": cfg.lr * cfg.trunk_lr_mult, "name": "trunk"}]
    else:
        groups = [{"params": list(model.parameters()), "lr": cfg.lr, "name": "all"}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _stages_for_epoch(epoch: int, cfg: TrainConfig) -> int:
    """Gradual unfreezing: how many top trunk stages train in ``epoch`` (0-based)."""
    if epoch < cfg.unfreeze_after:
        return 0
    return (1 + (epoch - cfg.unfreeze_after) // cfg.unfreeze_every) * cfg.stages_per_step


def _apply_strategy(model: nn.Module, cfg: TrainConfig, epoch: int) -> None:
    if cfg.strategy == "full":
        if hasattr(model, "freeze_trunks"):
            model.freeze_trunks(False)
        return
    needed = "freeze_trunks" if cfg.strategy == "frozen" else "unfreeze_top_stages"
    if not hasattr(model, needed):
        raise ValueError(f"strategy {cfg.strategy!r} needs a model with {needed}(); {type(model).__name__} has none")
    if cfg.strategy == "frozen":
        model.freeze_trunks(True)
    else:
        model.unfreeze_top_stages(_stages_for_epoch(epoch, cfg))


def _is_deterministic(dataset) -> bool:
    """Whether the pipeline gives the same tensor twice for the same sample (no random augmentation)."""
    if len(dataset) == 0:
        return True
    a, b = dataset[0][0], dataset[0][0]
    return isinstance(a, torch.Tensor) and torch.equal(a, b)


class _Indexed(Dataset):
    """Yields (x, y, index) so that predictions gathered from several ranks can be put back in order."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        return x, y, i


def _autocast(device: torch.device, amp: bool | str):
    enabled = device.type == "cuda" and amp in ("auto", True)
    dtype = torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


# ---- evaluation ------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, data: Dataset, *, batch_size: int = 64, device: str | torch.device = "auto",
            num_workers: int = 0, progress: bool = False, desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, K), labels (N,)) in dataset order; under torchrun every rank gets all N."""
    device = resolve_device(device) if isinstance(device, str) else device
    rank, world = _rank_world()
    was_training = model.training
    model.eval()
    indexed = _Indexed(data)
    sampler = DistributedSampler(indexed, shuffle=False) if world > 1 else None
    loader = DataLoader(indexed, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    probs, labels, index = [], [], []
    for x, y, i in tqdm(loader, desc=desc, disable=not progress or rank != 0, leave=False):
        with _autocast(device, "auto"):
            out = model(x.to(device))
        out = out[0] if isinstance(out, tuple) else out  # aux-head models: main logits only
        probs.append(out.float().softmax(dim=1).cpu())
        labels.append(torch.as_tensor(y))
        index.append(i)
    model.train(was_training)
    p, y, i = torch.cat(probs), torch.cat(labels), torch.cat(index)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (p, y, i))
        p, y, i = (torch.cat([g[k] for g in gathered]) for k in range(3))
    order = torch.zeros(len(data), dtype=torch.long)
    order[i] = torch.arange(len(i))  # DistributedSampler pads with repeats: the last write per index wins
    return p[order], y[order]


def evaluate(model: nn.Module, data: Dataset, *, class_names: list[str] | None = None, **kwargs) -> dict:
    """Metrics (acc, macro_f1, nll, ece, per-class, confusion) of ``model`` on ``data``."""
    probs, labels = predict(model, data, **kwargs)
    return classification_metrics(probs, labels, class_names or getattr(data, "class_names", None))


# ---- fit -------------------------------------------------------------------------------------------------------
def fit(model: nn.Module, train_data: Dataset, val_data: Dataset, config: TrainConfig | None = None, *,
        out_dir: str | os.PathLike | None = None, resume: bool = False,
        log: Callable[[str], None] | None = print, sample_weights: torch.Tensor | None = None) -> FitResult:
    """Train ``model`` on ``train_data``, choosing the best epoch on ``val_data``; see the module docstring.

    ``sample_weights`` (N,) draws training samples in proportion to them, with replacement (boosting by
    resampling); it replaces ``balanced_sampling``.
    """
    cfg = config or TrainConfig()
    device = setup_distributed(cfg.device)
    rank, world = _rank_world()
    say = log if (log is not None and rank == 0) else (lambda _msg: None)
    seed_everything(cfg.seed)
    out = Path(out_dir) if out_dir is not None else None
    if resume and (out is None or not (out / "final.pth").is_file()):
        raise FileNotFoundError(f"resume=True needs {str(out / 'final.pth') if out else 'out_dir'!r} from an "
                                f"earlier run; pass the run folder as out_dir")
    model.to(device)
    labels = list(getattr(train_data, "labels", []))
    class_names = getattr(model, "class_names", None) or getattr(train_data, "class_names", None)
    num_classes = len(class_names) if class_names else None
    weight = None
    if cfg.class_weighting or cfg.balanced_sampling:
        if not labels or num_classes is None:
            raise ValueError("class_weighting / balanced_sampling need a dataset with .labels and .class_names")
    if cfg.class_weighting:
        weight = class_weights(labels, num_classes).to(device)
    criterion = make_loss(cfg.loss, weight=weight, label_smoothing=cfg.label_smoothing, gamma=cfg.focal_gamma)

    _apply_strategy(model, cfg, 0)
    train_loader_data, val_loader_data, used_cache = _maybe_cache(model, train_data, val_data, cfg, device, world,
                                                                  say)
    forward = model.forward_head if used_cache else None

    steps_per_epoch = math.ceil(len(train_data) / world / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, total_steps))
    history: list[dict] = []
    best_score, best_epoch, bad_epochs, start = None, -1, 0, 0
    if resume:
        payload = ckpt.read_checkpoint(out / "final.pth")
        model.load_state_dict(payload["state_dict"])
        state = payload["extra"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best_score, best_epoch = state["history"], state["best_score"], state["best_epoch"]
        bad_epochs, start = state["bad_epochs"], state["epoch"] + 1
        torch.set_rng_state(state["torch_rng"])
        say(f"resumed from {str(out / 'final.pth')!r} at epoch {start + 1}/{cfg.epochs}")
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(out / "train_config.json", asdict(cfg))

    better = (lambda a, b: a > b) if MONITORS[cfg.monitor] == "max" else (lambda a, b: a < b)
    stopped_early = False
    train_model = model
    stages_now = None
    for epoch in range(start, cfg.epochs):
        if cfg.strategy == "gradual":
            stages = _stages_for_epoch(epoch, cfg)
            if stages != stages_now:
                _apply_strategy(model, cfg, epoch)
                stages_now = stages
                if world > 1:  # DDP fixes its parameter set at wrap time: re-wrap when it changes
                    train_model = nn.parallel.DistributedDataParallel(model)
        elif world > 1 and train_model is model:
            train_model = nn.parallel.DistributedDataParallel(model)
        t0 = time.perf_counter()
        train_loss = _train_epoch(train_model, forward, train_loader_data, criterion, optimizer, scheduler,
                                  cfg, epoch, device, labels, world, rank, sample_weights)
        if world > 1:
            _average_buffers(model, world)
        if used_cache:
            feats, y = val_loader_data
            with torch.no_grad():
                model.eval()
                probs = model.forward_head({k: v.to(device) for k, v in feats.items()}).float().softmax(1).cpu()
            metrics = classification_metrics(probs, y, class_names)
        else:
            metrics = evaluate(model, val_loader_data, class_names=class_names, batch_size=cfg.batch_size,
                               device=device, num_workers=cfg.num_workers)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": metrics["acc"],
               "val_macro_f1": metrics["macro_f1"], "val_nll": metrics["nll"], "val_ece": metrics["ece"],
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        history.append(row)
        score = metrics[cfg.monitor]
        improved = best_score is None or better(score, best_score)
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch + 1, 0
        else:
            bad_epochs += 1
        say(f"epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.4f}  val acc {metrics['acc']:.4f}  "
            f"macro-F1 {metrics['macro_f1']:.4f}  nll {metrics['nll']:.4f}  {row['seconds']:.1f}s"
            + ("  *best*" if improved else ""))
        if out is not None and rank == 0:
            summary = {**row, "monitor": cfg.monitor, "best_epoch": best_epoch}
            if improved:
                _save(model, out / "best.pth", summary, class_names)
            _save(model, out / "final.pth", summary, class_names, extra={
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "history": history, "best_score": best_score, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "torch_rng": torch.get_rng_state(), "train_config": asdict(cfg)})
            ckpt.atomic_write_json(out / "history.json", history)
            from fusionnet.plots import training_curves  # matplotlib only where a run folder is written

            training_curves(history, out / "history.png")
        if cfg.patience is not None and bad_epochs >= cfg.patience:
            say(f"early stop: {cfg.monitor} did not improve for {cfg.patience} epoch(s); best epoch {best_epoch}")
            stopped_early = True
            break
    if world > 1:
        dist.barrier()
    return FitResult(history=history, best_epoch=best_epoch, best_score=float(best_score), stopped_early=stopped_early,
                     out_dir=str(out) if out is not None else None, used_cache=used_cache)


def _maybe_cache(model, train_data, val_data, cfg: TrainConfig, device, world: int, say):
    """(train source, val source, cached?): cached feature tensors when the settings allow, else the datasets."""
    if cfg.strategy != "frozen" or cfg.cache_features is False:
        return train_data, val_data, False
    reason = supports_cache(model) or ("distributed training" if world > 1 else None)
    train_for_cache = train_data
    if reason is None and not _is_deterministic(train_data):
        if cfg.cache_features == "auto":
            reason = "the train pipeline is random (augmentation); cache_features=True caches it un-augmented"
        elif hasattr(train_data, "with_transform") and hasattr(val_data, "transform"):
            train_for_cache = train_data.with_transform(val_data.transform)
            say("feature cache: training on un-augmented train features (cache_features=True)")
        else:
            reason = "the train pipeline is random and the dataset cannot swap in the val pipeline"
    if reason is not None:
        if cfg.cache_features is True:
            raise ValueError(f"cache_features=True, but the features cannot be cached: {reason}")
        say(f"feature cache off: {reason}")
        return train_data, val_data, False
    cache_dir = cfg.cache_dir
    bar = (lambda it, d: tqdm(it, desc=d, leave=False)) if cfg.progress else (lambda it, d: it)
    kw = dict(cache_dir=cache_dir, batch_size=max(cfg.batch_size, 64), device=device, num_workers=cfg.num_workers)
    tr_f, tr_y, hit_tr = cached_features(model, train_for_cache, progress=lambda it: bar(it, "cache train"), **kw)
    va_f, va_y, hit_va = cached_features(model, val_data, progress=lambda it: bar(it, "cache val"), **kw)
    say(f"feature cache: train {'loaded' if hit_tr else 'computed'}, val {'loaded' if hit_va else 'computed'}"
        + (f" ({cache_dir!r})" if cache_dir else " (memory)"))
    return (tr_f, tr_y), (va_f, va_y), True


def _train_epoch(model, forward_head, source, criterion, optimizer, scheduler, cfg: TrainConfig, epoch: int,
                 device, labels, world: int, rank: int, sample_weights: torch.Tensor | None = None) -> float:
    epoch_seed = cfg.seed * 100_003 + epoch  # order and augmentation depend on (seed, epoch) only: resumable
    generator = torch.Generator().manual_seed(epoch_seed)
    if forward_head is not None:  # cached features: batches of indices into the feature tensors
        feats, y_all = source
        n = len(y_all)
        dataset: Dataset = TensorDataset(torch.arange(n))
    else:
        dataset, n = source, len(source)
    if world > 1:
        sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
    elif sample_weights is not None:
        if len(sample_weights) != n:
            raise ValueError(f"sample_weights has {len(sample_weights)} entries for {n} training samples")
        sampler = torch.utils.data.WeightedRandomSampler(torch.as_tensor(sample_weights, dtype=torch.double), n,
                                                         replacement=True, generator=generator)
    elif cfg.balanced_sampling:
        sampler = balanced_sampler(labels, generator=generator)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    _seed_pipeline(dataset, epoch_seed * 1_000 + rank)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        worker_init_fn=_seed_worker_pipeline, drop_last=False)
    model.train()
    aux_fn = getattr(_unwrap(model), "aux_logits", None)
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress or rank != 0, leave=False)
    for batch in bar:
        if forward_head is not None:
            (idx,) = batch
            x = {k: v[idx].to(device) for k, v in feats.items()}
            y = y_all[idx].to(device)
        else:
            x, y = batch[0].to(device), torch.as_tensor(batch[1]).to(device)
        with _autocast(device, cfg.amp):
            logits = forward_head(x) if forward_head is not None else model(x)
            loss = criterion(logits.float(), y)
            if aux_fn is not None and forward_head is None and cfg.aux_weight:
                for aux in aux_fn():  # main logits decide everything else; aux heads only add training signal
                    loss = loss + cfg.aux_weight * criterion(aux.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{total / count:.4f}")
    if world > 1:
        t = torch.tensor([total, count], dtype=torch.float64)
        dist.all_reduce(t)
        total, count = float(t[0]), float(t[1])
    return total / max(count, 1)


def _average_buffers(model: nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over ranks: each rank updated them from its own batches."""
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world)


def _seed_pipeline(dataset, seed: int) -> None:
    """Reseed an albumentations pipeline (it keeps its own RNG, untouched by torch/numpy seeds)."""
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def _seed_worker_pipeline(worker_id: int) -> None:
    """In a DataLoader worker: give each worker its own augmentation stream, derived from the epoch's seed."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(transform.seed * 64 + worker_id)


def _save(model: nn.Module, path: Path, metrics: dict, class_names, extra: dict | None = None) -> None:
    config = getattr(model, "config", None)
    ckpt.save_checkpoint(path, config=config.to_dict() if hasattr(config, "to_dict") else {},
                         state_dict=model.state_dict(), class_names=class_names, metrics=metrics, extra=extra)
