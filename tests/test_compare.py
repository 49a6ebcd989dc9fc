import json

import pytest
import torch

from fusionnet import ConfigError, FusionNet
from fusionnet.models.factory import load_fusionnet
from fusionnet.cli.main import main
from fusionnet.workflows.compare import CompareConfig, regime_train_config, compare
from fusionnet.workflows.compare.report import mcnemar, write_seed_summary
from fusionnet.ensembles.voting import MemberOutputs
from fusionnet.data.splits import load_splits
from fusionnet.ensembles.members import train_bagged, train_boosted
from fusionnet.engine.train import TrainConfig
from toydata import make_splits

TINY = ["timm/test_efficientnet", "timm/test_resnet"]


def tiny_compare(data, out, regime="frozen", **settings) -> CompareConfig:
    """A comparison of the tiny trunks at 32 px, 2 epochs of batch 8: the regime's training preset, changed."""
    train = regime_train_config(regime, epochs=2, batch_size=8, progress=False)
    return CompareConfig(data=str(data), backbones=TINY, regime=regime, size=32, pretrained=False, out=str(out),
                         train=train, **settings)
METHODS = {"member:timm/test_efficientnet", "member:timm/test_resnet", "soft", "hard", "weighted", "greedy",
           "exhaustive", "temperature", "stacking", "stacking_hgb",
           "fusion:concat", "fusion:gated", "fusion:attention", "fusion:late", "fusion:from_members",
           "fusion:codistilled", "fusion:late_oof", "fusion:late_oof:branch_vote",
           "selected:fusion", "selected:fusion:scaled", "selected:ensemble"}  # row ids (labels: the report's)


@pytest.mark.parametrize("regime", ["frozen", "finetune"])
def test_experiment_end_to_end_on_tiny_data_writes_every_output(tmp_path, regime):
    data = make_splits(tmp_path / "data", per_class=16)
    # the budget is "under a minute" for this run; that is measured (pytest --durations), not asserted
    variants = {} if regime == "frozen" else {"variants": ["concat", "from_members", "late_oof"]}
    results = compare(tiny_compare(data, tmp_path / "run", regime, **variants), log=None)
    run = tmp_path / "run"
    for name in ["config.json", "results.json", "results.md", "confusion.png", "reliability.png",
                 "models/fusion_concat/best.pth", "outputs/fusion_concat_test.pt", "outputs/timm/test_resnet_val.pt"]:
        assert (run / name).is_file(), name
    # a comparison keeps each model's best.pth, not its resume point (nothing resumes a scored model)
    assert not list(run.glob("models/**/final.pth"))
    # every image decoded once, into the run's image cache: one store for the eval pipeline, one for training
    assert len(list((run / "cache" / "images").glob("images-*.json"))) == 2
    expected = METHODS if regime == "frozen" else {m for m in METHODS if not any(
        v in m.split(":") for v in ("gated", "attention", "late", "codistilled"))}
    assert set(results["methods"]) == expected
    # a row recomputed from the saved member outputs: soft voting is the mean of the members' test probabilities
    outs = [MemberOutputs.load(run / "outputs" / f"{b}_test.pt") for b in TINY]
    mean = torch.stack([o.probs for o in outs]).mean(0)
    acc = float((mean.argmax(1) == outs[0].labels).double().mean())
    assert results["methods"]["soft"]["acc"] == pytest.approx(acc)
    fusion_rows = {n: r for n, r in results["methods"].items() if r["kind"] == "fusion"}
    selected = results["methods"]["selected:fusion"]
    assert selected["chosen"] in fusion_rows
    assert selected["val"]["nll"] == min(r["val"]["nll"] for r in fusion_rows.values())
    assert selected["acc"] == fusion_rows[selected["chosen"]]["acc"]
    saved = json.loads((run / "results.json").read_text())
    assert saved["budget"]["regime"] == regime and "probs" not in saved["methods"]["soft"]
    assert saved["methods"]["soft"]["label"] == "soft voting"
    assert saved["selected"]["fusion"]["id"] == selected["chosen"].partition(":")[2]
    chosen_variant = saved["selected"]["fusion"]["id"]
    assert saved["selected"]["fusion"]["checkpoint"] == results["fusion"][chosen_variant]["checkpoint"]
    assert "| FusionNet (selected on val) -> FusionNet" in (run / "results.md").read_text()
    # the jointly trained fusion has both trunks: as large as the two members together, plus a wider head
    members = sum(results["members"][b]["params"] for b in TINY)
    assert abs(results["fusion"]["concat"]["params"] - members) < 0.05 * members
    # the fusion built from members counts its members' training time
    assert results["fusion"]["from_members"]["seconds"] > sum(results["members"][b]["train_seconds"] for b in TINY)
    # the late_oof fusion: a saved late-fusion model whose predictions are the row's; fine-tuned, it reuses the
    # members' trunks and counts their time
    stacked = load_fusionnet(run / "models" / "fusion_late_oof" / "best.pth")
    assert stacked.config.fusion == "late"
    saved_test = MemberOutputs.load(run / "outputs" / "fusion_late_oof_test.pt")
    assert results["methods"]["fusion:late_oof"]["acc"] == pytest.approx(
        float((saved_test.probs.argmax(1) == saved_test.labels).double().mean()))
    # the soft vote of the late_oof model's own branch classifiers: recomputed from the saved model
    splits = load_splits(data, size=32)
    x = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    with torch.no_grad():
        vote = stacked.eval().forward_output(x).extras["branch_logits"].softmax(-1).mean(1)
    assert torch.allclose(results["methods"]["fusion:late_oof:branch_vote"]["probs"], vote,
                          atol=1e-5)
    # the branch vote is a variant of the fusion: the ensemble side chooses among the members' ensembles only
    branch_vote = results["methods"]["fusion:late_oof:branch_vote"]
    assert branch_vote["kind"] == "fusion variant"
    assert results["methods"]["selected:ensemble"]["chosen"] in {
        n for n, r in results["methods"].items() if r["kind"] == "ensemble"}
    if regime == "finetune":
        assert results["fusion"]["late_oof"]["seconds"] > sum(results["members"][b]["train_seconds"] for b in TINY)


