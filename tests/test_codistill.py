"""Fusion after fine-tuning (issue 19): co-distillation, the output chosen on validation, distilled fusion from
members, and cross-fitted stacking."""

import pytest
import torch

from fusionnet import FusionNet
from fusionnet.models.factory import load_fusionnet, save_model
from fusionnet.engine.callbacks import CoDistillation
from fusionnet.utils.probabilities import soft_vote_logits
from fusionnet.workflows.compare import LATE_OOF_WARNING, CompareConfig, regime_train_config, compare
from fusionnet.workflows.compare.crossfit import fit_combiner, fold_indices, out_of_fold_probs
from fusionnet.data.splits import load_splits
from fusionnet.errors import ConfigError, DataError
from fusionnet.models.fusion import predicted_logits
from fusionnet.engine.inference import choose_prediction
from fusionnet.engine.train import TrainConfig, fit
from toydata import make_splits

TINY = ["timm/test_efficientnet", "timm/test_resnet"]


def _model(**kw):
    torch.manual_seed(0)
    return FusionNet(backbones=TINY, num_classes=3, class_names=["a", "b", "c"], branch_heads=True, **kw)


def test_codistillation_gradients_reach_every_branch_and_head():
    model = _model().train()
    cb = CoDistillation(weight=1.0, temperature=2.0, rampup=0.0)
    x = torch.rand(4, 3, 32, 32)
    cb.on_fit_start(model)
    cb.on_batch(model, x, torch.zeros(4, dtype=torch.long))
    out = model.forward_output(x)
    loss = cb.extra_loss(model, out, torch.zeros(4, dtype=torch.long))["codistill"]
    assert loss.item() > 0
    loss.backward()
    for name, params in model.branch_parameters().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    for name, head in model.branch_heads.items():
        assert head.weight.grad.abs().sum() > 0, name
    assert model.head.fc.weight.grad.abs().sum() > 0


def test_the_online_teacher_is_detached():
    """With a detached teacher, d loss / d head logits is T * (softmax(h/T) - softmax(teacher/T)) / B per head; a
    teacher that passed gradients would add its own terms."""
    torch.manual_seed(0)
    heads = [torch.randn(5, 3, requires_grad=True) for _ in range(3)]
    t = 2.0
    cb = CoDistillation(weight=1.0, temperature=t, rampup=0.0)

    class Heads:  # the model interface the callback uses
        def branch_head_logits(self, output):
            return {"a": heads[1], "b": heads[2]}

    from fusionnet.models.interface import ModelOutput

    loss = cb.extra_loss(Heads(), ModelOutput(heads[0]), torch.zeros(5, dtype=torch.long))["codistill"]
    loss.backward()
    teacher = soft_vote_logits([h.detach() for h in heads])
    for h in heads:
        expected = t * ((h.detach() / t).softmax(1) - (teacher / t).softmax(1)) / 5
        assert torch.allclose(h.grad, expected, atol=1e-6)


def test_the_temporal_mean_teacher_gets_no_gradient_and_follows_the_weights():
    model = _model().train()
    cb = CoDistillation(teacher="mean", rampup=0.0, mean_decay=0.5)
    cb.on_fit_start(model)
    x = torch.rand(4, 3, 32, 32)
    cb.on_batch(model, x, torch.zeros(4, dtype=torch.long))
    loss = cb.extra_loss(model, model.forward_output(x), torch.zeros(4, dtype=torch.long))["codistill"]
    loss.backward()
    assert all(p.grad is None for p in cb.mean.module.parameters())
    before = cb.mean.module.head.fc.weight.clone()
    with torch.no_grad():
        model.head.fc.weight.add_(1.0)
    cb.on_step_end(model)
    cb.on_step_end(model)  # after the warm-up's first step the EMA moves part of the way
    after = cb.mean.module.head.fc.weight
    assert not torch.equal(after, before) and (after - before).abs().max() <= 1.0 + 1e-6


def test_ramp_up_rises_to_one():
    cb = CoDistillation(rampup=0.5)
    cb.on_schedule(steps_per_epoch=10, epochs=4)  # ramps over 20 steps
    values = []
    for _ in range(25):
        values.append(cb.ramp())
        cb.step += 1
    assert values[0] == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    assert values == sorted(values) and values[-1] == 1.0 and values[19] < 1.0


def test_codistillation_refuses_a_model_without_branch_heads(tmp_path):
    data = make_splits(tmp_path / "data", per_class=8, test=False)
    splits = load_splits(data, size=32)
    model = FusionNet(backbones=TINY, num_classes=3)
    with pytest.raises(ConfigError, match="branch_heads=True"):
        fit(model, splits.train, splits.val, TrainConfig(epochs=1, batch_size=4, codistill=1.0, progress=False),
            log=None)


