"""Cache of each branch's pooled features, for training only the head when every trunk is frozen.

With frozen trunks and a deterministic pipeline the trunks compute the same features every epoch; computing them
once per split and training the head on the cached tensors gives the same result far faster. On disk a cache is
keyed by the branch configs, a hash of the trunk weights, the transform and the file list (paths, sizes, mtimes),
so a second run starts instantly and any change recomputes.

Works with any model that has ``forward_features(x) -> {name: (B, D)}`` and ``forward_head(features)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from fusionnet.checkpoints import atomic_torch_save

CACHE_VERSION = 1


def weights_hash(module: nn.Module) -> str:
    """sha256 over every tensor of a state dict (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _files_fingerprint(dataset) -> list:
    paths = getattr(dataset, "paths", None)
    if paths is None:  # not a file-backed dataset: key on its length and type only
        return [type(dataset).__name__, len(dataset)]
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([p, st.st_size, st.st_mtime_ns])
    return out


def cache_key(model: nn.Module, dataset) -> str:
    """What cached features depend on: the model's weights (or one branch's config and weights), the transform,
    the labels and the files. A branch's key leaves out its name, so equal branches of two models share a cache."""
    cfg = getattr(model, "cfg", None)
    parts = {
        "version": CACHE_VERSION,
        "model": [{k: v for k, v in vars(cfg).items() if k != "name"} if cfg is not None else type(model).__name__,
                  weights_hash(model)],
        "transform": repr(getattr(dataset, "transform", None)),
        "labels": list(getattr(dataset, "labels", [])),
        "files": _files_fingerprint(dataset),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def supports_cache(model: nn.Module) -> str | None:
    """None if the model's features can be cached, else the reason they cannot."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return "the model has no forward_features/forward_head"
    branches = getattr(model, "branches", {})
    trainable = [n for n, p in (branches.named_parameters() if branches else []) if p.requires_grad]
    if trainable:
        return f"branch parameters are trainable ({trainable[0]} ...): features change while training"
    return None


@torch.no_grad()
def compute_features(model: nn.Module, dataset, *, names: list[str] | None = None, batch_size: int = 64,
                     device: torch.device | str = "cpu", num_workers: int = 0, progress: Callable | None = None
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({branch: (N, D_i)}, labels (N,)) in dataset order, with the model in eval mode; ``names`` limits the
    branches computed (a model with ``branches``), else every branch via ``forward_features``."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    features = (lambda x: {n: model.branches[n](x) for n in names}) if names is not None else model.forward_features
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    for x, y in (progress(loader) if progress else loader):
        for name, f in features(x.to(device)).items():
            feats.setdefault(name, []).append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(labels)


def cached_features(model: nn.Module, dataset, *, cache_dir: str | os.PathLike | None, **kwargs
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """Features from ``cache_dir`` where a matching cache exists, else computed (and saved there when given).

    A model with ``branches`` is cached one file per branch, so a fusion model reuses its members' features.
    Returns (features, labels, hit): hit is True when nothing had to be computed.
    """
    branches = getattr(model, "branches", None)
    if cache_dir is None or branches is None:
        feats, labels = compute_features(model, dataset, **kwargs)
        return feats, labels, False
    paths = {name: Path(cache_dir) / f"features-{cache_key(br, dataset)}.pt" for name, br in branches.items()}
    feats, labels = {}, None
    for name, path in paths.items():
        if path.is_file():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            feats[name], labels = blob["features"], blob["labels"]
    missing = [name for name in branches if name not in feats]
    if missing:
        new, labels = compute_features(model, dataset, names=missing, **kwargs)
        for name in missing:
            atomic_torch_save({"features": new[name], "labels": labels}, paths[name])
        feats.update(new)
    return {name: feats[name] for name in branches}, labels, not missing