def test_test_labels_never_reach_a_choice(tmp_path):
    """Poison the test labels (swap two test class folders): every choice made on validation stays the same and
    only the test scores move."""
    data = make_splits(tmp_path / "data", per_class=16)
    cfg = dict(variants=["concat", "from_members"])
    clean = compare(tiny_compare(data, tmp_path / "a", **cfg), log=None)
    (data / "test" / "a").rename(data / "test" / "tmp")
    (data / "test" / "b").rename(data / "test" / "a")
    (data / "test" / "tmp").rename(data / "test" / "b")
    poisoned = compare(tiny_compare(data, tmp_path / "b", **cfg), log=None)
    chosen = ("val", "weights", "chosen", "temperature", "temperatures", "ensemble_temperature", "cv_acc_on_val")
    for name, row in clean["methods"].items():
        other = poisoned["methods"][name]
        for key in chosen:
            assert row.get(key) == other.get(key), (name, key)
    assert any(clean["methods"][n]["acc"] != poisoned["methods"][n]["acc"] for n in clean["methods"])


def test_seed_summary_aggregates_and_pairs_the_selected_rows(tmp_path):
    def run(acc_f, acc_e, pred_f, pred_e):
        row = {"macro_f1": 0.5, "nll": 1.0, "ece": 0.1, "seconds": 1.0}
        return {"budget": {"regime": "frozen", "epochs": 1, "size": 32, "seed": 0, "batch_size": 8, "train": 1,
                           "val": 1, "test": 4},
                "test_labels": [0, 1, 0, 1],
                "methods": {"selected:fusion": {**row, "acc": acc_f, "pred": pred_f},
                            "selected:ensemble": {**row, "acc": acc_e, "pred": pred_e},
                            "soft": {**row, "acc": acc_e, "pred": pred_e, "kind": "ensemble"}}}

    per_seed = {0: run(1.0, 0.5, [0, 1, 0, 1], [0, 0, 0, 0]), 1: run(0.75, 0.5, [0, 1, 0, 0], [1, 1, 1, 1])}
    out = write_seed_summary(per_seed, tmp_path, {})
    f = out["methods"]["selected:fusion"]["acc"]
    assert f["mean"] == pytest.approx(0.875) and f["sd"] == pytest.approx(0.1767767, rel=1e-5)
    t = out["paired_test"]
    # fusion right / ensemble wrong on 2 (seed 0) + 2 (seed 1) images, the reverse on 1 (seed 1)
    assert (t["a_only"], t["b_only"]) == (4, 1)
    assert t["p_value"] == pytest.approx(2 * (1 + 5) / 32)
    # and against each output ensemble (here soft voting, which predicts as the selected ensemble)
    assert out["fusion_vs_each_ensemble"]["soft"] == mcnemar(
        [p == y for s in (0, 1) for p, y in zip(per_seed[s]["methods"]["selected:fusion"]["pred"],
                                                 [0, 1, 0, 1])],
        [p == y for s in (0, 1) for p, y in zip(per_seed[s]["methods"]["soft"]["pred"], [0, 1, 0, 1])])
    assert "| soft voting | 4 | 1 |" in (tmp_path / "results.md").read_text()
    assert "+-" in (tmp_path / "results.md").read_text() and "McNemar" in (tmp_path / "results.md").read_text()
    assert mcnemar([True] * 3, [True] * 3)["p_value"] == 1.0


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


