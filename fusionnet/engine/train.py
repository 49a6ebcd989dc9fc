"""The training loop: ``fit`` trains any classifier and picks its best epoch on validation.

It knows nothing about fusion: it talks to the model only through :mod:`fusionnet.models.interface` (a plain
``nn.Module`` returning logits is wrapped and trains with the ``full`` strategy). One loop serves image batches
and cached branch features alike (:class:`fusionnet.engine.feature_cache.FeatureDataset`, through the model's head path).

A run folder holds ``best.pth`` (best validation score; the first of tied epochs), ``final.pth`` (last epoch,
with optimiser, scheduler and RNG state for ``resume=True``), ``history.json``, ``history.png`` and
``train_config.json``, all written atomically. The checkpoints are written after every epoch unless that would
take over a tenth of the training time (short epochs: then every few epochs, and always after the last one;
see :class:`fusionnet.engine.run_writer.RunWriter`); the plot at the end. A non-finite loss stops training with a
:class:`TrainingError` that names the epoch and the first bad step; the checkpoints of the last good epoch stay as
they were. The step never waits for the GPU: the running loss and the first non-finite step are kept on the device
and read every ``sync_every`` steps and at the epoch's end. Under ``torchrun`` it trains with
DistributedDataParallel; only rank 0 writes.

Inputs come from one of three sources: cached branch features (frozen trunks), the GPU input path
(:mod:`fusionnet.data.device_input`: uint8 images in device memory, augmented a batch at a time; ``device_augment``), or
a DataLoader over the dataset's per-image pipeline.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from fusionnet.config import MONITORS, STRATEGIES, TrainConfig, resolved  # noqa: F401  (STRATEGIES, TrainConfig: re-exported)
from fusionnet.data.datasets import as_dataset, training_record
from fusionnet.data.splits import check_training_data, class_weights
from fusionnet.engine.callbacks import Callback
from fusionnet.engine.callbacks import from_config as callbacks_from_config
from fusionnet.engine.feature_cache import FeatureDataset
from fusionnet.engine.inference import evaluate
from fusionnet.engine.inputs import maybe_cache, maybe_device_input, mixup, steps_per_epoch
from fusionnet.engine.optim import lr_factor, make_optimizer  # noqa: F401  (re-exported)
from fusionnet.engine.run_writer import RunWriter
from fusionnet.engine.soup import SoupPool
from fusionnet.engine.state import FitResult, Inputs, Optimisation, Run
from fusionnet.engine.state import resume as resume_run
from fusionnet.engine.steps import train_epoch
from fusionnet.errors import ConfigError, MissingFileError
from fusionnet.models import checkpoints as ckpt
from fusionnet.models.interface import Classifier, TrainStep, as_classifier
from fusionnet.models.losses import make_loss
from fusionnet.utils.distributed import average_buffers, rank_world, setup_distributed
from fusionnet.utils.files import atomic_copy, atomic_write_json

__all__ = ["FitResult", "TrainConfig", "fit", "seed_everything", "stages_for_epoch"]


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


def fit(model: nn.Module, train_data: Dataset, val_data: Dataset, config: TrainConfig | None = None, *,
        out_dir: str | Path | None = None, resume: bool = False, log: Callable[[str], None] | None = print,
        callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train ``model`` on ``train_data``, choosing the best epoch on ``val_data``; see the module docstring.

    ``callbacks`` (:mod:`fusionnet.engine.callbacks`) run beside those the config asks for
    (``checkpoint_activations``, ``branch_streams``, ``ogm_alpha``, ...); ``Resample(weights)`` among them draws the
    training samples in proportion to ``weights`` (N,), with replacement (boosting by resampling), in place of the
    shuffle and of ``balanced_sampling``.
    """
    cfg = resolved(config or TrainConfig(), len(train_data))  # budget 'hyperrule' -> epochs for this data
    run = _setup(model, train_data, val_data, cfg, out_dir, resume, log, callbacks)
    for cb in run.callbacks:
        cb.on_fit_start(run.clf)
        cb.on_schedule(steps_per_epoch(len(train_data), cfg, run.world, drop_last=run.inputs.mix is not None), cfg.epochs)
    if resume:
        resume_run(run)
    try:
        stopped_early = _epochs(run)
    finally:
        for cb in run.callbacks:
            cb.on_fit_end(run.clf)
    soup = _cook_soup(run) if run.soup is not None else None
    if run.writer is not None and run.progress.history:
        run.writer.finish(run.progress.history)
    if run.world > 1:
        dist.barrier()
    return FitResult(history=run.progress.history, best_epoch=run.progress.best_epoch, best_score=float(run.progress.best_score),
                     stopped_early=stopped_early, out_dir=str(run.out) if run.out is not None else None,
                     used_cache=run.inputs.cached, extra={"soup": soup} if soup else {})


