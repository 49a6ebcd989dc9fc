"""Contracts that a plausible one-line bug would break: each test here fails on such a planted bug."""

import math

import pytest
import torch

from fusionnet import FusionNet, TrainConfig, fit
from fusionnet.models.checkpoints import read_state_dict
from fusionnet.errors import ConfigError
from fusionnet.models.backbones import get_spec, register_backbone
from fusionnet.ensembles.boosting import bootstrap_indices
from fusionnet.data.splits import load_splits
from fusionnet.engine.feature_cache import cached_features
from fusionnet.models.losses import make_loss
from fusionnet.engine.train import lr_factor, make_optimizer
from fusionnet.ensembles.voting import hard_vote
from toydata import make_splits

TINY = ["timm/test_resnet"]


@pytest.fixture
def splits(tmp_path):
    return load_splits(make_splits(tmp_path / "data", per_class=8), size=32, val_fraction=0.25)


def _cfg(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 8, "progress": False, "warmup_epochs": 0, **kw})


def test_the_feature_cache_recomputes_when_the_weights_change(splits, tmp_path):
    model = FusionNet(backbones=TINY, num_classes=3, freeze_trunks=True)
    data = splits.val
    first, hit = cached_features(model, data, cache_dir=tmp_path, device="cpu")
    assert not hit
    assert cached_features(model, data, cache_dir=tmp_path, device="cpu")[1]
    with torch.no_grad():
        next(model.branches["test_resnet"].trunk.parameters()).mul_(1.5)
    second, hit = cached_features(model, data, cache_dir=tmp_path, device="cpu")
    assert not hit and not torch.equal(first.features["test_resnet"], second.features["test_resnet"])


@pytest.mark.parametrize("monitor", ["nll", "ece", "acc"])
def test_the_best_epoch_follows_the_monitor_direction(splits, monitor):
    res = fit(FusionNet(backbones=TINY, num_classes=3), splits.train, splits.val, _cfg(lr=3e-3, monitor=monitor),
              log=None)
    values = [h[f"val_{monitor}"] for h in res.history]
    best = (min if monitor in ("nll", "ece") else max)(values)
    assert res.best_epoch == values.index(best) + 1 and res.best_score == best


def test_tied_epochs_keep_the_first(splits):
    # lr so small that every epoch scores the same: the first of the tied epochs is the best
    res = fit(FusionNet(backbones=TINY, num_classes=3, freeze_trunks=True), splits.train, splits.val,
              _cfg(lr=1e-30, strategy="frozen", monitor="acc"), log=None)
    assert len({h["val_acc"] for h in res.history}) == 1 and res.best_epoch == 1


def test_hard_vote_breaks_vote_ties_by_the_weighted_mean_probability():
    # votes tie 2:2; the weighted mean says class 1 (0.4375 vs 0.5625), the unweighted one would say class 0
    p = torch.tensor([[[.7, .3]], [[.7, .3]], [[.25, .75]]], dtype=torch.float64)
    assert int(hard_vote(p, [1, 1, 2]).argmax(1)) == 1


def test_prefixes_are_stripped_in_any_order_and_only_when_every_key_has_them(tmp_path):
    sd = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}
    torch.save({f"_orig_mod.module.{k}": v for k, v in sd.items()}, tmp_path / "a.pth")
    state, source = read_state_dict(tmp_path / "a.pth")
    assert set(state) == set(sd) and source.prefixes == ["_orig_mod.", "module."]
    torch.save({"module.fc.weight": sd["fc.weight"], "fc.bias": sd["fc.bias"]}, tmp_path / "b.pth")
    state, source = read_state_dict(tmp_path / "b.pth")
    assert set(state) == {"module.fc.weight", "fc.bias"} and source.prefixes == []


def test_bagged_members_train_on_bootstrap_samples(splits, monkeypatch):
    import fusionnet.ensembles.members as members

    seen = []
    monkeypatch.setattr(members, "fit", lambda model, train, *a, **k: seen.append(train.paths))
    members.train_bagged(lambda i: FusionNet(backbones=TINY, num_classes=3), splits.train, splits.val, _cfg(),
                         members=2, log=None)
    n = len(splits.train)
    assert all(len(p) == n and len(set(p)) < n for p in seen)  # drawn with replacement: repeats, same size
    assert seen[0] != seen[1]
    assert sorted(set(bootstrap_indices(50, 0))) != list(range(50))


