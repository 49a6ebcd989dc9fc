"""Classification metrics from predicted probabilities: accuracy, macro-F1, per-class precision/recall, confusion
matrix, negative log-likelihood and expected calibration error."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE: the bin-weighted gap between confidence (max probability) and accuracy, over equal-width bins."""
    probs, labels = _np(probs), _np(labels)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def nll(probs, labels, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class."""
    probs, labels = _np(probs), _np(labels)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0)).mean())


def classification_metrics(probs, labels, class_names: list[str] | None = None) -> dict:
    """All metrics for (N, K) probabilities and (N,) integer labels, as plain JSON-ready values."""
    probs, labels = _np(probs).astype(np.float64), _np(labels).astype(np.int64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"expected probs (N, K) and labels (N,), got {probs.shape} and {labels.shape}")
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
