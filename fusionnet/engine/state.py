"""What one call of :func:`fusionnet.engine.train.fit` holds while it trains, as a few named objects, and its
resume point: :class:`Run` = the model and where it runs + :class:`Inputs` (where batches come from) +
:class:`Optimisation` (loss, step, optimiser, schedule) + :class:`Progress` (history, best epoch, early stopping)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from fusionnet.config import TrainConfig
from fusionnet.data.device_input import BatchAugment, DeviceImages
from fusionnet.engine.callbacks import Callback, state_key
from fusionnet.engine.run_writer import RunWriter
from fusionnet.errors import CheckpointMismatchError
from fusionnet.models import checkpoints as ckpt
from fusionnet.models.interface import Classifier, PlainClassifier, TrainStep


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


@dataclass
class Inputs:
    """Where the training batches come from: cached features, the GPU input path or the per-image loader."""

    train: Dataset  # the training source: the dataset, or its cached features (feature_cache.FeatureDataset)
    val: Dataset
    cached: bool
    labels: list[int] | None
    mix: Callable | None = None  # timm's Mixup (mixup / cutmix): (x, y) -> (mixed x, soft targets)
    device_images: DeviceImages | None = None  # the GPU input path (device_input.py), when it is on
    augment: BatchAugment | None = None
    loader: tuple | None = None  # (DataLoader, EpochSampler) of the per-image path, built once per run (loader.py)


@dataclass
class Optimisation:
    """The loss, the (possibly compiled) training step, the optimiser and its schedule."""

    criterion: nn.Module
    step_module: TrainStep | nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass
class Progress:
    """The epochs so far: the history, the best epoch, early stopping's count, where a resumed run starts."""

    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    start: int = 0


@dataclass
class Run:
    """One call of ``fit``: set up by :func:`fusionnet.engine.train._setup`, advanced epoch by epoch."""

    cfg: TrainConfig
    model: nn.Module  # as given (its state dict is what checkpoints hold)
    clf: Classifier
    device: torch.device
    rank: int
    world: int
    say: Callable[[str], None]
    class_names: list[str] | None
    inputs: Inputs
    opt: Optimisation
    callbacks: list[Callback]
    out: Path | None
    writer: RunWriter | None
    data: dict | None = None  # what the model is trained on (fusionnet.data.datasets.training_record)
    progress: Progress = field(default_factory=Progress)
    soup: object | None = None  # TrainConfig.soup: the best epochs' weights (fusionnet.engine.soup.SoupPool)

    def resume_state(self, epoch: int) -> dict:
        p = self.progress
        state = {"optimizer": self.opt.optimizer.state_dict(), "scheduler": self.opt.scheduler.state_dict(),
                 "epoch": epoch, "history": p.history, "best_score": p.best_score, "best_epoch": p.best_epoch,
                 "bad_epochs": p.bad_epochs, "torch_rng": torch.get_rng_state(), "train_config": asdict(self.cfg),
                 "callbacks": {state_key(cb, self.callbacks): cb.state_dict() for cb in self.callbacks}}
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


def resume(run: Run) -> None:
    payload = ckpt.read_checkpoint(run.out / "final.pth")
    state = payload["extra"]
    run.model.load_state_dict(state.get("trained_state_dict", payload["state_dict"]))
    saved = state.get("callbacks", {})
    for cb in run.callbacks:
        key = state_key(cb, run.callbacks)
        key = key if key in saved else type(cb).__name__  # final.pth of fusionnet 0.3 keyed them by class
        if key in saved:
            cb.load_state_dict(saved[key])
    try:
        run.opt.optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:  # e.g. a frozen run of fusionnet 0.2, whose optimiser also held the trunk weights
        raise CheckpointMismatchError(f"{str(run.out / 'final.pth')!r}: its optimiser state does not fit this "
                                      f"run's parameters ({exc}); it was written with other settings or an older "
                                      f"fusionnet: start a new run (without resume)") from exc
    run.opt.scheduler.load_state_dict(state["scheduler"])
    run.progress = Progress(state["history"], state["best_score"], state["best_epoch"], state["bad_epochs"],
                            state["epoch"] + 1)
    torch.set_rng_state(state["torch_rng"])
    run.say(f"resumed from {str(run.out / 'final.pth')!r} at epoch {run.progress.start + 1}/{run.cfg.epochs}")
