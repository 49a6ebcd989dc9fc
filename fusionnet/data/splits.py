"""Splits of a data folder, the view of the training images through the validation pipeline, and what training
needs from the data beyond the samples (class weights, the balanced sampler, the checks, seeding the pipelines).

Images leave the library's datasets as float tensors (3, H, W) in [0, 1]; see :mod:`fusionnet.utils.images` (decoding),
:mod:`fusionnet.data.transforms` (pipelines) and :mod:`fusionnet.data.datasets` (the datasets and their protocol). Their names
are re-exported here, where earlier versions defined them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from fusionnet.data.datasets import (CsvImages, FolderImages, ImageDataset, LabelledData, PlainDataset,  # noqa: F401
                                SkippedFile, _class_folders, _class_mismatch, _data_root, as_dataset,
                                report_skipped)
from fusionnet.errors import ConfigError, DataError, is_int
from fusionnet.data.image_cache import ImageStore, train_side
from fusionnet.data.hf import is_hf_dataset, read_hf_dataset
from fusionnet.data.tables import TableSplits, is_table, read_table
from fusionnet.utils.images import IMAGE_EXTENSIONS, images_in, read_rgb  # noqa: F401
from fusionnet.data.transforms import Transform, eval_transform, seed_transform, train_transform  # noqa: F401


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
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    k, n_val = len(set(labels)), math.ceil(val_fraction * len(labels))
    if n_val < k or len(labels) - n_val < k:
        raise DataError(f"val_fraction={val_fraction} of {len(labels)} images leaves {n_val} for validation and "
                        f"{len(labels) - n_val} for training, fewer than the {k} classes; add images, give a "
                        f"val/ folder, or change val_fraction")
    idx = np.arange(len(labels))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=list(labels))
    return sorted(train_idx.tolist()), sorted(val_idx.tolist())


@dataclass
class SplitSettings:
    """How :func:`load_splits` reads a data folder (every field a keyword of ``load_splits`` too)."""

    size: int  # input size in pixels
    val_fraction: float = 0.15  # without val/: this stratified, seeded share of train/ becomes validation
    seed: int = 0
    policy: str = "default"  # the training augmentation policy: default | strong | none
    strict: bool = False  # refuse unreadable images up front instead of skipping them
    crop_pct: float = 1.0  # the eval pipeline's centre crop
    image_cache: str | os.PathLike | None = None  # a folder: decode every image once into it
    progress: bool = True
    resize: str = "shorter"  # the eval pipeline: shorter (short side, centre crop) | stretch (fusionnet.config.RESIZES)
    reader: str = "albumentations"  # whose eval pipeline: albumentations | torchvision (fusionnet.config.Reading)
    val_list: str | os.PathLike | None = None  # a file naming the images of train/ that are the validation split
    # (a path per line, relative to the data folder, to train/ or absolute): the split the members were validated on


def load_splits(root: str | os.PathLike, *, size: int, val_fraction: float = 0.15, seed: int = 0,
                policy: str = "default", strict: bool = False, crop_pct: float = 1.0,
                image_cache: str | os.PathLike | None = None, progress: bool = True, resize: str = "shorter",
                reader: str = "albumentations", val_list: str | os.PathLike | None = None,
                image_column: str | None = None, label_column: str = "label",
                image_root: str | os.PathLike | None = None) -> Splits:
    """``root/{train,val,test}/<class>/...`` (val and test optional) with train and eval pipelines at ``size``;
    or ``root`` a table of image paths and labels (CSV, TSV, Parquet or a DataFrame; its columns ``image_column``,
    default path or image, and ``label_column``; paths relative to ``image_root`` or the table's folder:
    :mod:`fusionnet.data.tables`), or a Hugging Face dataset (a
    ``save_to_disk`` folder or ``"hf:user/name"``: :mod:`fusionnet.data.hf`). The other keywords are
    :class:`SplitSettings`' fields (what each does is written there).

    Without a ``val`` folder, a stratified ``val_fraction`` of train (seeded) becomes validation; the test split is
    never used for any choice. With ``image_cache`` (a folder), every image is decoded once into
    :class:`~fusionnet.data.image_cache.ImageStore` files there (built on first use, then reused by every run on the same
    files): one at the eval pipeline's resize target (exact: the same images as from the files) for every split,
    and one at twice ``size`` for the training pipeline.
    """
    how = SplitSettings(size=size, val_fraction=val_fraction, seed=seed, policy=policy, strict=strict,
                        crop_pct=crop_pct, image_cache=image_cache, progress=progress, resize=resize, reader=reader,
                        val_list=val_list)
    if not (is_int(size) and size >= 1):
        raise ConfigError(f"size must be a whole number of pixels >= 1, got {size!r} (e.g. size=128)")
    train_tf = train_transform(size, policy=policy)
    eval_tf = eval_transform(size, crop_pct=crop_pct, resize=how.resize, reader=how.reader)
    table = table_of(root, image_column=image_column, label_column=label_column, image_root=image_root)
    full, val, test, base = _from_table(table, eval_tf) if table is not None else _from_folders(root, how, eval_tf)
    if len(full.class_names) < 2:
        kind = "data folder" if table is None else "table"
        raise DataError(f"{kind} {str(root)!r} has one class ({full.class_names[0]!r}); a classifier needs "
                        f"at least two" + (", each a sub-folder of train/ with its images" if table is None else ""))
    if how.val_list is not None and val is not None:
        raise ConfigError(f"{str(root)!r} has a validation split and val_list={str(how.val_list)!r} names another; "
                          f"use one of them")
    if how.val_list is not None:
        va = listed_indices(how.val_list, base, full.paths)
        tr = [i for i in range(len(full)) if i not in set(va)]
        train, val = full.subset(tr, train_tf), full.subset(va, eval_tf)
    elif val is not None:
        train = full.with_transform(train_tf)
    else:
        tr, va = stratified_split(full.labels, val_fraction, seed)
        train, val = full.subset(tr, train_tf), full.subset(va, eval_tf)
    report_skipped(full.skipped + (val.skipped if val is not full and isinstance(val, ImageDataset) else [])
                   + (test.skipped if test is not None else []), strict)  # one line for the whole data folder
    return Splits(train, val, test) if image_cache is None else _cached(Splits(train, val, test), full, how)


def table_of(source, *, image_column: str | None = None, label_column: str = "label",
             image_root: str | os.PathLike | None = None) -> TableSplits | None:
    """The samples per split of a table (:mod:`fusionnet.data.tables`) or a Hugging Face dataset
    (:mod:`fusionnet.data.hf`); None where ``source`` is a folder tree."""
    if is_table(source):
        return read_table(source, image_column=image_column, label_column=label_column, root=image_root)
    if is_hf_dataset(source):
        return read_hf_dataset(source, image_column=image_column, label_column=label_column)
    return None


def _from_folders(root, how: SplitSettings, eval_tf):
    """(train as found, val or None, test or None, the data folder) of ``root/{train,val,test}/<class>/``."""
    if Path(root).is_file():
        raise DataError(f"{str(root)!r} is a file: give a folder with train/ (and test/), a table of image paths and "
                        f"labels (.csv, .tsv, .parquet) or a Hugging Face dataset (a save_to_disk folder, hf:user/name)")
    base = _data_root(root)
    if not (base / "train").is_dir():
        raise DataError(f"{str(base)!r} has no 'train' folder; expected {str(base)!r}/train/<class>/<image>, "
                        f"optionally with val/ and test/ beside it (or give a table: CSV, TSV or Parquet)")
    if how.val_list is not None and (base / "val").is_dir():
        raise ConfigError(f"{str(base)!r} has a val/ folder and val_list={str(how.val_list)!r} names another "
                          f"validation split; use one of them")
    full = FolderImages(base / "train", warn=False)  # unreadable files: reported (or refused) once, by the caller
    names = full.class_names
    for other in ("val", "test"):  # every split's classes are checked before any work is done on them
        if (base / other).is_dir() and len(names) > 1:
            _checked(names, base / other)
    found = {other: FolderImages(base / other, eval_tf, class_names=names, warn=False)
             for other in ("val", "test") if (base / other).is_dir() and len(names) > 1}
    return full, found.get("val"), found.get("test"), base


def _from_table(table: TableSplits, eval_tf):
    """(train, val or None, test or None, the table's folder) of a table of image paths and labels."""
    def part(samples, tf):
        return ImageDataset(samples, table.class_names, tf, warn=False) if samples else None
    return part(table.train, None), part(table.val, eval_tf), part(table.test, eval_tf), table.base


def _cached(splits: Splits, full: ImageDataset, how: SplitSettings) -> Splits:
    """``splits`` reading decoded images from stores in ``how.image_cache`` (see :func:`load_splits`)."""
    train, val, test = splits.train, splits.val, splits.test
    size, cache, progress = how.size, how.image_cache, how.progress
    every = list(dict.fromkeys(full.paths + val.paths + (test.paths if test is not None else [])))
    if how.resize == "stretch" or how.reader == "torchvision":  # the store keeps the short side, resized by
        # OpenCV: stretching from it, or torchvision's reading, would not see the file's own pixels
        train_store = ImageStore(cache, full.paths, train_side(size), interpolation="area", progress=progress)
        return Splits(train.with_transform(train.transform, store=train_store), val, test)
    eval_store = ImageStore(cache, every, int(round(size / how.crop_pct)), progress=progress)
    train_store = eval_store if how.policy == "none" else ImageStore(cache, full.paths, train_side(size),
                                                                     interpolation="area", progress=progress)
    return Splits(train.with_transform(train.transform, store=train_store),
                  val.with_transform(val.transform, store=eval_store),
                  test.with_transform(test.transform, store=eval_store) if test is not None else None)


def listed_indices(list_file: str | os.PathLike, root: Path, paths: Sequence[str]) -> list[int]:
    """The indices in ``paths`` (train/'s images) of the files ``list_file`` names, a path per line (relative to
    ``root``, to ``root/train`` or absolute; blank lines and ``#`` comments skipped). A name that is not one of
    those images, or a list of none, is a DataError naming it."""
    file = Path(list_file)
    if not file.is_file():
        raise ConfigError(f"val_list {str(list_file)!r} is not a file; give a text file naming a validation image "
                          f"per line")
    index = {os.path.realpath(p): i for i, p in enumerate(paths)}
    found, missing = [], []
    for line in file.read_text().splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        candidates = [Path(name)] if Path(name).is_absolute() else [root / name, root / "train" / name]
        hit = next((index[r] for c in candidates if (r := os.path.realpath(c)) in index), None)
        (missing if hit is None else found).append(name if hit is None else hit)
    if missing:
        raise DataError(f"val_list {str(list_file)!r} names {len(missing)} file(s) that are not images of "
                        f"{str(root / 'train')!r}, e.g. {missing[:3]}; paths are relative to the data folder or to "
                        f"its train/ folder")
    if not found:
        raise DataError(f"val_list {str(list_file)!r} names no image; give a path per line")
    return sorted(set(found))


def eval_view(train_data, val_data) -> LabelledData:
    """The training images through the validation pipeline and its image store: a deterministic view of the
    training split (e.g. to cache its features). A ConfigError where the dataset cannot be given another pipeline."""
    val = as_dataset(val_data)
    return as_dataset(train_data).with_transform(val.transform, store=val.store)


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
    labels = as_dataset(train_data).labels
    if labels is not None and len(set(labels)) < 2:
        raise DataError(f"the train split holds a single class ({sorted(set(labels))}); a classifier needs at "
                        f"least two classes with images")
    if labels is not None and num_classes is not None and max(labels) >= num_classes:
        raise DataError(f"train labels go up to {max(labels)} but the model has {num_classes} classes; build the "
                        f"model with num_classes={max(labels) + 1} (or the dataset's class_names)")
