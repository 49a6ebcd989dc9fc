"""fusionnet: combine several pretrained image backbones into one classifier (feature fusion), and compare it
honestly with output ensembles of independently trained members.

The names below load on first use (PEP 562), so ``import fusionnet`` and the ``fusionnet`` command's help stay
fast; ``from fusionnet import FusionNet`` works as usual.
"""

from __future__ import annotations

import importlib

from fusionnet.errors import (CheckpointMismatchError, ConfigError, DataError, FusionNetError, MissingFileError,  # noqa: F401
                              TrainingError, WeightsUnavailableError, WriteError)

__version__ = "0.3.0"

_WHERE = {  # name -> the module that defines it
    "fusionnet.models.backbones": ("BackboneSpec", "get_spec", "list_backbones", "register_backbone"),
    "fusionnet.models.checkpoints": ("inspect_checkpoint", "read_checkpoint", "read_state_dict", "save_checkpoint"),
    "fusionnet.config": ("AutoConfig", "CompareConfig", "FuseConfig", "PlainConfig", "TrainConfig"),
    "fusionnet.data.splits": ("CsvImages", "FolderImages", "load_splits"),
    "fusionnet.models.factory": ("create_fusionnet", "fuse_members", "load_fusionnet", "save_model"),
    "fusionnet.models.fusion": ("BranchConfig", "FusionConfig", "FusionNet"),
    "fusionnet.models.fusers": ("Fuser", "register_fusion"),
    "fusionnet.engine.callbacks": ("Callback",),
    "fusionnet.engine.inference": ("evaluate", "predict"),
    "fusionnet.models.interface": ("Classifier", "ModelOutput"),
    "fusionnet.engine.train": ("FitResult", "fit"),
    "fusionnet.ensembles.voting": ("MemberOutputs", "VotingEnsemble", "VotingModule", "member_outputs"),
    "fusionnet.models.plain": ("load_member",),
    "fusionnet.workflows.auto_run": ("auto",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted([*_MODULE_OF, "CheckpointMismatchError", "ConfigError", "DataError", "FusionNetError",
                  "MissingFileError", "TrainingError", "WeightsUnavailableError", "WriteError"])


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fusionnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
