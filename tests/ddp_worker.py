"""Run by test_ddp.py under torchrun: trains a tiny model with fit() and saves this rank's final weights."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fusionnet import FusionNet  # noqa: E402
from fusionnet.data.splits import load_splits  # noqa: E402
from fusionnet.engine.train import TrainConfig, fit  # noqa: E402

data, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = FusionNet(backbones=["timm/test_efficientnet"], num_classes=3)
splits = load_splits(data, size=32, val_fraction=0.25, seed=0)
result = fit(model, splits.train, splits.val, TrainConfig(epochs=3, batch_size=4, lr=3e-3, progress=False,
                                                          warmup_epochs=0), out_dir=out / "run", log=None)
rank = int(os.environ["RANK"])
torch.save(model.state_dict(), out / f"rank{rank}.pt")
(out / f"rank{rank}.json").write_text(json.dumps(result.history))