def test_predict_with_needs_branch_heads_and_rejects_unknown_values():
    with pytest.raises(ConfigError, match="branch_heads=True"):
        FusionNet(backbones=TINY, num_classes=3, predict_with="branches")
    with pytest.raises(ConfigError, match="predict_with must be one of"):
        _model(predict_with="median")


@pytest.mark.parametrize("option", ["branches", "all"])
def test_the_chosen_output_round_trips_through_save_and_load(tmp_path, option):
    model = _model().eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = model.train(False).forward_output(x)
        branch = [out.aux["branch:" + n] for n in model.branches]
        fused = model.head(out.extras["fused"])
    model.config.predict_with = option
    with torch.no_grad():
        mine = model(x)
    expected = predicted_logits(fused, branch, option)
    voters = branch + ([fused] if option == "all" else [])
    assert torch.allclose(mine.softmax(1), torch.stack([v.softmax(1) for v in voters]).mean(0), atol=1e-6)
    assert torch.allclose(mine, expected, atol=1e-6)
    save_model(model, tmp_path / "m.pth")
    loaded = load_fusionnet(tmp_path / "m.pth").eval()
    assert loaded.config.predict_with == option
    with torch.no_grad():
        assert torch.allclose(loaded(x), mine, atol=1e-6)
    model.train()  # training always fits the fused head: its logits are the head's
    with torch.no_grad():
        train_out = model.forward_output(x)
        assert torch.allclose(train_out.logits, model.head(train_out.extras["fused"]), atol=1e-6)


def test_choose_prediction_picks_the_lowest_validation_nll(tmp_path):
    data = make_splits(tmp_path / "data", per_class=6, test=False)
    splits = load_splits(data, size=32)
    model = _model()
    scores = choose_prediction(model, splits.val, by="nll", device="cpu")
    best = min(("fused", "branches", "all"), key=lambda o: scores[o]["nll"])
    assert scores["chosen"] == best and model.config.predict_with == "fused"  # chosen, not set behind the caller


def test_cross_fitting_never_scores_a_fold_with_a_model_that_saw_it(tmp_path, monkeypatch):
    data = make_splits(tmp_path / "data", per_class=9, test=False)
    splits = load_splits(data, size=32)
    import fusionnet.engine.inference
    import fusionnet.engine.train

    trained, scored = [], []
    real_fit, real_predict = fusionnet.engine.train.fit, fusionnet.engine.inference.predict

    def spy_fit(model, train_data, *a, **kw):
        trained.append(set(train_data.paths))
        return real_fit(model, train_data, *a, **kw)

    def spy_predict(model, data, **kw):
        if set(data.paths) <= set(splits.train.paths):  # not fit's own validation passes
            scored.append(list(data.paths))
        return real_predict(model, data, **kw)

    monkeypatch.setattr(fusionnet.engine.train, "fit", spy_fit)
    monkeypatch.setattr(fusionnet.engine.inference, "predict", spy_predict)

    def build():
        torch.manual_seed(0)
        return FusionNet(backbones=TINY[:1], num_classes=3, class_names=splits.class_names)
    from fusionnet.workflows.pipeline import Context

    ctx = Context(splits, tmp_path, device="cpu")
    oof = out_of_fold_probs(build, ctx, TrainConfig(epochs=1, batch_size=8, progress=False), folds=3, seed=0,
                            out_dir=tmp_path / "cf")
    assert len(trained) == len(scored) == 3
    for seen, predicted in zip(trained, scored):
        assert not seen & set(predicted)  # no model predicts an image it trained on
    every = [p for fold in scored for p in fold]
    assert sorted(every) == sorted(splits.train.paths)  # every training image predicted exactly once
    assert oof.probs.shape == (len(splits.train), 3) and torch.allclose(oof.probs.sum(1), torch.ones(len(every)))
    for j, fold in enumerate(oof.folds):
        assert not set(fold["trained_on"]) & set(fold["scored"])
        assert (oof.fold_of[fold["scored"]] == j).all()


def test_cross_fitting_refuses_classes_smaller_than_the_folds():
    with pytest.raises(DataError, match="at least 5 training images per class"):
        fold_indices([0] * 10 + [1] * 3, 5, seed=0)


def test_the_cross_fitted_combiner_trusts_the_member_that_was_right_out_of_fold():
    from fusionnet.models.factory import fuse_members

    torch.manual_seed(0)
    members = [FusionNet(backbones=[b], num_classes=3, class_names=["a", "b", "c"]) for b in TINY]
    model = fuse_members(members, fusion="late", taps=0)
    y = torch.arange(60) % 3
    good = torch.full((60, 3), 0.05).scatter_(1, y[:, None], 0.9)  # right out of fold
    noise = torch.rand(60, 3).softmax(1)  # no better than chance
    facts = fit_combiner(model, [good, noise], y.tolist())
    w = {n: sum(v) / 3 for n, v in facts["weights"].items()}
    first, second = list(model.branches)
    assert w[first] > 3 * w[second]
    assert facts["member_oof_acc"][first] == 1.0


