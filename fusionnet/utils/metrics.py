"""Classification metrics from predicted probabilities, each computed in one place and used by tables and figures
alike: accuracy, macro-F1, per-class precision/recall, confusion matrix, negative log-likelihood, expected
calibration error (with its reliability bins) and ensemble diversity.

Macro-F1 averages over all K classes: a class absent from both labels and predictions scores 0.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from fusionnet.errors import DataError


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


ECE_BINS = 15  # the table's ECE and the reliability diagram use the same bins


def reliability_bins(probs, labels, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins: for each non-empty bin its mean confidence, accuracy and sample count."""
    probs, labels = _np(probs), _np(labels)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    return [{"confidence": float(conf[bins == b].mean()), "accuracy": float(correct[bins == b].mean()),
             "count": int((bins == b).sum())} for b in range(n_bins) if (bins == b).any()]


def equal_mass_bins(probs, labels, n_bins: int = 10) -> list[dict]:
    """Confidence bins of (near) equal sample counts, for a readable reliability diagram: every bin holds about
    N / n_bins samples, so no bin's accuracy is the noise of a handful; fewer bins for a small N (at least 20
    samples each)."""
    probs, labels = _np(probs), _np(labels)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    order = np.argsort(conf, kind="stable")
    k = max(1, min(n_bins, len(conf) // 20))
    return [{"confidence": float(conf[idx].mean()), "accuracy": float(correct[idx].mean()), "count": int(len(idx))}
            for idx in np.array_split(order, k) if len(idx)]


def expected_calibration_error(probs, labels, n_bins: int = ECE_BINS) -> float:
    """ECE: the sample-weighted gap between confidence (max probability) and accuracy over equal-width bins."""
    n = len(_np(labels))
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(probs, labels, n_bins)))


def nll(probs, labels, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class (probabilities clamped at ``eps``)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    return float(-p[torch.arange(len(y)), y].clamp_min(eps).log().mean())


def accuracy(probs, labels) -> float:
    return float((torch.as_tensor(probs).argmax(-1) == torch.as_tensor(labels)).double().mean())


def diversity(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Pairwise disagreement (fraction of samples where two members' predictions differ) and the correlation of
    their error indicators, for (M, N, K) member probabilities; higher disagreement and lower error correlation
    leave more for voting to gain."""
    pred = probs.argmax(2)  # (M, N)
    err = (pred != labels).double()
    m = probs.shape[0]
    disagree = [[float((pred[i] != pred[j]).double().mean()) for j in range(m)] for i in range(m)]
    with np.errstate(invalid="ignore", divide="ignore"):  # a member never (or always) wrong has no variance
        corr = np.corrcoef(err.numpy()) if m > 1 else np.ones((1, 1))
    return {"disagreement": disagree, "error_correlation": np.nan_to_num(corr, nan=0.0).tolist()}


def classification_metrics(probs, labels, class_names: list[str] | None = None) -> dict:
    """All metrics for (N, K) probabilities and (N,) integer labels, as plain JSON-ready values."""
    probs, labels = _np(probs).astype(np.float64), _np(labels).astype(np.int64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise DataError(f"expected probs (N, K) and labels (N,), got {probs.shape} and {labels.shape}")
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    names = class_names or [str(i) for i in range(k)]
    precision, recall, _, support = precision_recall_fscore_support(labels, pred, labels=list(range(k)),
                                                                    zero_division=0)
    return {
        "acc": float((pred == labels).mean()),
        "macro_f1": float(f1_score(labels, pred, labels=list(range(k)), average="macro", zero_division=0)),
        "nll": nll(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "per_class": {n: {"precision": float(p), "recall": float(r), "support": int(s)}
                      for n, p, r, s in zip(names, precision, recall, support)},
        "confusion": confusion_matrix(labels, pred, labels=list(range(k))).tolist(),
        "n": int(len(labels)),
    }