def _setup(model, train_data, val_data, cfg: TrainConfig, out_dir, resume: bool, log, callbacks: Sequence[Callback]) -> Run:
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
                          "(a fusionnet.data.datasets.LabelledData such as FolderImages)")
    weight = class_weights(labels, num_classes).to(device) if cfg.class_weighting else None
    if weight is not None:
        say("class weights (inverse frequency): " + ", ".join(
            f"{n} {w:.3f}" for n, w in zip(class_names or range(num_classes), weight.tolist())))
    mix = mixup(cfg, num_classes)
    criterion = make_loss(cfg.loss, weight=weight, label_smoothing=0.0 if mix else cfg.label_smoothing,
                          gamma=cfg.focal_gamma)  # with mixup, its soft targets carry the smoothing
    clf.set_trainable_stages(stages_for_epoch(0, cfg))
    train_src, val_src, used_cache = maybe_cache(clf, train_data, val_data, cfg, device, world, say)
    inputs = Inputs(train_src, val_src, used_cache, labels, mix)
    data = training_record(train_data, cfg.seed)
    run = Run(cfg, model, clf, device, rank, world, say, class_names, inputs,
              _optimisation(clf, cfg, criterion, len(train_data), world, used_cache, mix),
              [*callbacks_from_config(cfg), *callbacks], out,
              RunWriter(out, clf, class_names, cfg, data) if out is not None and rank == 0 else None, data)
    if cfg.soup:
        run.soup = SoupPool(cfg.soup, MONITORS[cfg.monitor] == "max")
    if not used_cache:
        maybe_device_input(run, train_data)
    if out is not None and rank == 0:
        atomic_write_json(out / "train_config.json", asdict(cfg))
    return run


def _optimisation(clf: Classifier, cfg: TrainConfig, criterion: nn.Module, n_train: int, world: int,
                  cached: bool, mix) -> Optimisation:
    """The training step, the optimiser and the warm-up + cosine schedule in steps."""
    per_epoch = steps_per_epoch(n_train, cfg, world, drop_last=mix is not None)
    total_steps, warmup = cfg.epochs * per_epoch, int(cfg.warmup_epochs * per_epoch)
    optimizer = make_optimizer(clf, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))
    step_module = TrainStep(clf, cached=cached)
    return Optimisation(criterion, torch.compile(step_module) if cfg.compile else step_module, optimizer, scheduler)


def _epochs(run: Run) -> bool:
    """The epoch loop from ``run.progress.start``; True when early stopping ended it."""
    cfg = run.cfg
    if cfg.validate_start and run.progress.start == 0:
        _score_start(run)
    train_module: nn.Module = run.opt.step_module
    stages_now = stages_for_epoch(0, cfg)
    for epoch in range(run.progress.start, cfg.epochs):
        stages = stages_for_epoch(epoch, cfg)
        if stages != stages_now:
            run.clf.set_trainable_stages(stages)
            stages_now = stages
            train_module = run.opt.step_module  # DDP fixes its parameter set at wrap time: re-wrap when it changes
        if run.world > 1 and train_module is run.opt.step_module:
            train_module = nn.parallel.DistributedDataParallel(run.opt.step_module)
        if _epoch(run, train_module, epoch):
            run.say(f"early stop: {cfg.monitor} did not improve for {cfg.patience} epoch(s); best epoch "
                    f"{run.progress.best_epoch}")
            return True
    return False


