"""Losses: cross-entropy (optionally class-weighted, label-smoothed) and focal loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusionnet.errors import ConfigError


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): ``-alpha_y * (1 - p_y)^gamma * log p_y``, averaged over the batch.

    ``gamma=0`` with no ``alpha`` is cross-entropy. ``alpha`` is a per-class weight (e.g. from
    :func:`fusionnet.data.splits.class_weights`); with ``alpha`` the mean is the plain batch mean, as in the paper.
    """

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"focal gamma must be >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32) if alpha is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # (B, K), (B,) -> ()
        logp = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)  # (B,)
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss.mean()


def make_loss(name: str = "ce", *, weight: torch.Tensor | None = None, label_smoothing: float = 0.0,
              gamma: float = 2.0) -> nn.Module:
    """``"ce"`` (weighted by ``weight`` if given, with label smoothing) or ``"focal"`` (``weight`` as alpha)."""
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if name == "focal":
        if label_smoothing:
            raise ConfigError("label_smoothing is not supported with the focal loss; set it to 0")
        return FocalLoss(gamma=gamma, alpha=weight)
    raise ConfigError(f"unknown loss {name!r}; choose 'ce' or 'focal'")
