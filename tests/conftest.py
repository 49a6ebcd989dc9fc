import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# The suite chooses its threads: commands then skip counting idle cores (0.2 s each; fusionnet.utils.threads), and
# the commands tests start as subprocesses use the same count
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

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


@pytest.fixture(scope="session")
def vgg16_files(tmp_path_factory) -> dict:
    """Plain torchvision VGG16 and VGG16-BN classifiers for 3 classes, built and saved once for the session (each is
    0.5 GB to initialise and write): {"vgg16": (model, path), "vgg16_bn": (model, path)}."""
    import torchvision

    folder = tmp_path_factory.mktemp("vgg")
    torch.manual_seed(0)
    files = {}
    for name, builder in (("vgg16", torchvision.models.vgg16), ("vgg16_bn", torchvision.models.vgg16_bn)):
        model = builder(weights=None, num_classes=3).eval()
        torch.save(model.state_dict(), folder / f"{name}.pth")
        files[name] = (model, folder / f"{name}.pth")
    return files
