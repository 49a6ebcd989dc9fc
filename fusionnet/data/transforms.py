"""The albumentations pipelines: images (H, W, 3) uint8 -> float tensors (3, H, W) in [0, 1], and their seeding.

Normalisation is not here: it belongs to each branch inside the model, because every backbone wants its own mean
and std. The GPU input path (whole batches augmented on the device) is a separate job; this is the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from fusionnet.config import Reading
from fusionnet.config.reading import check_reading_fields, resize_target
from fusionnet.errors import ConfigError
from fusionnet.utils.images import read_rgb

Transform = Callable[[np.ndarray], torch.Tensor]

_TO_TENSOR = [A.ToFloat(max_value=255.0), ToTensorV2()]  # uint8 (H, W, 3) -> float (3, H, W) in [0, 1]


POLICIES = ("default", "strong", "none")


@dataclass(frozen=True)
class AugmentSpec:
    """One augmentation policy, built by either path: :func:`train_transform` (albumentations, per image on the CPU)
    or :class:`fusionnet.data.device_input.BatchAugment` (whole batches on the device)."""

    size: int
    policy: str = "default"
    erase_p: float = 0.25
    scale: tuple[float, float] = (0.35, 1.0)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown augmentation policy {self.policy!r}; choose 'default', 'strong' or 'none'")


def train_transform(size: int, *, policy: str = "default", erase_p: float = 0.25,
                    scale: tuple[float, float] = (0.35, 1.0)) -> A.Compose:
    """Random resized crop, flip, colour jitter, coarse dropout; ``policy="strong"`` adds two RandAugment-style ops
    per image; ``policy="none"`` is the eval pipeline (deterministic, e.g. for feature caching). The pipeline carries
    its :class:`AugmentSpec` (:func:`spec_of`), so the GPU input path can apply the same policy."""
    spec = AugmentSpec(size, policy, erase_p, tuple(scale))
    pipeline = _albumentations(spec)
    pipeline.fusionnet_spec = spec
    return pipeline


def spec_of(transform) -> AugmentSpec | None:
    """The policy a :func:`train_transform` pipeline was built from; None for any other transform."""
    return getattr(transform, "fusionnet_spec", None)


def _albumentations(spec: AugmentSpec) -> A.Compose:
    size, policy, erase_p, scale = spec.size, spec.policy, spec.erase_p, spec.scale
    if policy == "none":
        return eval_transform(size)
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


def eval_transform(size: int, *, crop_pct: float = 1.0, resize: str = "shorter", reader: str = "albumentations"):
    """The evaluation pipeline of a :class:`fusionnet.config.Reading` (see there): ``resize="shorter"``: the short
    side to ``size / crop_pct``, then a centre crop of ``size`` (crop_pct=0.875 is ImageNet's habit; the default 1.0
    keeps the whole short side). ``"stretch"``: the whole image resized to ``size`` x ``size`` (what a model trained
    on torchvision's ``Resize((s, s))`` saw). ``reader="torchvision"``: torchvision's own transforms on the PIL
    image (:class:`TorchvisionEval`); ``"albumentations"``: the library's OpenCV pipeline."""
    check_reading_fields(size=size, resize=resize, crop_pct=crop_pct, reader=reader)
    if reader == "torchvision":
        return TorchvisionEval(size, crop_pct=crop_pct, resize=resize)
    if resize == "stretch":
        return A.Compose([A.Resize(size, size)] + _TO_TENSOR)
    return A.Compose([A.SmallestMaxSize(max_size=int(round(size / crop_pct))), A.CenterCrop(size, size)]
                     + _TO_TENSOR)


def reading_transform(reading: Reading, size: int | None = None):
    """:func:`eval_transform` of a :class:`~fusionnet.config.Reading` (at ``size``, else the reading's own)."""
    size = size or reading.size
    if size is None:
        raise ConfigError("the input size is unknown; give --size (the size the model was trained at)")
    return eval_transform(size, crop_pct=reading.crop_pct, resize=reading.resize, reader=reading.reader)


def read_pil_rgb(path) -> np.ndarray:
    """A file decoded as torchvision's ``ImageFolder`` decodes it: ``Image.open(f).convert("RGB")`` (no EXIF
    rotation; transparency dropped, not composited)."""
    from PIL import Image

    with open(path, "rb") as f:
        with Image.open(f) as img:
            return np.array(img.convert("RGB"))


class TorchvisionEval:
    """torchvision's evaluation transforms, exactly: ``Resize`` on the PIL image (antialiased bilinear; ``shorter``:
    ``Resize(floor(size / crop_pct))``, ``stretch``: ``Resize((s, s))``), ``CenterCrop(size)``, ``ToTensor()``.
    Takes the decoded (H, W, 3) uint8 array; :attr:`decode` is how its images are read from files."""

    decode = staticmethod(read_pil_rgb)

    def __init__(self, size: int, *, crop_pct: float = 1.0, resize: str = "shorter") -> None:
        from torchvision import transforms as T

        side = resize_target(size, crop_pct)
        first = T.Resize(side) if resize == "shorter" else T.Resize((side, side))
        self.pipeline = T.Compose([first, T.CenterCrop(size), T.ToTensor()])

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        from PIL import Image

        return self.pipeline(Image.fromarray(image))

    def __repr__(self) -> str:  # the feature cache keys on the pipeline's repr
        return f"TorchvisionEval({self.pipeline!r})"


def decoder_of(transform):
    """How files are decoded for ``transform``: its own ``decode`` (torchvision's reading), else
    :func:`fusionnet.utils.images.read_rgb`."""
    return getattr(transform, "decode", None) or read_rgb


def apply_transform(transform: Transform | None, image: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 image through ``transform`` (an albumentations pipeline or any callable; None: as is)."""
    if transform is None:
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    if isinstance(transform, A.BasicTransform | A.BaseCompose):
        return transform(image=image)["image"]
    return transform(image)


def seed_transform(transform, seed: int) -> None:
    """Reseed an albumentations pipeline (it keeps its own RNG, untouched by torch/numpy seeds); other callables
    are left as they are."""
    if isinstance(transform, A.BaseCompose):
        transform.set_random_seed(seed)
