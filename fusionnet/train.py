"""The training loop: ``fit`` trains any classifier and picks its best epoch on validation.

It knows nothing about fusion: it talks to the model only through :mod:`fusionnet.interface` (a plain
``nn.Module`` returning logits is wrapped and trains with the ``full`` strategy). One loop serves image batches
and cached branch features alike (:class:`fusionnet.feature_cache.FeatureDataset`, through the model's head path).

A run folder holds ``best.pth`` (best validation score; the first of tied epochs), ``final.pth`` (last epoch,
with optimiser, scheduler and RNG state for ``resume=True``), ``history.json``, ``history.png`` and
``train_config.json``, all written atomically. The checkpoints are written after every epoch unless that would
take over a tenth of the training time (short epochs: then every few epochs, and always after the last one;
see :class:`_RunWriter`); the plot at the end. A non-finite loss stops training with a :class:`TrainingError`
that names the epoch and step; the checkpoints of the last good epoch stay as they were. Under ``torchrun`` it
trains with DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from fusionnet import checkpoints as ckpt
from fusionnet.data import (balanced_sampler, check_training_data, class_weights, eval_view, seed_pipeline,
                            seed_worker_pipeline)
from fusionnet.distributed import autocast, average_buffers, rank_world, setup_distributed, to_device
from fusionnet.errors import ConfigError, MissingFileError, TrainingError, check_settings, is_finite, is_int
from fusionnet.feature_cache import FeatureDataset, cache_blocker, cached_features
from fusionnet.files import atomic_write_json
from fusionnet.inference import evaluate
from fusionnet.interface import Classifier, TrainStep, as_classifier
from fusionnet.losses import make_loss

STRATEGIES = ("full", "frozen", "gradual")
MONITORS = {"acc": "max", "macro_f1": "max", "nll": "min", "ece": "min"}


@dataclass
class TrainConfig:
    """How to train. Every field is plain data and is written to ``train_config.json``."""

    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # the head's learning rate
    trunk_lr_mult: float = 1.0  # pretrained trunks learn at lr * this; 1 chosen on validation over 0.1 (flowers5_128
    # Lite0, 3 epochs: val acc 0.743 vs 0.662; digits: 0.66 vs 0.28 after one epoch; experiments/README.md)
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
    validate_start: bool = False  # also score the untrained starting point ("epoch 0") as a best.pth candidate

    def __post_init__(self) -> None:
        check_settings([
            (is_int(self.epochs) and self.epochs >= 1, f"epochs must be an int >= 1, got {self.epochs!r}"),
            (is_int(self.batch_size) and self.batch_size >= 1,
             f"batch_size must be an int >= 1, got {self.batch_size!r}"),
            (is_int(self.num_workers) and self.num_workers >= 0,
             f"num_workers must be an int >= 0, got {self.num_workers!r}"),
            (self.optimizer in ("adamw", "sgd"), f"unknown optimizer {self.optimizer!r}; choose 'adamw' or 'sgd'"),
            (is_finite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr!r}"),
            (is_finite(self.trunk_lr_mult) and self.trunk_lr_mult >= 0,
             f"trunk_lr_mult must be >= 0, got {self.trunk_lr_mult!r}"),
            (is_finite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0, got {self.weight_decay!r}"),
            (is_finite(self.label_smoothing) and 0 <= self.label_smoothing < 1,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}"),
            (is_finite(self.aux_weight) and self.aux_weight >= 0, f"aux_weight must be >= 0, got {self.aux_weight!r}"),
            (self.grad_clip is None or (is_finite(self.grad_clip) and self.grad_clip > 0),
             f"grad_clip must be > 0 or None, got {self.grad_clip!r}"),
            (is_finite(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}"),
            (self.strategy in STRATEGIES, f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"),
            (self.monitor in MONITORS, f"unknown monitor {self.monitor!r}; choose one of {', '.join(MONITORS)}"),
            (self.loss in ("ce", "focal"), f"unknown loss {self.loss!r}; choose 'ce' or 'focal'"),
            (self.patience is None or self.patience >= 1, f"patience must be >= 1 or None, got {self.patience!r}"),
            (self.amp in ("auto", True, False), f"amp must be 'auto', True or False, got {self.amp!r}"),
            (self.cache_features in ("auto", True, False),
             f"cache_features must be 'auto', True or False, got {self.cache_features!r}"),
        ])


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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: Classifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Two parameter groups: the model's trunk parameters at ``lr * trunk_lr_mult``, everything else at ``lr``."""
    trunk = model.trunk_parameters()
    ids = {id(p) for p in trunk}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": cfg.lr, "name": "head"},
              {"params": trunk, "lr": cfg.lr * cfg.trunk_lr_mult, "name": "trunk"}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def stages_for_epoch(epoch: int, cfg: TrainConfig) -> int | None:
    """How many top trunk stages train in ``epoch`` (0-based): None (all) for ``full``, 0 for ``frozen``."""
    if cfg.strategy == "full":
        return None
    if cfg.strategy == "frozen" or epoch < cfg.unfreeze_after:
        return 0
    return (1 + (epoch - cfg.unfreeze_after) // cfg.unfreeze_every) * cfg.stages_per_step


def _is_deterministic(dataset) -> bool:
    """Whether the pipeline gives the same tensor twice for the same sample (no random augmentation)."""
    a, b = dataset[0][0], dataset[0][0]
    return isinstance(a, torch.Tensor) and torch.equal(a, b)


# ---- fit -------------------------------------------------------------------------------------------------------
def fit(model: nn.Module, train_data: Dataset, val_data: Dataset, config: TrainConfig | None = None, *,
        out_dir: str | Path | None = None, resume: bool = False,
        log: Callable[[str], None] | None = print, sample_weights: torch.Tensor | None = None) -> FitResult:
    """Train ``model`` on ``train_data``, choosing the best epoch on ``val_data``; see the module docstring.

    ``sample_weights`` (N,) draws training samples in proportion to them, with replacement (boosting by
    resampling); it replaces ``balanced_sampling``.
    """
    cfg = config or TrainConfig()
    clf = as_classifier(model)
    device = setup_distributed(cfg.device)
    rank, world = rank_world()
    say = log if (log is not None and rank == 0) else (lambda _msg: None)
    class_names = clf.class_names or getattr(train_data, "class_names", None)
    num_classes = len(class_names) if class_names else None
    check_training_data(train_data, val_data, num_classes)
    seed_everything(cfg.seed)
    out = Path(out_dir) if out_dir is not None else None
    if resume and (out is None or not (out / "final.pth").is_file()):
        raise MissingFileError(f"resume=True needs {str(out / 'final.pth') if out else 'out_dir'!r} from an "
                               f"earlier run; pass the run folder as out_dir")
    clf.to(device)
    labels = list(getattr(train_data, "labels", []))
    weight = None
    if cfg.class_weighting or cfg.balanced_sampling:
        if not labels or num_classes is None:
            raise ConfigError("class_weighting / balanced_sampling need a dataset with .labels and .class_names")
    if cfg.class_weighting:
        weight = class_weights(labels, num_classes).to(device)
    criterion = make_loss(cfg.loss, weight=weight, label_smoothing=cfg.label_smoothing, gamma=cfg.focal_gamma)

    clf.set_trainable_stages(stages_for_epoch(0, cfg))
    train_src, val_src, used_cache = _maybe_cache(clf, train_data, val_data, cfg, device, world, say)
    step_module = TrainStep(clf, cached=used_cache)

    steps_per_epoch = math.ceil(len(train_data) / world / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    optimizer = make_optimizer(clf, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))
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
        atomic_write_json(out / "train_config.json", asdict(cfg))

    better = (lambda a, b: a > b) if MONITORS[cfg.monitor] == "max" else (lambda a, b: a < b)
    writer = _RunWriter(out, clf, class_names, cfg) if out is not None and rank == 0 else None
    stopped_early = False
    train_module: nn.Module = step_module
    stages_now = stages_for_epoch(0, cfg)
    if cfg.validate_start and start == 0:
        metrics = _validate(clf, val_src, class_names, cfg, device)
        best_score, best_epoch = metrics[cfg.monitor], 0
        say(f"epoch 0 (start)  val acc {metrics['acc']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
            f"nll {metrics['nll']:.4f}  *best*")
        if out is not None and rank == 0:
            ckpt.save_checkpoint(out / "best.pth", config=clf.model_config(), state_dict=model.state_dict(),
                                 class_names=class_names, metrics={"epoch": 0, "val_acc": metrics["acc"],
                                                                   "monitor": cfg.monitor, "best_epoch": 0})
    for epoch in range(start, cfg.epochs):
        stages = stages_for_epoch(epoch, cfg)
        if stages != stages_now:
            clf.set_trainable_stages(stages)
            stages_now = stages
            train_module = step_module  # DDP fixes its parameter set at wrap time: re-wrap when it changes
        if world > 1 and train_module is step_module:
            train_module = nn.parallel.DistributedDataParallel(step_module)
        t0 = time.perf_counter()
        train_loss = _train_epoch(train_module, train_src, criterion, optimizer, scheduler, cfg, epoch, device,
                                  labels, world, rank, sample_weights)
        if world > 1:
            average_buffers(clf, world)
        metrics = _validate(clf, val_src, class_names, cfg, device)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": metrics["acc"],
               "val_macro_f1": metrics["macro_f1"], "val_nll": metrics["nll"], "val_ece": metrics["ece"],
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
               "trainable_params": sum(p.numel() for p in clf.parameters() if p.requires_grad)}
        history.append(row)
        score = metrics[cfg.monitor]
        improved = best_score is None or better(score, best_score)  # strict: the first of tied epochs stays
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch + 1, 0
        else:
            bad_epochs += 1
        say(f"epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.4f}  val acc {metrics['acc']:.4f}  "
            f"macro-F1 {metrics['macro_f1']:.4f}  nll {metrics['nll']:.4f}  {row['seconds']:.1f}s"
            + ("  *best*" if improved else ""))
        stop = cfg.patience is not None and bad_epochs >= cfg.patience
        if writer is not None:
            writer.epoch(model, row, improved, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "history": history, "best_score": best_score, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "torch_rng": torch.get_rng_state(), "train_config": asdict(cfg)}, last=stop or epoch + 1 == cfg.epochs)
        if stop:
            say(f"early stop: {cfg.monitor} did not improve for {cfg.patience} epoch(s); best epoch {best_epoch}")
            stopped_early = True
            break
    if writer is not None and history:
        writer.finish(history)
    if world > 1:
        dist.barrier()
    return FitResult(history=history, best_epoch=best_epoch, best_score=float(best_score), stopped_early=stopped_early,
                     out_dir=str(out) if out is not None else None, used_cache=used_cache)


