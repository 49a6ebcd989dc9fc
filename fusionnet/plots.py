"""Figures for experiment reports: confusion matrices and reliability diagrams (matplotlib, written as PNG)."""

from __future__ import annotations

import os
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_grid(matrices: Mapping[str, list[list[int]]], class_names: list[str],
                   path: str | os.PathLike) -> None:
    """One row-normalised confusion matrix per method, side by side, with counts in the cells."""
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 4.0), squeeze=False)
    for ax, (title, cm) in zip(axes[0], matrices.items()):
        cm = np.asarray(cm)
        norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0][0].set_ylabel("true", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reliability_diagram(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
                        n_bins: int = 10, min_count: int = 3) -> None:
    """Accuracy against confidence per bin for each method; the diagonal is perfect calibration.

    ``curves`` maps a method name to (probs (N, K), labels (N,)). Marker area grows with the bin's sample count;
    bins with fewer than ``min_count`` samples are left out (their accuracy is noise).
    """
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    edges = np.linspace(0, 1, n_bins + 1)
    for name, (probs, labels) in curves.items():
        probs, labels = np.asarray(probs), np.asarray(labels)
        conf, correct = probs.max(1), probs.argmax(1) == labels
        bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
        xs, ys, counts = [], [], []
        for b in range(n_bins):
            mask = bins == b
            if mask.sum() >= min_count:
                xs.append(conf[mask].mean())
                ys.append(correct[mask].mean())
                counts.append(mask.sum())
        (line,) = ax.plot(xs, ys, linewidth=1.2, label=name)
        ax.scatter(xs, ys, s=8 + 60 * np.sqrt(np.array(counts) / len(labels)), color=line.get_color(), zorder=3)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("reliability (test split)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves(history: list[dict], path: str | os.PathLike) -> None:
    """Train loss and validation metrics per epoch (from ``history.json`` rows), two panels."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", markersize=3, label="train loss")
    left.plot(epochs, [h["val_nll"] for h in history], marker="o", markersize=3, label="val NLL")
    left.set_xlabel("epoch")
    left.legend(fontsize=8)
    right.plot(epochs, [h["val_acc"] for h in history], marker="o", markersize=3, label="val accuracy")
    right.plot(epochs, [h["val_macro_f1"] for h in history], marker="o", markersize=3, label="val macro-F1")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
