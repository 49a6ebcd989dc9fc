import json

import pytest
import torch

from fusionnet import FusionNet
from fusionnet.cli import main
from fusionnet.compare import CompareConfig, run_comparison
from fusionnet.data import load_splits
from fusionnet.members import train_bagged, train_boosted
from fusionnet.train import TrainConfig
from toydata import make_splits

TINY = ["timm/test_efficientnet", "timm/test_resnet"]
METHODS = {"member: timm/test_efficientnet", "member: timm/test_resnet", "soft voting", "hard voting",
           "weighted voting (NLL-fitted)", "greedy selection (Caruana)", "best subset (exhaustive)",
           "soft voting, temperature-scaled", "stacking (logistic regression)", "stacking (gradient boosting)",
           "FusionNet"}


@pytest.mark.parametrize("regime", ["frozen", "finetune"])
def test_experiment_end_to_end_on_tiny_data_writes_every_output(tmp_path, regime):
    data = make_splits(tmp_path / "data", per_class=16)
    # the budget is "under a minute" for this run; that is measured (pytest --durations), not asserted:
    # a timed assertion fails on a loaded machine for reasons that have nothing to do with the code
    results = run_comparison(CompareConfig(data=str(data), backbones=TINY, regime=regime, size=32, epochs=2,
                                           batch_size=8, pretrained=False, out=str(tmp_path / "run"),
                                           progress=False), log=None)
    run = tmp_path / "run"
    for name in ["config.json", "results.json", "results.md", "confusion.png", "reliability.png",
                 "models/fusionnet/best.pth", "outputs/fusionnet_test.pt", "outputs/timm/test_resnet_val.pt"]:
        assert (run / name).is_file(), name
    assert set(results["methods"]) == METHODS
    for row in results["methods"].values():
        assert 0 <= row["acc"] <= 1 and row["nll"] > 0 and row["params"] > 0 and row["seconds"] > 0
    assert json.loads((run / "results.json").read_text())["budget"]["regime"] == regime
    assert "| FusionNet |" in (run / "results.md").read_text()
    # the fusion model has both trunks: it is as large as the two members together, plus a wider head
    members = sum(results["members"][b]["params"] for b in TINY)
    assert abs(results["fusion"]["params"] - members) < 0.05 * members


def test_test_labels_never_reach_a_choice(tmp_path, monkeypatch):
    """Every fitting function gets validation data only: poison the test labels and nothing chosen may change."""
    data = make_splits(tmp_path / "data", per_class=16)
    import fusionnet.compare as compare

    seen = []
    real_fit_weights = compare.fit_weights

    def spy(val, labels, **kw):
        seen.append(len(labels))
        return real_fit_weights(val, labels, **kw)

    monkeypatch.setattr(compare, "fit_weights", spy)
    cfg = CompareConfig(data=str(data), backbones=TINY, regime="frozen", size=32, epochs=1, batch_size=8,
                        pretrained=False, out=str(tmp_path / "run"), progress=False)
    results = run_comparison(cfg, log=None)
    n_val, n_test = results["budget"]["val"], results["budget"]["test"]
    assert n_val != n_test and seen == [n_val]


def test_bagged_and_boosted_members_train(tmp_path):
    splits = load_splits(make_splits(tmp_path / "data", per_class=12), size=32, val_fraction=0.25)
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, warmup_epochs=0)

    def make(i):
        torch.manual_seed(i)
        return FusionNet(backbones=["timm/test_efficientnet"], num_classes=3)

    bagged = train_bagged(make, splits.train, splits.val, cfg, members=2, log=None)
    assert len(bagged) == 2
    a, b = (m.head.fc.weight for m, _ in bagged)
    assert not torch.equal(a, b)
    models, alphas = train_boosted(make, splits.train, splits.val, cfg, rounds=2, log=None)
    assert len(models) == len(alphas) >= 1 and all(a > 0 for a in alphas)


def test_compare_cli_refuses_a_single_backbone(tmp_path, capsys):
    assert main(["compare", "--data", str(tmp_path), "--backbones", "resnet18"]) == 2
    assert "needs at least 2 backbones" in capsys.readouterr().err
