"""Labelled images listed in a table: a CSV / TSV / Parquet file, or a pandas DataFrame, with an image-path column, a
label column and an optional split column, beside a folder of images (how Kaggle sets and labelling tools keep them).

* the image column: ``path`` or ``image`` (or the name given); paths relative to the table's folder (a DataFrame's:
  the working directory; or ``root``) or absolute;
* the label column: ``label`` (or the name given); class names are the labels as text, sorted;
* the split column (optional): ``train``, ``val`` (or ``validation``) and ``test``; without it every row is training
  data (the validation split is then drawn from it, as from a folder without ``val/``).

Rows are put in a canonical order (class, then resolved path), so what is drawn from them (the stratified validation
split) depends on the set of images and labels and the seed, not on the order of the rows or the spelling of a path.
A table listing the files of a folder tree gives the splits the folder gives. Everything wrong with a table is one
:class:`~fusionnet.errors.DataError` naming it, raised while it is read, before anything is written.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from fusionnet.errors import DataError, MissingDependencyError, install_hint

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
IMAGE_COLUMNS = ("path", "image")
SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


@dataclass
class TableSplits:
    """The rows of a table as ``(path, label)`` samples per split (canonical order), and the class names."""

    class_names: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]] | None  # None: the table names no validation rows
    test: list[tuple[str, int]] | None
    base: Path  # where relative paths start (the table's folder)


def _is_frame(source) -> bool:
    return hasattr(source, "columns") and hasattr(source, "to_dict")  # a pandas DataFrame, without importing pandas


def is_table(source) -> bool:
    """Whether ``source`` is a table this module reads (a file of a table suffix, or a DataFrame)."""
    if _is_frame(source):
        return True
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in TABLE_SUFFIXES


def read_table(source, *, image_column: str | None = None, label_column: str = "label",
               root: str | os.PathLike | None = None) -> TableSplits:
    """The samples of a table file or DataFrame, per split (see the module docstring); relative image paths start
    at ``root`` (default: the table's folder; a DataFrame's: the working directory)."""
    rows, columns, base, what = _rows(source)
    if root is not None:
        base = Path(root).resolve()
        if not base.is_dir():
            raise DataError(f"image root {str(root)!r} is not a folder; give the folder the table's paths start at")
    if not rows:
        raise DataError(f"{what} has no rows; it needs a row per image (columns {', '.join(IMAGE_COLUMNS)}/label)")
    image = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    for needed, name in ((image, "image path"), (label_column, "label")):
        if needed is None or needed not in columns:
            asked = needed or " or ".join(repr(c) for c in IMAGE_COLUMNS)
            raise DataError(f"{what} has no {name} column {asked if needed is None else repr(needed)}; its columns "
                            f"are {columns}. Name it with --image-column / --label-column (image_column=, "
                            f"label_column=)")
    samples = _samples(rows, image, label_column, base, what)
    names = sorted({label for _, label, _ in samples})
    index = {n: i for i, n in enumerate(names)}
    return grouped(names, [(path, index[label], split, path) for path, label, split in samples], base, what)


def grouped(names: list[str], rows, base: Path, what: str) -> TableSplits:
    """``rows`` of (path, class index, split, key) as the samples of each split in the canonical order (class, then
    ``key``: the resolved path, or what stands for it), every class with training rows (else a DataError)."""
    by_split: dict[str, list[tuple[str, int]]] = {}
    for path, label, split, _ in sorted(rows, key=lambda r: (r[1], r[3])):
        by_split.setdefault(split, []).append((path, label))
    trained = {y for _, y in by_split.get("train", [])}
    untrained = [n for i, n in enumerate(names) if i not in trained]
    if untrained:
        raise DataError(f"{what}: class(es) {untrained} have no training rows; every class needs training images")
    return TableSplits(list(names), by_split["train"], by_split.get("val"), by_split.get("test"), base)


def _rows(source) -> tuple[list[dict], list[str], Path, str]:
    """(rows as dicts of text, the column names, where relative paths start, how to name the source)."""
    if _is_frame(source):
        frame = source.astype(object).where(source.notna(), "")
        return frame.to_dict("records"), [str(c) for c in source.columns], Path.cwd(), "the DataFrame"
    path = Path(source)
    if not path.is_file():
        raise DataError(f"table {str(source)!r} not found; give a CSV, TSV or Parquet file of image paths and labels")
    what = f"table {str(path)!r}"
    if path.suffix.lower() == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise MissingDependencyError(f"reading {what} needs pandas and pyarrow: {install_hint('tables')}") from None
        try:
            frame = pd.read_parquet(path)
        except ImportError as exc:
            raise MissingDependencyError(f"reading {what} needs pyarrow: {install_hint('tables')} ({exc})") from None
        rows, columns, _, _ = _rows(frame)
        return rows, columns, path.parent, what
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{k.strip(): (v or "") for k, v in r.items() if k is not None} for r in reader]
    return rows, columns, path.parent, what


def _samples(rows: list[dict], image: str, label: str, base: Path, what: str) -> list[tuple[str, str, str]]:
    """(resolved path, label, split) per row: unknown splits, missing files and contradicting rows refused."""
    out: dict[str, tuple[str, str, str]] = {}
    missing, repeated = [], 0
    for i, row in enumerate(rows):
        raw, name = str(row.get(image, "")).strip(), str(row.get(label, "")).strip()
        given = str(row.get("split", "train")).strip().lower()  # a split column's empty cell is refused, never
        split = SPLITS.get(given)  # taken for training: a test image would silently become training data
        if split is None:
            raise DataError(f"{what}, row {i + 1}: {'an empty split' if not given else f'unknown split {given!r}'}; "
                            f"use train, val or test")
        if not raw or not name:
            raise DataError(f"{what}, row {i + 1}: an empty {'image path' if not raw else 'label'}")
        path = str((base / raw).resolve()) if not os.path.isabs(raw) else str(Path(raw).resolve())
        if not os.path.isfile(path):
            missing.append(raw)
            continue
        if path in out:
            if out[path][1:] != (name, split):
                raise DataError(f"{what} lists {raw!r} twice with different labels or splits: {out[path][1:]} and "
                                f"{(name, split)}; keep one row per image")
            repeated += 1
            continue
        out[path] = (path, name, split)
    if missing:
        raise DataError(f"{what} lists {len(missing)} file(s) that do not exist, e.g. "
                        f"{', '.join(map(repr, missing[:3]))}; paths are relative to {str(base)!r}")
    if repeated:
        warnings.warn(f"{what} repeats {repeated} row(s); each image is used once", UserWarning, stacklevel=3)
    return list(out.values())
