"""The fine-tuning recipe's pieces in fit: the GPU input path on the CPU, EMA, mixup, layer decay, the deferred
non-finite check."""

import pytest
import torch
from torch import nn

from fusionnet import FusionNet
from fusionnet.models.factory import load_fusionnet
from fusionnet.models.checkpoints import read_checkpoint
from fusionnet.data.splits import load_splits
from fusionnet.errors import ConfigError, TrainingError
from fusionnet.engine.inference import evaluate
from fusionnet.engine.optim import make_optimizer
from fusionnet.engine.train import TrainConfig, fit
from toydata import crash_at_epoch, make_splits

TINY = ["timm/test_efficientnet"]


@pytest.fixture
def splits(tmp_path):
    return load_splits(make_splits(tmp_path / "data"), size=32, val_fraction=0.25, seed=0)


def _cfg(**kw):
    return TrainConfig(**{**dict(epochs=2, batch_size=8, lr=3e-3, progress=False, warmup_epochs=0, seed=0), **kw})


def _model(seed=0):
    torch.manual_seed(seed)
    return FusionNet(backbones=TINY, num_classes=3)


def test_batched_augmentation_trains_reproducibly_on_the_cpu(splits):
    said = []
    a, b = _model(), _model()
    res = fit(a, splits.train, splits.val, _cfg(epochs=3, device_augment=True), log=said.append)
    fit(b, splits.train, splits.val, _cfg(epochs=3, device_augment=True), log=None)
    assert any(m.startswith("GPU input path:") for m in said)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_auto_keeps_the_loader_on_the_cpu_and_true_refuses_a_dataset_it_cannot_load(splits):
    said = []
    fit(_model(), splits.train, splits.val, _cfg(epochs=1), log=said.append)
    assert not any("GPU input path" in m for m in said)
    plain = torch.utils.data.TensorDataset(torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    with pytest.raises(ConfigError, match="device_augment=True, but the training pipeline is not a fusionnet "
                                          "train_transform"):
        fit(_model(), plain, plain, _cfg(epochs=1, device_augment=True), log=None)


def test_ema_weights_are_validated_and_saved_and_the_trained_ones_kept_for_resume(splits, tmp_path):
    model = _model()
    res = fit(model, splits.train, splits.val, _cfg(epochs=2, ema_decay=0.9), out_dir=tmp_path / "run", log=None)
    final = read_checkpoint(tmp_path / "run" / "final.pth")
    trained = final["extra"]["trained_state_dict"]
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    weights = [k for k in trained if k.endswith("weight")]
    assert any(not torch.equal(final["state_dict"][k], trained[k]) for k in weights)  # the average differs
    best = load_fusionnet(tmp_path / "run" / "best.pth")
    assert evaluate(best, splits.val, device="cpu")["macro_f1"] == pytest.approx(res.best_score)


def test_a_run_with_ema_and_batched_augmentation_resumes_to_the_uninterrupted_result(splits, tmp_path):
    cfg = _cfg(epochs=3, ema_decay=0.9, device_augment=True)
    fit(_model(), splits.train, splits.val, cfg, out_dir=tmp_path / "a", log=None)

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), splits.train, splits.val, cfg, out_dir=tmp_path / "b", log=crash_at_epoch(2, 3))
    fit(_model(1), splits.train, splits.val, cfg, out_dir=tmp_path / "b", resume=True, log=None)
    a, b = read_checkpoint(tmp_path / "a" / "final.pth"), read_checkpoint(tmp_path / "b" / "final.pth")
    for k, v in a["state_dict"].items():  # the EMA weights
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    for k, v in a["extra"]["trained_state_dict"].items():
        torch.testing.assert_close(b["extra"]["trained_state_dict"][k], v, rtol=1e-5, atol=1e-6)


def test_mixup_and_cutmix_train_on_soft_targets_and_refuse_the_focal_loss(splits):
    res = fit(_model(), splits.train, splits.val, _cfg(epochs=2, mixup=0.4, cutmix=1.0, label_smoothing=0.1),
              log=None)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in res.history)
    with pytest.raises(ConfigError, match="mixup/cutmix train on soft targets, which the focal loss does not take"):
        TrainConfig(mixup=0.2, loss="focal")


def test_layer_decay_gives_each_stage_depth_its_own_rate_and_every_parameter_one_group():
    model = FusionNet(backbones=["timm/test_efficientnet", "timm/test_resnet"], num_classes=3)
    opt = make_optimizer(model, TrainConfig(lr=1.0, trunk_lr_mult=0.5, layer_decay=0.5))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["head"] == 1.0 and lrs["trunk-0"] == 0.25 and lrs["trunk-1"] == 0.125
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    top_stage = {id(p) for br in model.branches.values() for p in br.stages[-1].parameters()}
    assert top_stage == {id(p) for g in opt.param_groups if g["name"] == "trunk-0" for p in g["params"]}


class NanAfter(nn.Module):
    """Logits that turn NaN from the ``n``-th training forward pass on."""

    def __init__(self, n):
        super().__init__()
        self.fc, self.n, self.calls = nn.Linear(3 * 32 * 32, 3), n, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        out = self.fc(x.flatten(1))
        return out * float("nan") if self.training and self.calls >= self.n else out


def test_a_non_finite_loss_mid_epoch_names_its_first_step_though_the_host_reads_late(splits):
    with pytest.raises(TrainingError, match=r"non-finite at epoch 1, step 3;"):
        fit(NanAfter(3), splits.train, splits.val, _cfg(epochs=1, batch_size=2, sync_every=1000), log=None)


def test_the_hyperrule_budget_becomes_epochs_for_the_data_size():
    from fusionnet.config import hyperrule_epochs, resolved

    assert hyperrule_epochs(2935) == 88  # flowers5_128: 500 steps of 512 images
    assert hyperrule_epochs(100_000) == 52 and hyperrule_epochs(1_000_000) == 11
    cfg = resolved(TrainConfig(budget="hyperrule", batch_size=32), 2935)
    assert (cfg.budget, cfg.epochs, cfg.warmup_epochs) == ("epochs", 88, pytest.approx(4.4))
    quick = TrainConfig()
    assert resolved(quick, 2935) is quick and quick.epochs == 10
    with pytest.raises(ConfigError, match="unknown budget 'long'"):
        TrainConfig(budget="long")
