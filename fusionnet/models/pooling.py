"""Global pooling of a trunk's output to one vector per image, whatever the output's layout.

Layouts (what a trunk's ``forward_features`` returns):

* ``NCHW``: (B, C, h, w), convolutional networks (torchvision, most timm models);
* ``NHWC``: (B, h, w, C), timm models with ``output_fmt == "NHWC"`` (MambaOut, some Swin variants);
* ``NLC``: (B, N, C) tokens, vision transformers; the first ``prefix_tokens`` are class/register tokens.

Pool names follow timm: ``avg``, ``max``, ``avgmax`` (the *mean* of avg and max, C values), ``catavgmax`` (their
concatenation, 2C values), ``gem`` (generalised mean, learnable p) and, for tokens, ``token`` (the class token).
"""

from __future__ import annotations

import torch
from torch import nn

from fusionnet.errors import ConfigError

POOLS = ("avg", "max", "avgmax", "catavgmax", "gem", "token")
LAYOUTS = ("NCHW", "NHWC", "NLC")


class GeM(nn.Module):
    """Generalised-mean pooling over the last axis with a learnable exponent p (p=1: average, p -> inf: max)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, C)
        return x.clamp(min=self.eps).pow(self.p).mean(dim=-1).pow(1.0 / self.p)


class Pool(nn.Module):
    """(B, C, h, w) | (B, h, w, C) | (B, N, C) -> (B, D): D = C, or 2C for ``catavgmax``."""

    def __init__(self, kind: str = "avg", layout: str = "NCHW", prefix_tokens: int = 0) -> None:
        super().__init__()
        check_pool(kind, layout, prefix_tokens)
        self.kind, self.layout, self.prefix_tokens = kind, layout, prefix_tokens
        self.gem = GeM() if kind == "gem" else None

    def _channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """Any layout -> (B, C, L) over the spatial positions or patch tokens."""
        if self.layout == "NCHW":
            return x.flatten(2)
        if self.layout == "NHWC":
            return x.flatten(1, 2).transpose(1, 2)
        return x[:, self.prefix_tokens:].transpose(1, 2)  # NLC: patch tokens only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "token":
            return x[:, 0]  # (B, N, C) -> (B, C): the class token
        x = self._channels_first(x)  # (B, C, L)
        if self.kind == "avg":
            return x.mean(dim=-1)
        if self.kind == "max":
            return x.amax(dim=-1)
        if self.kind == "avgmax":
            return 0.5 * (x.mean(dim=-1) + x.amax(dim=-1))
        if self.kind == "catavgmax":
            return torch.cat([x.mean(dim=-1), x.amax(dim=-1)], dim=1)
        return self.gem(x)

    def out_dim(self, channels: int) -> int:
        return 2 * channels if self.kind == "catavgmax" else channels


def check_pool(kind: str, layout: str = "NCHW", prefix_tokens: int = 0) -> None:
    if kind not in POOLS:
        raise ConfigError(f"unknown pool {kind!r}; choose one of {', '.join(POOLS)}")
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown feature layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if kind == "token" and (layout != "NLC" or prefix_tokens < 1):
        raise ConfigError("pool 'token' takes the class token of a transformer; this trunk has none: use 'avg'")


def detect_layout(trunk: nn.Module, output: torch.Tensor) -> tuple[str, int, int]:
    """(layout, channels, prefix tokens) of a trunk's output, from its shape and timm's ``output_fmt``."""
    if output.ndim == 3:
        return "NLC", int(output.shape[-1]), int(getattr(trunk, "num_prefix_tokens", 0) or 0)
    if output.ndim != 4:
        raise ConfigError(f"{type(trunk).__name__}'s features have shape {tuple(output.shape)}; a branch needs "
                          f"(B, C, h, w), (B, h, w, C) or (B, N, C)")
    if str(getattr(trunk, "output_fmt", "NCHW")).upper().endswith("NHWC"):
        return "NHWC", int(output.shape[-1]), 0
    return "NCHW", int(output.shape[1]), 0
