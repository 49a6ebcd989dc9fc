"""Figures for experiment reports: confusion matrices, reliability diagrams, training curves.

Each function returns a matplotlib ``Figure`` built with the object API (``Figure`` + ``FigureCanvasAgg``) and,
given a path, saves it as PNG. Nothing here touches pyplot's global state or switches the user's backend.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fusionnet.utils.metrics import equal_mass_bins, expected_calibration_error


def new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, **kwargs):
    """(figure, axes) without pyplot: a Figure with its own Agg canvas."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save(fig: Figure, path: str | os.PathLike | None, dpi: int = 120) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def confusion_grid(matrices: Mapping[str, list[list[int]]], class_names: list[str],
                   path: str | os.PathLike | None = None) -> Figure:
    """One row-normalised confusion matrix per method, side by side, with counts in the cells."""
    n = len(matrices)
    fig, axes = new_figure((3.2 * n + 1, 4.6), 1, n, squeeze=False)
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
    fig.suptitle("confusion matrices (test split; rows: true class, columns: predicted; colour: row-normalised)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.01, 1, 0.95))  # room for the rotated tick labels and the "predicted" label
    return save(fig, path)


def reliability_diagram(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike | None = None,
                        n_bins: int = 10) -> Figure:
    """A panel per method: accuracy against confidence over equal-mass bins (each about N / ``n_bins`` images, the
    count written by each point), the diagonal of perfect calibration, and the method's ECE (the tables' own:
    15 equal-width bins) in its legend. ``curves`` maps a method name to (probs (N, K), labels (N,))."""
    n = max(1, len(curves))
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = new_figure((3.1 * cols + 0.4, 3.1 * rows + 0.5), rows, cols, squeeze=False)
    for ax, (name, (probs, labels)) in zip(axes.flat, curves.items()):
        bins = equal_mass_bins(probs, labels, n_bins)
        xs, ys = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.2, color="C0",
                label=f"ECE {expected_calibration_error(probs, labels):.3f}")
        for x, y, b in zip(xs, ys, bins):
            ax.annotate(str(b["count"]), (x, y), textcoords="offset points", xytext=(3, -9), fontsize=6,
                        color="dimgrey")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=7, loc="upper left", handlelength=1)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("confidence (max probability)", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy", fontsize=7)
    fig.suptitle("reliability on the test split (equal-mass bins, images per bin by each point)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return save(fig, path)


def training_curves(history: list[dict], path: str | os.PathLike | None = None) -> Figure:
    """Train loss and validation metrics per epoch (from ``history.json`` rows), two panels."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = new_figure((8, 3.2), 1, 2)
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", markersize=3, label="train loss")
    left.plot(epochs, [h["val_nll"] for h in history], marker="o", markersize=3, label="val NLL")
    left.legend(fontsize=8)
    scores = [h["val_acc"] for h in history] + [h["val_macro_f1"] for h in history]
    # macro-F1 dashed with open markers, drawn first: where the two coincide, accuracy stays visible on top
    right.plot(epochs, [h["val_macro_f1"] for h in history], linestyle="--", marker="s", markersize=5,
               markerfacecolor="none", label="val macro-F1")
    right.plot(epochs, [h["val_acc"] for h in history], marker="o", markersize=3, label="val accuracy")
    right.set_ylim(max(0.0, min(scores) - 0.05), min(1.0, max(scores) + 0.02))  # the scores' own range
    right.legend(fontsize=8, loc="lower right")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.5
    left.set_title("loss", fontsize=9)
    right.set_title("validation", fontsize=9)
    fig.tight_layout()
    return save(fig, path, dpi=110)


def gap_figure(train: dict, test: dict, path: str | os.PathLike | None = None) -> Figure:
    """Distributions of the domain-gap check, train against test: image side, aspect ratio, brightness, channel
    means (``train``/``test`` are :class:`fusionnet.workflows.gap.FolderStats` as dicts)."""
    fig, axes = new_figure((11, 3), 1, 4)
    panels = [("image side (px)", lambda s: [(w * h) ** 0.5 for w, h in s["sizes"]]),
              ("aspect ratio (w / h)", lambda s: [w / h for w, h in s["sizes"]]),
              ("mean luminance", lambda s: s["brightness"])]
    for ax, (title, values) in zip(axes, panels):
        for stats, label in ((train, "train"), (test, "test")):
            ax.hist(values(stats), bins=20, alpha=0.55, label=f"{label} (n={stats['n']})", density=True)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("density", fontsize=8)
        ax.legend(fontsize=7)
    ax = axes[3]
    xs = np.arange(3)
    ax.bar(xs - 0.2, train["channel_mean"], 0.4, yerr=train["channel_std"], label="train")
    ax.bar(xs + 0.2, test["channel_mean"], 0.4, yerr=test["channel_std"], label="test")
    ax.set_xticks(xs, ["R", "G", "B"])
    ax.set_ylim(0, 1)
    ax.set_title("channel mean (+- std)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle("domain-gap check: train vs test", fontsize=10)
    fig.tight_layout()
    return save(fig, path)
