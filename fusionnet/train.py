"""The training loop: ``fit`` trains any classifier and picks its best epoch on validation.

It knows nothing about fusion: it talks to the model only through :mod:`fusionnet.interface` (a plain
``nn.Module`` returning logits is wrapped and trains with the ``full`` strategy). One loop serves image batches
and cached branch features alike (:class:`fusionnet.feature_cache.FeatureDataset`, through the model's head path).

A run folder holds ``best.pth`` (best validation score; the first of tied epochs), ``final.pth`` (last epoch,
with optimiser, scheduler and RNG state for ``resume=True``), ``history.json``, ``history.png`` and
``train_config.json``, all written atomically. The checkpoints are written after every epoch unless that would
take over a tenth of the training time (short epochs: then every few epochs, and always after the last one;
see :class:`fusionnet.run_writer.RunWriter`); the plot at the end. A non-finite loss stops training with a
:class:`TrainingError` that names the epoch and the first bad step; the checkpoints of the last good epoch stay as
they were. The step never waits for the GPU: the running loss and the first non-finite step are kept on the device
and read every ``sync_every`` steps and at the epoch's end. Under ``torchrun`` it trains with
DistributedDataParallel; only rank 0 writes.

Inputs come from one of three sources: cached branch features (frozen trunks), the GPU input path
(:mod:`fusionnet.device_input`: uint8 images in device memory, augmented a batch at a time; ``device_augment``), or
a DataLoader over the dataset's per-image pipeline.
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
from torch.utils.data import Dataset, DistributedSampler
from tqdm.auto import tqdm

from fusionnet import checkpoints as ckpt
from fusionnet.callbacks import Callback
from fusionnet.callbacks import from_config as callbacks_from_config
from fusionnet.config import MONITORS, STRATEGIES, TrainConfig, resolved  # noqa: F401  (STRATEGIES, TrainConfig: re-exported)
from fusionnet.datasets import as_dataset, training_record
from fusionnet.device_input import BatchAugment, DeviceImages, fits
from fusionnet.data import balanced_sampler, check_training_data, class_weights, eval_view
from fusionnet.distributed import autocast, average_buffers, rank_world, setup_distributed, to_device
from fusionnet.errors import CheckpointMismatchError, ConfigError, MissingFileError, TrainingError
from fusionnet.feature_cache import FeatureDataset, cache_blocker, cached_features
from fusionnet.files import atomic_write_json
from fusionnet.run_writer import RunWriter
from fusionnet.inference import evaluate
from fusionnet.loader import training_loader
from fusionnet.interface import Classifier, PlainClassifier, TrainStep, as_classifier
from fusionnet.losses import make_loss
from fusionnet.optim import lr_factor, make_optimizer  # noqa: F401  (re-exported)
from fusionnet.transforms import spec_of



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
    device_images: DeviceImages | None = None  # the GPU input path (device_input.py), when it is on
    augment: BatchAugment | None = None
    mix: Callable | None = None  # timm's Mixup (mixup / cutmix): (x, y) -> (mixed x, soft targets)
    loader: tuple | None = None  # (DataLoader, EpochSampler) of the per-image path, built once per run (loader.py)
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    start: int = 0

    def resume_state(self, epoch: int) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "epoch": epoch,
                 "history": self.history, "best_score": self.best_score, "best_epoch": self.best_epoch,
                 "bad_epochs": self.bad_epochs, "torch_rng": torch.get_rng_state(), "train_config": asdict(self.cfg),
                 "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks}}
        if self.evaluated is not self.clf:  # the saved weights are the validated ones (EMA): keep the trained ones
            state["trained_state_dict"] = self.model.state_dict()
        return state

    @property
    def evaluated(self) -> Classifier:
        """The model validated and saved: a callback's (EMA) if one offers it, else the one being trained."""
        return next((m for cb in self.callbacks if (m := cb.eval_model()) is not None), self.clf)

    @property
    def saved(self) -> nn.Module:
        """The module whose state dict the checkpoints hold (the user's model, or its EMA copy)."""
        if self.evaluated is self.clf:
            return self.model
        return self.evaluated.module if isinstance(self.evaluated, PlainClassifier) else self.evaluated


