"""Datasets, and the one protocol through which the trainer, the feature cache, ``predict`` and the voting code
read them (the dataset's side of :mod:`fusionnet.models.interface`).

:class:`LabelledData` declares what a dataset offers, each with a default, so nothing outside asks a dataset what it
has (no ``hasattr`` probing):

=====================================  ========================================================================
``labels``                             the label of every sample, or None (unknown without reading them all)
``class_names``                        the class names in label order, or None
``paths``                              a file per sample, or None (not file-backed): keys caches, names rows
``transform``                          the per-sample pipeline (None: none); the feature cache keys on it
``store``                              the decoded-image cache the samples are read from, or None
``with_transform(t, store=...)``       the same samples through another pipeline (refused where impossible)
``seed(s)``                            reseed the pipeline's own random stream
=====================================  ========================================================================

:func:`as_dataset` gives any torch ``Dataset`` of ``(x, y)`` that view (:class:`PlainDataset`). The library's
image datasets (:class:`ImageDataset`, :class:`FolderImages`, :class:`CsvImages`) and the feature cache's
:class:`fusionnet.engine.feature_cache.FeatureDataset` are LabelledData.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from fusionnet.errors import ConfigError, DataError
from fusionnet.utils.files import resolve_path
from fusionnet.data.image_cache import ImageStore
from fusionnet.utils.images import IMAGE_EXTENSIONS, images_in, read_rgb
from fusionnet.data.transforms import Transform, apply_transform, decoder_of, seed_transform


class LabelledData(Dataset):
    """Base class of the datasets the library reads; see the module docstring."""

    class_names: list[str] | None = None
    transform = None
    store: ImageStore | None = None

    @property
    def labels(self) -> list[int] | None:
        return None

    @property
    def paths(self) -> list[str] | None:
        return None

    def with_transform(self, transform, *, store=None) -> "LabelledData":
        raise ConfigError(f"{type(self).__name__} cannot be given another pipeline; use a fusionnet image dataset "
                          f"(FolderImages, CsvImages) or cache_features=False")

    def seed(self, seed: int) -> None:
        seed_transform(self.transform, seed)


class PlainDataset(LabelledData):
    """Any torch Dataset of (x, y) seen through :class:`LabelledData`. What such datasets commonly expose is read
    here, once, and nowhere else: ``labels`` (or torchvision's ``targets``), ``class_names`` (or ``classes``),
    ``paths`` (or the paths of torchvision's ``samples``) and ``transform``; anything missing stays unknown."""

    def __init__(self, data: Dataset) -> None:
        self.data = data
        self._labels = _first(data, "labels", "targets")
        names = _first(data, "class_names", "classes")
        self.class_names = list(names) if names is not None else None
        samples = _first(data, "samples")
        self._paths = _first(data, "paths") or ([str(s[0]) for s in samples] if samples else None)
        self.transform = _first(data, "transform")

    @property
    def labels(self) -> list[int] | None:
        return [int(y) for y in self._labels] if self._labels is not None else None

    @property
    def paths(self) -> list[str] | None:
        return list(self._paths) if self._paths is not None else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i]


def _first(data, *names):
    for name in names:
        value = getattr(data, name, None)
        if value is not None:
            return value
    return None


def as_dataset(data: Dataset) -> LabelledData:
    """``data`` itself when it is a :class:`LabelledData`, else wrapped in :class:`PlainDataset`."""
    if isinstance(data, LabelledData):
        return data
    if not isinstance(data, Dataset) and not (hasattr(type(data), "__getitem__") and hasattr(type(data), "__len__")):
        raise ConfigError(f"expected a torch Dataset of (image, label) pairs, got {type(data).__name__}")
    return PlainDataset(data)


_KEEP = object()  # subset/with_transform: keep the dataset's image store


@dataclass
class SkippedFile:
    path: str
    reason: str


def unreadable(path: str) -> SkippedFile | None:
    """Why PIL cannot decode ``path`` (None: it can). A JPEG is decoded at 1/8 scale, still every byte (2.5x
    faster)."""
    try:
        with Image.open(path) as img:
            img.draft(img.mode, (1, 1))
            img.load()
    except Exception as exc:  # PIL raises several types for corrupt and truncated files
        return SkippedFile(path, f"{type(exc).__name__}: {exc}")
    return None


class SkippedImagesWarning(UserWarning):
    """Unreadable images were left out (one warning per command: how many, the first few names)."""


def report_skipped(skipped: Sequence[SkippedFile], strict: bool = False) -> None:
    """One line for every unreadable image of a command: a DataError with ``strict``, else a
    :class:`SkippedImagesWarning` (how many, the first three with their reasons)."""
    if not skipped:
        return
    first = "; ".join(f"{s.path!r} ({s.reason})" for s in skipped[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    if strict:
        raise DataError(f"{len(skipped)} unreadable image(s): {first}{more}; remove or fix them, or leave out "
                        f"--strict (strict=False) to skip them")
    warnings.warn(f"skipped {len(skipped)} unreadable image(s): {first}{more} (--strict makes this an error)",
                  SkippedImagesWarning, stacklevel=2)


class ImageDataset(LabelledData):
    """A list of (path, label) samples with class names; yields (image tensor in [0, 1], label)."""

    def __init__(self, samples: Sequence[tuple[str, int]], class_names: Sequence[str],
                 transform: Transform | None = None, *, check: bool = True, strict: bool = False,
                 skipped: Sequence[SkippedFile] = (), store: ImageStore | None = None, warn: bool = True) -> None:
        self.class_names = list(class_names)
        self.warn = warn  # say what was skipped (False: the caller reports several datasets' skips as one)
        self.transform = transform
        self.store = store  # decoded images (fusionnet.data.image_cache); files it lacks are decoded from disk
        self.skipped = list(skipped)
        if check:
            samples = self._drop_unreadable(samples, strict)
        self.samples = list(samples)

    def _drop_unreadable(self, samples: Sequence[tuple[str, int]], strict: bool) -> list[tuple[str, int]]:
        good, skipped = [], []
        for path, label in samples:
            bad = unreadable(path)
            if bad is None:
                good.append((path, label))
            else:
                skipped.append(bad)
        if strict:
            report_skipped(skipped, strict=True)
        self.skipped += skipped
        lost = sorted({self.class_names[label] for _, label in samples} - {self.class_names[label] for _, label in good})
        if lost:  # like an empty class folder: the class cannot be learned or evaluated
            raise DataError(f"every image of class(es) {', '.join(map(repr, lost))} is unreadable (e.g. "
                            f"{self.skipped[0].path!r}: {self.skipped[0].reason}); fix or remove those files")
        if self.skipped and self.warn:
            report_skipped(self.skipped)
        return good

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        decode = decoder_of(self.transform)  # torchvision's reading decodes the file itself, never from a store
        image = self.store.get(path) if self.store is not None and decode is read_rgb else None
        return apply_transform(self.transform, image if image is not None else decode(path)), label

    def subset(self, indices: Sequence[int], transform: Transform | None = None, *, store=_KEEP) -> "ImageDataset":
        """A dataset of the given samples (already checked), with its own transform (and image store)."""
        return ImageDataset([self.samples[i] for i in indices], self.class_names,
                            transform if transform is not None else self.transform, check=False,
                            store=self.store if store is _KEEP else store)

    def with_transform(self, transform: Transform | None, *, store=_KEEP) -> "ImageDataset":  # type: ignore[override]
        return ImageDataset(self.samples, self.class_names, transform, check=False,
                            store=self.store if store is _KEEP else store)

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.class_names)}


def _data_root(root: str | os.PathLike) -> Path:
    p = resolve_path(root, what="data folder")
    if not p.is_dir():
        raise DataError(f"data folder {str(root)!r} is a file, not a folder of class sub-folders")
    return p


def _class_folders(root: Path) -> list[str]:
    """The sorted names of the class sub-folders (hidden folders such as .ipynb_checkpoints are not classes)."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


class FolderImages(ImageDataset):
    """``root/<class>/**/*.jpg``; classes are the sub-folder names, sorted (or ``class_names`` in that order)."""

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None, *,
                 class_names: Sequence[str] | None = None, strict: bool = False, check: bool = True,
                 warn: bool = True) -> None:
        self.root = _data_root(root)
        found = _class_folders(self.root)
        if not found:
            raise DataError(f"data folder {str(self.root)!r} has no class sub-folders; expected "
                            f"{str(self.root)!r}/<class>/<image>.jpg")
        if class_names is not None and set(found) != set(class_names):
            raise DataError(_class_mismatch(list(class_names), found, "expected", str(self.root)))
        names = list(class_names) if class_names is not None else found
        samples: list[tuple[str, int]] = []
        empty = []
        for label, name in enumerate(names):
            files = images_in(self.root / name)
            if not files:
                empty.append(name)
            samples += [(f, label) for f in files]
        if empty:
            raise DataError(f"class folder(s) with no images in {str(self.root)!r}: {', '.join(map(repr, empty))} "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)}); remove the folder or add images")
        super().__init__(samples, names, transform, check=check, strict=strict, warn=warn)


def _class_mismatch(expected: list[str], found: list[str], what: str, where: str) -> str:
    only_e = sorted(set(expected) - set(found))
    only_f = sorted(set(found) - set(expected))
    return (f"class folders in {where!r} differ from the {what} classes: missing {only_e or 'none'}, "
            f"extra {only_f or 'none'}; every split needs the same class folders")


class CsvImages(ImageDataset):
    """A CSV with ``path,label`` columns (a header row is required); paths relative to ``root`` or the CSV's folder.

    Labels are class names; ``class_names`` fixes their order (and refuses others), else they are sorted.
    """

    def __init__(self, csv_path: str | os.PathLike, transform: Transform | None = None, *,
                 root: str | os.PathLike | None = None, class_names: Sequence[str] | None = None,
                 strict: bool = False, check: bool = True) -> None:
        csv_file = resolve_path(csv_path, what="CSV file")
        base = _data_root(root) if root is not None else csv_file.parent
        with open(csv_file, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise DataError(f"CSV {str(csv_file)!r} needs a header with columns 'path' and 'label', "
                                f"got {reader.fieldnames}")
            rows = [(r["path"].strip(), r["label"].strip()) for r in reader]
        if not rows:
            raise DataError(f"CSV {str(csv_file)!r} has no rows")
        labels = sorted({label for _, label in rows})
        if class_names is not None:
            unknown = sorted(set(labels) - set(class_names))
            if unknown:
                raise DataError(f"CSV {str(csv_file)!r} has labels not in class_names: {unknown[:5]}"
                                f"{' ...' if len(unknown) > 5 else ''}; known: {list(class_names)}")
        names = list(class_names) if class_names is not None else labels
        index = {name: i for i, name in enumerate(names)}
        samples = [(str(base / p) if not os.path.isabs(p) else p, index[label]) for p, label in rows]
        missing = [p for p, _ in samples if not os.path.isfile(p)]
        if missing:
            raise DataError(f"CSV {str(csv_file)!r} lists {len(missing)} file(s) that do not exist, e.g. "
                            f"{', '.join(map(repr, missing[:3]))}; paths are relative to {str(base)!r}")
        super().__init__(samples, names, transform, check=check, strict=strict)


# ---- what a model was trained on ---------------------------------------------------------------------------------
def file_key(path: str | os.PathLike) -> str:
    """A short key for an image file that survives moving the data folder: its split folder, class folder and
    name (``train/daisy/1.jpg``), hashed; files of the same name in train/ and test/ stay apart."""
    import hashlib

    return hashlib.sha1("/".join(Path(path).parts[-3:]).encode()).hexdigest()[:16]


def training_record(data: Dataset, seed: int) -> dict:
    """What a checkpoint keeps of the data it was trained on: a key per training file (when file-backed), the seed
    of its split and the input size of its images (when they are images), so that a later "validation" split can be
    checked for images the model has seen, and an export gets the size the model was trained at."""
    view = as_dataset(data)
    paths = view.paths
    sample = view[0][0] if len(view) else None
    size = int(sample.shape[-1]) if isinstance(sample, torch.Tensor) and sample.ndim == 3 else None
    return {"files": sorted(file_key(p) for p in paths) if paths is not None else None, "seed": seed,
            "input_size": size, "train_images": len(view)}


def check_unseen(record: dict | None, data: Dataset, split: str, model: str) -> None:
    """Refuse scoring ``model`` on a ``split`` that holds images it was trained on (its scores there would not be
    validation): a DataError naming how many and the seed its own split was made with."""
    paths = as_dataset(data).paths
    if not record or not record.get("files") or paths is None:
        return
    seen = set(record["files"])
    overlap = sum(file_key(p) in seen for p in paths)
    if overlap:
        raise DataError(f"{model} was trained on {overlap} of the {len(paths)} images of this {split!r} split, so its "
                        f"scores there would not be validation: the split was made differently from its training "
                        f"split. It was trained with seed {record.get('seed')!r}: pass --seed {record.get('seed')} "
                        f"(and the same validation fraction), or give the data a val/ folder")
