"""Tiny generated image folders for the training tests: each class has its own dominant colour, plus noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def make_image(rng: np.random.Generator, label: int, size: int = 32) -> Image.Image:
    base = np.array(COLOURS[label], dtype=np.float32)
    pixels = base + rng.normal(0, 40, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_folder(root: Path, counts: dict[str, int], *, seed: int = 0, size: int = 32, ext: str = "png") -> Path:
    """root/<class>/<i>.png with counts[class] images per class (classes take colours in sorted order)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(sorted(counts)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(counts[name]):
            make_image(rng, label, size).save(root / name / f"{i:03d}.{ext}")
    return root


def make_splits(root: Path, per_class: int = 12, classes=("a", "b", "c"), test: bool = True) -> Path:
    make_folder(root / "train", {c: per_class for c in classes}, seed=0)
    if test:
        make_folder(root / "test", {c: max(2, per_class // 3) for c in classes}, seed=1)
    return root


def crash_at_epoch(epoch: int, epochs: int):
    """A ``fit`` log function that interrupts training when epoch ``epoch`` of ``epochs`` reports (a crash)."""

    def log(msg: str) -> None:
        if msg.startswith(f"epoch {epoch}/{epochs}"):
            raise KeyboardInterrupt("simulated crash")

    return log
