"""fusionnet: combine several pretrained image backbones into one classifier (feature fusion), and compare it
honestly with output ensembles of independently trained members."""

from fusionnet.backbones import (BackboneSpec, WeightsUnavailableError, get_spec, list_backbones,
                                 register_backbone)
from fusionnet.checkpoints import (CheckpointMismatchError, inspect_checkpoint, read_checkpoint, read_state_dict,
                                   save_checkpoint)
from fusionnet.fusion import BranchConfig, FusionConfig, FusionNet, save_model

__version__ = "0.1.0"

__all__ = [
    "BackboneSpec", "BranchConfig", "CheckpointMismatchError", "FusionConfig", "FusionNet",
    "WeightsUnavailableError", "get_spec", "inspect_checkpoint", "list_backbones", "read_checkpoint",
    "read_state_dict", "register_backbone", "save_checkpoint", "save_model",
]
