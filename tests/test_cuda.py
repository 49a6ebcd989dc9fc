"""The CUDA paths, run only where a GPU is present (on the CPU the device rule is tested in test_faults.py).

A model loaded on the CPU must run on the GPU when asked (the bug behind `compare` crashing on CUDA), in bf16
autocast where the settings ask for it, in fit, predict, the feature cache and a one-epoch comparison.
"""

import pytest
import torch

from fusionnet import FusionNet, TrainConfig, fit
from fusionnet.models.factory import load_fusionnet, save_model
from fusionnet.workflows.compare import CompareConfig, compare
from fusionnet.data.splits import load_splits
from fusionnet.engine.feature_cache import cached_features
from fusionnet.engine.inference import predict
from fusionnet.ensembles.voting import VotingModule, member_outputs
from toydata import make_splits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = ["timm/test_resnet", "timm/test_efficientnet"]


@pytest.fixture
def splits(tmp_path):
    return load_splits(make_splits(tmp_path / "data", per_class=8), size=32, val_fraction=0.25)


def test_a_model_loaded_on_the_cpu_predicts_on_the_gpu(splits, tmp_path):
    path = save_model(FusionNet(backbones=TINY, num_classes=3), tmp_path / "m.pth")
    model = load_fusionnet(path)  # on the CPU
    probs, _ = predict(model, splits.val, device="cuda", amp="auto")
    assert probs.device.type == "cpu" and torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-3)
    assert next(model.parameters()).is_cuda
    out = member_outputs(load_fusionnet(path), splits.test, member="m", split="test", device="cuda")
    assert out.probs.shape == (len(splits.test), 3)
    voting = VotingModule([load_fusionnet(path), load_fusionnet(path).cuda()])
    assert voting(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_fit_in_bf16_autocast_and_the_feature_cache_on_the_gpu(splits, tmp_path):
    model = FusionNet(backbones=TINY, num_classes=3)
    res = fit(model, splits.train, splits.val, TrainConfig(epochs=1, batch_size=8, amp="auto", device="cuda",
                                                           progress=False), log=None)
    assert res.history and torch.isfinite(torch.tensor(res.history[0]["train_loss"]))
    frozen = FusionNet(backbones=TINY, num_classes=3, freeze_trunks=True)
    feats, _ = cached_features(frozen, splits.val, cache_dir=tmp_path / "cache", device="cuda")
    assert all(f.device.type == "cpu" and torch.isfinite(f).all() for f in feats.features.values())


def test_a_one_epoch_comparison_on_the_gpu(tmp_path):
    data = make_splits(tmp_path / "data", per_class=12)
    results = compare(CompareConfig(data=str(data), backbones=TINY, size=32, epochs=1, batch_size=8,
                                           pretrained=False, device="cuda", out=str(tmp_path / "run"),
                                           progress=False), log=None)
    assert "selected:fusion" in results["methods"]


def test_branches_on_cuda_streams_match_running_them_in_turn():
    torch.manual_seed(0)
    model = FusionNet(backbones=TINY + ["timm/test_vit"], num_classes=3, taps={"timm/test_resnet": 1}).cuda()
    streamed = FusionNet(config=type(model.config).from_dict({**model.config.to_dict(), "branch_streams": True}))
    streamed.load_state_dict(model.state_dict())
    streamed.cuda()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    y = torch.tensor([0, 1, 2, 0], device="cuda")
    for m in (model, streamed):
        torch.nn.functional.cross_entropy(m.train()(x), y).backward()
    assert torch.allclose(model.eval()(x), streamed.eval()(x), atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), streamed.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name
