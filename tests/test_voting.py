import os
import pytest
import torch

from fusionnet.errors import ConfigError, DataError

from fusionnet.ensembles.boosting import boosted_vote, samme_alpha, samme_update
from fusionnet.ensembles.calibration import fit_temperature
from fusionnet.utils.metrics import diversity
from fusionnet.ensembles.stacking import stacking
from fusionnet.ensembles.selection import exhaustive_selection, fit_weights, greedy_selection
from fusionnet.ensembles.voting import MemberOutputs, VotingEnsemble, VotingModule, check_aligned, hard_vote, soft_vote

# three members, two samples, three classes
P = torch.tensor([
    [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]],
    [[0.1, 0.8, 0.1], [0.1, 0.2, 0.7]],
    [[0.5, 0.4, 0.1], [0.3, 0.4, 0.3]],
])


def test_soft_and_weighted_voting_give_the_hand_computed_answer():
    torch.testing.assert_close(soft_vote(P), torch.tensor([[0.4, 0.5, 0.1], [0.2, 1.1 / 3, 1.3 / 3]]))
    torch.testing.assert_close(soft_vote(P, [2, 1, 1]), torch.tensor([[0.45, 0.45, 0.1], [0.2, 0.4, 0.4]]))
    assert VotingEnsemble("soft").predict(list(P)).tolist() == [1, 2]
    torch.testing.assert_close(soft_vote(P).sum(1), torch.ones(2))


def test_hard_voting_majority_and_its_tie_rule():
    # sample 0: votes class 0 (m0), 1 (m1), 0 (m2) -> class 0 by majority, though soft voting says class 1
    # sample 1: votes 1, 2, 1 -> class 1
    assert hard_vote(P).argmax(1).tolist() == [0, 1]
    torch.testing.assert_close(hard_vote(P)[0], torch.tensor([2 / 3, 1 / 3, 0.0]), atol=1e-5, rtol=0)
    # a 1-1 tie between classes 0 and 1 goes to the higher mean probability (class 1: 0.55 vs 0.35) ...
    tie = torch.tensor([[[0.6, 0.4, 0.0]], [[0.1, 0.7, 0.2]]])
    assert hard_vote(tie).argmax(1).tolist() == [1]
    # ... and an exact tie of votes and mean probabilities goes to the lowest class index
    exact = torch.tensor([[[0.6, 0.4, 0.0]], [[0.4, 0.6, 0.0]]])
    assert hard_vote(exact).argmax(1).tolist() == [0]
    # weights change the majority: member 1 alone outweighs the other two
    assert hard_vote(P, [1, 3, 1]).argmax(1).tolist() == [1, 2]


def test_voting_rejects_bad_weights_and_names():
    with pytest.raises(ValueError, match=r"weights must be 3 finite non-negative numbers with a positive sum"):
        soft_vote(P, [1, -1, 1])
    with pytest.raises(ValueError, match="voting must be 'soft' or 'hard', got 'mean'"):
        VotingEnsemble("mean")


