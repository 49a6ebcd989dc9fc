"""The training loop: ``fit`` trains any classifier and picks its best epoch on validation.

It knows nothing about fusion: it talks to the model only through :mod:`fusionnet.interface` (a plain
``nn.Module`` returning logits is wrapped and trains with the ``full`` strategy). One loop serves image batches
and cached branch features alike (:class:`fusionnet.feature_cache.FeatureDataset`, through the model's head path).

A run folder holds ``best.pth`` (best validation score; the first of tied epochs), ``final.pth`` (last epoch,
with optimiser, scheduler and RNG state for ``resume=True``), ``history.json``, ``history.png`` and
``train_config.json``, all written atomically. The checkpoints are written after every epoch unless that would
take over a tenth of the training time (short epochs: then every few epochs, and always after the last one;
see :class:`fusionnet.run_writer.RunWriter`); the plot at the end. A non-finite loss stops training with a :class:`TrainingError`
that names the epoch and step; the checkpoints of the last good epoch stay as they were. Under ``torchrun`` it
trains with DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from fusionnet import checkpoints as ckpt
from fusionnet.callbacks import Callback
from fusionnet.callbacks import from_config as callbacks_from_config
from fusionnet.config import MONITORS, STRATEGIES, TrainConfig  # noqa: F401  (STRATEGIES, TrainConfig: re-exported)
from fusionnet.datasets import as_dataset, training_record
from fusionnet.data import (balanced_sampler, check_training_data, class_weights, eval_view, seed_pipeline,
                            seed_worker_pipeline)
from fusionnet.distributed import autocast, average_buffers, rank_world, setup_distributed, to_device
from fusionnet.errors import CheckpointMismatchError, ConfigError, MissingFileError, TrainingError
from fusionnet.feature_cache import FeatureDataset, cache_blocker, cached_features
from fusionnet.files import atomic_write_json
from fusionnet.run_writer import RunWriter
from fusionnet.inference import evaluate
from fusionnet.interface import Classifier, TrainStep, as_classifier
from fusionnet.losses import make_loss
from fusionnet.optim import lr_factor, make_optimizer  # noqa: F401  (re-exported)



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
@dataclass
class _Run:
    """What one call of :func:`fit` holds while it trains: set up by :func:`_setup`, advanced by :func:`_epoch`."""

    cfg: TrainConfig
    model: nn.Module  # as given (its state dict is what checkpoints hold)
    clf: Classifier
    device: torch.device
    rank: int
    world: int
    say: Callable[[str], None]
    class_names: list[str] | None
    criterion: nn.Module
    train_src: Dataset
    val_src: Dataset
    used_cache: bool
    step_module: TrainStep
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    labels: list[int]
    sample_weights: torch.Tensor | None
    callbacks: list[Callback]
    out: Path | None
    writer: RunWriter | None
    data: dict | None = None  # what the model is trained on (fusionnet.datasets.training_record), in checkpoints
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    start: int = 0

    def resume_state(self, epoch: int) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "epoch": epoch,
                "history": self.history, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "torch_rng": torch.get_rng_state(), "train_config": asdict(self.cfg)}


def fit(model: nn.Module, train_data: Dataset, val_data: Dataset, config: TrainConfig | None = None, *,
        out_dir: str | Path | None = None, resume: bool = False, log: Callable[[str], None] | None = print,
        sample_weights: torch.Tensor | None = None, callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train ``model`` on ``train_data``, choosing the best epoch on ``val_data``; see the module docstring.

    ``sample_weights`` (N,) draws training samples in proportion to them, with replacement (boosting by
    resampling); it replaces ``balanced_sampling``. ``callbacks`` (:mod:`fusionnet.callbacks`) run beside those
    the config asks for (``checkpoint_activations``, ``branch_streams``, ``ogm_alpha``).
    """
    run = _setup(model, train_data, val_data, config or TrainConfig(), out_dir, resume, log, sample_weights,
                 callbacks)
    for cb in run.callbacks:
        cb.on_fit_start(run.clf)
    try:
        stopped_early = _epochs(run)
    finally:
        for cb in run.callbacks:
            cb.on_fit_end(run.clf)
    if run.writer is not None and run.history:
        run.writer.finish(run.history)
    if run.world > 1:
        dist.barrier()
    return FitResult(history=run.history, best_epoch=run.best_epoch, best_score=float(run.best_score),
                     stopped_early=stopped_early, out_dir=str(run.out) if run.out is not None else None,
                     used_cache=run.used_cache)