def test_compare_cli_refuses_a_single_backbone(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--data", str(tmp_path), "--backbones", "resnet18"]) == 2
    assert "needs at least 2 backbones" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    ({"late_oof_taps": -1}, "late_oof_taps must be a whole number >= 0, got -1"),
    ({"size": 0}, "size must be a whole number of pixels >= 1"),
    ({"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\), got 1.5"),
    ({"fusion_dropout": 1.0}, r"fusion_dropout must be in \[0, 1\), got 1.0"),
    ({"variants": ["concat", "late_oof_twice"]}, r"unknown comparison variant 'late_oof_twice'; did you mean "
                                                r"'late_oof'\? available: concat, gated"),
    ({"variants": ["concat", "nope"]}, r"unknown comparison variant 'nope'; available: concat, gated"),
    ({"regime": "frozen", "train": TrainConfig(strategy="full")}, "the frozen regime trains with strategy 'frozen'"),
])
def test_every_compare_setting_is_checked_before_any_work(tmp_path, setting, message):
    """The dataclass checks its own fields; the names that need the registries are checked by validate, the first
    thing compare does."""
    from fusionnet.workflows.compare import validate

    with pytest.raises(ConfigError, match=message):
        validate(CompareConfig(data=str(tmp_path / "no such folder"), backbones=TINY, **setting))


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1.0"], "lr must be a finite number > 0, got -1.0"),
    (["--epochs", "0"], "epochs must be an int >= 1"),
    (["--workers", "-1"], "num_workers must be an int >= 0, got -1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--variants", "concat", "nope"], r"unknown comparison variant 'nope'; available: concat, gated"),
])
def test_every_compare_flag_is_checked_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    """The training flags of compare are TrainConfig's fields: checked by TrainConfig, before a folder is touched."""
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--data", "nowhere", "--backbones", *TINY, *flags]) == 2
    import re
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_a_bad_compare_flag_leaves_the_earlier_run_in_place(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "results.md").write_text("earlier results")
    argv = ["compare", "--data", "data", "--backbones", *TINY, "--out", "runs/old", "--overwrite"]
    assert main([*argv, "--late-oof-taps", "-1"]) == 2
    assert "late_oof_taps must be a whole number >= 0" in capsys.readouterr().err
    assert (tmp_path / "runs" / "old" / "results.md").read_text() == "earlier results"


def test_a_cuda_index_beyond_the_machine_names_the_ones_there(monkeypatch):
    from fusionnet.utils.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"'cuda:5' asked for, but this machine has 2 CUDA GPU\(s\): use 'cuda:0' "
                                          r"to 'cuda:1'"):
        resolve_device("cuda:5")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_keep_outputs_leaves_no_model_file_and_the_same_rows(tmp_path):
    data = make_splits(tmp_path / "data", per_class=16)
    lean = compare(tiny_compare(data, tmp_path / "lean", variants=["concat", "late_oof"], keep="outputs"),
                          log=None)
    assert not list((tmp_path / "lean" / "models").rglob("*.pth"))
    assert lean["selected"]["ensemble"]["vote"] is None and not (tmp_path / "lean" / "vote").exists()  # no models
    assert (tmp_path / "lean" / "outputs" / "fusion_late_oof_test.pt").is_file()
    full = compare(tiny_compare(data, tmp_path / "full", variants=["concat", "late_oof"], keep="all"), log=None)
    assert list((tmp_path / "full" / "models").rglob("final.pth"))
    assert {n: r["acc"] for n, r in lean["methods"].items()} == {n: r["acc"] for n, r in full["methods"].items()}