def _score_start(run: Run) -> None:
    """Validate the untrained starting point as "epoch 0", a best.pth candidate."""
    metrics = _validate(run.evaluated, run.inputs.val, run.class_names, run.cfg, run.device)
    run.progress.best_score, run.progress.best_epoch = metrics[run.cfg.monitor], 0
    run.say(f"epoch 0 (start)  val acc {metrics['acc']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
            f"nll {metrics['nll']:.4f}  *best*")
    if run.out is not None and run.rank == 0:
        ckpt.save_checkpoint(run.out / "best.pth", config=run.clf.model_config(), state_dict=run.saved.state_dict(),
                             class_names=run.class_names, data=run.data,
                             metrics={"epoch": 0, "val_acc": metrics["acc"], "monitor": run.cfg.monitor,
                                      "best_epoch": 0})


def _epoch(run: Run, train_module: nn.Module, epoch: int) -> bool:
    """Train one epoch, validate, record and write; True when early stopping is due."""
    cfg = run.cfg
    t0 = time.perf_counter()
    train_loss = train_epoch(run, train_module, epoch)
    if run.world > 1:
        average_buffers(run.clf, run.world)
    metrics = _validate(run.evaluated, run.inputs.val, run.class_names, cfg, run.device)
    row = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": metrics["acc"],
           "val_macro_f1": metrics["macro_f1"], "val_nll": metrics["nll"], "val_ece": metrics["ece"],
           "lr": run.opt.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
           "trainable_params": sum(p.numel() for p in run.clf.parameters() if p.requires_grad)}
    run.progress.history.append(row)
    for cb in run.callbacks:
        cb.on_epoch_end(run.clf, row)
    score = metrics[cfg.monitor]
    improved = run.progress.best_score is None or (  # strict: the first of tied epochs stays
        score > run.progress.best_score if MONITORS[cfg.monitor] == "max" else score < run.progress.best_score)
    if run.soup is not None:
        run.soup.offer(score, epoch + 1, run.saved)
    if improved:
        run.progress.best_score, run.progress.best_epoch, run.progress.bad_epochs = score, epoch + 1, 0
    else:
        run.progress.bad_epochs += 1
    run.say(f"epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.4f}  val acc {metrics['acc']:.4f}  "
            f"macro-F1 {metrics['macro_f1']:.4f}  nll {metrics['nll']:.4f}  {row['seconds']:.1f}s"
            + ("  *best*" if improved else ""))
    stop = cfg.patience is not None and run.progress.bad_epochs >= cfg.patience
    if run.writer is not None:
        run.writer.epoch(run.saved, row, improved, run.resume_state(epoch), last=stop or epoch + 1 == cfg.epochs)
    return stop


def _cook_soup(run: Run) -> dict | None:
    """``TrainConfig.soup``: the greedy soup of the best epochs, left in the model and written as best.pth; the
    single best epoch's best.pth is kept first as best_epoch.pth (so a run can be scored with and without it)."""
    monitor = run.cfg.monitor
    cooked = run.soup.cook(run.saved, lambda: _validate(run.evaluated, run.inputs.val, run.class_names, run.cfg,
                                                        run.device)[monitor])
    if cooked is None:
        return None
    epochs, score = cooked
    run.say(f"greedy soup of epochs {epochs}: val {monitor} {score:.4f} (best epoch {run.progress.best_epoch} "
            f"alone: {run.progress.best_score:.4f})")
    if run.out is not None and run.rank == 0:
        if (run.out / "best.pth").is_file():
            atomic_copy(run.out / "best.pth", run.out / "best_epoch.pth")
        ckpt.save_checkpoint(run.out / "best.pth", config=run.clf.model_config(), state_dict=run.saved.state_dict(),
                             class_names=run.class_names, data=run.data,
                             metrics={"epoch": run.progress.best_epoch, "best_epoch": run.progress.best_epoch,
                                      "monitor": monitor, f"val_{monitor}": score, "soup_epochs": epochs,
                                      "best_epoch_score": run.progress.best_score})
    return {"epochs": epochs, "score": score, "best_epoch_score": run.progress.best_score}


def _validate(clf: Classifier, val_src, class_names, cfg: TrainConfig, device) -> dict:
    """Validation metrics in the training precision and memory format (the weights being trained stay as they are)."""
    return evaluate(clf, val_src, class_names=class_names, batch_size=max(cfg.batch_size, 64), device=device,
                    amp=cfg.amp, channels_last=False,
                    num_workers=0 if isinstance(val_src, FeatureDataset) else cfg.num_workers)
