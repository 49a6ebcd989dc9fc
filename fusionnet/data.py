"""Datasets, augmentation pipelines, splits, samplers and class weights.

Images leave this module as float tensors (3, H, W) in [0, 1]: normalisation belongs to each branch inside the
model, because every backbone wants its own mean/std.

* :class:`FolderImages` reads ``root/<class>/*.jpg`` (named apart from torchvision's ``ImageFolder``, which
  yields PIL images through torchvision transforms); :func:`load_splits` reads ``root/{train,val,test}/<class>/...``
  and makes a stratified, seeded validation split when there is no ``val`` folder.
* :class:`CsvImages` reads a CSV of ``path,label``.
* :func:`train_transform` / :func:`eval_transform` are albumentations pipelines.
* :func:`class_weights` and :func:`balanced_sampler` handle imbalanced data.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image, ImageOps
from torch.utils.data import Dataset, WeightedRandomSampler

from fusionnet.errors import DataError, is_int
from fusionnet.files import resolve_path
from fusionnet.image_cache import ImageStore, train_side

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
Transform = Callable[[np.ndarray], torch.Tensor]


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


# ---- transforms ------------------------------------------------------------------------------------------------
_TO_TENSOR = [A.ToFloat(max_value=255.0), ToTensorV2()]  # uint8 (H, W, 3) -> float (3, H, W) in [0, 1]


def train_transform(size: int, *, policy: str = "default", erase_p: float = 0.25,
                    scale: tuple[float, float] = (0.35, 1.0)) -> A.Compose:
    """Random resized crop, flip, colour jitter, coarse dropout; ``policy="strong"`` adds two RandAugment-style ops
    per image; ``policy="none"`` is the eval pipeline (deterministic, e.g. for feature caching)."""
    if policy == "none":
        return eval_transform(size)
    if policy not in ("default", "strong"):
        raise ValueError(f"unknown augmentation policy {policy!r}; choose 'default', 'strong' or 'none'")
    ops: list = [A.RandomResizedCrop(size=(size, size), scale=scale), A.HorizontalFlip(p=0.5),
                 A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.8)]
    if policy == "strong":
        ops.append(A.SomeOf([
            A.Affine(rotate=(-25, 25), p=1.0), A.Affine(shear=(-15, 15), p=1.0),
            A.Affine(translate_percent=(-0.15, 0.15), p=1.0), A.Equalize(p=1.0), A.Posterize(num_bits=(4, 6), p=1.0),
            A.Solarize(threshold_range=(0.6, 0.9), p=1.0), A.Sharpen(p=1.0),
            A.RandomBrightnessContrast(brightness_limit=0.4, contrast_limit=0.4, p=1.0),
            A.HueSaturationValue(p=1.0)], n=2))
    if erase_p > 0:
        ops.append(A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.3),
                                   hole_width_range=(0.1, 0.3), p=erase_p))
    return A.Compose(ops + _TO_TENSOR)


def eval_transform(size: int, *, crop_pct: float = 1.0) -> A.Compose:
    """Resize the short side to ``size / crop_pct``, then centre-crop ``size`` (crop_pct=0.875 is ImageNet's habit;
    the default 1.0 keeps the whole image)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    return A.Compose([A.SmallestMaxSize(max_size=int(round(size / crop_pct))), A.CenterCrop(size, size)]
                     + _TO_TENSOR)


def _apply(transform: Transform | None, image: np.ndarray) -> torch.Tensor:
    if transform is None:
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    if isinstance(transform, A.BasicTransform | A.BaseCompose):
        return transform(image=image)["image"]
    return transform(image)


# ---- datasets --------------------------------------------------------------------------------------------------
_KEEP = object()  # subset/with_transform: keep the dataset's image store


@dataclass
class SkippedFile:
    path: str
    reason: str


