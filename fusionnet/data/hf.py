"""Labelled images from a Hugging Face dataset: a folder written by ``save_to_disk``, or a dataset id
(``hf:user/name``) loaded through ``datasets``' own ``load_dataset`` and cache (it honours ``HF_DATASETS_OFFLINE``
and ``HF_HOME``).

The image column is the one whose feature is ``Image`` and the label column the ``ClassLabel`` one (or those named),
whose names give the class order; the dataset's splits are used as given (``train``, ``validation`` or ``val``,
``test``). Each image's encoded bytes are written once, unchanged, to a file under the fusionnet cache
(``$FUSIONNET_CACHE``, default ``~/.cache/fusionnet``), named by the dataset's fingerprint, split and row: from
there every pipeline (the image cache, the training record, the unreadable-file check) reads it as it reads a table
of files (:mod:`fusionnet.data.tables`), and the sample ids stay stable.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from fusionnet.data.tables import SPLITS, TableSplits, grouped
from fusionnet.errors import DataError, MissingDependencyError, install_hint
from fusionnet.utils.files import atomic_write

PREFIX = "hf:"


def is_hf_dataset(source) -> bool:
    """A ``hf:<id>`` string, or a folder written by ``datasets``' ``save_to_disk``."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    if str(source).startswith(PREFIX):
        return True
    p = Path(source)
    return p.is_dir() and any((p / f).is_file() for f in ("dataset_dict.json", "state.json"))


def read_hf_dataset(source, *, image_column: str | None = None, label_column: str | None = None) -> TableSplits:
    """The dataset's images as files per split, and its class names (see the module docstring)."""
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(f"reading the Hugging Face dataset {str(source)!r} needs datasets: "
                                     f"{install_hint('hf')}") from None
    loaded = _load(datasets, source)
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    unknown = sorted(set(parts) - set(SPLITS))
    if unknown:
        raise DataError(f"{str(source)!r} has split(s) {unknown}; fusionnet takes train, validation (or val) and test")
    features = next(iter(parts.values())).features
    image = image_column or next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
    label = label_column if label_column in features else next(
        (n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), label_column)
    for needed, kind in ((image, "image"), (label, "label")):
        if needed is None or needed not in features:
            raise DataError(f"{str(source)!r} has no {kind} column{'' if needed is None else f' {needed!r}'}; its "
                            f"features are {dict(features)}. Name it with --image-column / --label-column")
    classes = features[label].names if isinstance(features[label], datasets.ClassLabel) else None
    names = classes or sorted({str(v) for part in parts.values() for v in part[label]})
    index = {n: i for i, n in enumerate(names)}
    if "train" not in parts:
        raise DataError(f"{str(source)!r} has no train split; its splits are {sorted(parts)}")
    folder = _cache_root() / _safe(str(source))
    rows = []
    for split, part in parts.items():
        files, keys = _write_images(part.cast_column(image, datasets.Image(decode=False)), image,
                                    folder / part._fingerprint / SPLITS[split])
        labels = [index[names[v] if classes else str(v)] for v in part[label]]
        # ordered by the image's own name (its bytes' hash where it has none), not by the row order
        rows += [(f, y, SPLITS[split], key) for f, y, key in zip(files, labels, keys)]
    return grouped(names, rows, folder, f"Hugging Face dataset {str(source)!r}")


def _load(datasets, source):
    name = str(source)
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    if offline:  # as the environment says now: datasets and huggingface_hub read it once, when first imported
        import huggingface_hub.constants

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        if name.startswith(PREFIX):
            return datasets.load_dataset(name[len(PREFIX):])
        return datasets.load_from_disk(name)
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as exc:
        why = "offline and not in the cache" if offline else "not found or not reachable"
        raise DataError(f"Hugging Face dataset {name!r}: {why} ({type(exc).__name__}: {str(exc)[:200]}); give a "
                        f"folder written by save_to_disk, or a dataset id that loads with datasets.load_dataset") \
            from None


def _write_images(part, column: str, folder: Path) -> tuple[list[str], list[str]]:
    """Each row's image bytes in a file of its own (written once; the format's own suffix), in row order, and each
    image's key for ordering: the file name it was stored with, else a hash of its bytes."""
    import hashlib

    from PIL import Image

    files, keys = [], []
    for i, cell in enumerate(part[column]):
        data = cell.get("bytes") if isinstance(cell, dict) else None
        if data is None and isinstance(cell, dict) and cell.get("path") and os.path.isfile(cell["path"]):
            data = Path(cell["path"]).read_bytes()
        if data is None:
            raise DataError(f"row {i} of {str(folder)!r}'s split has no image bytes")
        try:
            suffix = "." + (Image.open(io.BytesIO(data)).format or "png").lower().replace("jpeg", "jpg")
        except Exception:  # an undecodable image: kept, and named by the unreadable-file check at load time
            suffix = ".bin"
        path = folder / f"{i:07d}{suffix}"
        if not path.is_file():
            atomic_write(path, lambda f, data=data: f.write(data))
        files.append(str(path))
        keys.append(os.path.basename(cell.get("path") or "") or hashlib.sha1(data).hexdigest())
    return files, keys


def _cache_root() -> Path:
    return Path(os.environ.get("FUSIONNET_CACHE") or Path.home() / ".cache" / "fusionnet") / "datasets"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.removeprefix(PREFIX).strip("/"))[-80:]