def _setup(model, train_data, val_data, cfg: TrainConfig, out_dir, resume: bool, log, sample_weights,
           callbacks: Sequence[Callback]) -> _Run:
    """Everything before the first epoch: device, checks, loss, feature cache, optimiser, resume state."""
    clf = as_classifier(model)
    train_data, val_data = as_dataset(train_data), as_dataset(val_data)  # the dataset protocol (datasets.py)
    device = setup_distributed(cfg.device)
    rank, world = rank_world()
    say = log if (log is not None and rank == 0) else (lambda _msg: None)
    class_names = clf.class_names or train_data.class_names
    num_classes = len(class_names) if class_names else None
    check_training_data(train_data, val_data, num_classes)
    seed_everything(cfg.seed)
    out = Path(out_dir) if out_dir is not None else None
    if resume and (out is None or not (out / "final.pth").is_file()):
        raise MissingFileError(f"resume=True needs {str(out / 'final.pth') if out else 'out_dir'!r} from an "
                               f"earlier run; pass the run folder as out_dir")
    clf.to(device)
    labels = train_data.labels
    if (cfg.class_weighting or cfg.balanced_sampling) and (labels is None or num_classes is None):
        raise ConfigError("class_weighting / balanced_sampling need a dataset that knows its labels and class names "
                          "(a fusionnet.datasets.LabelledData such as FolderImages)")
    weight = class_weights(labels, num_classes).to(device) if cfg.class_weighting else None
    criterion = make_loss(cfg.loss, weight=weight, label_smoothing=cfg.label_smoothing, gamma=cfg.focal_gamma)
    clf.set_trainable_stages(stages_for_epoch(0, cfg))
    train_src, val_src, used_cache = _maybe_cache(clf, train_data, val_data, cfg, device, world, say)
    steps_per_epoch = math.ceil(len(train_data) / world / cfg.batch_size)
    total_steps, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    optimizer = make_optimizer(clf, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))
    data = training_record(train_data, cfg.seed)
    run = _Run(cfg, model, clf, device, rank, world, say, class_names, criterion, train_src, val_src, used_cache,
               TrainStep(clf, cached=used_cache), optimizer, scheduler, labels, sample_weights,
               [*callbacks_from_config(cfg), *callbacks], out,
               RunWriter(out, clf, class_names, cfg, data) if out is not None and rank == 0 else None, data)
    if resume:
        _resume(run)
    if out is not None and rank == 0:
        atomic_write_json(out / "train_config.json", asdict(cfg))
    return run


def _resume(run: _Run) -> None:
    payload = ckpt.read_checkpoint(run.out / "final.pth")
    run.model.load_state_dict(payload["state_dict"])
    state = payload["extra"]
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:  # e.g. a frozen run of fusionnet 0.2, whose optimiser also held the trunk weights
        raise CheckpointMismatchError(f"{str(run.out / 'final.pth')!r}: its optimiser state does not fit this "
                                      f"run's parameters ({exc}); it was written with other settings or an older "
                                      f"fusionnet: start a new run (without resume)") from exc
    run.scheduler.load_state_dict(state["scheduler"])
    run.history, run.best_score, run.best_epoch = state["history"], state["best_score"], state["best_epoch"]
    run.bad_epochs, run.start = state["bad_epochs"], state["epoch"] + 1
    torch.set_rng_state(state["torch_rng"])
    run.say(f"resumed from {str(run.out / 'final.pth')!r} at epoch {run.start + 1}/{run.cfg.epochs}")


def _epochs(run: _Run) -> bool:
    """The epoch loop from ``run.start``; True when early stopping ended it."""
    cfg = run.cfg
    if cfg.validate_start and run.start == 0:
        _score_start(run)
    train_module: nn.Module = run.step_module
    stages_now = stages_for_epoch(0, cfg)
    for epoch in range(run.start, cfg.epochs):
        stages = stages_for_epoch(epoch, cfg)
        if stages != stages_now:
            run.clf.set_trainable_stages(stages)
            stages_now = stages
            train_module = run.step_module  # DDP fixes its parameter set at wrap time: re-wrap when it changes
        if run.world > 1 and train_module is run.step_module:
            train_module = nn.parallel.DistributedDataParallel(run.step_module)
        if _epoch(run, train_module, epoch):
            run.say(f"early stop: {cfg.monitor} did not improve for {cfg.patience} epoch(s); best epoch "
                    f"{run.best_epoch}")
            return True
    return False


def _score_start(run: _Run) -> None:
    """Validate the untrained starting point as "epoch 0", a best.pth candidate."""
    metrics = _validate(run.clf, run.val_src, run.class_names, run.cfg, run.device)
    run.best_score, run.best_epoch = metrics[run.cfg.monitor], 0
    run.say(f"epoch 0 (start)  val acc {metrics['acc']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
            f"nll {metrics['nll']:.4f}  *best*")
    if run.out is not None and run.rank == 0:
        ckpt.save_checkpoint(run.out / "best.pth", config=run.clf.model_config(), state_dict=run.model.state_dict(),
                             class_names=run.class_names, data=run.data,
                             metrics={"epoch": 0, "val_acc": metrics["acc"], "monitor": run.cfg.monitor,
                                      "best_epoch": 0})


