"""Fusion methods: how branch features become one vector. Each method is one registered :class:`Fuser` class.

Every fuser maps the branch features ``[(B, D_1), ..., (B, D_M)]`` (in branch order) to ``(fused (B, F), extras)``;
``extras`` holds the per-branch weights for analysis (``"gates"`` or ``"attention"``, (B, M), rows summing to 1
over branches) or the per-branch logits of ``late`` fusion (``"branch_logits"``, (B, M, K)).

A method declares, besides its forward pass:

* ``out_dim``: the width F of the fused vector, which the model's head reads;
* :meth:`Fuser.start_from_heads`: how it starts from trained members' Linear heads so that, before any training,
  the model predicts their logit average (or its equivalent); False where it cannot;
* :meth:`Fuser.branch_columns`: where each branch lies in the fused vector, where the fused vector is a per-branch
  rescaling of the features (OGM-GE needs each branch's share of the logits); None elsewhere;

Adding a method is one class with ``@register_fusion("name")`` here and its tests; nothing outside this file compares
method names: the model, the factory, the trainer and the comparison ask the class (:func:`get_fusion`) or for a
capability (:func:`fusionnet.engine.late_fit.closed_form_fusion`: the method with a closed-form fit, which the
``late_oof`` variant, ``fuse``, cross-fitting and ``auto`` build; fits live in the engine, beside training).

* ``concat``: (B, sum D_i), no parameters.
* ``gated``: a gate network on the concatenated features gives per-sample softmax weights g (B, M); each branch
  is scaled by ``M * g_i`` and the results concatenated. The gate starts at zero, so g = 1/M and ``gated`` begins
  exactly as ``concat`` (a model built from trained members starts at their logit average either way).
* ``attention``: each branch is projected to one width ``d`` (a token), a learned query attends over the M branch
  tokens (multi-head), and the attention-weighted sum (B, d) is the fused vector.
* ``late``: a Linear classifier per branch (its closed-form fit: :mod:`fusionnet.engine.late_fit`); the
  fused vector is their log-probabilities side by side (B, M*K), so the head is a learned combiner of the
  branches' predictions (stacking inside the network).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Mapping, Sequence

import torch
from einops import rearrange
from torch import nn

from fusionnet.registry import Registry

Heads = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per branch: (weight (K, D_i), bias (K,)) of a member's head
FUSIONS: Registry[type["Fuser"]] = Registry("fusion method")


def register_fusion(name: str, *, default: bool = False) -> Callable[[type["Fuser"]], type["Fuser"]]:
    """Class decorator: make a :class:`Fuser` available as ``FusionConfig(fusion=name)``; names are unique.
    ``default``: ``compare`` trains it jointly when no ``--variants`` are given (a new method is opt-in)."""
    def add(cls: type["Fuser"]) -> type["Fuser"]:
        cls.name = name
        cls.compare_default = default
        return FUSIONS.register(name)(cls)
    return add


def get_fusion(name: str) -> type["Fuser"]:
    """The registered class of a fusion method, or a ConfigError with the closest names."""
    return FUSIONS.get(name)


def list_fusions() -> list[str]:
    """The registered fusion methods, in registration order."""
    return FUSIONS.names()


class Fuser(nn.Module):
    """Base class of the fusion methods (see the module docstring)."""

    name: ClassVar[str]
    per_branch_linear: ClassVar[bool] = False  # fused = the branch features, each scaled: branch_columns() holds

    def __init__(self, dims: Sequence[int], *, num_classes: int, width: int) -> None:
        super().__init__()
        self.dims = list(dims)
        self.out_dim = sum(dims)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def branch_columns(self) -> list[slice] | None:
        """Each branch's columns of the fused vector, for per-branch-linear fusions (else None)."""
        if not self.per_branch_linear:
            return None
        ends = torch.tensor(self.dims).cumsum(0).tolist()
        return [slice(end - d, end) for d, end in zip(self.dims, ends)]

    @torch.no_grad()
    def start_from_heads(self, head: nn.Linear, heads: Heads) -> bool:
        """Set this fuser and the model's Linear ``head`` so that the model's logits are the mean of the
        members' head logits ``W_i f_i + b_i`` over the branches; False where the method cannot."""
        if not self.per_branch_linear:  # the fused vector mixes branches: no closed-form start
            return False
        n = len(heads)  # fc = [W_1 ... W_N] / N, b = mean b_i (gated starts with uniform gates: exactly concat)
        head.weight.copy_(torch.cat([w for w, _ in heads], dim=1) / n)  # (K, sum D_i)
        head.bias.copy_(torch.stack([b for _, b in heads]).mean(0))
        return True

    @classmethod
    def can_start_from_heads(cls) -> bool:
        """Whether :meth:`start_from_heads` can set the model to the members' logit average."""
        return cls.per_branch_linear or cls.start_from_heads is not Fuser.start_from_heads


