"""fusionnet: combine several pretrained image backbones into one classifier (feature fusion), and compare it
honestly with output ensembles of independently trained members."""

from fusionnet.backbones import BackboneSpec, get_spec, list_backbones, register_backbone
from fusionnet.checkpoints import inspect_checkpoint, read_checkpoint, read_state_dict, save_checkpoint
from fusionnet.data import CsvImages, FolderImages, load_splits
from fusionnet.errors import (CheckpointMismatchError, ConfigError, DataError, FusionNetError, TrainingError,
                              WeightsUnavailableError, WriteError)
from fusionnet.factory import create_fusionnet, fuse_members, load_fusionnet, save_model
from fusionnet.fusion import BranchConfig, FusionConfig, FusionNet
from fusionnet.inference import evaluate, predict
from fusionnet.interface import Classifier, ModelOutput
from fusionnet.train import FitResult, TrainConfig, fit
from fusionnet.voting import MemberOutputs, VotingEnsemble, VotingModule, member_outputs

__version__ = "0.2.0"

__all__ = [
    "BackboneSpec", "BranchConfig", "CheckpointMismatchError", "Classifier", "ConfigError", "CsvImages", "DataError",
    "FitResult", "FolderImages", "FusionConfig", "FusionNet", "FusionNetError", "MemberOutputs", "ModelOutput",
    "TrainConfig", "TrainingError", "VotingEnsemble", "VotingModule", "WeightsUnavailableError", "WriteError",
    "create_fusionnet", "evaluate", "fit", "fuse_members", "get_spec", "inspect_checkpoint", "list_backbones",
    "load_fusionnet", "load_splits", "member_outputs", "predict", "read_checkpoint", "read_state_dict",
    "register_backbone", "save_checkpoint", "save_model",
]
