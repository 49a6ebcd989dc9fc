"""Honest stacking of fine-tuned members: cross-fitting.

A combiner (stacking) must be fitted on predictions for images the predicting model never trained on. With frozen
trunks the late head gets them from out-of-fold logistic regressions on fixed features (:mod:`fusionnet.engine.late_fit`);
with fine-tuned trunks that is not enough, because the trunks themselves saw every training image (digits, Lite1:
out-of-fold accuracy 0.95 on training features against 0.80 on validation). Cross-fitting trains each member again
``folds`` times, each time on every fold but one, and has that model predict the fold it left out
(:func:`out_of_fold_probs`); the combiner of a late-fusion model over the full members then fits on those honest
predictions (:func:`fit_combiner`). With ``taps``, each fold model also fits a classifier on its earlier feature
levels (on the images it trained on) and predicts the held-out fold with it, so the choice between a member's own
head and its tapped classifier, and the combiner over them, rest on honest predictions too; the deployed model
takes the full members' trunks with the tapped classifiers refitted on the whole training split. The price is
``folds`` more trainings of every member (the tapped heads reuse them: a feature pass each): the row's time counts
them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from fusionnet.errors import DataError


@dataclass
class OutOfFold:
    """Out-of-fold predictions of one member on the training split."""

    probs: torch.Tensor  # (N, K): row i predicted by the model trained without i's fold
    fold_of: torch.Tensor  # (N,): the fold each training image was held out in
    seconds: float
    folds: list[dict] = field(default_factory=list)  # per fold: trained_on / scored (training-split indices)
    tapped: torch.Tensor | None = None  # (N, K), with ``taps``: row i predicted by a classifier on the tapped
    # feature levels of the fold model trained without i, fitted on that model's own training images


def tapped_view(member: nn.Module, taps: int) -> nn.Module:
    """A one-branch late-fusion copy of the single-branch ``member`` with ``taps`` earlier levels (its trunk, frozen;
    the classifier still to fit)."""
    from fusionnet.models.branch import BranchConfig
    from fusionnet.engine.late_fit import closed_form_fusion
    from fusionnet.models.fusion import FusionConfig, FusionNet

    (own,) = member.config.branches
    cfg = FusionConfig([BranchConfig(**{**own.__dict__, "name": "", "taps": taps})], member.config.num_classes,
                       class_names=member.class_names, fusion=closed_form_fusion(), freeze_trunks=True,
                       **member.config.reading().model_fields())
    view = FusionNet(cfg)
    next(iter(view.branches.values())).trunk.load_state_dict(next(iter(member.branches.values())).trunk.state_dict())
    view.set_trainable_stages(0)
    return view.eval()


def fit_tapped(view: nn.Module, fit_data, seed: int, device, grid: tuple[float, ...] | None = None):
    """Fit ``view``'s branch classifier (the late_oof head's per-branch fit: C and the taps chosen by out-of-fold
    NLL) on ``fit_data``, in place; returns the :class:`fusionnet.engine.late_fit.BranchFit`."""
    from fusionnet.engine.feature_cache import cached_features
    from fusionnet.engine.late_fit import fit_branch, stacking_cv

    feats, _ = cached_features(view, fit_data, cache_dir=None, device=device, batch_size=64)
    (name,) = view.branches
    return fit_branch(view, name, feats.features[name], feats.targets, stacking_cv(feats.targets, seed),
                      **({"grid": grid} if grid else {}))


def tapped_probs(view: nn.Module, data, device) -> torch.Tensor:
    """(N, K) probabilities of ``view``'s branch classifier alone on ``data``."""
    from fusionnet.engine.feature_cache import cached_features

    feats, _ = cached_features(view, data, cache_dir=None, device=device, batch_size=64)
    (name,) = view.branches
    classifier = view.fuser.classifiers[0]
    with torch.no_grad():
        return classifier(feats.features[name]).float().softmax(1)


