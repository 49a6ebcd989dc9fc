"""SAMME boosting maths (Zhu et al., 2009) and bootstrap samples, for sequentially trained or bagged members."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from fusionnet.ensembles.voting import hard_vote

EPS = 1e-12


def samme_alpha(weighted_error: float, num_classes: int) -> float:
    """SAMME's member weight (Zhu et al., 2009): log((1 - err) / err) + log(K - 1)."""
    err = min(max(weighted_error, EPS), 1 - EPS)
    return math.log((1 - err) / err) + math.log(num_classes - 1)


def samme_update(sample_weights: torch.Tensor, correct: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, float]:
    """One SAMME round: (new normalised sample weights, alpha) given which samples the new member got right."""
    w = sample_weights.double() / sample_weights.sum()
    err = float((w * (~correct).double()).sum())
    alpha = samme_alpha(err, num_classes)
    new = w * torch.exp(alpha * (~correct).double())
    return new / new.sum(), alpha


def boosted_vote(probs: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """SAMME's combination: each member votes for its predicted class with weight alpha_m, i.e. weighted hard
    voting (same tie rule); (M, N, K) -> (N, K) vote fractions."""
    return hard_vote(probs, alphas)


def bootstrap_indices(n: int, seed: int) -> list[int]:
    """A bootstrap sample (with replacement, size n) of range(n), for bagged member training."""
    return np.random.default_rng(seed).integers(0, n, size=n).tolist()