def _tiny(data, out, regime, **kw):
    train = regime_train_config(regime, epochs=1, batch_size=8, progress=False)
    return CompareConfig(data=str(data), backbones=TINY, regime=regime, size=32, pretrained=False, out=str(out),
                         train=train, **kw)


def test_fine_tuned_stacking_warns_unless_cross_fitted_and_the_new_variants_run(tmp_path):
    data = make_splits(tmp_path / "data", per_class=9)
    logged = []
    results = compare(_tiny(data, tmp_path / "plain", "finetune", variants=["late_oof", "codistilled"]),
                             log=logged.append)
    assert results["fusion"]["late_oof"]["warning"] == LATE_OOF_WARNING
    assert any(m.startswith("WARNING:") and "--late-oof-folds" in m for m in logged)
    chosen = results["fusion"]["codistilled"]["predict_with"]["chosen"]
    assert load_fusionnet(tmp_path / "plain/models/fusion_codistilled/best.pth").config.predict_with == chosen
    crossed = compare(_tiny(data, tmp_path / "cross", "finetune", variants=["late_oof", "distilled_from_members",
                                   "distilled"], late_oof_folds=2, late_oof_taps=0), log=None)  # taps: below
    info = crossed["fusion"]["late_oof"]
    assert "warning" not in info and info["cross_fit"]["folds"] == 2
    # the row's time counts the members and their extra trainings
    assert info["seconds"] > sum(info["cross_fit"]["fold_seconds"].values()) + sum(
        crossed["members"][b]["train_seconds"] for b in TINY)
    assert "fusion:distilled_from_members" in crossed["methods"]
    distilled = crossed["fusion"]["distilled"]  # its teacher is the members: their time is counted
    assert distilled["seconds"] > sum(crossed["members"][b]["train_seconds"] for b in TINY) + \
        distilled["train_seconds"] - 1e-6


def test_the_distilled_fusion_learns_the_members_soft_vote_from_fresh_trunks(tmp_path):
    from fusionnet.engine.callbacks import Distillation
    from fusionnet.workflows.compare import fusion_entry
    from fusionnet.workflows.pipeline import Scored

    data = make_splits(tmp_path / "data", per_class=4)
    splits = load_splits(data, size=32, val_fraction=0.25, seed=0)
    cfg = _tiny(data, tmp_path / "run", "finetune", distill_temperature=2.5, distill_label_weight=0.25)
    members = {}
    for i, b in enumerate(TINY):
        torch.manual_seed(10 + i)
        members[b] = Scored(b, "member", {}, {"seconds": 7.0 + i},
                            FusionNet(backbones=[b], num_classes=3, class_names=splits.class_names).eval())
    entry = fusion_entry("distilled", cfg, splits, members)
    model, prior_s = entry.build()
    assert prior_s == 15.0 and len(model.branches) == 2 and model.config.fusion == "concat"
    assert not any(p is q for p in model.parameters() for m in members.values() for q in m.model.parameters())
    [cb] = entry.callbacks()
    assert isinstance(cb, Distillation) and cb.temperature == 2.5 and cb.task_loss_weight == 0.25
    assert not entry.train.cache_features  # the teacher needs the images
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        vote = torch.stack([m.model(x).softmax(1) for m in members.values()]).mean(0)
        assert torch.allclose(cb.teacher(x).softmax(1), vote, atol=1e-5)


def test_selection_by_scaled_nll_prefers_the_better_ranker_over_the_better_calibrated():
    from fusionnet.ensembles.calibration import scaled_nll, scale_probs
    from fusionnet.utils.metrics import nll
    from fusionnet.workflows.pipeline import Table, val_scores

    torch.manual_seed(0)
    y = torch.arange(200) % 4
    onehot = torch.nn.functional.one_hot(y, 4).float()
    shy = (1.0 * onehot).softmax(1)  # always right, under-confident (as label smoothing leaves a model)
    wrong = torch.rand(200) < 0.1
    sure = torch.where(wrong[:, None], onehot.roll(1, 1), onehot)
    calibrated = (sure * 2.5).softmax(1)  # right 90 %, confident about it
    # a temperature cannot change the ranking, so the scaled NLL hardly moves with it; the raw NLL does
    assert abs(scaled_nll(scale_probs(shy, 3.0), y) - scaled_nll(shy, y)) < 1e-3
    # never worse than no temperature (T = 1 is a candidate), even near 100 % accuracy with an error or two, where a
    # temperature fitted on half of the split and scored on the other half blew up
    nearly = (4.0 * onehot).softmax(1)
    nearly[:2] = nearly[:2].roll(1, 1)
    for probs in (calibrated, nearly, shy):
        assert scaled_nll(probs, y) <= nll(probs, y) + 1e-6
    table = Table.__new__(Table)
    table.rows = {"shy": {"val": val_scores(shy, y)}, "calibrated": {"val": val_scores(calibrated, y)}}
    assert table.pick(["shy", "calibrated"], "nll") == "calibrated"
    assert table.pick(["shy", "calibrated"], "nll_scaled") == "shy"
    table.rows["cv"] = {"val": {"acc": 0.5, "nll": 0.01}}  # out-of-fold scores already: its NLL stands for it
    assert table.pick(["calibrated", "cv"], "nll_scaled") == "cv"


