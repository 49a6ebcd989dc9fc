"""How branch features become one vector: ``concat``, ``gated`` and ``attention`` fusion, and branch dropout.

Every fuser maps ``{name: (B, D_i)}`` (in branch order) to ``(fused (B, F), extras)``; ``extras`` holds the
per-branch weights for analysis (``"gates"`` or ``"attention"``, (B, M), rows summing to 1 over branches) or the
per-branch logits of ``late`` fusion (``"branch_logits"``, (B, M, K)).

* ``concat``: (B, sum D_i), no parameters.
* ``gated``: a gate network on the concatenated features gives per-sample softmax weights g (B, M); each branch
  is scaled by ``M * g_i`` and the results concatenated. The gate starts at zero, so g = 1/M and ``gated`` begins
  exactly as ``concat`` (a model built from trained members starts at their logit average either way).
* ``attention``: each branch is projected to one width ``d`` (a token), a learned query attends over the M branch
  tokens (multi-head), and the attention-weighted sum (B, d) is the fused vector.
* ``late``: a Linear classifier per branch; the fused vector is their log-probabilities side by side (B, M*K), so
  the head is a learned combiner of the branches' predictions (stacking inside the network). With the head at
  [I/M ... I/M] the model predicts the softmax of the mean branch logit. :func:`fusionnet.late_head.fit_late_head`
  fits both parts in closed form on frozen features, the combiner on out-of-fold predictions.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from einops import rearrange
from torch import nn

FUSIONS = ("concat", "gated", "attention", "late")


class ConcatFusion(nn.Module):
    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.out_dim = sum(dims)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.cat(list(feats), dim=1), {}


class GatedFusion(nn.Module):
    def __init__(self, dims: Sequence[int], hidden: int = 128) -> None:
        super().__init__()
        self.out_dim, self.m = sum(dims), len(dims)
        self.gate = nn.Sequential(nn.LayerNorm(sum(dims)), nn.Linear(sum(dims), hidden), nn.GELU(),
                                  nn.Linear(hidden, len(dims)))
        nn.init.zeros_(self.gate[-1].weight)  # uniform gates at the start: exactly concat
        nn.init.zeros_(self.gate[-1].bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gates = self.gate(torch.cat(list(feats), dim=1)).softmax(dim=1)  # (B, M)
        scaled = [f * (self.m * gates[:, i:i + 1]) for i, f in enumerate(feats)]
        return torch.cat(scaled, dim=1), {"gates": gates}


class AttentionFusion(nn.Module):
    def __init__(self, dims: Sequence[int], width: int = 256, heads: int = 4) -> None:
        super().__init__()
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


class LateFusion(nn.Module):
    def __init__(self, dims: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.out_dim = len(dims) * num_classes
        self.classifiers = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = torch.stack([c(f) for c, f in zip(self.classifiers, feats)], dim=1)  # (B, M, K)
        log_probs = logits.float().log_softmax(dim=2).to(logits.dtype)
        return rearrange(log_probs, "b m k -> b (m k)"), {"branch_logits": logits}


def make_fuser(kind: str, dims: Sequence[int], width: int = 256, num_classes: int = 1) -> nn.Module:
    if kind == "concat":
        return ConcatFusion(dims)
    if kind == "gated":
        return GatedFusion(dims)
    if kind == "late":
        return LateFusion(dims, num_classes)
    return AttentionFusion(dims, width=width)


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


def ogm_coefficients(branch_logits: Sequence[torch.Tensor], target: torch.Tensor, alpha: float) -> torch.Tensor:
    """OGM-GE's per-branch gradient coefficients (Peng et al., CVPR 2022), generalised to M branches.

    Each branch's score is the summed softmax probability its own logit contribution gives the true class; a
    branch whose score exceeds the mean of the others' by the ratio rho > 1 is dominant and gets
    ``1 - tanh(alpha * (rho - 1))``; the others get 1. Returns (M,) coefficients in (0, 1].
    """
    scores = torch.stack([lg.detach().float().softmax(1).gather(1, target[:, None]).sum() for lg in branch_logits])
    m = len(scores)
    others = (scores.sum() - scores) / max(m - 1, 1)
    rho = scores / others.clamp_min(1e-12)
    return torch.where(rho > 1, 1 - torch.tanh(alpha * (rho - 1)), torch.ones_like(rho))


def ordered(features: Mapping[str, torch.Tensor], names: Sequence[str]) -> list[torch.Tensor]:
    return [features[n] for n in names]
