"""Probabilities from several models: the checks of what output ensembles are given (probabilities (M, N, K) or
(N, K), labels (N,), weights) and the one soft vote (:func:`soft_vote`; from logits, :func:`soft_vote_logits`).

Every voting, selection, calibration and stacking function checks its inputs here, so a wrong shape, NaN, logits
passed as probabilities or out-of-range labels fail with one clear :class:`fusionnet.errors.DataError`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fusionnet.errors import ConfigError, DataError

ROW_SUM_TOL = 1e-3  # probabilities saved in float32 sum to 1 within ~1e-6; logits miss by far more
EPS = 1e-12  # probabilities are clamped here before a log


def _probs_tensor(probs, ndim: int, what: str) -> torch.Tensor:
    if isinstance(probs, (list, tuple)) and len(probs) == 0:
        raise DataError(f"{what}: no members given; pass at least one member's probabilities")
    p = torch.as_tensor(probs)
    if not p.is_floating_point():
        p = p.double()
    if p.ndim != ndim:
        shape = "(M members, N samples, K classes)" if ndim == 3 else "(N samples, K classes)"
        raise DataError(f"{what}: expected probabilities of shape {shape}, got shape {tuple(p.shape)}"
                        + ("; one member's (N, K) array goes in a list: [probs]" if p.ndim == ndim - 1 else ""))
    if p.numel() == 0:
        raise DataError(f"{what}: empty probabilities, shape {tuple(p.shape)}")
    if not torch.isfinite(p).all():
        raise DataError(f"{what}: probabilities contain NaN or inf ({int((~torch.isfinite(p)).sum())} values); "
                        f"re-run the member's predictions")
    sums = p.sum(dim=-1)
    if (p < 0).any() or (p > 1).any() or ((sums - 1).abs() > ROW_SUM_TOL).any():
        worst = float((sums - 1).abs().max())
        raise DataError(f"{what}: rows are not probabilities (values outside [0, 1] or rows summing to 1 +- "
                        f"{worst:.3g}); if these are logits, apply .softmax(-1) first")
    return p


def _labels_tensor(labels, n: int, k: int, what: str) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise DataError(f"{what}: labels must be class indices (integers), got fractional values")
    y = y.long()
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{what}: expected {n} labels (one per sample), got shape {tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise DataError(f"{what}: labels must lie in 0..{k - 1} for {k} classes, got values "
                        f"{int(y.min())}..{int(y.max())}")
    return y


def check_stack(probs, labels=None, what: str = "ensemble") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M, N, K) probabilities (float) and (N,) long labels, or a DataError naming what is wrong."""
    p = _probs_tensor(probs, 3, what)
    return p, (_labels_tensor(labels, p.shape[1], p.shape[2], what) if labels is not None else None)


def check_probs(probs, labels=None, what: str = "probabilities") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, K) probabilities (float) and (N,) long labels, or a DataError naming what is wrong."""
    p = _probs_tensor(probs, 2, what)
    return p, (_labels_tensor(labels, p.shape[0], p.shape[1], what) if labels is not None else None)


def check_weights(weights: Sequence[float] | torch.Tensor | None, m: int) -> torch.Tensor:
    """(M,) float64 weights normalised to sum to 1; uniform when None."""
    if weights is None:
        return torch.full((m,), 1.0 / m, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if len(w) != m or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"weights must be {m} finite non-negative numbers with a positive sum, got "
                          f"{list(w.tolist())}")
    return w / w.sum()


def soft_vote(probs, weights: Sequence[float] | torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
    """The soft vote, the one implementation every caller uses: (M, N, K) probabilities -> (N, K), their mean (or
    weighted mean: ``weights`` (M,), normalised to sum to 1), summed in float64, returned in the inputs' dtype.
    Inputs are checked (:func:`check_stack`, :func:`check_weights`); ``check=False`` where they are valid by
    construction (softmax outputs in a forward pass, weights checked once)."""
    p = check_stack(probs)[0] if check else probs
    w = check_weights(weights, p.shape[0]) if check or weights is None else weights
    return torch.einsum("m,mnk->nk", w.to(p.device, torch.float64), p.double()).to(p.dtype)


def scale_probs(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature scaling applied to probabilities: softmax(log p / T), p clamped at :data:`EPS` first (what
    :func:`fusionnet.ensembles.calibration.fit_temperature` fits, and a vote model applies)."""
    return (probs.clamp_min(EPS).log() / temperature).softmax(dim=-1)


def soft_vote_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The log of the mean softmax of several models' or heads' logits (each (B, K)): :func:`soft_vote` as logits
    (float32), computed in log space (logsumexp) so that no probability underflows."""
    log_p = torch.stack([lg.float().log_softmax(1) for lg in logits])
    return log_p.logsumexp(0) - torch.log(torch.tensor(float(len(logits)), device=log_p.device))
