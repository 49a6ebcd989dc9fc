"""Image files: decoding any file to upright RGB pixels, and finding the image files under a folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array, whatever its mode (L, RGBA, P, CMYK, I;16, I, F ...).

    16-bit and 32-bit single-channel images are scaled by their own bit depth (PIL's own conversion clips them,
    turning a 16-bit photo near-white). A camera's EXIF orientation is applied, so a photo taken upright is upright
    (as image viewers show it), not lying on its side."""
    with Image.open(path) as img:
        img.load()  # decodes fully: truncated files raise here
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I") or img.mode == "F":  # one channel of 16/32-bit ints or floats
            a = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") else _bit_depth_top(a)
            grey = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")  # composite on white rather than let transparent pixels turn black
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return np.array(img.convert("RGB"))  # a writable copy: torch refuses read-only arrays


def _bit_depth_top(a: np.ndarray) -> float:
    """The white level of a 32-bit int or float image: 1 (floats in [0, 1]), 255, 65535 or 2^32 - 1."""
    peak = float(a.max()) if a.size else 0.0
    return next(top for top in (1.0, 255.0, 65535.0, 4294967295.0) if peak <= top or top == 4294967295.0)


def images_in(folder: Path) -> list[str]:
    """Every image file under ``folder`` (any depth), sorted."""
    return sorted(str(f) for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