def fit(model: nn.Module, train_data: Dataset, val_data: Dataset, config: TrainConfig | None = None, *,
        out_dir: str | Path | None = None, resume: bool = False, log: Callable[[str], None] | None = print,
        sample_weights: torch.Tensor | None = None, callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train ``model`` on ``train_data``, choosing the best epoch on ``val_data``; see the module docstring.

    ``sample_weights`` (N,) draws training samples in proportion to them, with replacement (boosting by
    resampling); it replaces ``balanced_sampling``. ``callbacks`` (:mod:`fusionnet.callbacks`) run beside those
    the config asks for (``checkpoint_activations``, ``branch_streams``, ``ogm_alpha``).
    """
    cfg = resolved(config or TrainConfig(), len(train_data))  # budget 'hyperrule' -> epochs for this data
    run = _setup(model, train_data, val_data, cfg, out_dir, resume, log, sample_weights, callbacks)
    for cb in run.callbacks:
        cb.on_fit_start(run.clf)
        cb.on_schedule(_steps_per_epoch(len(train_data), cfg, run.world, drop_last=run.mix is not None), cfg.epochs)
    if resume:
        _resume(run)
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
    mix = _mixup(cfg, num_classes)
    criterion = make_loss(cfg.loss, weight=weight, label_smoothing=0.0 if mix else cfg.label_smoothing,
                          gamma=cfg.focal_gamma)  # with mixup, its soft targets carry the smoothing
    clf.set_trainable_stages(stages_for_epoch(0, cfg))
    train_src, val_src, used_cache = _maybe_cache(clf, train_data, val_data, cfg, device, world, say)
    steps_per_epoch = _steps_per_epoch(len(train_data), cfg, world, drop_last=mix is not None)
    total_steps, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    optimizer = make_optimizer(clf, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))
    data = training_record(train_data, cfg.seed)
    step_module = TrainStep(clf, cached=used_cache)
    run = _Run(cfg, model, clf, device, rank, world, say, class_names, criterion, train_src, val_src, used_cache,
               torch.compile(step_module) if cfg.compile else step_module, optimizer, scheduler, labels,
               sample_weights, [*callbacks_from_config(cfg), *callbacks], out,
               RunWriter(out, clf, class_names, cfg, data) if out is not None and rank == 0 else None, data, mix=mix)
    if not used_cache:
        _maybe_device_input(run, train_data)
    if out is not None and rank == 0:
        atomic_write_json(out / "train_config.json", asdict(cfg))
    return run


def _steps_per_epoch(n: int, cfg: TrainConfig, world: int, drop_last: bool) -> int:
    per_rank = math.ceil(n / world)
    return max(per_rank // cfg.batch_size, 1) if drop_last else math.ceil(per_rank / cfg.batch_size)


def _mixup(cfg: TrainConfig, num_classes: int | None):
    """timm's Mixup for ``mixup`` / ``cutmix`` (one of them per batch when both are on), or None."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    if num_classes is None:
        raise ConfigError("mixup/cutmix need the number of classes: give a dataset with class names (a "
                          "fusionnet.datasets.LabelledData such as FolderImages) or a model that knows them")
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def _maybe_device_input(run: _Run, train_data) -> None:
    """Switch ``run`` to the GPU input path (:mod:`fusionnet.device_input`) when ``device_augment`` allows it."""
    cfg = run.cfg
    if cfg.device_augment is False or (cfg.device_augment == "auto" and run.device.type != "cuda"):
        return  # the CPU keeps the per-image loader unless asked
    spec = spec_of(train_data.transform)
    side = spec.size if spec is not None else 0
    reason = ("the training pipeline is not a fusionnet train_transform" if spec is None else
              "distributed training shards the images per process" if run.world > 1 else
              "sample_weights draw the samples" if run.sample_weights is not None else
              "the training images do not fit in a quarter of the free GPU memory"
              if run.device.type == "cuda" and not fits(len(train_data), side, run.device) else None)
    if reason is not None:
        if cfg.device_augment is True:
            raise ConfigError(f"device_augment=True, but {reason}; use device_augment='auto' or False")
        run.say(f"GPU input path off: {reason}")
        return
    bar = (lambda it: tqdm(it, desc="images to device", leave=False)) if cfg.progress else None
    try:
        run.device_images = DeviceImages.load(train_data, side, run.device, num_workers=cfg.num_workers,
                                              progress=bar)
    except ConfigError as exc:
        if cfg.device_augment is True:
            raise
        run.say(f"GPU input path off: {exc}")
        return
    run.augment = BatchAugment(spec)
    run.say(f"GPU input path: {len(train_data)} images at {side} px on {run.device} "
            f"({run.device_images.images.numel() / 2 ** 20:.0f} MiB), augmented per batch there")


def _resume(run: _Run) -> None:
    payload = ckpt.read_checkpoint(run.out / "final.pth")
    state = payload["extra"]
    run.model.load_state_dict(state.get("trained_state_dict", payload["state_dict"]))
    for cb in run.callbacks:
        if type(cb).__name__ in state.get("callbacks", {}):
            cb.load_state_dict(state["callbacks"][type(cb).__name__])
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
    metrics = _validate(run.evaluated, run.val_src, run.class_names, run.cfg, run.device)
    run.best_score, run.best_epoch = metrics[run.cfg.monitor], 0
    run.say(f"epoch 0 (start)  val acc {metrics['acc']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
            f"nll {metrics['nll']:.4f}  *best*")
    if run.out is not None and run.rank == 0:
        ckpt.save_checkpoint(run.out / "best.pth", config=run.clf.model_config(), state_dict=run.saved.state_dict(),
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
    metrics = _validate(run.evaluated, run.val_src, run.class_names, cfg, run.device)
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
        run.writer.epoch(run.saved, row, improved, run.resume_state(epoch), last=stop or epoch + 1 == cfg.epochs)
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


def _batches(run: _Run, epoch: int, epoch_seed: int):
    """(batches of (x, y) on the device, their number) for one epoch, from the run's input source."""
    cfg, dataset = run.cfg, run.train_src
    generator = torch.Generator().manual_seed(epoch_seed)
    sampler = _sampler(dataset, cfg, epoch, generator, run.labels, run.world, run.sample_weights)
    drop_last = run.mix is not None and len(sampler) >= cfg.batch_size  # mixup pairs need even, full batches
    count = _steps_per_epoch(len(sampler), cfg, 1, drop_last)
    if run.device_images is not None:  # the GPU input path: indices in the sampler's order, augmented on the device
        order = torch.tensor(list(sampler))
        gen = torch.Generator(device=run.device).manual_seed(epoch_seed)
        return ((run.device_images.batch(order[i * cfg.batch_size:(i + 1) * cfg.batch_size], run.augment, gen)
                 for i in range(count)), count)
    if isinstance(dataset, FeatureDataset):  # cached features: whole batches by indexing, the same batches
        loader = dataset.batches(sampler, cfg.batch_size)
    else:  # one loader per run: its workers persist; each batch carries its augmentation seed (loader.py)
        if run.loader is None:
            run.loader = training_loader(dataset, cfg.batch_size, num_workers=cfg.num_workers,
                                         pin_memory=run.device.type == "cuda", drop_last=drop_last)
        loader, epoch_sampler = run.loader
        epoch_sampler.start(sampler, epoch_seed * 1_000 + run.rank)
    device = run.device
    return ((to_device(x, device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True))
            for x, y in loader), count


def _train_epoch(run: _Run, step: nn.Module, epoch: int) -> float:
    """One pass over the training source; ``step`` maps a batch to a ModelOutput (a TrainStep, DDP-wrapped under
    torchrun). The loss sum and the first non-finite step stay on the device; the host reads them every
    ``sync_every`` steps (the progress bar, the non-finite check) and at the end."""
    cfg = run.cfg
    epoch_seed = cfg.seed * 100_003 + epoch  # order and augmentation depend on (seed, epoch) only: resumable
    batches, count = _batches(run, epoch, epoch_seed)
    step.train()
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=run.device)
    seen = 0
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress or run.rank != 0,
               leave=False, total=count)
    for i, (x, y) in enumerate(bar):
        loss = _step(run, step, x, y)
        total += loss.double() * len(y)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad)
        seen += len(y)
        if (i + 1) % cfg.sync_every == 0:
            _check_finite(run, first_bad, epoch)
            bar.set_postfix(loss=f"{float(total) / seen:.4f}")
    _check_finite(run, first_bad, epoch)
    t = torch.stack([total, torch.tensor(float(seen), dtype=torch.float64, device=run.device)])
    if run.world > 1:
        t = t.cpu()
        dist.all_reduce(t)
    return float(t[0]) / max(float(t[1]), 1)


