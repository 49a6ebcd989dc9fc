"""The GPU input path: the decoded training images kept on the device as uint8, augmented a whole batch at a time.

On a GPU the per-image CPU pipeline (:mod:`fusionnet.data.transforms`, albumentations in loader workers) cannot feed the
trunks: on an H200 ``fit`` ran at 0.09-0.31x of the step rate. When the training images fit in device memory
(flowers5_128: 2,935 x 3 x 128 x 128 bytes, about 150 MB), :class:`DeviceImages` decodes them once through the
eval view (resize the short side, centre crop, as uint8) and :class:`BatchAugment` draws every random parameter
**per sample** (torchvision's v2 transforms draw one set per batched tensor) and applies them to the batch at once:

* random resized crop and horizontal flip: one affine sampling grid per sample (``F.affine_grid`` + bilinear
  ``F.grid_sample``); ``policy="strong"`` adds a rotation, shear or translation to the same grid;
* colour jitter (brightness, contrast, saturation; probability 0.8 per sample), and for ``strong`` a
  solarize or posterize per sample;
* erasing: 1-3 rectangles of 10-30 % of each side filled with 0 (probability ``erase_p`` per sample).

It is the same policy as the CPU pipeline (:class:`fusionnet.data.transforms.AugmentSpec`) with one difference: hue jitter
(±0.03) is left out. The same code runs on CPU tensors (tests, and a CPU run that asks for it). Every draw comes from
one ``torch.Generator`` on the images' device, seeded per epoch, so a run is reproducible and resumable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fusionnet.errors import ConfigError
from fusionnet.data.transforms import AugmentSpec, eval_transform

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(low, high, generator=gen)


def _chance(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, device=device, generator=gen) < p


class BatchAugment:
    """``augment(images uint8 (B, 3, S, S), generator) -> float (B, 3, size, size) in [0, 1]``; see the module
    docstring. ``spec.policy == "none"`` only resizes."""

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"BatchAugment takes uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.float().div_(255)
        s = self.spec
        if s.policy == "none":
            return F.interpolate(x, size=(s.size, s.size), mode="bilinear", antialias=True, align_corners=False)
        x = F.grid_sample(x, self.grid(len(x), gen, x.device), mode="bilinear", padding_mode="reflection",
                          align_corners=False)
        x = self.colour(x, gen)
        if s.erase_p > 0:
            x = self.erase(x, gen)
        return x.clamp_(0, 1)

    def grid(self, n: int, gen: torch.Generator, device) -> torch.Tensor:
        """(n, size, size, 2) sampling grids: per-sample random resized crop (area in ``spec.scale``, aspect in
        [3/4, 4/3], log-uniform), horizontal flip with p=0.5, and for ``strong`` one geometric op."""
        s = self.spec
        area = _uniform(n, *s.scale, gen, device)
        aspect = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), gen, device))
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width and height as fractions of the image
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (1 - w) * _uniform(n, -1, 1, gen, device)  # the crop's centre in [-1, 1] coordinates, inside the image
        cy = (1 - h) * _uniform(n, -1, 1, gen, device)
        flip = torch.where(_chance(n, 0.5, gen, device), -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = w * flip, h, cx, cy
        if s.policy == "strong":
            theta = self._geometric(theta, gen, device)
        return F.affine_grid(theta, [n, 3, s.size, s.size], align_corners=False)

    @staticmethod
    def _geometric(theta: torch.Tensor, gen: torch.Generator, device) -> torch.Tensor:
        """One of rotate ±25°, shear ±15°, translate ±15 % per sample (as the CPU pipeline's ``strong`` ops)."""
        n = len(theta)
        op = torch.randint(0, 3, (n,), generator=gen, device=device)
        angle = torch.deg2rad(_uniform(n, -25, 25, gen, device)) * (op == 0)
        shear = torch.tan(torch.deg2rad(_uniform(n, -15, 15, gen, device))) * (op == 1)
        shift = _uniform(n, -0.3, 0.3, gen, device)[:, None] * (op == 2)[:, None]  # 15 % of the side = 0.3 in [-1, 1]
        cos, sin = torch.cos(angle), torch.sin(angle)
        m = torch.zeros(n, 3, 3, device=device)
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = cos, -sin + shear, sin, cos, 1
        m[:, :2, 2] = shift
        full = torch.cat([theta, torch.tensor([0, 0, 1.0], device=device).expand(n, 1, 3)], 1)
        return (full @ m)[:, :2]

    def colour(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Brightness, contrast and saturation factors in [0.7, 1.3] per sample (applied to 80 % of samples);
        ``strong``: then solarize (threshold 0.6-0.9) or posterize (4-6 bits) for half the samples."""
        n, dev = len(x), x.device
        on = _chance(n, 0.8, gen, dev)
        factor = [torch.where(on, _uniform(n, 0.7, 1.3, gen, dev), 1.0)[:, None, None, None] for _ in range(3)]
        weights = torch.tensor(_GRAY, device=dev)[None, :, None, None]
        x = (x * factor[0]).clamp_(0, 1)
        mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = ((x - mean) * factor[1] + mean).clamp_(0, 1)
        gray = (x * weights).sum(1, keepdim=True)
        x = ((x - gray) * factor[2] + gray).clamp_(0, 1)
        if self.spec.policy == "strong":
            op = torch.randint(0, 4, (n,), generator=gen, device=dev)[:, None, None, None]
            threshold = _uniform(n, 0.6, 0.9, gen, dev)[:, None, None, None]
            levels = 2.0 ** torch.randint(4, 7, (n,), generator=gen, device=dev)[:, None, None, None]
            x = torch.where((op == 0) & (x >= threshold), 1 - x, x)
            x = torch.where(op == 1, torch.floor(x * (levels - 1) + 0.5) / (levels - 1), x)
        return x

    def erase(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Up to 3 rectangles per chosen sample, each 10-30 % of the height and width, set to 0."""
        n, _, hgt, wid = x.shape
        dev = x.device
        holes = torch.randint(1, 4, (n,), generator=gen, device=dev)
        chosen = _chance(n, self.spec.erase_p, gen, dev)
        rows = torch.arange(hgt, device=dev)[None, :, None]
        cols = torch.arange(wid, device=dev)[None, None, :]
        keep = torch.ones(n, hgt, wid, dtype=torch.bool, device=dev)
        for k in range(3):
            hh, ww = (_uniform(n, 0.1, 0.3, gen, dev) * hgt).long(), (_uniform(n, 0.1, 0.3, gen, dev) * wid).long()
            top = (torch.rand(n, generator=gen, device=dev) * (hgt - hh + 1)).long()
            left = (torch.rand(n, generator=gen, device=dev) * (wid - ww + 1)).long()
            inside = ((rows >= top[:, None, None]) & (rows < (top + hh)[:, None, None])
                      & (cols >= left[:, None, None]) & (cols < (left + ww)[:, None, None]))
            keep &= ~(inside & (chosen & (holes > k))[:, None, None])
        return x * keep[:, None]


class DeviceImages:
    """The training images decoded once (through the eval view at ``side`` px: short side resized, centre crop) and
    kept on ``device`` as uint8 (N, 3, side, side), with their labels (N,) beside them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    @classmethod
    def load(cls, data, side: int, device: torch.device, *, num_workers: int = 0, progress=None) -> "DeviceImages":
        view = data.with_transform(eval_transform(side))  # a ConfigError where the dataset cannot switch pipelines
        loader = DataLoader(view, batch_size=256, num_workers=num_workers)
        chunks, labels = [], []
        for x, y in (progress(loader) if progress else loader):
            chunks.append(x.mul(255).round_().to(torch.uint8).to(device))
            labels.append(torch.as_tensor(y))
        return cls(torch.cat(chunks), torch.cat(labels).to(device))

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, augment: BatchAugment, gen: torch.Generator):
        """(augmented float images, labels) of the samples at ``index``."""
        index = index.to(self.images.device)
        return augment(self.images[index], gen), self.labels[index]


def device_bytes(n: int, side: int) -> int:
    """What :class:`DeviceImages` of ``n`` images at ``side`` px hold."""
    return n * 3 * side * side


def fits(n: int, side: int, device: torch.device, share: float = 0.25) -> bool:
    """Whether ``n`` images at ``side`` px take at most ``share`` of the device's free memory (CUDA only)."""
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return device_bytes(n, side) <= share * free