class ImageDataset(Dataset):
    """A list of (path, label) samples with class names; yields (image tensor in [0, 1], label)."""

    def __init__(self, samples: Sequence[tuple[str, int]], class_names: Sequence[str],
                 transform: Transform | None = None, *, check: bool = True, strict: bool = False,
                 skipped: Sequence[SkippedFile] = (), store: ImageStore | None = None) -> None:
        self.class_names = list(class_names)
        self.transform = transform
        self.store = store  # decoded images (fusionnet.image_cache); files it lacks are decoded from disk
        self.skipped = list(skipped)
        if check:
            samples = self._drop_unreadable(samples, strict)
        self.samples = list(samples)

    def _drop_unreadable(self, samples: Sequence[tuple[str, int]], strict: bool) -> list[tuple[str, int]]:
        good = []
        for path, label in samples:
            try:
                with Image.open(path) as img:
                    img.draft(img.mode, (1, 1))  # JPEG: decode at 1/8 scale, still every byte (2.5x faster)
                    img.load()
            except Exception as exc:  # PIL raises several types for corrupt and truncated files
                if strict:
                    raise DataError(f"unreadable image {path!r} ({type(exc).__name__}: {exc}); "
                                    f"remove it, or pass strict=False to skip such files") from exc
                self.skipped.append(SkippedFile(path, f"{type(exc).__name__}: {exc}"))
                continue
            good.append((path, label))
        lost = sorted({self.class_names[label] for _, label in samples} - {self.class_names[label] for _, label in good})
        if lost:  # like an empty class folder: the class cannot be learned or evaluated
            raise DataError(f"every image of class(es) {', '.join(map(repr, lost))} is unreadable (e.g. "
                            f"{self.skipped[0].path!r}: {self.skipped[0].reason}); fix or remove those files")
        if self.skipped:
            examples = ", ".join(repr(s.path) for s in self.skipped[:3])
            warnings.warn(f"skipped {len(self.skipped)} unreadable image(s), e.g. {examples} "
                          f"(dataset.skipped lists them all; strict=True makes this an error)", stacklevel=3)
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
        image = self.store.get(path) if self.store is not None else None
        return _apply(self.transform, image if image is not None else read_rgb(path)), label

    def subset(self, indices: Sequence[int], transform: Transform | None = None, *, store=_KEEP) -> "ImageDataset":
        """A dataset of the given samples (already checked), with its own transform (and image store)."""
        return ImageDataset([self.samples[i] for i in indices], self.class_names,
                            transform if transform is not None else self.transform, check=False,
                            store=self.store if store is _KEEP else store)

    def with_transform(self, transform: Transform | None, *, store=_KEEP) -> "ImageDataset":
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


def images_in(folder: Path) -> list[str]:
    """Every image file under ``folder`` (any depth), sorted."""
    return sorted(str(f) for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())


class FolderImages(ImageDataset):
    """``root/<class>/**/*.jpg``; classes are the sub-folder names, sorted (or ``class_names`` in that order)."""

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None, *,
                 class_names: Sequence[str] | None = None, strict: bool = False, check: bool = True) -> None:
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
        super().__init__(samples, names, transform, check=check, strict=strict)


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


@dataclass
class Splits:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset | None

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices), each class split in proportion; reproducible for a seed."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    k, n_val = len(set(labels)), math.ceil(val_fraction * len(labels))
    if n_val < k or len(labels) - n_val < k:
        raise DataError(f"val_fraction={val_fraction} of {len(labels)} images leaves {n_val} for validation and "
                        f"{len(labels) - n_val} for training, fewer than the {k} classes; add images, give a "
                        f"val/ folder, or change val_fraction")
    idx = np.arange(len(labels))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=list(labels))
    return sorted(train_idx.tolist()), sorted(val_idx.tolist())


