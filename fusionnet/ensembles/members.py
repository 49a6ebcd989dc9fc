"""Training the members of an output ensemble: plain, bagged (bootstrap samples) or boosted (SAMME).

Diversity is what voting feeds on: bagging gives each member its own bootstrap sample of the training set;
SAMME trains members one after another, each drawing training samples in proportion to weights raised on what
the previous members got wrong, and weights each member by its alpha.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fusionnet.ensembles.boosting import bootstrap_indices, samme_update
from fusionnet.data.splits import eval_view
from fusionnet.engine.inference import predict
from fusionnet.engine.callbacks import Resample
from fusionnet.engine.train import FitResult, TrainConfig, fit


def train_bagged(make_model: Callable[[int], nn.Module], train_data, val_data, config: TrainConfig, *,
                 members: int, out_dir: str | None = None, log=print) -> list[tuple[nn.Module, FitResult]]:
    """``members`` models, member i trained on bootstrap sample i (seeded by ``config.seed + i``)."""
    out = []
    for i in range(members):
        idx = bootstrap_indices(len(train_data), config.seed + i)
        model = make_model(i)
        res = fit(model, train_data.subset(idx), val_data, replace(config, seed=config.seed + i),
                  out_dir=str(Path(out_dir) / f"bag{i}") if out_dir else None, log=log)
        out.append((model, res))
    return out


def train_boosted(make_model: Callable[[int], nn.Module], train_data, val_data, config: TrainConfig, *,
                  rounds: int, out_dir: str | None = None, log=print) -> tuple[list[nn.Module], list[float]]:
    """SAMME boosting by resampling. Returns (members, alphas); combine with
    :func:`fusionnet.ensembles.boosting.boosted_vote`. Stops early when a member is no better than chance (alpha <= 0).

    The training-set predictions that reweight samples use the validation pipeline (no augmentation).
    """
    num_classes = len(train_data.class_names)
    plain = eval_view(train_data, val_data)
    weights = torch.full((len(train_data),), 1.0 / len(train_data), dtype=torch.double)
    models, alphas = [], []
    for r in range(rounds):
        model = make_model(r)
        fit(model, train_data, val_data, replace(config, seed=config.seed + r), callbacks=[Resample(weights)],
            out_dir=str(Path(out_dir) / f"boost{r}") if out_dir else None, log=log)
        probs, labels = predict(model, plain, batch_size=config.batch_size, device=config.device)
        new_weights, alpha = samme_update(weights, probs.argmax(1) == labels, num_classes)
        if alpha <= 0:
            if log:
                log(f"boosting stopped at round {r + 1}: the member is no better than chance (alpha {alpha:.3f})")
            break
        models.append(model)
        alphas.append(alpha)
        weights = new_weights
    return models, alphas