def _epoch(run: _Run, train_module: nn.Module, epoch: int) -> bool:
    """Train one epoch, validate, record and write; True when early stopping is due."""
    cfg = run.cfg
    t0 = time.perf_counter()
    train_loss = _train_epoch(run, train_module, epoch)
    if run.world > 1:
        average_buffers(run.clf, run.world)
    metrics = _validate(run.clf, run.val_src, run.class_names, cfg, run.device)
    row = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": metrics["acc"],
           "val_macro_f1": metrics["macro_f1"], "val_nll": metrics["nll"], "val_ece": metrics["ece"],
           "lr": run.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
           "trainable_params": sum(p.numel() for p in run.clf.parameters() if p.requires_grad)}
    run.history.append(row)
    score = metrics[cfg.monitor]
    improved = run.best_score is None or (  # strict: the first of tied epochs stays
        score > run.best_score if MONITORS[cfg.monitor] == "max" else score < run.best_score)
    if improved:
        run.best_score, run.best_epoch, run.bad_epochs = score, epoch + 1, 0
    else:
        run.bad_epochs += 1
    run.say(f"epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.4f}  val acc {metrics['acc']:.4f}  "
            f"macro-F1 {metrics['macro_f1']:.4f}  nll {metrics['nll']:.4f}  {row['seconds']:.1f}s"
            + ("  *best*" if improved else ""))
    stop = cfg.patience is not None and run.bad_epochs >= cfg.patience
    if run.writer is not None:
        run.writer.epoch(run.model, row, improved, run.resume_state(epoch), last=stop or epoch + 1 == cfg.epochs)
    return stop


def _validate(clf: Classifier, val_src, class_names, cfg: TrainConfig, device) -> dict:
    """Validation metrics in the training precision and memory format (the weights being trained stay as they are)."""
    return evaluate(clf, val_src, class_names=class_names, batch_size=max(cfg.batch_size, 64), device=device,
                    amp=cfg.amp, channels_last=False,
                    num_workers=0 if isinstance(val_src, FeatureDataset) else cfg.num_workers)


def _maybe_cache(clf: Classifier, train_data, val_data, cfg: TrainConfig, device, world: int, say):
    """(train source, val source, cached?): FeatureDatasets when the settings allow, else the datasets."""
    if cfg.strategy != "frozen" or cfg.cache_features is False:
        return train_data, val_data, False
    reason = cache_blocker(clf) or ("distributed training" if world > 1 else None)
    train_for_cache = train_data
    if reason is None and not _is_deterministic(train_data):
        try:  # frozen trunks: un-augmented cached features, as good on validation and many times faster (config.py)
            train_for_cache = eval_view(train_data, val_data)
            say("feature cache: training on un-augmented train features (frozen trunks; --cache-features false "
                "trains on augmented images instead)")
        except ConfigError as exc:
            reason = f"the train pipeline is random and {exc}"
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


def _train_epoch(run: _Run, step: nn.Module, epoch: int) -> float:
    """One pass over the training source; ``step`` maps a batch to a ModelOutput (a TrainStep, DDP-wrapped under
    torchrun)."""
    cfg, dataset = run.cfg, run.train_src
    epoch_seed = cfg.seed * 100_003 + epoch  # order and augmentation depend on (seed, epoch) only: resumable
    generator = torch.Generator().manual_seed(epoch_seed)
    sampler = _sampler(dataset, cfg, epoch, generator, run.labels, run.world, run.sample_weights)
    seed_pipeline(dataset, epoch_seed * 1_000 + run.rank)
    if isinstance(dataset, FeatureDataset):  # cached features: whole batches by indexing, the same batches
        loader = dataset.batches(sampler, cfg.batch_size)
    else:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                            worker_init_fn=seed_worker_pipeline, pin_memory=run.device.type == "cuda")
    step.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress or run.rank != 0,
               leave=False, total=math.ceil(len(sampler) / cfg.batch_size))
    for i, (x, y) in enumerate(bar):
        x, y = to_device(x, run.device, non_blocking=True), torch.as_tensor(y).to(run.device, non_blocking=True)
        loss = _step(run, step, x, y, epoch, i)
        total += float(loss) * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{total / count:.4f}")
    if run.world > 1:
        t = torch.tensor([total, count], dtype=torch.float64)
        dist.all_reduce(t)
        total, count = float(t[0]), float(t[1])
    return total / max(count, 1)


def _step(run: _Run, step: nn.Module, x, y: torch.Tensor, epoch: int, i: int) -> torch.Tensor:
    """Forward, loss (task + aux heads + callbacks' terms), backward, callbacks, clip, step; returns the loss."""
    cfg = run.cfg
    with autocast(run.device, cfg.amp):
        out = step(x)
        loss = run.criterion(out.logits.float(), y)
        for aux in out.aux.values() if cfg.aux_weight else ():  # aux heads only add training signal
            loss = loss + cfg.aux_weight * run.criterion(aux.float(), y)
        for cb in run.callbacks:
            for term in cb.extra_loss(run.clf, out, y).values():
                loss = loss + term
    if not torch.isfinite(loss):
        raise TrainingError(f"the training loss became {float(loss)} at epoch {epoch + 1}, step {i + 1}; "
                            f"training stopped and the checkpoints of the last good epoch were kept. Lower "
                            f"lr (now {cfg.lr}), keep grad_clip on, or check the data for broken images")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for cb in run.callbacks:
        cb.on_after_backward(run.clf, out, y)
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"] if p.grad is not None],
                                 cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    return loss.detach()
