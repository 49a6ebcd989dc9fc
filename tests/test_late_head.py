"""Late fusion and its late_oof head: the model computes exactly the fitted stack, from training data only."""

import pytest
import torch

from fusionnet import FusionNet
from fusionnet.errors import ConfigError, DataError
from fusionnet.models.factory import fuse_members
from fusionnet.engine.late_fit import fit_late_head

TINY = ["timm/test_efficientnet", "timm/test_resnet"]


def _features(model, n_per_class: int, k: int, seed: int = 0):
    """Branch features where branch 0 separates classes 0/1 and branch 1 separates the rest: they complement."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per_class)
    feats = {}
    for i, (name, br) in enumerate(model.branches.items()):
        x = torch.randn(len(y), br.out_dim, generator=g)
        informative = (y < 2) if i == 0 else (y >= 2)
        x[:, :k] += 3.0 * torch.nn.functional.one_hot(y, k).float() * informative[:, None]
        feats[name] = x * (i + 1) + 5.0 * i  # different scales and offsets: the standardisation must fold in
    return feats, y


def test_late_fusion_outputs_log_probabilities_of_each_branch():
    model = FusionNet(backbones=TINY, num_classes=3, fusion="late").eval()
    x = torch.rand(4, 3, 32, 32)
    out = model.forward_output(x)
    assert out.extras["branch_logits"].shape == (4, 2, 3)
    fused, _ = model.fuser([model.forward_branches(x)[n] for n in model.branches])
    assert fused.shape == (4, 6)
    assert torch.allclose(fused.view(4, 2, 3).exp().sum(2), torch.ones(4, 2), atol=1e-5)


def test_from_members_in_late_fusion_predict_the_mean_member_logit():
    members = []
    for b in TINY:
        torch.manual_seed(len(members))
        members.append(FusionNet(backbones=[b], num_classes=3).eval())
    x = torch.rand(5, 3, 32, 32)
    for taps in (None, 2):  # taps: earlier trunk levels that the members' heads weigh 0
        fused = fuse_members(members, fusion="late", taps=taps)
        with torch.no_grad():
            mean_logits = torch.stack([m(x) for m in members]).mean(0)
            assert torch.allclose(fused(x).softmax(1), mean_logits.softmax(1), atol=1e-6)


def test_fit_late_head_matches_the_stack_and_beats_each_branch():
    from sklearn.linear_model import LogisticRegression

    model = FusionNet(backbones=TINY, num_classes=4, fusion="late", freeze_trunks=True).eval()
    feats, y = _features(model, 30, 4)
    fit = fit_late_head(model, feats, y, seed=0)
    assert set(fit.branch_C) == set(model.branches) == set(fit.weights) and fit.folds == 5
    assert all(w >= 0 for ws in fit.weights.values() for w in ws)
    # the combiner uses the complementary branches: better out of fold than either branch alone
    assert fit.oof_acc["combined"] > max(fit.oof_acc[n] for n in model.branches) + 0.1
    # the network computes exactly the fitted branch classifier: recompute branch 0 with scikit-learn
    name = list(model.branches)[0]
    x = feats[name].double().numpy()
    z = (x - x.mean(0)) / x.std(0)
    lr = LogisticRegression(C=fit.branch_C[name], max_iter=10000, tol=1e-10).fit(z, y.numpy())  # the exact optimum
    with torch.no_grad():
        _, extras = model.fuser([feats[n] for n in model.branches])
    expected = torch.from_numpy(lr.decision_function(z)).float()
    assert torch.allclose(extras["branch_logits"][:, 0], expected, atol=1e-3)
    with torch.no_grad():
        train_acc = (model.forward_head(feats).argmax(1) == y).float().mean()
    assert train_acc > 0.9


def test_a_fit_in_a_cancelled_thread_stops_and_leaves_the_model_as_it_was():
    import threading

    from fusionnet.utils.threads import Cancelled, cancel_with

    model = FusionNet(backbones=TINY, num_classes=4, fusion="late", freeze_trunks=True).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    feats, y = _features(model, 30, 4)
    event, raised = threading.Event(), []

    def run():
        cancel_with(event)
        try:
            fit_late_head(model, feats, y, seed=0)
        except Cancelled as exc:
            raised.append(exc)

    event.set()  # cancelled before its first step: e.g. the command around it was interrupted
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert raised and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    fit_late_head(model, feats, y, seed=0)  # this thread has no cancel signal: it fits


def test_fit_late_head_binary_and_bad_input():
    model = FusionNet(backbones=TINY, num_classes=2, fusion="late")
    feats, y = _features(model, 10, 2)
    fit_late_head(model, feats, y, grid=(0.1, 1.0), folds=3)
    with torch.no_grad():
        probs = model.forward_head(feats).softmax(1)
    assert (probs.argmax(1) == y).float().mean() > 0.8
    with pytest.raises(DataError, match="class 1 has 1 training sample"):
        fit_late_head(model, {n: f[:11] for n, f in feats.items()}, y[:11])
    with pytest.raises(DataError, match="no features for branch"):
        fit_late_head(model, {list(feats)[0]: feats[list(feats)[0]]}, y)
    with pytest.raises(DataError, match="class indices 0..1"):
        fit_late_head(model, feats, y - 1)
    broken = {n: f.clone() for n, f in feats.items()}
    broken[list(feats)[1]][3, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or infinite features in 1 row"):
        fit_late_head(model, broken, y)
    with pytest.raises(ConfigError, match="fusion='late'"):
        fit_late_head(FusionNet(backbones=TINY, num_classes=2), feats, y)


def test_fit_late_head_uses_tapped_levels_only_where_they_lower_the_out_of_fold_nll():
    model = FusionNet(backbones=TINY, num_classes=3, fusion="late", freeze_trunks=True, taps=1).eval()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(40)
    signal = 6.0 * torch.nn.functional.one_hot(y, 3).float()
    feats = {}
    for i, (name, br) in enumerate(model.branches.items()):
        main, tap = br.levels()
        x = torch.randn(len(y), br.out_dim, generator=g)
        informative = tap if i == 0 else main  # branch 0: only its earlier level knows the class
        x[:, informative.start:informative.start + 3] += signal
        feats[name] = x
    fit = fit_late_head(model, feats, y, seed=0)
    first, second = model.branches
    assert fit.branch_taps == {first: 1, second: 0}
    assert fit.oof_acc[first] > 0.6  # from the tapped level (chance: 1/3; 317 of its 320 features are noise)
    weight = model.fuser.classifiers[1].weight
    assert torch.count_nonzero(weight[:, model.branches[second].levels()[1]]) == 0  # the unused level weighs 0
    assert torch.count_nonzero(weight[:, model.branches[second].levels()[0]]) > 0


def test_near_constant_features_get_no_weight_and_the_answer_does_not_depend_on_the_batch():
    """A weak member's features that barely move (their spread float32 rounding) must not be amplified by the
    standardisation: the fitted head stays small and answers the same at batch 1 and batch 256."""
    torch.manual_seed(0)
    model = FusionNet(backbones=TINY, num_classes=3, fusion="late").eval()
    feats, y = _features(model, 30, 3)
    weak = list(model.branches)[1]
    signal = torch.nn.functional.one_hot(y, 3).float()  # perfectly informative, but 1e-7 of the magnitude
    feats[weak] = 50.0 + 5e-6 * torch.cat([signal, torch.randn(len(y), feats[weak].shape[1] - 3)], 1)
    fit_late_head(model, feats, y, folds=3)
    w = model.fuser.classifiers[1].weight
    assert float(w.abs().max()) < 1e-6 and float(model.fuser.classifiers[0].weight.abs().max()) > 0
    x = {n: f.float() for n, f in feats.items()}
    with torch.no_grad():
        whole = model.forward_head(x).softmax(1)
        one = torch.cat([model.forward_head({n: f[i:i + 1] for n, f in x.items()}).softmax(1) for i in range(len(y))])
    assert torch.equal(whole.argmax(1), one.argmax(1)) and float((whole - one).abs().max()) < 1e-5


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention", "late"])
def test_every_fusion_method_answers_the_same_at_batch_1_and_batch_256(fusion):
    torch.manual_seed(0)
    model = FusionNet(backbones=TINY, num_classes=5, fusion=fusion).eval()
    x = torch.rand(256, 3, 32, 32)
    with torch.no_grad():
        whole = model(x).softmax(1)
        one = torch.cat([model(x[i:i + 1]).softmax(1) for i in range(len(x))])
    assert float((whole - one).abs().max()) < 1e-5
    assert torch.equal(whole.argmax(1), one.argmax(1))