def test_the_frozen_regime_says_why_it_skips_the_distilled_fusion(tmp_path):
    data = make_splits(tmp_path / "data", per_class=6)
    results = compare(_tiny(data, tmp_path / "run", "frozen", variants=["concat", "distilled_from_members"]),
                             log=None)
    assert "finetune regime only" in results["skipped"]["fusion:distilled_from_members"]
    # by default each regime runs the variants that can run in it, so a frozen report lists no skipped rows
    from fusionnet.workflows.compare import resolve_variants

    frozen, finetune = (resolve_variants(r, None) for r in ("frozen", "finetune"))
    assert {"distilled", "distilled_from_members"} <= set(finetune) - set(frozen) and "late_oof" in frozen


@pytest.mark.parametrize("setting, message", [
    ({"late_oof_folds": 1}, "late_oof_folds must be 0"), ({"distill_temperature": 0}, "distill_temperature"),
    ({"distill_label_weight": -1}, "distill_label_weight")])
def test_new_compare_settings_are_checked(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        CompareConfig(data=str(tmp_path), backbones=TINY, **setting)


@pytest.mark.parametrize("field, value, message", [
    ("codistill", -1, "codistill must be"), ("codistill_temperature", 0, "codistill_temperature"),
    ("codistill_teacher", "gated", "codistill_teacher"), ("codistill_rampup", 2, "codistill_rampup")])
def test_codistill_settings_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_cross_fitting_with_taps_fits_each_tapped_classifier_on_its_fold_models_training_images(tmp_path,
                                                                                                monkeypatch):
    """Issue 30: the tapped levels' classifier of each fold model is fitted on that model's training images only and
    predicts the fold it left out; the deployed model keeps, per member, the head whose honest predictions were
    better."""
    import fusionnet.workflows.compare.crossfit as crossfit
    from fusionnet.workflows.compare.crossfit import CrossFitted
    from fusionnet.workflows.pipeline import Context

    data = make_splits(tmp_path / "data", per_class=9)
    splits = load_splits(data, size=32)
    pairs, real_fit, real_probs = [], crossfit.fit_tapped, crossfit.tapped_probs

    def spy_fit(view, fit_data, seed, device):
        pairs.append([set(fit_data.paths)])
        return real_fit(view, fit_data, seed, device, grid=(0.1, 1.0))  # a short C walk: tiny data

    def spy_probs(view, data, device):
        pairs[-1].append(set(data.paths))
        return real_probs(view, data, device)

    monkeypatch.setattr(crossfit, "fit_tapped", spy_fit)
    monkeypatch.setattr(crossfit, "tapped_probs", spy_probs)

    def build(backbone):
        def make():
            torch.manual_seed(0)
            return FusionNet(backbones=[backbone], num_classes=3, class_names=splits.class_names)
        return make

    ctx = Context(splits, tmp_path, device="cpu")
    train = TrainConfig(epochs=1, batch_size=8, progress=False)
    builders = {b: build(b) for b in TINY}
    scored = CrossFitted("late_oof", builders, [b() for b in builders.values()], 0.0, train, 2, seed=0,
                         taps=2).run(ctx)
    assert len(pairs) == 4  # 2 members x 2 folds, one fit and one prediction each
    for member in (pairs[:2], pairs[2:]):
        for fitted, held in member:
            assert not fitted & held and fitted | held == set(splits.train.paths)
        assert member[0][1] | member[1][1] == set(splits.train.paths)  # every image predicted by a model without it
    used = scored.info["cross_fit"]["taps_used"]
    assert set(used) == set(TINY)
    for u in used.values():  # each member's choice follows its honest NLLs
        assert u["used"] == (u["tapped_nll"] < u["head_nll"])
    probs = scored.outputs["val"].probs
    assert probs.shape == (len(splits.val), 3) and torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-5)