def test_register_backbone_and_its_overrides():
    from fusionnet.models.backbones import BACKBONES, TorchvisionWeights, torchvision_trunk

    def build(pretrained=False):
        return torchvision_trunk("resnet18", ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                                              "layer4"], pretrained)

    declared = dict(feature_dim=512, mean=(0.1, 0.2, 0.3), std=(1, 1, 1), weights=[TorchvisionWeights("resnet18")])
    assert register_backbone("my_resnet18", **declared)(build) is build
    spec = get_spec("my_resnet18")
    assert spec.build is build and spec.weights == (TorchvisionWeights("resnet18"),) and spec.library == "torchvision"
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("my_resnet18", **declared)(build)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['feature_width'\]"):
        register_backbone("other", feature_width=512)
    model = FusionNet(backbones=["my_resnet18", "timm/test_resnet"], num_classes=2,
                      input_size={"my_resnet18": 40})
    br = model.branches["my_resnet18"]
    assert br.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3]) and br.input_size == 40
    assert model.branches["test_resnet"].input_size is None
    BACKBONES.unregister("my_resnet18")


def test_trunks_get_their_own_learning_rate_and_the_schedule_warms_up_then_decays():
    model = FusionNet(backbones=TINY, num_classes=3)
    opt = make_optimizer(model, TrainConfig(lr=1e-2, trunk_lr_mult=0.1))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["head"]["lr"] == 1e-2 and groups["trunk"]["lr"] == pytest.approx(1e-3)
    trunk = {id(p) for p in groups["trunk"]["params"]}
    assert trunk == {id(p) for p in model.trunk_parameters()} and id(model.head.fc.weight) not in trunk
    assert [lr_factor(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(12, 4, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(20, 4, 20) == pytest.approx(0.0)


def test_label_smoothing_and_grad_clipping_do_what_they_say(splits):
    logits, y = torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([0])
    plain, smooth = make_loss("ce")(logits, y), make_loss("ce", label_smoothing=0.3)(logits, y)
    assert smooth > plain + 1.0  # a confident right answer is penalised when targets are smoothed
    model = FusionNet(backbones=TINY, num_classes=3)
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        seen.append(max_norm)
        norm = real(params, max_norm, *a, **k)
        total = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        assert total <= max_norm * 1.0001
        return norm

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        fit(model, splits.train, splits.val, _cfg(epochs=1, lr=1.0, grad_clip=0.01), log=None)
    finally:
        torch.nn.utils.clip_grad_norm_ = real
    assert seen and set(seen) == {0.01}


def test_the_lite_key_map_reproduces_the_reference_on_real_photos():
    from efficientnet_lite_pytorch import EfficientNet

    from fusionnet.workflows.demo import imagenet_model, load_image, sample_photo_paths
    from fusionnet.models.efficientnet_lite import lite_package_path

    x = torch.stack([load_image(p, 224) for p in sample_photo_paths()])  # scikit-learn's two photos
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=224)
    ref.load_state_dict(torch.load(lite_package_path("tf_efficientnet_lite0"), weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(imagenet_model("efficientnet_lite0")(x), ref.eval()((x * 255 - 127) / 128),
                                   rtol=1e-4, atol=1e-4)



def test_a_config_naming_a_tracker_loads_without_it_and_the_command_refuses_before_any_folder(tmp_path, monkeypatch,
                                                                                            capsys):
    """A saved config loads on a machine without the extra it names; the command that would use it says which
    extra to install, before it touches --out."""
    import importlib.util

    from fusionnet.cli.main import main
    from toydata import make_splits

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert TrainConfig(log="mlflow").log == "mlflow"
    data = make_splits(tmp_path / "data", per_class=4)
    code = main(["train", "--data", str(data), "--backbones", "timm/test_resnet", "--log", "mlflow",
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "pip install" in capsys.readouterr().err and not (tmp_path / "run").exists()