def _validate(clf: Classifier, val_src, class_names, cfg: TrainConfig, device) -> dict:
    """Validation metrics in the training precision and memory format (the weights being trained stay as they are)."""
    return evaluate(clf, val_src, class_names=class_names, batch_size=max(cfg.batch_size, 64), device=device,
                    amp=cfg.amp, channels_last=False,
                    num_workers=0 if isinstance(val_src, FeatureDataset) else cfg.num_workers)


WRITE_SHARE = 0.1  # the share of training time that checkpoint writes may take (see _RunWriter)


class _RunWriter:
    """The run folder's per-epoch files: ``history.json`` every epoch; ``best.pth`` and ``final.pth`` (the resume
    point) together, every epoch unless writing them would take more than WRITE_SHARE of the training time since
    the last write (short epochs, e.g. a head on cached features beside three trunks' weights: then every few
    epochs, so a crash loses at most ~10 write times of work); always after the last epoch or an early stop;
    ``history.png`` at the end. An improved epoch that is not written yet is kept in memory (on the CPU)."""

    def __init__(self, out: Path, clf: Classifier, class_names, cfg: TrainConfig) -> None:
        self.out, self.clf, self.class_names, self.cfg = out, clf, class_names, cfg
        self.write_s, self.since_s = 0.0, 0.0
        self.best: tuple[dict | None, dict] | None = None  # (state dict or None: the model as it is, metrics)

    def epoch(self, model: nn.Module, row: dict, improved: bool, resume_state: dict, last: bool) -> None:
        summary = {**row, "monitor": self.cfg.monitor, "best_epoch": resume_state["best_epoch"]}
        self.since_s += row["seconds"]
        due = last or self.since_s * WRITE_SHARE >= self.write_s
        if improved:
            state = None if due else {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best = (state, summary)
        atomic_write_json(self.out / "history.json", resume_state["history"])
        if not due:
            return
        t0 = time.perf_counter()
        config = self.clf.model_config()
        if self.best is not None:  # written first: final.pth's resume state never names a best epoch not on disk
            state, best_summary = self.best
            ckpt.save_checkpoint(self.out / "best.pth", config=config, class_names=self.class_names,
                                 state_dict=state if state is not None else model.state_dict(),
                                 metrics=best_summary)
            self.best = None
        ckpt.save_checkpoint(self.out / "final.pth", config=config, state_dict=model.state_dict(),
                             class_names=self.class_names, metrics=summary, extra=resume_state)
        self.write_s, self.since_s = time.perf_counter() - t0, 0.0

    def finish(self, history: list[dict]) -> None:
        from fusionnet.plots import training_curves  # matplotlib only where a run folder is written

        training_curves(history, self.out / "history.png")


def _maybe_cache(clf: Classifier, train_data, val_data, cfg: TrainConfig, device, world: int, say):
    """(train source, val source, cached?): FeatureDatasets when the settings allow, else the datasets."""
    if cfg.strategy != "frozen" or cfg.cache_features is False:
        return train_data, val_data, False
    reason = cache_blocker(clf) or ("distributed training" if world > 1 else None)
    train_for_cache = train_data
    if reason is None and not _is_deterministic(train_data):
        if cfg.cache_features == "auto":
            reason = "the train pipeline is random (augmentation); cache_features=True caches it un-augmented"
        elif hasattr(train_data, "with_transform") and hasattr(val_data, "transform"):
            train_for_cache = eval_view(train_data, val_data)
            say("feature cache: training on un-augmented train features (cache_features=True)")
        else:
            reason = "the train pipeline is random and the dataset cannot swap in the val pipeline"
    if reason is not None:
        if cfg.cache_features is True:
            raise ConfigError(f"cache_features=True, but the features cannot be cached: {reason}")
        say(f"feature cache off: {reason}")
        return train_data, val_data, False
    bar = (lambda d: (lambda it: tqdm(it, desc=d, leave=False))) if cfg.progress else (lambda d: None)
    kw = dict(cache_dir=cfg.cache_dir, batch_size=max(cfg.batch_size, 64), device=device,
              num_workers=cfg.num_workers)
    train_f, hit_tr = cached_features(clf, train_for_cache, progress=bar("cache train"), **kw)
    val_f, hit_va = cached_features(clf, val_data, progress=bar("cache val"), **kw)
    say(f"feature cache: train {'loaded' if hit_tr else 'computed'}, val {'loaded' if hit_va else 'computed'}"
        + (f" ({cfg.cache_dir!r})" if cfg.cache_dir else " (memory)"))
    return train_f, val_f, True


def _sampler(dataset, cfg: TrainConfig, epoch: int, generator, labels, world: int, sample_weights):
    if world > 1:
        sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
        return sampler
    if sample_weights is not None:
        if len(sample_weights) != len(dataset):
            raise ConfigError(f"sample_weights has {len(sample_weights)} entries for {len(dataset)} training samples")
        return torch.utils.data.WeightedRandomSampler(torch.as_tensor(sample_weights, dtype=torch.double),
                                                      len(dataset), replacement=True, generator=generator)
    if cfg.balanced_sampling:
        return balanced_sampler(labels, generator=generator)
    return torch.utils.data.RandomSampler(dataset, generator=generator)


def _train_epoch(step: nn.Module, dataset, criterion, optimizer, scheduler, cfg: TrainConfig, epoch: int, device,
                 labels, world: int, rank: int, sample_weights: torch.Tensor | None = None) -> float:
    """One pass over ``dataset``; ``step`` maps a batch to a ModelOutput (a TrainStep, DDP-wrapped under torchrun)."""
    epoch_seed = cfg.seed * 100_003 + epoch  # order and augmentation depend on (seed, epoch) only: resumable
    generator = torch.Generator().manual_seed(epoch_seed)
    sampler = _sampler(dataset, cfg, epoch, generator, labels, world, sample_weights)
    seed_pipeline(dataset, epoch_seed * 1_000 + rank)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        worker_init_fn=seed_worker_pipeline, pin_memory=device.type == "cuda")
    step.train()
    model: Classifier = step.module.model if isinstance(step, nn.parallel.DistributedDataParallel) else step.model
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress or rank != 0, leave=False)
    for i, (x, y) in enumerate(bar):
        x, y = to_device(x, device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            out = step(x)
            loss = criterion(out.logits.float(), y)
            for aux in out.aux.values() if cfg.aux_weight else ():  # aux heads only add training signal
                loss = loss + cfg.aux_weight * criterion(aux.float(), y)
            for term in model.extra_losses(out, y).values():
                loss = loss + term
        if not torch.isfinite(loss):
            raise TrainingError(f"the training loss became {float(loss)} at epoch {epoch + 1}, step {i + 1}; "
                                f"training stopped and the checkpoints of the last good epoch were kept. Lower "
                                f"lr (now {cfg.lr}), keep grad_clip on, or check the data for broken images")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.modulate_gradients(out, y)
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
