"""fusionnet: combine several pretrained image backbones into one classifier (feature fusion), and compare it
honestly with output ensembles of independently trained members."""

from fusionnet.backbones import (BackboneSpec, WeightsUnavailableError, get_spec, list_backbones,
                                 register_backbone)
from fusionnet.checkpoints import (CheckpointMismatchError, inspect_checkpoint, read_checkpoint, read_state_dict,
                                   save_checkpoint)
from fusionnet.data import CsvImages, DataError, ImageFolder, load_splits
from fusionnet.fusion import BranchConfig, FusionConfig, FusionNet, save_model
from fusionnet.train import FitResult, TrainConfig, evaluate, fit, predict
from fusionnet.voting import MemberOutputs, VotingEnsemble, VotingModule, member_outputs

__version__ = "0.1.0"

__all__ = [
    "BackboneSpec", "BranchConfig", "CheckpointMismatchError", "CsvImages", "DataError", "FitResult",
    "FusionConfig", "FusionNet", "ImageFolder", "MemberOutputs", "TrainConfig", "VotingEnsemble", "VotingModule",
    "WeightsUnavailableError", "evaluate", "fit", "get_spec", "inspect_checkpoint", "list_backbones", "load_splits",
    "member_outputs", "predict", "read_checkpoint", "read_state_dict", "register_backbone", "save_checkpoint",
    "save_model",
]