def test_the_selected_ensemble_chooses_by_scores_cross_validated_on_validation():
    """A method fitted on validation (here: weights on members that are noise, but one of them lucky on these
    very images) looks better there than it is; the selected ensemble must not pick it for that."""
    from fusionnet.ensembles.methods import ENSEMBLES
    from fusionnet.workflows.pipeline import Scored, Table

    g = torch.Generator().manual_seed(0)
    n, k = 60, 3
    labels = torch.arange(n) % k

    def member(name: str, split: str, probs: torch.Tensor) -> MemberOutputs:
        return MemberOutputs(name, split, probs, labels, ["a", "b", "c"], [f"{split}{i}" for i in range(n)])

    good = torch.nn.functional.one_hot(labels, k).float() * 0.6 + 0.4 / k  # right, modestly confident
    scored = []
    for i in range(3):
        noise = {s: torch.rand(n, k, generator=g).softmax(1) for s in ("val", "test")}
        probs = {s: good if i == 0 else noise[s] for s in noise}
        scored.append(Scored(f"m{i}", "member", {s: member(f"m{i}", s, probs[s]) for s in probs},
                             {"seconds": 1.0, "params": 1, "val": {"acc": 0.0, "nll": 1.0}}))
    table = Table(scored, ["a", "b", "c"])
    table.add_ensembles([ENSEMBLES.get(m) for m in ("soft", "weighted")])
    soft, weighted = table.rows["soft"], table.rows["weighted"]
    assert soft["val_cv"]["nll"] == pytest.approx(soft["val"]["nll"])  # nothing fitted: the same scores
    assert weighted["val"]["nll"] <= weighted["val_cv"]["nll"]  # in-sample is optimistic
    chosen = table.pick(["soft", "weighted"], "nll")
    by_cv = min(("soft", "weighted"), key=lambda m: table.rows[m]["val_cv"]["nll"])
    assert chosen == by_cv


def test_the_selected_ensemble_never_picks_vote_fractions_by_nll():
    """Hard voting's outputs are vote fractions: where members agree their NLL is near 0, so a NLL-based choice
    would pick it for a score that is not a probability's."""
    from fusionnet.ensembles.methods import ENSEMBLES
    from fusionnet.workflows.pipeline import Scored, Table

    n, k = 30, 3
    labels = torch.arange(n) % k
    right = torch.nn.functional.one_hot(labels, k).float() * 0.3 + 0.7 / k  # right, unconfident: NLL ~0.73
    scored = [Scored(f"m{i}", "member",
                     {s: MemberOutputs(f"m{i}", s, right, labels, ["a", "b", "c"], [f"{s}{j}" for j in range(n)])
                      for s in ("val", "test")}, {"seconds": 1.0, "params": 1, "val": {"acc": 1.0, "nll": 0.7}})
              for i in range(2)]
    table = Table(scored, ["a", "b", "c"])
    table.add_ensembles([ENSEMBLES.get(m) for m in ("hard", "soft")])
    assert table.rows["hard"]["val"]["nll"] < table.rows["soft"]["val"]["nll"]  # the trap: vote fractions of 1
    table.add_selected("nll")
    assert table.rows["selected:ensemble"]["chosen"] == "soft"
    assert table.not_probabilities == {"hard"}


def test_row_ids_of_earlier_versions_read_as_todays(tmp_path):
    """0.3 called the late fusion's out-of-fold fit `stacked` and fuse's trained head `fused_members`: their rows in an
    old results.json / fuse.json read as today's ids, with today's labels."""
    from fusionnet.errors import MissingFileError
    from fusionnet.workflows.rows import current_id, label
    from fusionnet.workflows.runs import selected_in_comparison

    assert current_id("fusion:stacked") == "fusion:late_oof" and current_id("soft") == "soft"
    assert label("fusion:stacked") == label("fusion:late_oof") == "FusionNet (late, out-of-fold fit)"
    assert label("fusion:fused_members") == label("fusion:from_members")
    assert label("stacking-hgb") == label("stacking_hgb") == "stacking (gradient boosting)"
    (tmp_path / "results.json").write_text(json.dumps({"selected": {"fusion": {
        "id": "fusion:stacked", "checkpoint": str(tmp_path / "gone.pth")}}}))
    with pytest.raises(MissingFileError, match="validation chose 'fusion:late_oof'"):
        selected_in_comparison(tmp_path)


