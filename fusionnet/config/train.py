"""Training settings: :class:`TrainConfig` (one ``fit``), :class:`TrainRun` (``fusionnet train``), the regimes'
presets, and the constants every setting checks against. Imports no torch."""


from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from fusionnet.errors import ConfigError, check_settings, is_finite, is_int


def check_installed(module: str, extra: str, what: str) -> None:
    """A MissingDependencyError naming the extra to install when ``module`` is absent (checked without importing)."""
    from importlib.util import find_spec

    from fusionnet.errors import MissingDependencyError, install_hint

    if find_spec(module) is None:
        raise MissingDependencyError(f"{what} needs {module}: {install_hint(extra)}")

SELECT_BY = "nll"  # how the selected rows choose: validation NLL

STRATEGIES = ("full", "frozen", "gradual")
MONITORS = {"acc": "max", "macro_f1": "max", "nll": "min", "ece": "min"}
REGIMES = ("frozen", "finetune")
DEFAULT_FUSION = "concat"  # the fusion method a model gets when none is named (fusionnet.models.fusers registers it)
TRACKERS = ("tensorboard", "mlflow")  # where TrainConfig.log also writes each epoch's metrics


def setting(default, help: str, *, flag: str | None = None, factory=None):
    """A dataclass field with its help text (and optional flag name) for the command line."""
    meta = {"help": help, **({"flag": flag} if flag else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """How to train: optimisation, freezing, loss, schedule and run settings. Every field is plain data, written
    to ``train_config.json``, and a ``fusionnet train`` / ``compare`` flag (``--batch-size`` for ``batch_size``)."""

    epochs: int = setting(10, "passes over the training split (budget 'epochs'; 10 is the quick preset)")
    budget: Literal["epochs", "hyperrule"] = setting("epochs", "epochs: train for `epochs` | hyperrule: BiT's "
                                                     "HyperRule in steps scaled to the data (under 20k images 500 "
                                                     "steps of 512 images, under 500k 10k steps, else 20k), as "
                                                     "epochs of this batch size, with 5 % warm-up; for a GPU")
    batch_size: int = setting(32, "images per step (per process under torchrun)")
    optimizer: Literal["adamw", "sgd"] = setting("adamw", "the optimiser")
    lr: float = setting(1e-3, "the head's learning rate")
    trunk_lr_mult: float = setting(1.0, "pretrained trunks learn at lr * this (1: chosen on validation over 0.1; figures: docs/training.md)")
    weight_decay: float = setting(1e-4, "AdamW/SGD weight decay")
    momentum: float = setting(0.9, "sgd only")
    warmup_epochs: float = setting(0.5, "linear warm-up, then cosine decay to 0 over the remaining steps")
    grad_clip: float | None = setting(1.0, "max global gradient norm (none: no clipping)")
    label_smoothing: float = setting(0.0, "label smoothing of the training loss")
    loss: Literal["ce", "focal"] = setting("ce", "ce: cross-entropy | focal: focal loss")
    aux_weight: float = setting(0.3, "weight of each auxiliary head's loss (GoogLeNet aux heads; 0.3 as in the paper)")
    focal_gamma: float = setting(2.0, "focal loss's gamma")
    class_weighting: bool = setting(False, "inverse-frequency class weights in the loss (focal: as alpha)")
    balanced_sampling: bool = setting(False, "oversample rare classes (WeightedRandomSampler)")
    strategy: Literal["full", "frozen", "gradual"] = setting("full", "full: train everything | frozen: head only | gradual: unfreeze from the top; the strategy overrides the model's own freeze_trunks setting")
    unfreeze_after: int = setting(1, "gradual: epochs with every trunk frozen")
    unfreeze_every: int = setting(1, "gradual: epochs between unfreezing steps")
    stages_per_step: int = setting(1, "gradual: trunk stages released per step, nearest the output first")
    monitor: Literal["acc", "macro_f1", "nll", "ece"] = setting("macro_f1", "the validation metric that picks best.pth and early stopping")
    patience: int | None = setting(None, "stop after this many epochs without improvement (none: never)")
    amp: bool | str = setting("auto", "mixed precision: auto: bf16 autocast on CUDA, fp32 on the CPU; true: bf16 on the CPU too (where a CPU runs it faster; measured: experiments/README.md section 9); false: fp32")
    cache_features: bool | str = setting("auto", "frozen strategy: 'auto' and true compute each trunk's features "
                                                 "once and train the head on them, the training images seen through "
                                                 "the val pipeline (un-augmented; measured against augmented images: "
                                                 "docs/training.md); true refuses to train without the cache, "
                                                 "auto falls back; false trains on augmented images")
    cache_dir: str | None = setting(None, "where cached features persist between runs (none: in memory only)")
    seed: int = setting(0, "seed of the validation split, initialisation, order and augmentation")
    num_workers: int = setting(0, "DataLoader worker processes (0: load in the main process)", flag="--workers")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    progress: bool = setting(True, "progress bars")
    validate_start: bool = setting(False, "also score the untrained starting point ('epoch 0') as a best.pth candidate")
    checkpoint_activations: bool = setting(False, "recompute each trainable trunk in backward instead of storing its activations (less peak memory for about one more forward pass of time, measured: docs/training.md; BatchNorm statistics update twice per step)")
    branch_streams: bool = setting(False, "CUDA: each branch on its own CUDA stream (no effect on the CPU); off until experiments/bench_throughput.py (mode 'streams') shows it faster on a GPU")
    ogm_alpha: float = setting(0.0, "OGM-GE gradient modulation of the dominant branch (0: off); a Linear head over concat or gated fusion")
    ema_decay: float = setting(0.0, "exponential moving average of the weights (timm ModelEmaV3, decay warmed up over the first steps): the average is what is validated and saved (0: off)")
    mixup: float = setting(0.0, "mixup's alpha (0: off; timm Mixup, with label_smoothing folded into its targets)")
    cutmix: float = setting(0.0, "cutmix's alpha (0: off); with mixup too, each batch uses one of the two")
    codistill: float = setting(0.0, "co-distillation weight (0: off): with branch_heads, every branch head and the "
                                    "fused head also learn the soft vote of all the heads at codistill_temperature "
                                    "(fusionnet.engine.callbacks.CoDistillation)")
    codistill_temperature: float = setting(3.0, "co-distillation: the KL terms' temperature")
    codistill_teacher: Literal["ensemble", "mean"] = setting("ensemble", "co-distillation's teacher: ensemble (the "
                                                             "heads' soft vote, detached) | mean (that vote from an "
                                                             "EMA of the weights, PCL's temporal mean; one more "
                                                             "forward pass per step)")
    codistill_rampup: float = setting(0.3, "co-distillation: share of the steps over which its weight ramps up")
    layer_decay: float = setting(1.0, "layer-wise learning-rate decay: a trunk stage k stages below the top learns at lr * trunk_lr_mult * layer_decay ** (k + 1) (1: off)")
    device_augment: bool | str = setting("auto", "the GPU input path (fusionnet.data.device_input): the training images decoded once into device memory as uint8 and augmented there a batch at a time; 'auto': on CUDA when they take at most a quarter of the free memory and the dataset's pipeline is a fusionnet train_transform; true: also on the CPU; false: the per-image albumentations loader")
    sync_every: int = setting(50, "steps between host reads of the running loss and the non-finite check (reading a CUDA value waits for the GPU); the epoch's end always checks")
    compile: bool = setting(False, "torch.compile the training step (the first steps compile; see experiments/bench_throughput.py)")
    soup: int = setting(0, "greedy soup: average the weights of up to this many best epochs, each kept only if "
                           "the average validates at least as well (Wortsman et al. 2022); best.pth then holds the "
                           "soup. 0: off (the default until validation shows it helps)")
    log: str | None = setting(None, "also log every epoch's metrics and the settings to tensorboard (a "
                                    "SummaryWriter per model under --log-dir, default runs/tensorboard) or mlflow "
                                    "(a run per model; --log-dir: the tracking URI, default $MLFLOW_TRACKING_URI "
                                    "or mlflow's own, sqlite:///mlflow.db); pip install 'fusionnet[tensorboard]' / "
                                    "'fusionnet[mlflow]'")
    log_dir: str | None = setting(None, "--log tensorboard: the folder; --log mlflow: the tracking URI")
    run_name: str = ""  # what a tracked run is called (compare names each model's; empty: "fit")

    def __post_init__(self) -> None:
        check_settings([
            (is_int(self.epochs) and self.epochs >= 1, f"epochs must be an int >= 1, got {self.epochs!r}"),
            (self.budget in ("epochs", "hyperrule"), f"unknown budget {self.budget!r}; choose 'epochs' or 'hyperrule'"),
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
            (is_finite(self.ogm_alpha) and self.ogm_alpha >= 0, f"ogm_alpha must be >= 0, got {self.ogm_alpha!r}"),
            (is_finite(self.ema_decay) and 0 <= self.ema_decay < 1,
             f"ema_decay must be in [0, 1) (e.g. 0.998; 0 turns EMA off), got {self.ema_decay!r}"),
            (is_finite(self.mixup) and self.mixup >= 0, f"mixup must be >= 0 (an alpha; 0: off), got {self.mixup!r}"),
            (is_finite(self.cutmix) and self.cutmix >= 0, f"cutmix must be >= 0 (an alpha; 0: off), got {self.cutmix!r}"),
            (not ((self.mixup or self.cutmix) and self.loss == "focal"),
             "mixup/cutmix train on soft targets, which the focal loss does not take; use loss='ce' or turn them off"),
            (is_finite(self.codistill) and self.codistill >= 0, f"codistill must be >= 0 (0: off), got {self.codistill!r}"),
            (is_finite(self.codistill_temperature) and self.codistill_temperature > 0,
             f"codistill_temperature must be > 0, got {self.codistill_temperature!r}"),
            (self.codistill_teacher in ("ensemble", "mean"),
             f"codistill_teacher must be 'ensemble' or 'mean', got {self.codistill_teacher!r}"),
            (is_finite(self.codistill_rampup) and 0 <= self.codistill_rampup <= 1,
             f"codistill_rampup must be in [0, 1], got {self.codistill_rampup!r}"),
            (is_finite(self.layer_decay) and 0 < self.layer_decay <= 1,
             f"layer_decay must be in (0, 1] (1: off), got {self.layer_decay!r}"),
            (self.device_augment in ("auto", True, False),
             f"device_augment must be 'auto', True or False, got {self.device_augment!r}"),
            (is_int(self.sync_every) and self.sync_every >= 1, f"sync_every must be an int >= 1, got {self.sync_every!r}"),
            (is_int(self.soup) and (self.soup == 0 or self.soup >= 2),
             f"soup must be 0 (off) or a whole number of epochs >= 2, got {self.soup!r}"),
            (self.log in (None, *TRACKERS), f"unknown log {self.log!r}; choose one of {', '.join(TRACKERS)}"),
            (self.log_dir is None or self.log is not None, "log_dir names where --log writes; give --log too"),
        ])



# TrainConfig's fields by concern: how --help groups the training flags (a YAML / JSON config stays flat, the
# same keys as before). tests/test_layers.py checks that every field has exactly one concern.
TRAIN_CONCERNS = {
    "optimisation": ("epochs", "budget", "batch_size", "optimizer", "lr", "trunk_lr_mult", "layer_decay",
                     "weight_decay", "momentum", "warmup_epochs", "grad_clip", "strategy", "unfreeze_after",
                     "unfreeze_every", "stages_per_step", "monitor", "patience", "validate_start"),
    "recipe": ("loss", "label_smoothing", "focal_gamma", "aux_weight", "class_weighting", "balanced_sampling",
               "mixup", "cutmix", "soup"),
    "callbacks": ("checkpoint_activations", "branch_streams", "ogm_alpha", "ema_decay", "codistill",
                  "codistill_temperature", "codistill_teacher", "codistill_rampup", "log", "log_dir", "run_name"),
    "loading": ("seed", "cache_features", "cache_dir", "num_workers", "device_augment"),
    "runtime": ("device", "amp", "compile", "sync_every", "progress"),
}


@dataclass
class TrainRun:
    """``fusionnet train``: the data and the model; the training itself is a :class:`TrainConfig`."""

    data: str = setting(None, "folder with train/ (val/, test/ optional), or a table of image paths and labels (CSV, "
                                  "TSV or Parquet: path or image, label, optional split), or a Hugging Face "
                                  "dataset (a save_to_disk folder, or hf:user/name)")
    backbones: list[str] = setting(None, "one backbone (a member) or several (a FusionNet); fusionnet backbones "
                                         "lists them")
    fusion: str = setting(DEFAULT_FUSION, "fusion method: a registered one (fusionnet.models.fusers.list_fusions())")
    pretrained: bool = setting(True, "ImageNet-pretrained trunks")
    policy: Literal["default", "strong", "none"] = setting("default", "augmentation policy")
    size: int = setting(128, "input size in pixels")
    input_size: int | None = setting(None, "each branch resizes its input to this many pixels before its trunk, "
                                           "e.g. 224 for 128 px data (BiT-style upsampling; none: as given)")
    val_fraction: float = setting(0.15, "share of train/ held out for validation when there is no val/")
    image_column: str | None = setting(None, "a table's image-path column (default: path or image)")
    label_column: str = setting("label", "a table's label column")
    image_root: str | None = setting(None, "a table's image paths are relative to this folder (default: the "
                                           "table's own)")
    strict: bool = setting(False, "refuse unreadable images, naming them, instead of skipping them")
    image_cache: str | None = setting(None, "a folder: decode every image once into it and train from there "
                                            "(fast on large photos; reused by later runs on the same files)")
    out: str | None = setting(None, "run folder (default runs/<backbones>)")

    def __post_init__(self) -> None:
        for required in ("data", "backbones"):
            if not getattr(self, required):
                raise ConfigError(f"train needs --{required} (or '{required}' in --config)")
        if self.out is None:
            self.out = "runs/" + "+".join(b.replace("/", "_") for b in self.backbones)


def hyperrule_epochs(n_images: int) -> int:
    """BiT's HyperRule budget (Kolesnikov et al. 2020) as epochs: 500 / 10k / 20k steps of 512 images for data
    sets under 20k / under 500k / larger, over ``n_images``."""
    steps = 500 if n_images < 20_000 else 10_000 if n_images < 500_000 else 20_000
    return max(1, math.ceil(steps * 512 / max(n_images, 1)))


def resolved(cfg: TrainConfig, n_images: int) -> TrainConfig:
    """``cfg`` with its budget turned into epochs and warm-up for ``n_images`` training images."""
    if cfg.budget == "epochs":
        return cfg
    epochs = hyperrule_epochs(n_images)
    return replace(cfg, budget="epochs", epochs=epochs, warmup_epochs=0.05 * epochs)


def regime_train_config(regime: str, **fields) -> TrainConfig:
    """The training preset of a comparison regime: frozen trunks with heads on cached features at lr 3e-3, or
    every layer fine-tuned at lr 1e-3 with label smoothing 0.1; best epochs by validation NLL. ``fields`` override it.

    Label smoothing 0.1 when fine-tuning, chosen on validation: Lite0 on flowers5_128 at 64 px, 15 epochs (converged:
    validation NLL stopped improving by epoch 9-14), val acc / NLL 0.7857 / 0.648 and 0.8012 / 0.590 against
    0.7741 / 0.660 and 0.7915 / 0.612 without (seeds 0, 1); at 128 px and 3 epochs 0.780 vs 0.743. Every
    comparison favours it, though at 15 epochs neither exact McNemar test on the 518 validation images is
    significant (p = 0.53, 0.63; 0.03 at 3 epochs); experiments/README.md. The focal loss takes no smoothing."""
    if regime not in REGIMES:
        raise ConfigError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    frozen = regime == "frozen"
    base = {"strategy": "frozen" if frozen else "full", "cache_features": frozen, "lr": 3e-3 if frozen else 1e-3,
            "monitor": "nll", "label_smoothing": 0.0 if frozen or fields.get("loss") == "focal" else 0.1}
    return TrainConfig(**{**base, **fields})


