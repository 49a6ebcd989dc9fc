"""The one interface through which the trainer, the feature cache, ``predict`` and the voting code talk to a model.

A model is a :class:`Classifier` (``FusionNet`` is one), or any ``nn.Module`` that maps images to logits, which
:func:`as_classifier` wraps in :class:`PlainClassifier`. Nothing outside a model asks it what it has (no
``hasattr`` probing); a capability a model lacks answers with the base class's default:

==============================  =============================================================================
``forward(x)``                  images (B, 3, H, W) in [0, 1] -> logits (B, K): inference, voting, export
``forward_output(x)``           images -> :class:`ModelOutput` (logits + aux logits + extras): training
``forward_head_output(f)``      cached per-branch features ``{name: (B, D_i)}`` -> :class:`ModelOutput`
``feature_extractors()``        ``{name: module}`` each mapping images to (B, D_i): the cacheable path ({} none)
``trunk_parameters()``          pretrained trunk weights (their own learning rate); [] none
``trunk_parameters_by_depth()``  the same, grouped by stages below the top: [top stage, next, ...] (layer decay)
``num_trunk_stages()``          how many stages the deepest trunk has (gradual unfreezing); 0 none
``set_trainable_stages(k)``     train the top ``k`` stages of every trunk: 0 frozen, None everything
``model_config()``              plain data that rebuilds the model (stored in checkpoints); None none
==============================  =============================================================================

What training callbacks (:mod:`fusionnet.engine.callbacks`) ask of a model; the defaults refuse with a ConfigError
naming the model, so a trick switched on for a model that cannot take it says so at its first use:

====================================  =======================================================================
``set_activation_checkpointing(on)``  recompute trunk activations in backward (less memory)
``set_branch_runner(runner)``         how the branches run, e.g. each on a CUDA stream (None: in turn)
``branch_parameters()``               ``{branch: [parameters]}``
``branch_logit_shares(out)``          ``{branch: (B, K)}``: each branch's share of the logits (OGM-GE)
``branch_head_logits(out)``           ``{branch: (B, K)}``: each branch head's own logits (co-distillation)
====================================  =======================================================================

``ModelOutput.aux`` holds extra logits (GoogLeNet's auxiliary classifiers, per-branch heads) that the trainer
adds to the loss with ``TrainConfig.aux_weight``; ``extras`` holds tensors for analysis (gate weights ...).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
from torch import nn

from fusionnet.errors import ConfigError

_EMPTY: dict = {}


class ModelOutput(NamedTuple):
    """What a training-mode forward pass returns (a NamedTuple, so DistributedDataParallel can traverse it)."""

    logits: torch.Tensor  # (B, K)
    aux: Mapping[str, torch.Tensor] = _EMPTY  # extra logits (B, K), each trained with the task loss * aux_weight
    extras: Mapping[str, torch.Tensor] = _EMPTY  # for analysis, e.g. "gates": (B, M)


class Classifier(nn.Module):
    """Base class of the library's models; subclasses implement :meth:`forward_output` and what they support."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, K)
        return self.forward_output(x).logits

    def forward_output(self, x: torch.Tensor) -> ModelOutput:
        raise NotImplementedError

    def forward_head_output(self, features: Mapping[str, torch.Tensor]) -> ModelOutput:
        raise ConfigError(f"{type(self).__name__} has no cacheable feature path; train it without the feature cache")

    def feature_extractors(self) -> Mapping[str, nn.Module]:
        return {}

    def trunk_parameters(self) -> list[nn.Parameter]:
        return []

    def trunk_parameters_by_depth(self) -> list[list[nn.Parameter]]:
        trunk = self.trunk_parameters()
        return [trunk] if trunk else []

    def num_trunk_stages(self) -> int:
        return 0

    def set_trainable_stages(self, k: int | None) -> None:
        if k is not None:
            raise ConfigError(f"{type(self).__name__} has no trunk stages to freeze; use strategy='full', or build "
                              f"the model as a FusionNet")

    def model_config(self) -> dict | None:
        return None

    # ---- what training callbacks ask (fusionnet.engine.callbacks) -------------------------------------------------------
    def set_activation_checkpointing(self, enabled: bool) -> None:
        if enabled:
            raise ConfigError(f"{type(self).__name__} cannot checkpoint activations; train it without "
                              f"checkpoint_activations, or build the model as a FusionNet")

    def set_branch_runner(self, runner) -> None:
        if runner is not None:
            raise ConfigError(f"{type(self).__name__} has no branches to run on streams; train it without "
                              f"branch_streams")

    def branch_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {}

    def branch_logit_shares(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        raise ConfigError(f"{type(self).__name__} has no per-branch logit shares; OGM-GE (ogm_alpha) needs a "
                          f"FusionNet with a Linear head over concat or gated fusion")

    def branch_head_logits(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        raise ConfigError(f"{type(self).__name__} has no branch heads; co-distillation (codistill) needs a FusionNet "
                          f"with several branches built with branch_heads=True")

    @property
    def class_names(self) -> list[str] | None:
        return None


class PlainClassifier(Classifier):
    """Any ``nn.Module`` returning logits, seen through the interface: everything trains, nothing is cached."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward_output(self, x: torch.Tensor) -> ModelOutput:
        out = self.module(x)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"{type(self.module).__name__}.forward returned {type(out).__name__}; a plain model "
                              f"must return logits (B, K). Subclass fusionnet.Classifier to return more")
        return ModelOutput(out)


def as_classifier(model: nn.Module) -> Classifier:
    """``model`` itself when it implements the interface, else wrapped in :class:`PlainClassifier`."""
    if isinstance(model, Classifier):
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return PlainClassifier(model)


class TrainStep(nn.Module):
    """``forward(x) = model.forward_output(x)`` (or the head path on cached features), as a module of its own so
    that DistributedDataParallel wraps the training-mode forward pass, not just ``forward``."""

    def __init__(self, model: Classifier, cached: bool) -> None:
        super().__init__()
        self.model, self.cached = model, cached

    def forward(self, x) -> ModelOutput:
        return self.model.forward_head_output(x) if self.cached else self.model.forward_output(x)
