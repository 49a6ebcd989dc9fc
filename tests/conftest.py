import os
from pathlib import Path

import pytest
import torch

# Two worker processes (setup.cfg's addopts: pytest-xdist) with a torch thread each; run alone (-n 0), two threads.
# The suite chooses its threads: commands then skip counting idle cores (0.2 s each; fusionnet.utils.threads), and
# the commands tests start as subprocesses use the same count
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
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


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for a module's Ray tests, shut down after them (its idle workers poll: kept for the
    whole session they cost the tests after them CPU time). Serve's proxy must answer its readiness check within
    5 s by default, which a loaded 2-core machine may miss (the controller then kills it): the longer limits are
    set before Ray starts, so they reach the controller's process."""
    ray = pytest.importorskip("ray")
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ[name] = "120"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    yield ray
    ray.shutdown()
