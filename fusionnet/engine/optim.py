"""The optimiser and the learning-rate schedule that ``fit`` trains with."""

from __future__ import annotations

import math

import torch

from fusionnet.config import TrainConfig
from fusionnet.models.interface import Classifier


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: Classifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Parameter groups: everything but the trunks at ``lr``; the trunks at ``lr * trunk_lr_mult``, and with
    ``layer_decay`` < 1 one group per depth, a stage k stages below the top at ``lr * trunk_lr_mult *
    layer_decay ** (k + 1)``. With the ``frozen`` strategy only the trainable parameters (the trunks stay frozen
    throughout): a head step then does not walk every trunk parameter in the optimiser, the clipping and
    ``zero_grad``. AdamW runs fused (one kernel for all parameters) when every parameter is on CUDA."""
    trunk = model.trunk_parameters()
    ids = {id(p) for p in trunk}
    trains = (lambda p: p.requires_grad) if cfg.strategy == "frozen" else (lambda p: True)
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids and trains(p)], "lr": cfg.lr,
               "name": "head"}]
    trunk_lr = cfg.lr * cfg.trunk_lr_mult
    if cfg.layer_decay < 1:
        groups += [{"params": [p for p in params if trains(p)], "lr": trunk_lr * cfg.layer_decay ** (depth + 1),
                    "name": f"trunk-{depth}"} for depth, params in enumerate(model.trunk_parameters_by_depth())]
    else:
        groups.append({"params": [p for p in trunk if trains(p)], "lr": trunk_lr, "name": "trunk"})
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=True)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