def _check_finite(run: _Run, first_bad: torch.Tensor, epoch: int) -> None:
    bad = int(first_bad)  # the one host read: waits for the queued steps
    if bad >= 0:
        raise TrainingError(f"the training loss became non-finite at epoch {epoch + 1}, step {bad + 1}; training "
                            f"stopped and the checkpoints of the last good epoch were kept. Lower lr (now "
                            f"{run.cfg.lr}), keep grad_clip on, or check the data for broken images")


def _step(run: _Run, step: nn.Module, x, y: torch.Tensor) -> torch.Tensor:
    """Forward, loss (task + aux heads + callbacks' terms), backward, callbacks, clip, step; returns the loss
    (detached, on the device: nothing here waits for the GPU)."""
    cfg = run.cfg
    target = y
    if run.mix is not None and len(y) % 2 == 0:
        x, target = run.mix(x, y)  # soft targets (B, K); callbacks still see the hard labels
    with autocast(run.device, cfg.amp):
        for cb in run.callbacks:
            cb.on_batch(run.clf, x, y)
        out = step(x)
        loss = run.criterion(out.logits.float(), target)
        for aux in out.aux.values() if cfg.aux_weight else ():  # aux heads only add training signal
            loss = loss + cfg.aux_weight * run.criterion(aux.float(), target)
        loss = loss * math.prod(cb.task_loss_weight for cb in run.callbacks)
        for cb in run.callbacks:
            for term in cb.extra_loss(run.clf, out, y).values():
                loss = loss + term
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for cb in run.callbacks:
        cb.on_after_backward(run.clf, out, y)
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"] if p.grad is not None],
                                 cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    for cb in run.callbacks:
        cb.on_step_end(run.clf)
    return loss.detach()
