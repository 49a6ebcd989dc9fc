"""FusionNet: several pretrained trunks, each pooled, fused into one shared head, trained end to end.

Data flow for one batch of images (B, 3, H, W) in [0, 1]::

    per branch: resize (if configured) -> normalise with the branch's own mean/std -> trunk -> feature map
                -> pool (avg | max | avgmax | catavgmax | gem | token) -> (B, D_i)
    training:   branch dropout (whole branches, per sample; off in eval)
    fusion:     a registered method (fusers.py): concat (B, sum D_i) | gated | attention (B, d) | late (B, M*K)
    head:       dropout -> [Linear -> ReLU -> dropout] -> Linear -> logits (B, K)
    optional:   a Linear head per branch on (B, D_i) -> branch logits (deep supervision, per-branch predictions)

This module builds modules only: random weights, no file reads, downloads or printing. Pretrained weights and
checkpoints arrive through :mod:`fusionnet.models.factory` (``create_fusionnet``, ``load_fusionnet``, ``fuse_members``).
A single-backbone FusionNet is an ordinary classifier; ensemble members are built that way. Training machinery
(activation checkpointing, CUDA streams per branch, gradient modulation) is not part of the model or its config:
the trainer switches it on through :mod:`fusionnet.engine.callbacks`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from dataclasses import asdict, dataclass, replace
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from fusionnet.models.backbones import build_trunk, get_spec, list_backbones
from fusionnet.models.branch import Branch, BranchConfig
from fusionnet.config import DEFAULT_FUSION, Reading
from fusionnet.config.reading import check_reading_fields
from fusionnet.errors import CheckpointMismatchError, ConfigError, is_int
from fusionnet.models.fusers import branch_dropout, get_fusion, ordered
from fusionnet.models.interface import Classifier, ModelOutput
from fusionnet.utils.probabilities import soft_vote_logits
from fusionnet.models.pooling import POOLS
from fusionnet.models.pretrained import PretrainedMixin


@dataclass
class FusionConfig:
    """Everything needed to rebuild a FusionNet; stored as plain data in every checkpoint."""

    branches: list[BranchConfig]
    num_classes: int
    head_hidden: int | None = None  # width of the hidden head layer; None: a single Linear on the fused vector
    dropout: float = 0.0  # before each head Linear
    freeze_trunks: bool = False  # trunks as fixed feature extractors: no gradients, BatchNorm stats frozen
    class_names: list[str] | None = None
    fusion: str = DEFAULT_FUSION  # a registered fusion method (fusionnet.models.fusers.list_fusions())
    fusion_width: int = 256  # attention: the width of the branch tokens
    branch_dropout: float = 0.0  # training: probability of dropping a whole branch per sample (never all)
    branch_heads: bool = False  # a Linear head per branch: aux logits "branch:<name>" (TrainConfig.aux_weight)
    predict_with: str = "fused"  # what the model predicts in eval mode: fused (the head) | branches (the soft vote
    # of the branch heads) | all (the soft vote of both); chosen on validation after co-distillation
    # How the model reads an image (fusionnet.config.Reading): read by predict, serve, export and fuse.
    resize: str = "shorter"  # shorter | stretch; a plain member trained on Resize((s, s)) says "stretch"
    crop_pct: float = 1.0  # the share of the resized side kept by the centre crop (0.875: Resize(256)+CenterCrop(224))
    reader: str = "albumentations"  # whose eval pipeline: albumentations (fusionnet-trained) | torchvision (plain)
    image_size: int | None = None  # the input size it was trained at, where known (else its training record's)

    def __post_init__(self) -> None:
        # copies: naming the branches below never rewrites the BranchConfigs the caller passed in
        self.branches = [replace(b) if isinstance(b, BranchConfig) else BranchConfig(**b) for b in self.branches]
        if not self.branches:
            raise ConfigError("a FusionNet needs at least one backbone, got an empty list")
        if not (is_int(self.num_classes) and self.num_classes >= 1):
            raise ConfigError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(f"class_names has {len(self.class_names)} names but num_classes is "
                              f"{self.num_classes}: pass one name per class")
        for field_name in ("dropout", "branch_dropout"):
            if not 0.0 <= getattr(self, field_name) < 1.0:
                raise ConfigError(f"{field_name} must be in [0, 1), got {getattr(self, field_name)!r}")
        if self.head_hidden is not None and self.head_hidden < 1:
            raise ConfigError(f"head_hidden must be a positive int or None, got {self.head_hidden!r}")
        get_fusion(self.fusion)  # a ConfigError listing the registered methods
        if self.predict_with not in PREDICT_WITH:
            raise ConfigError(f"predict_with must be one of {', '.join(PREDICT_WITH)}, got {self.predict_with!r}")
        if self.predict_with != "fused" and not self.branch_heads:
            raise ConfigError(f"predict_with={self.predict_with!r} needs the branch heads: build the model with "
                              f"branch_heads=True, or predict with 'fused'")
        check_reading_fields(size=self.image_size, resize=self.resize, crop_pct=self.crop_pct, reader=self.reader)
        if self.fusion_width < 1:
            raise ConfigError(f"fusion_width must be a positive int, got {self.fusion_width!r}")
        used: dict[str, int] = {}
        for b in self.branches:
            if b.pool not in POOLS:
                raise ConfigError(f"branch {b.backbone!r}: unknown pool {b.pool!r}; choose one of {', '.join(POOLS)}")
            if b.aux_heads and not get_spec(b.backbone).aux_heads:
                able = [n for n in list_backbones() if get_spec(n).aux_heads]
                raise ConfigError(f"branch {b.backbone!r}: aux_heads=True exists for {', '.join(map(repr, able))} "
                                  f"only")
            if not (is_int(b.taps) and b.taps >= 0):
                raise ConfigError(f"branch {b.backbone!r}: taps must be an int >= 0, got {b.taps!r}")
            if b.input_size is not None and (isinstance(b.input_size, bool) or int(b.input_size) < 8):
                raise ConfigError(f"branch {b.backbone!r}: input_size must be an int >= 8 or None, "
                                  f"got {b.input_size!r}")
            if not b.name:
                base = b.backbone.removeprefix("timm/").replace(".", "_").replace("/", "_")
                used[base] = used.get(base, 0) + 1
                b.name = base if used[base] == 1 else f"{base}_{used[base]}"
        names = [b.name for b in self.branches]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"branch names must be unique, {dupes} repeat; name them, e.g. "
                              f"BranchConfig('resnet18', name='resnet18_a')")
        bad = [n for n in names if "." in n or not n]
        if bad:
            raise ConfigError(f"branch names may not contain '.': {bad}")

    def to_dict(self) -> dict:
        return asdict(self)

    def reading(self, size: int | None = None) -> Reading:
        """How this model reads an image, at ``size`` (default: the size it records)."""
        return Reading(size or self.image_size, self.resize, self.crop_pct, self.reader)

    @classmethod
    def from_dict(cls, d: Mapping) -> "FusionConfig":
        d = {k: v for k, v in d.items() if k not in _TRAINING_FIELDS_OF_0_2}
        d["branches"] = [BranchConfig(**{**b, "mean": _tuple(b.get("mean")), "std": _tuple(b.get("std"))})
                         for b in d["branches"]]
        return cls(**d)


PREDICT_WITH = ("fused", "branches", "all")
_KEYWORD_DEFAULTS = dict(pool="avg", input_size=None, taps=0, class_names=None, fusion=DEFAULT_FUSION,
                         fusion_width=256, head_hidden=None, dropout=0.0, branch_dropout=0.0, branch_heads=False,
                         freeze_trunks=False, predict_with="fused", resize="shorter", crop_pct=1.0,
                         reader="albumentations", image_size=None)  # FusionNet's keywords as it defaults them
_TRAINING_FIELDS_OF_0_2 = ("ogm_alpha", "checkpoint_trunks", "branch_streams")  # training settings that 0.2
# saved with the model; now TrainConfig's (fusionnet.engine.callbacks), ignored when an old checkpoint loads


def _tuple(v):
    return tuple(v) if v is not None else None


class FusionNet(Classifier, PretrainedMixin):
    """Several trunks, pooled and fused into one head; see the module docstring. Random weights: use
    :func:`fusionnet.create_fusionnet` for pretrained trunks and checkpoints (``trunks``: modules already built
    for some branches, by branch name, used as they are).

    >>> model = FusionNet(backbones=["resnet18", "mobilenet_v2"], num_classes=5)
    >>> logits = model(torch.rand(2, 3, 64, 64))            # (2, 5)
    >>> feats = model.forward_branches(x)                    # {"resnet18": (2, 512), "mobilenet_v2": (2, 1280)}
    """

    def __init__(self, config: FusionConfig | None = None, *, backbones: Sequence[str | BranchConfig] | None = None,
                 num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 pool: str | Mapping[str, str] = "avg", input_size: int | Mapping[str, int] | None = None,
                 taps: int | Mapping[str, int] = 0, fusion: str = DEFAULT_FUSION, fusion_width: int = 256,
                 head_hidden: int | None = None, dropout: float = 0.0, branch_dropout: float = 0.0,
                 branch_heads: bool = False, freeze_trunks: bool = False, predict_with: str = "fused",
                 resize: str = "shorter", crop_pct: float = 1.0, reader: str = "albumentations",
                 image_size: int | None = None, trunks: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        settings = dict(pool=pool, input_size=input_size, taps=taps, class_names=class_names, fusion=fusion,
                        fusion_width=fusion_width, head_hidden=head_hidden, dropout=dropout,
                        branch_dropout=branch_dropout, branch_heads=branch_heads, freeze_trunks=freeze_trunks,
                        predict_with=predict_with, resize=resize, crop_pct=crop_pct, reader=reader,
                        image_size=image_size)
        if config is None:
            config = make_config(backbones, num_classes=num_classes, **settings)
        elif backbones is not None or num_classes is not None or settings != _KEYWORD_DEFAULTS:
            raise ConfigError("pass either a FusionConfig or keyword settings, not both")
        self.config = config
        self.load_reports: dict = {}  # filled by fusionnet.models.factory when checkpoints are loaded into branches
        self.branches = nn.ModuleDict()
        trunks = dict(trunks or {})  # built elsewhere (e.g. with pretrained weights), by branch name
        unknown = sorted(set(trunks) - {b.name for b in config.branches})
        if unknown:
            raise ConfigError(f"trunks given for unknown branch(es) {unknown}")
        for b in config.branches:
            spec = get_spec(b.backbone)
            trunk = trunks.get(b.name)
            if trunk is None:
                trunk = build_trunk(spec, aux_classes=config.num_classes if b.aux_heads else None)
            self.branches[b.name] = Branch(b, spec, trunk)
        dims = [br.out_dim for br in self.branches.values()]
        self.fuser = get_fusion(config.fusion)(dims, num_classes=config.num_classes, width=config.fusion_width)
        self.feature_dim = self.fuser.out_dim
        layers: list[tuple[str, nn.Module]] = [("drop", nn.Dropout(config.dropout))]
        width = self.feature_dim
        if config.head_hidden:
            layers += [("hidden", nn.Linear(width, config.head_hidden)), ("act", nn.ReLU(inplace=True)),
                       ("drop2", nn.Dropout(config.dropout))]
            width = config.head_hidden
        layers.append(("fc", nn.Linear(width, config.num_classes)))
        self.head = nn.Sequential(OrderedDict(layers))
        self.branch_heads = nn.ModuleDict({n: nn.Linear(br.out_dim, config.num_classes)
                                           for n, br in self.branches.items()}) if config.branch_heads else None
        # how the trainer runs the branches (fusionnet.engine.callbacks); not part of the config or the checkpoint
        self.checkpoint_activations = False
        self.branch_runner: Callable | None = None  # e.g. fusionnet.models.streams.StreamRunner: each on a CUDA stream
        if config.freeze_trunks:
            self.set_trainable_stages(0)

    # ---- the training interface (fusionnet.models.interface) --------------------------------------------------------
    def trunk_parameters(self) -> list[nn.Parameter]:
        """Pretrained trunk weights (the optimiser gives them a smaller learning rate); aux heads are not."""
        return [p for br in self.branches.values() for stage in br.stages for p in stage.parameters()]

    def trunk_parameters_by_depth(self) -> list[list[nn.Parameter]]:
        """[parameters of every branch's top stage, of the stage below it, ...]: branches align at their tops."""
        depths: list[list[nn.Parameter]] = [[] for _ in range(self.num_trunk_stages())]
        for br in self.branches.values():
            for depth, stage in enumerate(reversed(br.stages)):
                depths[depth].extend(stage.parameters())
        return depths

    def num_trunk_stages(self) -> int:
        return max(len(br.stages) for br in self.branches.values())

    def set_trainable_stages(self, k: int | None, names: Sequence[str] | None = None) -> None:
        """Train the top ``k`` trunk stages of the named branches (all by default): 0 freezes, None releases."""
        for name in names or list(self.branches):
            if name not in self.branches:
                raise ConfigError(f"no branch {name!r}; branches: {', '.join(self.branches)}")
            self.branches[name].set_trainable_top_stages(k)

    def feature_extractors(self) -> Mapping[str, nn.Module]:
        return self.branches

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.checkpoint_activations = bool(enabled)

    def set_branch_runner(self, runner: Callable | None) -> None:
        self.branch_runner = runner

    def branch_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {name: list(br.parameters()) for name, br in self.branches.items()}

    def branch_logit_shares(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """{name: (B, K)}: each branch's share ``W_i f_i + b / M`` of the logits, for a Linear head over a fusion
        that keeps each branch in its own columns (concat, gated)."""
        columns = self.fuser.branch_columns()
        if columns is None or self.config.head_hidden or "fused" not in output.extras:
            raise ConfigError(f"per-branch logit shares (OGM-GE) need a Linear head (head_hidden=None) over a fusion "
                              f"that keeps each branch in its own columns, e.g. concat or gated; this model has "
                              f"fusion={self.config.fusion!r}, head_hidden={self.config.head_hidden!r}")
        fc: nn.Linear = self.head.fc
        fused, m = output.extras["fused"], len(columns)
        return {name: fused[:, cols] @ fc.weight[:, cols].T + fc.bias / m for name, cols in zip(self.branches, columns)}

    def branch_head_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        """{name: (B, K)}: each branch head's logits (``branch_heads=True``), from a training-mode output."""
        if self.branch_heads is None or len(self.branches) < 2:
            raise ConfigError(f"co-distillation needs a FusionNet with at least 2 branches and branch_heads=True; "
                              f"this one has {len(self.branches)} branch(es), branch_heads={self.config.branch_heads}")
        return {name: output.aux[f"branch:{name}"] for name in self.branches}

    def _per_branch(self, x: torch.Tensor, fn: Callable[[Branch], object]) -> dict[str, object]:
        """{name: fn(branch)}: the branches in turn, or through ``branch_runner`` (e.g. each on a CUDA stream)."""
        calls = {name: (lambda br=br: fn(br)) for name, br in self.branches.items()}
        if self.branch_runner is not None and x.is_cuda and len(self.branches) > 1:
            return self.branch_runner(x, calls)
        return {name: call() for name, call in calls.items()}

    def forward_output(self, x: torch.Tensor) -> ModelOutput:
        _check_images(x)
        runs = self._per_branch(x, lambda br: br.forward_with_aux(x, checkpoint=self.checkpoint_activations))
        feats = {name: f for name, (f, _) in runs.items()}
        aux = {f"{name}:{k}": v for name, (_, branch_aux) in runs.items() for k, v in branch_aux.items()}
        out = self.forward_head_output(feats)
        return ModelOutput(out.logits, {**aux, **out.aux}, out.extras)

    def forward_head_output(self, features: Mapping[str, torch.Tensor]) -> ModelOutput:
        names = list(self.branches)
        feats = branch_dropout(ordered(features, names), self.config.branch_dropout, self.training)
        fused, extras = self.fuser(feats)
        aux = {}
        if self.branch_heads is not None:  # on the undropped features: every branch learns to classify alone
            aux = {f"branch:{n}": self.branch_heads[n](features[n]) for n in names}
        logits = self.head(fused)
        if not self.training and self.config.predict_with != "fused":  # training always fits the fused head
            logits = predicted_logits(logits, list(aux.values()), self.config.predict_with)
        return ModelOutput(logits, aux, {**extras, "fused": fused})

    def model_config(self) -> dict:
        return self.config.to_dict()

    @classmethod
    def from_payload(cls, payload: Mapping, *, config_file, weights_file) -> "FusionNet":
        """The model a checkpoint payload describes (its ``config`` and ``state_dict``), in eval mode; a config this
        fusionnet cannot build, or weights that do not fit it, are a CheckpointMismatchError naming the file."""
        try:
            config = FusionConfig.from_dict(payload["config"])
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointMismatchError(f"{str(config_file)!r} holds a model config this fusionnet cannot build "
                                          f"({type(exc).__name__}: {exc})") from exc
        model = cls(config)
        try:
            model.load_state_dict(payload["state_dict"], strict=True)
        except RuntimeError as exc:
            config = "config" if str(config_file) == str(weights_file) else Path(config_file).name
            raise CheckpointMismatchError(f"{str(weights_file)!r} does not fit its {config}: the file is damaged or "
                                          f"was edited ({str(exc).splitlines()[0]})") from exc
        return model.eval()

    # ---- inference ---------------------------------------------------------------------------------------------
    def forward_branches(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each branch's pooled features, by branch name: {name: (B, D_i)}."""
        _check_images(x)
        return self._per_branch(x, lambda br: br(x))

    def forward_head(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, K) from pooled features by branch name."""
        return self.forward_head_output(features).logits

    def forward_with_branches(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits (B, K), {name: (B, D_i)}) in one pass."""
        feats = self.forward_branches(x)
        return self.forward_head(feats), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1] -> (B, K)
        return self.forward_head(self.forward_branches(x))

    @property
    def class_names(self) -> list[str] | None:
        return self.config.class_names

    def extra_repr(self) -> str:
        dims = ", ".join(f"{n}={br.out_dim}" for n, br in self.branches.items())
        return (f"branches: {dims}; fusion={self.config.fusion} -> {self.feature_dim}; "
                f"classes={self.config.num_classes}")


def make_config(backbones: Sequence[str | BranchConfig] | None, *, num_classes: int | None = None,
                pool: str | Mapping[str, str] = "avg", input_size: int | Mapping[str, int] | None = None,
                taps: int | Mapping[str, int] = 0, class_names: Sequence[str] | None = None,
                **options) -> FusionConfig:
    """A FusionConfig from the keyword form: plain names take the model-wide ``pool`` / ``input_size`` / ``taps``
    (or a dict by backbone name); a BranchConfig keeps its own; ``options`` are FusionConfig fields."""
    if backbones is None or isinstance(backbones, str) or not isinstance(backbones, Sequence):
        raise ConfigError(f"backbones must be a list of backbone names, got {backbones!r}; "
                          f"e.g. backbones=['resnet18']")
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if num_classes is None:
        raise ConfigError("pass num_classes (or class_names)")
    unknown = sorted(set(options) - set(FusionConfig.__dataclass_fields__) - {"branches"})
    if unknown:
        raise ConfigError(f"unknown FusionNet setting(s) {unknown}; settings: "
                          f"{', '.join(f for f in FusionConfig.__dataclass_fields__ if f != 'branches')}")
    plain = [b for b in backbones if isinstance(b, str)]
    for setting, value in (("pool", pool), ("input_size", input_size), ("taps", taps)):
        stray = sorted(set(value) - set(plain)) if isinstance(value, Mapping) else []
        if stray:  # a misspelt name would silently leave its branch at the default
            raise ConfigError(f"{setting} names backbone(s) {stray} that are not among the plain backbone names "
                              f"{plain}; key the dict by those names")
    branches = [b if isinstance(b, BranchConfig) else BranchConfig(**b) if isinstance(b, Mapping) else
                BranchConfig(backbone=b, pool=_per_branch(pool, b, "avg"), input_size=_per_branch(input_size, b, None),
                             taps=_per_branch(taps, b, 0))
                for b in backbones]
    return FusionConfig(branches=branches, num_classes=num_classes,
                        class_names=list(class_names) if class_names is not None else None, **options)


def _per_branch(value, backbone: str, default):
    """A setting given once for all branches, or as a dict by backbone name (names it lacks get ``default``)."""
    return value.get(backbone, default) if isinstance(value, Mapping) else value


def predicted_logits(fused: torch.Tensor, branch_logits: Sequence[torch.Tensor], predict_with: str) -> torch.Tensor:
    """The logits a model with branch heads predicts: the fused head's (``fused``), or the log of the mean
    probabilities (a soft vote) of the branch heads (``branches``) or of the branch heads and the fused head
    (``all``). (B, K) each."""
    if predict_with == "fused":
        return fused
    return soft_vote_logits(list(branch_logits) + ([fused] if predict_with == "all" else [])).to(fused.dtype)


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"expected images of shape (B, 3, H, W) with values in [0, 1], got {shape}; "
                          f"grayscale images: x.expand(-1, 3, -1, -1)")
    if not x.is_floating_point():  # checked without reading the values (no device sync)
        raise ConfigError(f"expected float images with values in [0, 1], got {x.dtype}; 8-bit images: "
                          f"x.float() / 255")