def load_splits(root: str | os.PathLike, *, size: int, val_fraction: float = 0.15, seed: int = 0,
                policy: str = "default", strict: bool = False, crop_pct: float = 1.0,
                image_cache: str | os.PathLike | None = None, progress: bool = True) -> Splits:
    """``root/{train,val,test}/<class>/...`` (val and test optional) with train and eval pipelines at ``size``.

    Without a ``val`` folder, a stratified ``val_fraction`` of train (seeded) becomes validation; the test split is
    never used for any choice. With ``image_cache`` (a folder), every image is decoded once into
    :class:`~fusionnet.image_cache.ImageStore` files there (built on first use, then reused by every run on the same
    files): one at the eval pipeline's resize target (exact: the same images as from the files) for every split,
    and one at twice ``size`` for the training pipeline.
    """
    if not (is_int(size) and size >= 1):
        raise ValueError(f"size must be a whole number of pixels >= 1, got {size!r} (e.g. size=128)")
    base = _data_root(root)
    if not (base / "train").is_dir():
        raise DataError(f"{str(base)!r} has no 'train' folder; expected {str(base)!r}/train/<class>/<image>, "
                        f"optionally with val/ and test/ beside it")
    train_tf, eval_tf = train_transform(size, policy=policy), eval_transform(size, crop_pct=crop_pct)
    full = FolderImages(base / "train", strict=strict)
    names = full.class_names
    for other in ("val", "test"):  # every split's classes are checked before any work is done on them
        if (base / other).is_dir():
            _checked(names, base / other)
    if (base / "val").is_dir():
        train = full.with_transform(train_tf)
        val = FolderImages(base / "val", eval_tf, class_names=_checked(names, base / "val"), strict=strict)
    else:
        tr, va = stratified_split(full.labels, val_fraction, seed)
        train, val = full.subset(tr, train_tf), full.subset(va, eval_tf)
    test = None
    if (base / "test").is_dir():
        test = FolderImages(base / "test", eval_tf, class_names=_checked(names, base / "test"), strict=strict)
    if image_cache is None:
        return Splits(train, val, test)
    every = list(dict.fromkeys(full.paths + val.paths + (test.paths if test is not None else [])))
    eval_store = ImageStore(image_cache, every, int(round(size / crop_pct)), progress=progress)
    train_store = eval_store if policy == "none" else ImageStore(image_cache, full.paths, train_side(size),
                                                                 interpolation="area", progress=progress)
    return Splits(train.with_transform(train.transform, store=train_store),
                  val.with_transform(val.transform, store=eval_store),
                  test.with_transform(test.transform, store=eval_store) if test is not None else None)


def eval_view(train_data, val_data):
    """The training images through the validation pipeline and its image store: a deterministic view of the
    training split (e.g. to cache its features); ``train_data`` itself when it cannot be re-piped."""
    if not hasattr(train_data, "with_transform") or not hasattr(val_data, "transform"):
        return train_data
    if isinstance(train_data, ImageDataset):
        return train_data.with_transform(val_data.transform, store=getattr(val_data, "store", None))
    return train_data.with_transform(val_data.transform)


def _checked(names: list[str], folder: Path) -> list[str]:
    found = _class_folders(folder)
    if set(found) != set(names):
        raise DataError(_class_mismatch(names, found, "train", str(folder)))
    return names


# ---- imbalance -------------------------------------------------------------------------------------------------
def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, scaled so the average sample weight is 1 (n / (K * count_k))."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).float()
    if (counts == 0).any():
        empty = (counts == 0).nonzero().flatten().tolist()
        raise DataError(f"class index(es) {empty} have no samples; class weights need every class present")
    return counts.sum() / (num_classes * counts)


def balanced_sampler(labels: Sequence[int], *, num_samples: int | None = None,
                     generator: torch.Generator | None = None) -> WeightedRandomSampler:
    """Oversample rare classes so each class is drawn equally often in expectation (with replacement)."""
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    per_class = 1.0 / torch.bincount(labels_t).float()
    return WeightedRandomSampler(per_class[labels_t].double(), num_samples=num_samples or len(labels_t),
                                 replacement=True, generator=generator)


# ---- training-time helpers -----------------------------------------------------------------------------------
def check_training_data(train_data, val_data, num_classes: int | None) -> None:
    """Refuse what cannot be trained: an empty split, a single class, labels beyond the model's classes."""
    for name, data in (("train", train_data), ("val", val_data)):
        if len(data) == 0:
            raise DataError(f"the {name} split is empty; check its folder has images (or val_fraction)")
    labels = getattr(train_data, "labels", None)
    if labels is not None and len(set(labels)) < 2:
        raise DataError(f"the train split holds a single class ({sorted(set(labels))}); a classifier needs at "
                        f"least two classes with images")
    if labels is not None and num_classes is not None and max(labels) >= num_classes:
        raise DataError(f"train labels go up to {max(labels)} but the model has {num_classes} classes; build the "
                        f"model with num_classes={max(labels) + 1} (or the dataset's class_names)")


def seed_pipeline(dataset, seed: int) -> None:
    """Reseed an albumentations pipeline (it keeps its own RNG, untouched by torch/numpy seeds)."""
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def seed_worker_pipeline(worker_id: int) -> None:
    """In a DataLoader worker: give each worker its own augmentation stream, derived from the epoch's seed."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(transform.seed * 64 + worker_id)
