"""How a model reads an image: the one description every command, report and export uses (imports no torch).

A :class:`Reading` says which library's pipeline brings a decoded photo to the model's input, at what size, how
the image reaches that size and how much of it is kept; the model's own branches normalise it afterwards. Two
pipelines are reproduced exactly:

* ``reader="torchvision"``: what a plain torchvision script does at evaluation, ``Image.open(f).convert("RGB")``
  (PIL decoding, no EXIF rotation, as ``ImageFolder`` reads), ``T.Resize`` on the PIL image (antialiased
  bilinear), ``T.CenterCrop``, ``T.ToTensor``. Plain state-dict members are read this way, so their answers through
  fusionnet are the answers of the user's own script.
* ``reader="albumentations"``: the library's own training pipeline's eval view (OpenCV resize, EXIF rotation
  applied), which fusionnet-trained models saw in training.

``resize``: ``shorter`` (the short side to ``size / crop_pct``, then a centre crop of ``size``: torchvision's
``Resize(s)`` + ``CenterCrop``) or ``stretch`` (the whole image to a square: ``Resize((s, s))``; with
``crop_pct < 1``, ``Resize((s / crop_pct,) * 2)`` + ``CenterCrop(s)``). ``crop_pct=0.875`` is the ImageNet habit
``Resize(256)`` + ``CenterCrop(224)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

from fusionnet.errors import ConfigError, is_int

# How an image is brought to the input size for evaluation: its short side resized and the centre cropped, or the
# whole image stretched to a square (torchvision's Resize((s, s)) in training)
RESIZES = ("shorter", "stretch")
READERS = ("albumentations", "torchvision")
# The sizes a plain member is scored at on validation when nothing says the size it was trained at
CANDIDATE_SIZES = (64, 96, 128, 160, 224)


def check_reading_fields(*, size=None, resize: str = "shorter", crop_pct: float = 1.0,
                         reader: str = "albumentations") -> None:
    """A ConfigError naming the bad value and the valid ones."""
    if size is not None and not (is_int(size) and size >= 1):
        raise ConfigError(f"size must be a whole number of pixels >= 1, got {size!r} (e.g. 128)")
    if resize not in RESIZES:
        raise ConfigError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct!r} (0.875 for Resize(256) + CenterCrop(224))")
    if reader not in READERS:
        raise ConfigError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")


def resize_target(size: int, crop_pct: float) -> int:
    """The side an image is resized to before the centre crop: ``floor(size / crop_pct)`` (timm's rule; 224 at
    0.875 gives torchvision's 256)."""
    return int(math.floor(size / crop_pct + 1e-9))


@dataclass(frozen=True)
class Reading:
    """How a model's images reach it (see the module docstring); ``size`` None: not known yet."""

    size: int | None = None
    resize: str = "shorter"
    crop_pct: float = 1.0
    reader: str = "albumentations"

    def __post_init__(self) -> None:
        check_reading_fields(size=self.size, resize=self.resize, crop_pct=self.crop_pct, reader=self.reader)

    def at(self, size: int) -> "Reading":
        return Reading(size, self.resize, self.crop_pct, self.reader)

    def to_dict(self) -> dict:
        return asdict(self)

    def split_fields(self) -> dict:
        """The :func:`fusionnet.data.splits.load_splits` keywords that read a data folder this way."""
        return {"resize": self.resize, "crop_pct": self.crop_pct, "reader": self.reader}

    def model_fields(self) -> dict:
        """The :class:`fusionnet.models.fusion.FusionConfig` fields of a model that reads its images this way."""
        return {**self.split_fields(), "image_size": self.size}

    def describe(self) -> str:
        """One line a person reads, e.g. ``torchvision: Resize(73) + CenterCrop(64) on the PIL image
        (antialiased), at 64 px``."""
        size = self.size
        if size is None:
            return f"{self.reader}: {self.resize} resize, crop_pct {self.crop_pct:g}, size unknown"
        if self.reader == "torchvision":
            side = resize_target(size, self.crop_pct)
        else:  # the albumentations pipeline: the short side rounded; a stretch ignores crop_pct
            side = size if self.resize == "stretch" else int(round(size / self.crop_pct))
        first = f"Resize(({side}, {side}))" if self.resize == "stretch" else f"Resize({side})"
        crop = "" if self.resize == "stretch" and side == size else f" + CenterCrop({size})"
        how = "on the PIL image (antialiased, no EXIF rotation)" if self.reader == "torchvision" else \
            "with OpenCV (no antialiasing, EXIF rotation applied)"
        return f"{self.reader}: {first}{crop} {how}, at {size} px"


def common_reading(readings: Mapping[str, Reading]) -> Reading:
    """The one way several members read an image (one network reads one batch one way); members that read
    differently are refused, naming the vote, which reads each member its own way. Sizes not known yet (None) are
    left to the caller."""
    kinds = {(r.resize, r.crop_pct, r.reader) for r in readings.values()}
    sizes = {r.size for r in readings.values()} - {None}
    if len(kinds) == 1 and len(sizes) > 1:
        listed = ", ".join(f"{name}: {r.size} px" for name, r in readings.items())
        raise ConfigError(f"the members were trained at different input sizes ({listed}); one fused network reads "
                          f"one batch at one size: give --size to read them all at one, or vote over them (each "
                          f"read at its own size: 'fusionnet predict' per member, then 'fusionnet vote')")
    if len(kinds) > 1:
        listed = "; ".join(f"{name}: {r.describe()}" for name, r in readings.items())
        raise ConfigError(f"the members read their images differently ({listed}). One fused network reads one "
                          f"batch one way, so it would read some of them unlike their training; vote instead, which "
                          f"reads each member its own way: score each with 'fusionnet predict MEMBER --data DATA "
                          f"--split val --out M_val.pt' (and --split test), then 'fusionnet vote --val *_val.pt "
                          f"--test *_test.pt'. Or retrain the odd one out with the others' reading")
    first = next(iter(readings.values()))
    return first.at(sizes.pop()) if sizes else first
