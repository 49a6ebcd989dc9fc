"""The output-ensemble methods of the comparison, as a table: name -> function of cached member outputs.

Each method sees the members' validation probabilities ``val`` (M, N_val, K) with labels, and their test
probabilities ``test`` (M, N_test, K) without labels; it returns its test probabilities, its validation
probabilities (for choosing among methods on validation), the member weights it used and any extra facts.
Adding a method is one function with ``@register_ensemble("id", label="...")``: the id is its key in code and its
``fusionnet vote --method`` name, the label what reports print.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fusionnet.registry import Registry
from fusionnet.ensembles.calibration import fit_temperature
from fusionnet.ensembles.selection import exhaustive_selection, fit_weights, greedy_selection
from fusionnet.ensembles.stacking import stacking
from fusionnet.ensembles.voting import hard_vote
from fusionnet.utils.probabilities import soft_vote


@dataclass
class MemberProbs:
    val: torch.Tensor  # (M, N_val, K)
    val_labels: torch.Tensor  # (N_val,)
    test: torch.Tensor  # (M, N_test, K); its labels are not here: no method can see them
    seed: int = 0


@dataclass
class MethodOutput:
    test: torch.Tensor  # (N_test, K)
    val: torch.Tensor | None  # (N_val, K), fitted methods: in-sample on val (optimistic); None: use val_scores
    weights: list[float] | None = None  # per member; None: all members, equally
    val_scores: dict | None = None  # honest {"acc", "nll"} on val where val probabilities would be in-sample
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EnsembleMethod:
    """A registered output-ensemble method: its stable id (the CLI name), its report label, its function, and
    whether its outputs are probabilities (hard voting's are vote fractions: no NLL-based choice may pick it), and
    whether it is a weighted soft vote of the members (its output's ``weights`` and ``extra["temperatures"]``,
    ``extra["ensemble_temperature"]``), which :class:`fusionnet.models.vote.Vote` saves as one model."""

    id: str
    label: str
    run: Callable[[MemberProbs], MethodOutput]
    probabilities: bool = True
    vote: bool = False  # a weighted (temperature-scaled) soft vote of the members: a Vote model can be it

    def __call__(self, probs: MemberProbs) -> MethodOutput:
        return self.run(probs)


ENSEMBLES: Registry[EnsembleMethod] = Registry("ensemble method")


def cross_validated(method: EnsembleMethod, p: MemberProbs, folds: int = 5) -> torch.Tensor | None:
    """The method's out-of-fold predictions on validation (N_val, K): fitted on the other folds of validation
    (stratified, seeded), predicting each held-out fold as its test split. A method fitted on validation
    (weights, selection, temperatures) is then scored on images it did not fit on, as fairly as a fusion model.
    None where a class has fewer than 2 validation images."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    y = p.val_labels
    counts = torch.bincount(y)
    k = int(min(folds, int(counts[counts > 0].min())))
    if k < 2:
        return None
    out = torch.zeros(p.val.shape[1:], dtype=p.val.dtype)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=p.seed)
    for fit_idx, held in cv.split(np.zeros(len(y)), y.numpy()):
        res = method.run(MemberProbs(p.val[:, fit_idx], y[fit_idx], p.val[:, held], p.seed))
        out[torch.from_numpy(held)] = res.test.to(out.dtype)
    return out


def register_ensemble(id: str, *, label: str, probabilities: bool = True, vote: bool = False) -> Callable:
    """Function decorator: an ensemble method under ``id`` (``vote --method id``), shown as ``label``;
    ``probabilities=False`` for a method whose outputs are not probabilities (scored by NLL, they mislead);
    ``vote=True`` for a weighted soft vote of the members (see :class:`EnsembleMethod`)."""
    def add(run: Callable[[MemberProbs], MethodOutput]) -> Callable[[MemberProbs], MethodOutput]:
        ENSEMBLES.register(id, EnsembleMethod(id, label, run, probabilities, vote))
        return run
    return add


def list_ensembles() -> list[str]:
    """The registered ensemble methods' ids (``vote --method``), in registration order."""
    return ENSEMBLES.names()


@register_ensemble("soft", label="soft voting", vote=True)
def _soft(p: MemberProbs) -> MethodOutput:
    return MethodOutput(soft_vote(p.test), soft_vote(p.val))


@register_ensemble("hard", label="hard voting", probabilities=False)
def _hard(p: MemberProbs) -> MethodOutput:
    return MethodOutput(hard_vote(p.test), hard_vote(p.val))


@register_ensemble("weighted", label="weighted voting (NLL-fitted)", vote=True)
def _weighted(p: MemberProbs) -> MethodOutput:
    w = fit_weights(p.val, p.val_labels)
    return MethodOutput(soft_vote(p.test, w), soft_vote(p.val, w), w)


@register_ensemble("greedy", label="greedy selection (Caruana)", vote=True)
def _greedy(p: MemberProbs) -> MethodOutput:
    g = greedy_selection(p.val, p.val_labels, metric="nll", n_init=1, rounds=25)
    return MethodOutput(soft_vote(p.test, g.weights), soft_vote(p.val, g.weights), g.weights,
                        extra={"trajectory": g.trajectory})


@register_ensemble("exhaustive", label="best subset (exhaustive)", vote=True)
def _exhaustive(p: MemberProbs) -> MethodOutput:
    e = exhaustive_selection(p.val, p.val_labels, metric="nll")
    return MethodOutput(soft_vote(p.test, e.weights), soft_vote(p.val, e.weights), e.weights)


@register_ensemble("temperature", label="soft voting, temperature-scaled", vote=True)
def _temperature(p: MemberProbs) -> MethodOutput:
    temps = [fit_temperature(p.val[i], p.val_labels) for i in range(len(p.val))]
    scaled_v = torch.stack([t.apply(p.val[i]) for i, t in enumerate(temps)])
    scaled_t = torch.stack([t.apply(p.test[i]) for i, t in enumerate(temps)])
    ens = fit_temperature(soft_vote(scaled_v), p.val_labels)
    return MethodOutput(ens.apply(soft_vote(scaled_t)), ens.apply(soft_vote(scaled_v)),
                        extra={"temperatures": [t.temperature for t in temps],
                               "ensemble_temperature": ens.temperature})


def _stacking(method: str) -> Callable[[MemberProbs], MethodOutput]:
    def run(p: MemberProbs) -> MethodOutput:
        st = stacking(p.val, p.val_labels, p.test, method=method, cv=5, seed=p.seed)
        return MethodOutput(st.test_probs, None, val_scores={"acc": st.cv_acc, "nll": st.cv_nll},
                            extra={"cv_acc_on_val": st.cv_acc})
    return run


register_ensemble("stacking", label="stacking (logistic regression)")(_stacking("logreg"))
register_ensemble("stacking_hgb", label="stacking (gradient boosting)")(_stacking("hgb"))
