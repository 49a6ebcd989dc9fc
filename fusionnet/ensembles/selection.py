"""Choosing and weighting ensemble members on a validation split.

Everything here takes cached probabilities: ``val`` (M, N, K) and ``labels`` (N,). The test split is never an
argument of a fitting function, so no choice can see it.

* :func:`greedy_selection`: Caruana et al. (2004), forward selection with replacement, sorted initialisation with
  the best N members, optional bagged selection; the counts are the weights; the score trajectory is kept.
* :func:`exhaustive_selection`: every non-empty subset (uniform weights) when there are at most 12 members.
* :func:`fit_weights`: simplex weights minimising validation NLL (softmax-parameterised).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from fusionnet.utils.probabilities import check_stack, soft_vote
from fusionnet.errors import ConfigError
from fusionnet.utils.metrics import accuracy, nll

EPS = 1e-12
SCORERS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], float], str]] = {
    "nll": (nll, "min"), "acc": (accuracy, "max")}


def _scorer(metric: str):
    if metric not in SCORERS:
        raise ConfigError(f"unknown selection metric {metric!r}; choose one of {', '.join(SCORERS)}")
    fn, direction = SCORERS[metric]
    return (lambda p, y: fn(p, y)) if direction == "max" else (lambda p, y: -fn(p, y))  # higher is better


@dataclass
class SelectionResult:
    counts: list[int]  # how often each member was picked
    weights: list[float]  # counts / sum(counts)
    trajectory: list[float] = field(default_factory=list)  # validation metric after each addition
    metric: str = "nll"


def greedy_selection(val: torch.Tensor, labels: torch.Tensor, *, metric: str = "nll", n_init: int = 1,
                     rounds: int = 25, bags: int = 0, bag_fraction: float = 0.5, seed: int = 0) -> SelectionResult:
    """Caruana et al. (2004) ensemble selection with replacement.

    Start from the ``n_init`` best single members (sorted initialisation), then repeatedly add the member (repeats
    allowed) whose addition gives the best validation ``metric`` of the soft-voted ensemble, for ``rounds`` steps;
    the best point of the trajectory is kept. With ``bags > 0``, the procedure runs on ``bags`` random subsets of
    ``bag_fraction`` of the members and the counts are summed (bagged selection, which curbs overfitting to val).
    """
    val, labels = check_stack(val, labels, "validation")
    m = val.shape[0]
    if not 1 <= n_init <= m:
        raise ConfigError(f"n_init must be between 1 and the {m} members, got {n_init}")
    if bags:
        rng = np.random.default_rng(seed)
        total = np.zeros(m, dtype=int)
        size = max(1, int(round(bag_fraction * m)))
        for _ in range(bags):
            idx = np.sort(rng.choice(m, size=size, replace=False))
            sub = greedy_selection(val[idx], labels, metric=metric, n_init=min(n_init, size), rounds=rounds)
            total[idx] += np.array(sub.counts)
        counts = total.tolist()
        ens = soft_vote(val, counts)
        return SelectionResult(counts, [c / sum(counts) for c in counts], [SCORERS[metric][0](ens, labels)], metric)
    score = _scorer(metric)
    singles = [score(val[i], labels) for i in range(m)]
    counts = [0] * m
    for i in sorted(range(m), key=lambda i: -singles[i])[:n_init]:
        counts[i] += 1
    running = torch.einsum("m,mnk->nk", torch.tensor(counts, dtype=val.dtype), val)  # sum of chosen probs
    trajectory = [SCORERS[metric][0](running / sum(counts), labels)]
    best_counts, best_score = list(counts), score(running / sum(counts), labels)
    for _ in range(rounds):
        n = sum(counts) + 1
        gains = [score((running + val[i]) / n, labels) for i in range(m)]
        pick = int(np.argmax(gains))  # first best on ties: deterministic
        counts[pick] += 1
        running = running + val[pick]
        trajectory.append(SCORERS[metric][0](running / n, labels))
        if gains[pick] > best_score + 1e-12:
            best_score, best_counts = gains[pick], list(counts)
    return SelectionResult(best_counts, [c / sum(best_counts) for c in best_counts], trajectory, metric)


def exhaustive_selection(val: torch.Tensor, labels: torch.Tensor, *, metric: str = "nll",
                         max_members: int = 12) -> SelectionResult:
    """The best non-empty subset (uniform soft vote) by validation ``metric``; at most ``max_members`` members."""
    val, labels = check_stack(val, labels, "validation")
    m = val.shape[0]
    if m > max_members:
        raise ConfigError(f"exhaustive search over {m} members is 2^{m} subsets; use greedy_selection, or raise "
                         f"max_members (now {max_members})")
    score = _scorer(metric)
    best, best_subset = -math.inf, None
    for r in range(1, m + 1):
        for subset in itertools.combinations(range(m), r):
            s = score(val[list(subset)].mean(0), labels)
            if s > best + 1e-12:
                best, best_subset = s, subset
    counts = [1 if i in best_subset else 0 for i in range(m)]
    return SelectionResult(counts, [c / sum(counts) for c in counts], [SCORERS[metric][0](
        val[list(best_subset)].mean(0), labels)], metric)


def fit_weights(val: torch.Tensor, labels: torch.Tensor, *, steps: int = 200) -> list[float]:
    """Weights on the simplex minimising the validation NLL of the weighted soft vote (softmax of free logits)."""
    val, labels = check_stack(val, labels, "validation")
    probs = val.double()
    theta = torch.zeros(val.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        mix = torch.einsum("m,mnk->nk", theta.softmax(0), probs)
        loss = -mix[torch.arange(len(labels)), labels].clamp_min(EPS).log().mean()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach().softmax(0).tolist()


