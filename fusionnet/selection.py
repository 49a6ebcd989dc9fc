"""Choosing and weighting ensemble members on a validation split; calibration; stacking; diversity; boosting.

Everything here takes cached probabilities: ``val`` (M, N, K) and ``labels`` (N,). The test split is never an
argument of a fitting function, so no choice can see it.

* :func:`greedy_selection`: Caruana et al. (2004), forward selection with replacement, sorted initialisation with
  the best N members, optional bagged selection; the counts are the weights; the score trajectory is kept.
* :func:`exhaustive_selection`: every non-empty subset (uniform weights) when there are at most 12 members.
* :func:`fit_weights`: simplex weights minimising validation NLL (softmax-parameterised).
* :func:`fit_temperature`: temperature scaling of one member or of an ensemble.
* :func:`stacking`: a meta-learner on the members' probabilities, evaluated by cross-validation on val.
* :func:`diversity`: pairwise disagreement and error correlation.
* :func:`samme_alpha` / :func:`samme_update`: SAMME boosting weights for sequentially trained members.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from einops import rearrange

from fusionnet.metrics import expected_calibration_error
from fusionnet.voting import hard_vote, soft_vote

EPS = 1e-12


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float(-probs[torch.arange(len(labels)), labels].clamp_min(EPS).log().mean())


def _acc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels).float().mean())


SCORERS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], float], str]] = {
    "nll": (_nll, "min"), "acc": (_acc, "max")}


def _scorer(metric: str):
    if metric not in SCORERS:
        raise ValueError(f"unknown selection metric {metric!r}; choose one of {', '.join(SCORERS)}")
    fn, direction = SCORERS[metric]
    return (lambda p, y: fn(p, y)) if direction == "max" else (lambda p, y: -fn(p, y))  # higher is better


def _check(val: torch.Tensor, labels: torch.Tensor) -> None:
    if val.ndim != 3 or val.shape[1] != len(labels):
        raise ValueError(f"expected val probabilities (M, N, K) and labels (N,), got {tuple(val.shape)} and "
                         f"{tuple(labels.shape)}")


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
    _check(val, labels)
    m = val.shape[0]
    if not 1 <= n_init <= m:
        raise ValueError(f"n_init must be between 1 and the {m} members, got {n_init}")
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
    _check(val, labels)
    m = val.shape[0]
    if m > max_members:
        raise ValueError(f"exhaustive search over {m} members is 2^{m} subsets; use greedy_selection, or raise "
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
    _check(val, labels)
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


@dataclass
class Temperature:
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        return scale_probs(probs, self.temperature)


def scale_probs(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T): temperature scaling applied to probabilities."""
    return (probs.clamp_min(EPS).log() / temperature).softmax(dim=-1)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> Temperature:
    """The T > 0 minimising validation NLL of softmax(log p / T) (Guo et al., 2017), with ECE before and after."""
    logp = probs.double().clamp_min(EPS).log()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logp / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    after = scale_probs(probs, t)
    return Temperature(t, _nll(probs, labels), _nll(after, labels), expected_calibration_error(probs, labels),
                       expected_calibration_error(after, labels))


@dataclass
class StackingResult:
    test_probs: torch.Tensor  # (N_test, K) from the meta-learner fitted on all of val
    cv_acc: float  # honest estimate: out-of-fold accuracy on val
    cv_nll: float
    meta: object  # the fitted scikit-learn estimator


def _meta_learner(method: str, seed: int):
    if method == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=2000, C=1.0)
    if method == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, random_state=seed)
    raise ValueError(f"unknown stacking meta-learner {method!r}; choose 'logreg' or 'hgb'")


def stacking(val: torch.Tensor, val_labels: torch.Tensor, test: torch.Tensor, *, method: str = "logreg",
             cv: int = 5, seed: int = 0) -> StackingResult:
    """A meta-learner on the members' concatenated probabilities (features (N, M*K)).

    It is fitted on the validation split only: out-of-fold predictions (stratified ``cv`` folds on val) give an
    honest score, then a final fit on all of val predicts ``test``. Test labels are never an input.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    _check(val, val_labels)
    x_val = rearrange(val, "m n k -> n (m k)").numpy()  # each sample: its members' probabilities side by side
    x_test = rearrange(test, "m n k -> n (m k)").numpy()
    y = val_labels.numpy()
    folds = StratifiedKFold(n_splits=min(cv, int(np.bincount(y).min())), shuffle=True, random_state=seed)
    oof = cross_val_predict(_meta_learner(method, seed), x_val, y, cv=folds, method="predict_proba")
    oof_t = torch.from_numpy(oof)
    meta = _meta_learner(method, seed).fit(x_val, y)
    test_probs = torch.zeros(len(x_test), val.shape[2], dtype=torch.float64)
    test_probs[:, meta.classes_] = torch.from_numpy(meta.predict_proba(x_test)).double()
    return StackingResult(test_probs.float(), _acc(oof_t, val_labels), _nll(oof_t, val_labels), meta)


def diversity(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Pairwise disagreement (fraction of samples where two members' predictions differ) and the correlation of
    their error indicators; higher disagreement and lower error correlation leave more for voting to gain."""
    pred = probs.argmax(2)  # (M, N)
    err = (pred != labels).double()
    m = probs.shape[0]
    disagree = [[float((pred[i] != pred[j]).double().mean()) for j in range(m)] for i in range(m)]
    with np.errstate(invalid="ignore", divide="ignore"):  # a member never (or always) wrong has no variance
        corr = np.corrcoef(err.numpy()) if m > 1 else np.ones((1, 1))
    return {"disagreement": disagree, "error_correlation": np.nan_to_num(corr, nan=0.0).tolist()}


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