def fold_indices(labels, folds: int, seed: int) -> list[np.ndarray]:
    """The held-out indices of each of ``folds`` stratified folds of ``labels``."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels)
    counts = np.bincount(y)
    if folds < 2:
        raise DataError(f"cross-fitting needs at least 2 folds, got {folds}")
    if counts[counts > 0].min() < folds:
        raise DataError(f"cross-fitting with {folds} folds needs at least {folds} training images per class; the "
                        f"smallest class has {int(counts[counts > 0].min())}. Use fewer folds")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [held for _, held in cv.split(np.zeros(len(y)), y)]


def out_of_fold_probs(build: Callable[[], nn.Module], ctx, train_cfg, *, folds: int, seed: int,
                      out_dir: Path | None = None, callbacks: Callable[[], list] = list, taps: int = 0) -> OutOfFold:
    """Train ``build()`` once per fold on the other folds of the training split of ``ctx`` (a
    :class:`fusionnet.workflows.pipeline.Context`; best epoch on its validation split, like the full member) and
    predict the held-out fold through the validation pipeline, on ``ctx.device``. With ``taps``, the same fold
    model also gives a classifier on its tapped feature levels (fitted on the fold's training images) whose
    predictions on the held-out fold are ``tapped``: one training per fold serves both heads."""
    from fusionnet.data.splits import eval_view
    from fusionnet.engine.inference import predict
    from fusionnet.workflows.pipeline import _best_epoch
    from fusionnet.engine.train import fit

    train_data, val_data, device, log = ctx.splits.train, ctx.splits.val, ctx.device, ctx.log
    t0 = time.perf_counter()
    labels = list(train_data.labels)
    held_out = fold_indices(labels, folds, seed)
    probs, fold_of, record, tapped = None, torch.empty(len(labels), dtype=torch.long), [], None
    everything = np.arange(len(labels))
    for j, held in enumerate(held_out):
        fit_idx = np.setdiff1d(everything, held)
        log(f"cross-fit: fold {j + 1}/{folds} ({len(fit_idx)} images to train, {len(held)} to predict)")
        model = build()
        result = fit(model, train_data.subset(fit_idx.tolist()), val_data, train_cfg,
                     out_dir=out_dir / f"fold_{j}" if out_dir else None, log=log, callbacks=callbacks())
        model = _best_epoch(model, result.best_path) if result.best_path else model.eval()
        held_view = eval_view(train_data.subset(held.tolist()), val_data)
        p, _ = predict(model, held_view, device=device)
        probs = p.new_zeros(len(labels), p.shape[1]) if probs is None else probs
        probs[torch.from_numpy(held)] = p.float()
        if taps:
            view = tapped_view(model, taps)
            fit_tapped(view, eval_view(train_data.subset(fit_idx.tolist()), val_data), seed, device)
            tapped = probs.new_zeros(probs.shape) if tapped is None else tapped
            tapped[torch.from_numpy(held)] = tapped_probs(view, held_view, device)
        fold_of[torch.from_numpy(held)] = j
        record.append({"trained_on": fit_idx.tolist(), "scored": held.tolist()})
    return OutOfFold(probs, fold_of, time.perf_counter() - t0, record, tapped)


def fit_combiner(model, member_probs: list[torch.Tensor], labels) -> dict:
    """Fit the combiner (the Linear head) of a late-fusion ``model`` whose branch classifiers are the full members'
    heads, on the members' out-of-fold probabilities ``[(N, K)] * M`` (in branch order): the same non-negative,
    pulled-to-equal combiner as :mod:`fusionnet.engine.late_fit`, with its own out-of-fold score."""
    from fusionnet.engine.late_fit import fit_combiner_into, stacking_cv

    if len(member_probs) != len(model.branches):
        raise DataError(f"{len(member_probs)} members' predictions for a model of {len(model.branches)} branches")
    log_p = torch.stack([p.double().clamp_min(1e-12).log() for p in member_probs], dim=1)  # (N, M, K)
    target = torch.as_tensor(list(labels)).long()
    w, nll, acc = fit_combiner_into(model, log_p, target, stacking_cv(target, 0))
    return {"weights": {n: w[i].tolist() for i, n in enumerate(model.branches)}, "oof_nll": nll, "oof_acc": acc,
            "member_oof_acc": {n: float((p.argmax(1) == target).double().mean())
                               for n, p in zip(model.branches, member_probs)}}


@dataclass
class CrossFitted:
    """A comparison entry (:mod:`fusionnet.workflows.pipeline`): the late fusion of the trained ``members`` (their heads as
    its branch classifiers), its combiner fitted on cross-fitted member predictions; its time counts the members'
    (``prior_s``) and the ``folds`` extra trainings of each."""

    name: str
    builders: dict[str, Callable[[], nn.Module]]  # per member: a fresh, untrained copy (same seed and settings)
    members: list[nn.Module]
    prior_s: float
    train: object  # the TrainConfig every member trained with
    folds: int
    seed: int = 0
    kind: str = "fusion"
    callbacks: Callable[[], list] = list  # training callbacks of the fold models (e.g. a deadline)
    taps: int = 0  # earlier trunk levels each branch classifier may use: per member, its honest (cross-fitted)
    # predictions decide between the member's own head and a classifier on the tapped levels

    def run(self, ctx):
        import shutil

        from fusionnet.data.datasets import training_record
        from fusionnet.models.factory import fuse_members, save_model
        from fusionnet.workflows.pipeline import score

        t0 = time.perf_counter()
        folder = ctx.out / "models" / self.name
        oof = {b: out_of_fold_probs(build, ctx, self.train, folds=self.folds, seed=self.seed, out_dir=folder / b,
                                    callbacks=self.callbacks, taps=self.taps) for b, build in self.builders.items()}
        from fusionnet.engine.late_fit import closed_form_fusion

        model = fuse_members(self.members, fusion=closed_form_fusion(), taps=self.taps)
        honest, taps_used = self._branch_classifiers(model, oof, ctx)
        facts = {**fit_combiner(model, honest, ctx.splits.train.labels), "folds": self.folds,
                 "fold_seconds": {b: o.seconds for b, o in oof.items()}, "taps_used": taps_used}
        ctx.log(f"cross-fitted stacking: combiner out-of-fold acc {facts['oof_acc']:.4f}, NLL {facts['oof_nll']:.4f}"
                + (f"; tapped levels used by {[b for b, u in taps_used.items() if u['used']]}" if self.taps else ""))
        if ctx.keep != "all":
            for b in self.builders:
                shutil.rmtree(folder / b, ignore_errors=True)
        path = str(folder / "best.pth")
        save_model(model, path, metrics={"cross_fit": facts}, data=training_record(ctx.splits.train, self.seed))
        train_s = time.perf_counter() - t0
        scored = score(model, ctx, self.name, self.kind, checkpoint=path)
        scored.info.update(train_seconds=train_s, best_epoch=None, epochs_run=0, cross_fit=facts,
                           seconds=self.prior_s + train_s + scored.info["predict_seconds"])
        return scored

    def _branch_classifiers(self, model, oof: dict, ctx) -> tuple[list[torch.Tensor], dict]:
        """Per member, the head whose cross-fitted predictions have the lower NLL: its own (kept from
        fuse_members) or, with taps, a classifier on the tapped levels, then refitted on the full member's features
        of the whole training split. Returns (the chosen heads' honest predictions, what was chosen and why)."""
        from fusionnet.data.splits import eval_view
        from fusionnet.engine.feature_cache import cached_features
        from fusionnet.engine.late_fit import fit_branch, stacking_cv

        labels = torch.as_tensor(ctx.splits.train.labels).long()
        nll = lambda p: float(-p[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean())  # noqa: E731
        honest, used, feats = [], {}, None
        for (b, o), name in zip(oof.items(), model.branches):
            use = o.tapped is not None and nll(o.tapped) < nll(o.probs)
            used[b] = {"used": use, "head_nll": nll(o.probs), "tapped_nll": nll(o.tapped) if o.tapped is not None
                       else None}
            honest.append(o.tapped if use else o.probs)
            if use:
                if feats is None:
                    feats, _ = cached_features(model, eval_view(ctx.splits.train, ctx.splits.val), cache_dir=None,
                                               device=ctx.device, batch_size=64)
                fit_branch(model, name, feats.features[name], labels, stacking_cv(labels, self.seed))
        return honest, used
