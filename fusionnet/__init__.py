"""fusionnet: combine several pretrained image backbones into one classifier (feature fusion), and compare it
honestly with output ensembles of independently trained members.

What a user calls, by task (each name is documented where it is defined; ``help(fusionnet.compare)``):

* build: :class:`FusionNet` (random weights), :func:`create_fusionnet` (pretrained trunks, checkpoints per branch),
  :func:`fuse_members` (trained members as one model, starting at their logit average);
* train, predict, evaluate: :func:`fit` with a :class:`TrainConfig` (and :class:`Callback`\\ s), :func:`predict`,
  :func:`evaluate`; data from a folder tree: :func:`load_splits`;
* compare and choose: :func:`compare` (fusion vs every output ensemble on one budget, :class:`CompareConfig`),
  :func:`auto` (which trunks to fuse within a time limit, :class:`AutoConfig`), :class:`VotingEnsemble` over saved
  :class:`MemberOutputs`, and the vote as one model, :class:`Vote`;
* files: :func:`save` and :func:`load` (fusionnet checkpoints, model and vote folders, Hub ids, or plain
  torchvision / timm state dicts, read with a :class:`PlainConfig`);
* extension: ``list_*`` and ``register_*`` for backbones, fusion methods, ensemble methods, comparison variants and
  training callbacks (docs/extending.md shows each);
* settings: :class:`FusionConfig`, :class:`BranchConfig` and the configs above; errors: :class:`FusionNetError` and
  its subclasses.

Everything else lives in its subpackage (``fusionnet.models``, ``fusionnet.data``, ``fusionnet.engine``,
``fusionnet.ensembles``, ``fusionnet.workflows``, ``fusionnet.serving``). The names load on first use (PEP 562), so
``import fusionnet`` and the ``fusionnet`` command's help stay fast.
"""

from __future__ import annotations

import importlib

from fusionnet.errors import (CheckpointMismatchError, ConfigError, DataError, FusionNetError, MissingFileError,  # noqa: F401
                              TrainingError, WeightsUnavailableError, WriteError)

__version__ = "0.3.0"

_WHERE = {  # module -> the public names it defines
    "fusionnet.models.fusion": ("FusionNet", "FusionConfig", "BranchConfig"),
    "fusionnet.models.factory": ("create_fusionnet", "fuse_members"),
    "fusionnet.models.io": ("load", "save"),
    "fusionnet.engine.train": ("fit", "FitResult"),
    "fusionnet.engine.inference": ("predict", "evaluate"),
    "fusionnet.engine.callbacks": ("Callback", "list_callbacks", "register_callback"),
    "fusionnet.data.splits": ("load_splits",),
    "fusionnet.config": ("TrainConfig", "CompareConfig", "AutoConfig", "PlainConfig"),
    "fusionnet.workflows.compare": ("compare", "list_variants", "register_variant"),
    "fusionnet.workflows.auto": ("auto",),
    "fusionnet.ensembles.voting": ("VotingEnsemble", "MemberOutputs"),
    "fusionnet.models.vote": ("Vote",),
    "fusionnet.ensembles.methods": ("list_ensembles", "register_ensemble"),
    "fusionnet.models.backbones": ("list_backbones", "register_backbone"),
    "fusionnet.models.fusers": ("list_fusions", "register_fusion"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
ERRORS = ("CheckpointMismatchError", "ConfigError", "DataError", "FusionNetError", "MissingFileError",
          "TrainingError", "WeightsUnavailableError", "WriteError")

__all__ = sorted([*_MODULE_OF, *ERRORS])


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fusionnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