def test_a_config_file_of_0_3_reads_with_todays_names(tmp_path):
    """A compare run's saved config.json of 0.3 (`stacked_taps`, variant `stacked`) and a fuse config (`heads`
    trained / stacked) read as today's settings."""
    from fusionnet.cli.args import _read_config

    (tmp_path / "config.json").write_text(json.dumps({"compare": {
        "variants": ["concat", "stacked"], "stacked_taps": 2, "stacked_folds": 3, "train": {"epochs": 2}}}))
    assert _read_config(str(tmp_path / "config.json")) == {
        "variants": ["concat", "late_oof"], "late_oof_taps": 2, "late_oof_folds": 3, "epochs": 2}
    (tmp_path / "fuse.yaml").write_text("heads: [trained, stacked]\n")
    assert _read_config(str(tmp_path / "fuse.yaml")) == {"heads": ["from_members", "late_oof"]}


def test_the_closed_form_fit_runs_beside_the_members_with_the_same_rows_and_torch_threads_given_back(tmp_path,
                                                                                                     monkeypatch):
    import threading
    import time

    import fusionnet.workflows.pipeline as pipeline
    from fusionnet.errors import DataError

    data = make_splits(tmp_path / "data", per_class=16)
    seen, real_fit = [], pipeline.fit_closed_form_on

    def spy(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(pipeline, "fit_closed_form_on", spy)
    import fusionnet.engine.feature_cache as feature_cache

    trunk_passes, real_pass = [], feature_cache.compute_features
    monkeypatch.setattr(feature_cache, "compute_features", lambda *a, **k: trunk_passes.append(
        threading.current_thread().name) or real_pass(*a, **k))
    settings = dict(variants=["concat", "late_oof"], shared_cache=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one torch thread: nothing to share, all of it in turn
        alone = compare(tiny_compare(data, tmp_path / "alone", **settings), log=None)
        assert seen.pop() == ("MainThread", 1)
        torch.set_num_threads(2)  # two: the fit in a thread of its own, each with one torch thread
        lines = []
        beside = compare(tiny_compare(data, tmp_path / "beside", **settings), log=lines.append)
        assert seen.pop() == ("fusionnet-closed-form", 1) and torch.get_num_threads() == 2
        assert trunk_passes and set(trunk_passes) == {"MainThread"}  # the thread only loads what this one cached
        assert {n: r["acc"] for n, r in beside["methods"].items()} == {n: r["acc"] for n, r in alone["methods"].items()}
        for row in ("fusion:late_oof", "fusion:concat", "soft"):
            assert torch.allclose(beside["methods"][row]["probs"], alone["methods"][row]["probs"], atol=1e-4)
        fit_lines = [i for i, line in enumerate(lines) if line.startswith("late head: branch")]
        assert len(fit_lines) == len(TINY) and lines.index("== FusionNet (late, out-of-fold fit)") < fit_lines[0]

        def fails(*args, **kwargs):
            raise DataError("no good")

        monkeypatch.setattr(pipeline, "fit_closed_form_on", fails)  # its error reaches the caller at once (no
        lines.clear()  # fusion variant trained first), torch's threads back
        with pytest.raises(DataError, match="no good"):
            compare(tiny_compare(data, tmp_path / "fails", **settings), log=lines.append)
        assert torch.get_num_threads() == 2 and "== FusionNet (concat)" not in lines

        def runs_until_cancelled(*args, **kwargs):  # a fit that only a cancel ends
            from fusionnet.utils.threads import check_cancelled

            while True:
                check_cancelled()
                time.sleep(0.01)

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        import fusionnet.workflows.compare as compare_module

        monkeypatch.setattr(pipeline, "fit_closed_form_on", runs_until_cancelled)
        monkeypatch.setattr(compare_module, "_train_members", interrupted)  # Ctrl-C while the fit runs beside
        with pytest.raises(KeyboardInterrupt):
            compare(tiny_compare(data, tmp_path / "interrupted", **settings), log=None)
        assert "fusionnet-closed-form" not in [t.name for t in threading.enumerate()]  # stopped, not left running
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
