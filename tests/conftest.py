import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

FLOWERS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flowers5_128"


@pytest.fixture
def flowers_root() -> Path:
    root = Path(os.environ.get("FUSIONNET_FLOWERS", FLOWERS))
    if not (root / "train").is_dir():
        pytest.skip(f"real data not found at {str(root)!r} (set FUSIONNET_FLOWERS to the flowers5_128 folder)")
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
