"""Test-time augmentation: a model's prediction averaged over a few views of each image.

Views act on a batch of images (B, 3, H, W) and keep its size: ``flip`` (the image and its mirror) and
``flip-zoom`` (those two and a centre crop of 87.5 % of each side, resized back, with its mirror). The views'
outputs are averaged in probability space (``"prob"``, the mean of the softmaxes) or in logit space (``"logit"``, the
softmax of the mean logits). A model invariant to the views predicts exactly what it predicts without TTA.
Cost: one forward pass per view.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fusionnet.errors import ConfigError


def _zoom(x: torch.Tensor, keep: float = 0.875) -> torch.Tensor:
    h, w = x.shape[-2:]
    dh, dw = round(h * (1 - keep) / 2), round(w * (1 - keep) / 2)
    crop = x[..., dh:h - dh, dw:w - dw]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


def _flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


VIEWS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "flip": [lambda x: x, _flip],
    "flip-zoom": [lambda x: x, _flip, _zoom, lambda x: _flip(_zoom(x))],
}
SPACES = ("prob", "logit")


def check_tta(tta: str | None, space: str) -> None:
    if tta is not None and tta not in VIEWS:
        raise ConfigError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(VIEWS)} (or none)")
    if space not in SPACES:
        raise ConfigError(f"unknown TTA averaging space {space!r}; choose 'prob' or 'logit'")


def tta_probs(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str | None,
              space: str = "prob") -> torch.Tensor:
    """Probabilities (B, K) of ``forward`` (images -> logits) on ``x``, averaged over the views of ``tta``."""
    if tta is None:
        return forward(x).float().softmax(1)
    logits = [forward(view(x)).float() for view in VIEWS[tta]]
    if space == "logit":
        return torch.stack(logits).mean(0).softmax(1)
    return torch.stack([lg.softmax(1) for lg in logits]).mean(0)
