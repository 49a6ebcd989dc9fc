"""Decoded-image cache: each image file decoded once, resized, and kept on disk as uint8.

Decoding a full-size photo costs far more than augmenting a 128-px crop of it, and without this cache every
epoch, every model and every seed of a comparison decodes every file again. An :class:`ImageStore` decodes a list
of files once (in worker processes where the files are large enough to be worth them, with a progress bar),
shrinks each so that its short side is at most ``short_side`` (aspect kept, never enlarged) and writes them one
after another into a flat uint8 file beside a JSON index. Reading an image back is a slice of a memory map: no
decoding. The files are keyed like the feature cache, by their paths, sizes and modification times and by the side
and interpolation, so a changed file or setting builds a new store and a second run starts at once.

Datasets use a store through ``ImageDataset(store=...)`` (:func:`fusionnet.data.splits.load_splits` with
``image_cache=``): the eval pipeline's images are stored at its own resize target with its own interpolation,
so its output is the same as from the files; training images are stored at twice the training size
(:func:`train_side`), so that random crops down to a quarter of the area are still shrunk, never enlarged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import albumentations as A
import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from fusionnet.errors import ConfigError, DataError
from fusionnet.utils.files import atomic_write, atomic_write_json, files_fingerprint
from fusionnet.utils.images import read_rgb

STORE_VERSION = 2  # 2: images upright by their EXIF orientation
INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def train_side(size: int) -> int:
    """The short side at which training images are stored for a training size."""
    return 2 * size


def shrink(image: np.ndarray, short_side: int, interpolation: str) -> np.ndarray:
    """``image`` with its short side at most ``short_side`` (the eval pipeline's own resize when it applies)."""
    if min(image.shape[:2]) <= short_side:
        return image
    return A.SmallestMaxSize(max_size=short_side, interpolation=INTERPOLATIONS[interpolation], p=1.0)(
        image=image)["image"]


class _Decode(Dataset):
    def __init__(self, paths: Sequence[str], short_side: int, interpolation: str) -> None:
        self.paths, self.short_side, self.interpolation = list(paths), short_side, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:

        try:
            image = read_rgb(self.paths[i])
        except Exception as exc:  # PIL raises several types for corrupt and truncated files
            raise DataError(f"cannot decode {self.paths[i]!r} for the image cache ({type(exc).__name__}: {exc}); "
                            f"fix or remove the file") from exc
        return np.ascontiguousarray(shrink(image, self.short_side, self.interpolation))


PROBE = 32  # images decoded in this process first, timed: worker processes only where the rest is worth them
WORKERS_WORTH_S = 2.0  # starting workers and sending each image back costs ~1 ms an image: for small files (the
# demo's 1,797 digit scans: 0.32 s in-process, 1.76 s with 2 workers) decoding in-process is faster


def _decoded(data: _Decode, workers: int):
    """``data``'s images in order: the first PROBE decoded here, the rest in ``workers`` processes (in chunks)
    when at this pace they would take more than WORKERS_WORTH_S, else here too."""
    import time

    t0 = time.perf_counter()
    head = min(PROBE, len(data))
    for i in range(head):
        yield data[i]
    rest = len(data) - head
    if workers <= 0 or rest <= 0 or (time.perf_counter() - t0) / max(head, 1) * rest < WORKERS_WORTH_S:
        for i in range(head, len(data)):
            yield data[i]
        return
    tail = Subset(data, range(head, len(data)))
    for chunk in DataLoader(tail, batch_size=16, num_workers=workers, collate_fn=list):
        yield from chunk


class ImageStore:
    """Decoded images of ``paths`` at short side <= ``short_side``, built in ``directory`` unless already there.

    ``store.get(path)`` returns the (H, W, 3) uint8 array, or None for a path the store does not hold."""

    def __init__(self, directory: str | os.PathLike, paths: Sequence[str], short_side: int, *,
                 interpolation: str = "linear", workers: int | None = None, progress: bool = True) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
        if not isinstance(short_side, int) or short_side < 1:
            raise ConfigError(f"short_side must be a positive int, got {short_side!r}")
        paths = [str(p) for p in paths]
        if len(set(paths)) != len(paths):
            raise DataError("the image cache got the same file twice; each path may appear once")
        self.short_side, self.interpolation = short_side, interpolation
        key = hashlib.sha256(json.dumps([STORE_VERSION, short_side, interpolation, files_fingerprint(paths)])
                             .encode()).hexdigest()[:32]
        self.data_path = Path(directory) / f"images-{key}.u8"
        self.index_path = Path(directory) / f"images-{key}.json"
        self.built = False  # True when this call decoded the files (False: found on disk)
        index = self._read_index()
        if index is None:
            index = self._build(paths, workers, progress)
        self._rows = {p: (off, h, w) for p, off, h, w in zip(index["paths"], index["offsets"], index["heights"],
                                                             index["widths"])}
        self.nbytes = index["bytes"]
        self._map: np.memmap | None = None  # opened lazily: in each DataLoader worker, not pickled

    def describe(self) -> str:
        """What a consumer's output depends on (the feature cache keys on it)."""
        return f"ImageStore(short_side={self.short_side}, interpolation={self.interpolation!r})"

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, path: str) -> bool:
        return str(path) in self._rows

    def get(self, path: str) -> np.ndarray | None:
        row = self._rows.get(str(path))
        if row is None:
            return None
        if self._map is None:
            self._map = np.memmap(self.data_path, dtype=np.uint8, mode="r")
        off, h, w = row
        return np.array(self._map[off:off + h * w * 3]).reshape(h, w, 3)  # a writable copy, as read_rgb gives

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}

    def _read_index(self) -> dict | None:
        """The index when both files are complete, else None (a damaged store is rebuilt, never trusted)."""
        try:
            index = json.loads(self.index_path.read_text())
            if self.data_path.stat().st_size != index["bytes"]:
                return None
            return index
        except (OSError, ValueError, KeyError):
            return None

    def _build(self, paths: list[str], workers: int | None, progress: bool) -> dict:
        """Decode ``paths`` into the store's two files; returns the index written."""
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        offsets, heights, widths = [], [], []

        def write(f) -> None:
            pos = 0
            bar = tqdm(_decoded(_Decode(paths, self.short_side, self.interpolation), workers),
                       total=len(paths), desc=f"decoding images (short side {self.short_side})",
                       disable=not progress, leave=False)
            for image in bar:
                image = np.asarray(image, dtype=np.uint8)
                offsets.append(pos)
                heights.append(int(image.shape[0]))
                widths.append(int(image.shape[1]))
                f.write(image.tobytes())
                pos += image.nbytes

        try:
            atomic_write(self.data_path, write)  # the index is written last: it marks the store complete
            index = {"version": STORE_VERSION, "short_side": self.short_side, "interpolation": self.interpolation,
                     "paths": paths, "offsets": offsets, "heights": heights, "widths": widths,
                     "bytes": int(sum(h * w * 3 for h, w in zip(heights, widths)))}
            atomic_write_json(self.index_path, index)
        except OSError as exc:  # a read-only, missing or full place: say which folder, and what to do
            raise DataError(f"cannot write the image cache in {str(self.data_path.parent)!r} ({exc.strerror or exc}); "
                            f"give a writable folder (e.g. --image-cache runs/image_cache), or none to read the "
                            f"image files directly") from exc
        self.built = True
        return index