@register_fusion("concat", default=True)
class ConcatFusion(Fuser):
    per_branch_linear = True

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.cat(list(feats), dim=1), {}


@register_fusion("gated", default=True)
class GatedFusion(Fuser):
    per_branch_linear = True

    def __init__(self, dims: Sequence[int], *, num_classes: int, width: int, hidden: int = 128) -> None:
        super().__init__(dims, num_classes=num_classes, width=width)
        self.m = len(dims)
        self.gate = nn.Sequential(nn.LayerNorm(sum(dims)), nn.Linear(sum(dims), hidden), nn.GELU(),
                                  nn.Linear(hidden, len(dims)))
        nn.init.zeros_(self.gate[-1].weight)  # uniform gates at the start: exactly concat
        nn.init.zeros_(self.gate[-1].bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gates = self.gate(torch.cat(list(feats), dim=1)).softmax(dim=1)  # (B, M)
        scaled = [f * (self.m * gates[:, i:i + 1]) for i, f in enumerate(feats)]
        return torch.cat(scaled, dim=1), {"gates": gates}


@register_fusion("attention", default=True)
class AttentionFusion(Fuser):
    def __init__(self, dims: Sequence[int], *, num_classes: int, width: int = 256, heads: int = 4) -> None:
        super().__init__(dims, num_classes=num_classes, width=width)
        heads = max(h for h in range(1, heads + 1) if width % h == 0)
        self.out_dim = width
        self.proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width)) for d in dims)
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens = torch.stack([p(f) for p, f in zip(self.proj, feats)], dim=1)  # (B, M, d)
        query = self.query.expand(tokens.shape[0], -1, -1)  # (B, 1, d)
        fused, weights = self.attn(query, tokens, tokens, need_weights=True, average_attn_weights=True)
        # fused (B, 1, d) -> (B, d); weights (B, 1, M) -> (B, M): the query's attention over branches
        return self.norm(rearrange(fused, "b 1 d -> b d")), {"attention": rearrange(weights, "b 1 m -> b m")}


@register_fusion("late", default=True)
class LateFusion(Fuser):
    def __init__(self, dims: Sequence[int], *, num_classes: int, width: int) -> None:
        super().__init__(dims, num_classes=num_classes, width=width)
        self.out_dim = len(dims) * num_classes
        self.classifiers = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = torch.stack([c(f) for c, f in zip(self.classifiers, feats)], dim=1)  # (B, M, K)
        log_probs = logits.float().log_softmax(dim=2).to(logits.dtype)
        return rearrange(log_probs, "b m k -> b (m k)"), {"branch_logits": logits}

    @torch.no_grad()
    def start_from_heads(self, head: nn.Linear, heads: Heads) -> bool:
        """Each member's head becomes its branch's classifier and the combiner is [I/N ... I/N], so the fused
        softmax is that of the mean member logit (log-softmax only subtracts a per-sample constant)."""
        n, k = len(heads), head.out_features
        for classifier, (w, b) in zip(self.classifiers, heads):
            classifier.weight.copy_(w)
            classifier.bias.copy_(b)
        head.weight.copy_(torch.eye(k).repeat(1, n) / n)  # (K, N*K)
        head.bias.zero_()
        return True


def branch_dropout(feats: Sequence[torch.Tensor], p: float, training: bool) -> list[torch.Tensor]:
    """Drop whole branches per sample with probability ``p`` (never all of them), rescaling the kept ones by
    M / kept so the fused vector keeps its expected scale; the identity in eval mode or with p = 0."""
    if not training or p <= 0 or len(feats) < 2:
        return list(feats)
    b, m = feats[0].shape[0], len(feats)
    keep = torch.rand(b, m, device=feats[0].device) >= p  # (B, M)
    none = ~keep.any(dim=1)
    if none.any():  # a sample that lost every branch keeps one, chosen at random
        pick = torch.randint(0, m, (int(none.sum()),), device=keep.device)
        keep[none.nonzero().flatten(), pick] = True
    scale = keep.float() * (m / keep.sum(dim=1, keepdim=True).float())  # (B, M)
    return [f * scale[:, i:i + 1].to(f.dtype) for i, f in enumerate(feats)]


def ordered(features: Mapping[str, torch.Tensor], names: Sequence[str]) -> list[torch.Tensor]:
    return [features[n] for n in names]
