"""One branch of a FusionNet: resize -> normalise with the backbone's own mean/std -> trunk -> pool (+ the pooled
outputs of earlier trunk levels, ``taps``): images (B, 3, H, W) in [0, 1] -> features (B, D)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from fusionnet.models.backbones import BackboneSpec, tap_stages, trunk_output, trunk_stages
from fusionnet.models.pooling import Pool


@dataclass
class BranchConfig:
    """One branch of a FusionNet."""

    backbone: str  # registry name, "timm/<model>" or a plain timm model name
    name: str = ""  # unique within the model; defaults to the backbone name (suffixed _2, _3 for repeats)
    pool: str = "avg"  # avg | max | avgmax | catavgmax | gem | token (see fusionnet.models.pooling)
    input_size: int | None = None  # resize the batch to this square size; None keeps it (or the trunk's fixed size)
    mean: tuple[float, float, float] | None = None  # normalisation override; None takes the backbone spec's
    std: tuple[float, float, float] | None = None
    aux_heads: bool = False  # googlenet only: train its two auxiliary classifiers too (TrainConfig.aux_weight)
    taps: int = 0  # also average-pool the outputs of up to this many feature levels below the trunk's output, append
    # them to its pooled features (multi-level features: a linear head gains most on data far from the
    # pretraining images); convolutional trunks


class Branch(nn.Module):
    """Resize -> normalise -> trunk -> pool, for one backbone: (B, 3, H, W) in [0, 1] -> (B, D)."""

    def __init__(self, cfg: BranchConfig, spec: BackboneSpec, trunk: nn.Module) -> None:
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.trunk = trunk
        layout, channels, prefix = trunk_output(spec, trunk)
        self.pool = Pool(cfg.pool, layout, prefix)
        self.input_size = cfg.input_size or (spec.input_size if spec.fixed_input_size else None)
        self.stages = trunk_stages(trunk)  # a plain list: the modules stay registered under self.trunk
        self.taps = tap_stages(trunk, self.stages, cfg.taps, self.input_size or spec.input_size) if cfg.taps else []
        self._tapped: list[torch.Tensor] | None = None  # the taps' pooled outputs while _run runs the trunk
        for stage, _ in self.taps:
            stage.register_forward_hook(self._tap)
        self.out_dim = self.pool.out_dim(channels) + sum(c for _, c in self.taps)
        mean, std = cfg.mean or spec.mean, cfg.std or spec.std
        # not persistent: derived from the config, so checkpoints hold weights only
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.frozen_stages = 0  # how many stages, counted from the input, are frozen

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=size < min(x.shape[-2:]))
        return (x - self.mean) / self.std

    def forward_with_aux(self, x: torch.Tensor, checkpoint: bool = False
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, 3, H, W) -> ((B, D), GoogLeNet aux logits by head name in training mode, else {}).
        ``checkpoint``: keep only the trunk's input for backward and recompute the rest there."""
        x = self.preprocess(x)
        fn = self.trunk.forward_with_aux if self.cfg.aux_heads else self.trunk.forward_features
        if checkpoint and self.training and torch.is_grad_enabled() and self.frozen_stages < len(self.stages):
            out, taps = torch.utils.checkpoint.checkpoint(self._run, fn, x, use_reentrant=False)
        else:
            out, taps = self._run(fn, x)
        fmap, aux = out if self.cfg.aux_heads else (out, {})
        return self._pooled(fmap, taps), aux

    def _run(self, fn, x: torch.Tensor):
        """(fn(x), the taps' pooled outputs during it, input side first)."""
        self._tapped = []
        try:
            return fn(x), self._tapped
        finally:
            self._tapped = None

    def _tap(self, _module, _inputs, output: torch.Tensor) -> None:
        if self._tapped is not None:  # the trunk run outside _run (e.g. feature_map) collects nothing
            self._tapped.append(output.mean((2, 3)))  # (B, C, h, w) -> (B, C)

    def _pooled(self, fmap: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.pool(fmap), *taps], dim=1) if self.taps else self.pool(fmap)

    def levels(self) -> list[slice]:
        """Where each feature level lies in the branch's output: [the trunk's output, the nearest tap, ...]."""
        widths = [self.out_dim - sum(c for _, c in self.taps)] + [c for _, c in self.taps[::-1]]
        ends = torch.tensor(widths).cumsum(0).tolist()
        slices = [slice(end - w, end) for w, end in zip(widths, ends)]
        return [slices[0], *slices[1:][::-1]]  # the taps are appended input side first

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's unpooled output in its own layout, e.g. (B, C, h, w) (see fusionnet.models.pooling)."""
        return self.trunk.forward_features(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        fmap, taps = self._run(self.trunk.forward_features, self.preprocess(x))
        return self._pooled(fmap, taps)

    def set_trainable_top_stages(self, k: int | None) -> None:
        """Train only the ``k`` stages nearest the output (None: all); the others keep weights and BatchNorm stats."""
        n = len(self.stages)
        self.frozen_stages = 0 if k is None else max(n - max(k, 0), 0)
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i >= self.frozen_stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Branch":
        super().train(mode)
        for stage in self.stages[:self.frozen_stages]:  # frozen stages keep their BatchNorm statistics
            stage.eval()
        return self