def _val_set():
    """Member 0: right on the first half; member 1: right on the second half; member 2: always wrong-ish."""
    n, k = 40, 2
    labels = torch.tensor([0, 1] * (n // 2))
    good_first = torch.where(torch.arange(n)[:, None] < n // 2, torch.nn.functional.one_hot(labels, k) * 0.8 + 0.1,
                             torch.full((n, k), 0.5))
    good_second = torch.where(torch.arange(n)[:, None] >= n // 2, torch.nn.functional.one_hot(labels, k) * 0.8 + 0.1,
                              torch.full((n, k), 0.5))
    bad = torch.nn.functional.one_hot(1 - labels, k) * 0.6 + 0.2
    return torch.stack([good_first, good_second, bad]).float(), labels


def test_greedy_selection_picks_the_complementary_pair_and_weights_are_counts():
    val, labels = _val_set()
    res = greedy_selection(val, labels, metric="nll", n_init=1, rounds=10)
    assert res.counts[2] == 0 and res.counts[0] == res.counts[1] >= 1
    assert res.weights == [c / sum(res.counts) for c in res.counts]
    assert len(res.trajectory) == 11 and min(res.trajectory) < res.trajectory[0]
    bagged = greedy_selection(val, labels, rounds=5, bags=6, bag_fraction=0.67, seed=0)
    assert sum(bagged.counts) > 0 and bagged.counts[2] <= min(bagged.counts[:2])


def test_exhaustive_selection_finds_the_best_subset():
    val, labels = _val_set()
    assert exhaustive_selection(val, labels, metric="nll").counts == [1, 1, 0]
    with pytest.raises(ValueError, match="exhaustive search over 13 members"):
        exhaustive_selection(torch.rand(13, 4, 2).softmax(-1), torch.zeros(4, dtype=torch.long))


def test_fitted_weights_stay_on_the_simplex_and_improve_validation_nll():
    val, labels = _val_set()
    w = fit_weights(val, labels)
    assert sum(w) == pytest.approx(1.0) and all(x >= 0 for x in w) and w[2] < 0.05

    def nll(p):
        return float(-p[torch.arange(len(labels)), labels].log().mean())

    assert nll(soft_vote(val, w)) < nll(soft_vote(val)) - 0.05


def test_temperature_scaling_lowers_nll_of_overconfident_outputs():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=g)
    logits = torch.randn(400, 4, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, 4)
    overconfident = (logits * 4).softmax(1)  # right 70% of the time, but with ~0.99 confidence
    t = fit_temperature(overconfident, labels)
    assert t.temperature > 2 and t.nll_after < t.nll_before and t.ece_after < t.ece_before


def test_stacking_never_sees_test_labels():
    val, labels = _val_set()
    test = val.clone()
    res = stacking(val, labels, test, method="logreg", cv=5)
    assert res.test_probs.shape == (40, 2) and res.cv_acc > 0.9
    # the signature has no place for test labels; and shuffling test rows shuffles the output rows identically
    perm = torch.randperm(40)
    torch.testing.assert_close(stacking(val, labels, test[:, perm], cv=5).test_probs, res.test_probs[perm])
    hgb = stacking(val, labels, test, method="hgb", cv=5)
    assert hgb.test_probs.shape == (40, 2)


def test_diversity_and_boosting_weights():
    val, labels = _val_set()
    d = diversity(val, labels)
    # m0 predicts the label on the first half and class 0 on the second (0.5/0.5 ties go to index 0); m1 the
    # reverse; m2 always the wrong class: hand-counted disagreements over the 40 samples
    assert d["disagreement"][0][0] == 0 and d["disagreement"][0][1] == 0.5 and d["disagreement"][0][2] == 0.75
    assert samme_alpha(0.5, 2) == pytest.approx(0.0) and samme_alpha(0.2, 3) > 0
    w, alpha = samme_update(torch.ones(4), torch.tensor([True, True, True, False]), num_classes=2)
    assert alpha == pytest.approx(torch.log(torch.tensor(3.0)).item())
    assert w[3] == pytest.approx(0.5) and w[:3].sum() == pytest.approx(0.5)  # misclassified mass raised to half
    assert boosted_vote(P, [0.1, 1.0, 0.1]).argmax(1).tolist() == [1, 2]


def _outputs(member, probs, ids=("a", "b"), classes=("x", "y", "z"), labels=(0, 2)):
    return MemberOutputs(member=member, split="val", probs=probs, labels=torch.tensor(labels),
                         class_names=list(classes), sample_ids=list(ids))


def test_member_outputs_round_trip_and_mismatches_are_refused(tmp_path):
    a = _outputs("m0", P[0])
    path = a.save(tmp_path / "m0_val.pt")
    b = MemberOutputs.load(path)
    assert torch.equal(b.probs, a.probs) and b.sample_ids == ["a", "b"] and b.member == "m0"
    check_aligned([a, _outputs("m1", P[1])])
    with pytest.raises(ValueError, match="different class order"):
        check_aligned([a, _outputs("m1", P[1], classes=("y", "x", "z"))])
    with pytest.raises(ValueError, match=r"samples in a different order \(first difference at row 0\)"):
        check_aligned([a, _outputs("m1", P[1], ids=("b", "a"))])
    with pytest.raises(ValueError, match="different samples"):
        check_aligned([a, _outputs("m1", P[1], ids=("a", "c"))])
    with pytest.raises(ValueError, match="is not a member-outputs file"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        MemberOutputs.load(tmp_path / "other.pt")


def test_voting_module_over_live_members_and_members_that_return_tuples_are_refused():
    class Fixed(torch.nn.Module):
        def __init__(self, logits, tuple_out=False):
            super().__init__()
            self.logits, self.tuple_out = logits, tuple_out

        def forward(self, x):
            return (self.logits, self.logits) if self.tuple_out else self.logits

    out = VotingModule([Fixed(p.log()) for p in P], voting="soft")(torch.zeros(2, 3, 8, 8))
    torch.testing.assert_close(out, soft_vote(P))
    with pytest.raises(ConfigError, match="voting members must return logits"):
        VotingModule([Fixed(P[0].log(), tuple_out=True)])(torch.zeros(2, 3, 8, 8))




def test_exact_ties_follow_the_documented_rule_in_any_precision():
    from fusionnet.ensembles.voting import hard_vote

    # one vote each; the mean probabilities tie exactly between classes 0 and 2 -> the lowest index, 0
    p = torch.tensor([[[0, .125, .875]], [[.125, .75, .125]], [[.875, .125, 0]]], dtype=torch.float64)
    assert int(hard_vote(p).argmax(1)) == 0
    # weighted votes tie exactly (7 each); the weighted mean probability then decides: class 0
    q = torch.tensor([[[.4, .6]]] * 3 + [[[.9, .1]]])
    for dtype in (torch.float32, torch.float64):
        assert int(hard_vote(q.to(dtype), [2, 4, 1, 7]).argmax(1)) == 0
    # uniform weights are exact in float64: rows sum to 1 to the last bit that float64 keeps
    r = torch.rand(5, 20, 4, dtype=torch.float64).softmax(-1)
    assert (soft_vote(r).sum(1) - 1).abs().max() < 1e-14 and soft_vote(r).dtype == torch.float64


@pytest.mark.parametrize("bad,match", [
    ([], "no member probabilities given"),
    (torch.full((2, 3, 4), float("nan")), "NaN or inf"),
    (torch.randn(2, 3, 4), "rows are not probabilities"),
    (torch.rand(3, 4).softmax(-1), r"one member's \(N, K\) array goes in a list"),
])
def test_voting_refuses_inputs_that_are_not_member_probabilities(bad, match):
    with pytest.raises(DataError, match=match):
        VotingEnsemble().predict_proba(bad)


def test_fitting_functions_check_labels_and_accept_any_integer_dtype():
    val = torch.rand(2, 6, 3).softmax(-1)
    with pytest.raises(DataError, match=r"labels must lie in 0..2 for 3 classes"):
        greedy_selection(val, torch.tensor([0, 1, 2, 3, 0, 1]))
    t = fit_temperature(val[0], torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32))
    assert t.temperature > 0
    with pytest.raises(DataError, match="NaN"):
        fit_temperature(torch.full((6, 3), float("nan")), torch.zeros(6, dtype=torch.long))


def test_stacking_with_a_singleton_validation_class_says_why_it_cannot_score():
    val = torch.rand(2, 7, 3).softmax(-1)
    with pytest.raises(DataError, match="at least 2 validation samples of every class"):
        stacking(val, torch.tensor([0, 0, 0, 1, 1, 1, 2]), val)


def test_check_aligned_refuses_other_labels_for_the_same_samples():
    a = MemberOutputs("a", "val", P[0], torch.tensor([0, 1]), ["x", "y", "z"], ["s0", "s1"])
    b = MemberOutputs("b", "val", P[1], torch.tensor([0, 2]), ["x", "y", "z"], ["s0", "s1"])
    with pytest.raises(DataError, match=r"same samples but different labels \(first at row 1\)"):
        check_aligned([a, b])


def test_samme_stops_when_a_member_is_no_better_than_chance():
    w = torch.full((4,), 0.25, dtype=torch.float64)
    _, alpha = samme_update(w, torch.tensor([True, False, False, False]), num_classes=2)
    assert alpha < 0  # 25 % right on two classes: worse than chance, train_boosted stops there
    _, alpha = samme_update(w, torch.tensor([True, True, True, False]), num_classes=2)
    assert alpha == pytest.approx(samme_alpha(0.25, 2)) and alpha > 0


def test_a_sample_reached_through_a_symlinked_folder_has_the_same_id(tmp_path):
    """compare stored resolved paths and predict the paths as given: vote over a mix said 'different samples'."""
    from fusionnet.ensembles.voting import sample_id

    (tmp_path / "real" / "a").mkdir(parents=True)
    (tmp_path / "real" / "a" / "x.png").write_bytes(b"png")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert sample_id(tmp_path / "link" / "a" / "x.png") == sample_id(tmp_path / "real" / "a" / "x.png") == \
        os.path.realpath(tmp_path / "real" / "a" / "x.png")  # outside a split folder: the resolved path
    assert sample_id("row 3") == "row 3"  # not a file: kept as given
    # inside a data folder: split/class/name, the same for a copy of the folder elsewhere (another machine)
    for root in ("data", "copy"):
        (tmp_path / root / "test" / "a").mkdir(parents=True)
        (tmp_path / root / "test" / "a" / "x.png").write_bytes(b"png")
    (tmp_path / "via").symlink_to(tmp_path / "data")
    assert sample_id(tmp_path / "via" / "test" / "a" / "x.png") == sample_id(tmp_path / "copy" / "test" / "a" /
                                                                            "x.png") == "test/a/x.png"
