"""The closed-form fit of late fusion (``fusion="late"``, :class:`fusionnet.models.fusers.LateFusion`) on frozen branch
features: stacking inside the network.

:class:`~fusionnet.models.fusers.LateFusion` has a Linear classifier per branch; the fused vector is their log-probabilities side by side
(B, M*K), so the model's head is a learned combiner of the branches' predictions. With the head at [I/M ... I/M]
the model predicts the softmax of the mean branch logit. :func:`fit_late_head` fits both parts:

Stacking (Wolpert 1992; the "super learner" of van der Laan et al. 2007), with every part inside one model:

1. per branch, a multinomial logistic regression on its standardised pooled features, the L2 strength chosen
   from a grid by out-of-fold NLL (stratified k-fold cross-validation on the training split); a branch built
   with ``taps`` (pooled outputs of earlier trunk levels, :class:`fusionnet.models.fusion.BranchConfig`) uses them too
   where that lowers the out-of-fold NLL (multi-level features, as in Head2Toe, Evci et al. 2022, which help most
   on images unlike the pretraining set), else gives them weight 0;
2. the combiner, fitted on the branches' out-of-fold log-probabilities (predictions on images each classifier did
   not train on): logit_k = sum_m w[m, k] * log p_m(k) + b_k with w >= 0, i.e. how far to trust each branch for
   each class. Non-negative weights are Breiman's (1996) remedy for stacking's instability; they also keep the
   combiner from exploiting the anti-correlation that out-of-fold predictions of an uninformative classifier
   have with the labels. w = 1/M, b = 0 is the mean branch logit, the point it starts from and is pulled towards;
3. both are written into the model, the standardisation folded into each branch's Linear: the model's forward
   pass is exactly the fitted stack.

Only the training split is used, so validation stays free for choosing between models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from fusionnet.errors import ConfigError, DataError
from fusionnet.models.fusers import FUSIONS, Fuser, LateFusion
from fusionnet.utils.threads import check_cancelled

WALK_TOL = 1e-5  # gradient tolerance while choosing C (the kept weights: 1e-6, float64): digits Lite0 main features
# 1.4 s vs 2.2 s for the walk, the same C, out-of-fold NLL 0.17775 vs 0.17734
MAX_ITER = 300  # L-BFGS iterations per C at most; warm-started along the grid, it stops on its tolerance first
# (digits, Lite0's 1280 main features, 5 folds: C=1, out-of-fold NLL 0.1773 in 27-42 s where scikit-learn's lbfgs took
# 132 s to choose C=0.3 at NLL 0.1794, both on a loaded 2-core machine; experiments/bench_late_head.py)
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)  # branch classifiers: inverse L2 strength
# on standardised features, walked upwards until the out-of-fold NLL has risen twice
PULL = 1e-2  # the combiner's L2 pull towards equal weights 1/M
MIN_SPREAD = 1e-5  # std below this share of a feature's magnitude or of its branch's RMS: dead (float32 noise)


@dataclass
class LateHeadFit:
    branch_C: dict[str, float]  # the chosen inverse L2 strength per branch
    weights: dict[str, list[float]]  # the combiner's weight per branch and class (1/M each: the mean logit)
    oof_nll: dict[str, float]  # out-of-fold NLL on the training split, per branch and "combined" (the combiner
    # cross-validated over the branches' out-of-fold predictions)
    oof_acc: dict[str, float]
    folds: int
    seconds: float
    branch_taps: dict[str, int]  # how many tapped feature levels each branch classifier uses: all or none,
    # chosen like C by out-of-fold NLL


def fit_late_head(model, features: Mapping[str, torch.Tensor], labels: torch.Tensor, *, folds: int = 5,
                  seed: int = 0, grid: tuple[float, ...] = GRID,
                  log: Callable[[str], None] | None = None, progress: bool = False) -> LateHeadFit:
    """Fit ``model``'s branch classifiers and combiner on ``features`` ({branch: (N, D_i)}, e.g. a
    :class:`~fusionnet.engine.feature_cache.FeatureDataset`'s ``.features``) with ``labels`` (N,), in place."""
    from sklearn.model_selection import StratifiedKFold

    t0 = time.perf_counter()
    y, n_folds = _checked_inputs(model, features, labels, folds)
    cv = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    say = log or (lambda _m: None)
    names = list(model.branches)
    branch_c, branch_taps, oof_nll, oof_acc, oof = {}, {}, {}, {}, []
    bar = tqdm(total=len(names), desc="late head: branches", disable=not progress, leave=False)
    for name in names:
        bar.set_postfix_str(name)
        fitted = fit_branch(model, name, features[name], y, cv, grid=grid,
                            tick=lambda c: bar.set_postfix_str(f"{name}: C={c:g}"))
        bar.update()
        branch_c[name], oof_nll[name], oof_acc[name] = fitted.C, fitted.oof_nll, fitted.oof_acc
        branch_taps[name] = fitted.taps
        oof.append(fitted.oof_log_probs)
        say(f"late head: branch {name}: C={fitted.C:g}, {fitted.taps} tapped levels, "
            f"out-of-fold acc {fitted.oof_acc:.4f}, NLL {fitted.oof_nll:.4f}")
    bar.close()
    log_p = torch.from_numpy(np.stack(oof, axis=1))  # (N, M, K): the branches' out-of-fold log-probabilities
    target = torch.from_numpy(y)
    w, oof_nll["combined"], oof_acc["combined"] = fit_combiner_into(model, log_p, target, cv)
    say(f"late head: combiner out-of-fold acc {oof_acc['combined']:.4f}, NLL {oof_nll['combined']:.4f}; "
        f"weights per branch (mean over classes) "
        + ", ".join(f"{n} {float(w[i].mean()):.2f}" for i, n in enumerate(names)))
    return LateHeadFit(branch_c, {n: w[i].tolist() for i, n in enumerate(names)}, oof_nll, oof_acc, n_folds,
                       time.perf_counter() - t0, branch_taps)


def _checked_inputs(model, features: Mapping[str, torch.Tensor], labels, folds: int) -> tuple[np.ndarray, int]:
    """(labels as an array, the number of folds): the model, the features' branches and the labels checked."""
    fuser = getattr(model, "fuser", None)  # a FusionNet's fusion method (this module sits below FusionNet)
    if not isinstance(fuser, LateFusion) or model.config.head_hidden:
        what = f"fusion={model.config.fusion!r}" if isinstance(fuser, Fuser) else type(model).__name__
        raise ConfigError(f"fit_late_head needs a FusionNet built with fusion='late' and head_hidden=None, got "
                          f"{what}")
    missing = [n for n in model.branches if n not in features]
    if missing:
        raise DataError(f"no features for branch(es) {missing}; features hold {sorted(features)}")
    k = model.config.num_classes
    y = torch.as_tensor(labels).long().numpy()
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise DataError(f"labels must be class indices 0..{k - 1} for this {k}-class model, got values "
                        f"{int(y.min())}..{int(y.max())}")
    counts = np.bincount(y, minlength=k) if len(y) else np.zeros(k, dtype=int)
    if counts.min() < 2:
        rare = int(counts.argmin())
        raise DataError(f"class {rare} has {int(counts[rare])} training sample(s); fitting the late-fusion head "
                        f"needs at least 2 per class for its out-of-fold predictions. Add images of that class")
    return y, int(min(folds, counts.min()))


@dataclass
class BranchFit:
    """One branch classifier of a late-fusion model, fitted: its L2 strength, tapped levels used, and its
    out-of-fold predictions on the training split (what a combiner, or ``fusionnet auto``'s selection, fits on)."""

    C: float
    taps: int
    oof_nll: float
    oof_acc: float
    oof_log_probs: np.ndarray  # (N, K): row i predicted by the fold's classifier that did not train on it


def stacking_cv(labels, seed: int, folds: int = 5):
    """The stratified, shuffled folds of the late head's out-of-fold fits: ``folds``, fewer where the smallest class
    has fewer images, at least 2."""
    from sklearn.model_selection import StratifiedKFold

    n = int(max(2, min(folds, torch.bincount(torch.as_tensor(labels).long()).min())))
    return StratifiedKFold(n_splits=n, shuffle=True, random_state=seed)


def fit_branch(model, name: str, features: torch.Tensor, labels, cv, *, grid: tuple[float, ...] = GRID,
               tick: Callable[[float], None] = lambda c: None) -> BranchFit:
    """Fit the late-fusion ``model``'s classifier of branch ``name`` on its ``features`` (N, D) in place: C (and
    whether the tapped levels help) chosen by out-of-fold NLL under ``cv``, then fitted on every row."""
    i = list(model.branches).index(name)
    y = torch.as_tensor(labels).long().numpy()
    best, taps = _fit_branch(model.branches[name], model.fuser.classifiers[i], features, y,
                             model.config.num_classes, grid, cv, name, tick)
    return BranchFit(best[0], taps, best[1], best[2], best[3])


def _fit_branch(branch, classifier: torch.nn.Linear, features: torch.Tensor, y: np.ndarray, k: int, grid, cv,
                name: str, tick: Callable[[float], None] = lambda c: None):
    """Choose C (and whether the tapped levels help) by out-of-fold NLL, fit on every row and write the classifier
    with the standardisation folded in. Returns (the chosen walk's best, how many tapped levels are used)."""
    x = torch.as_tensor(features).double().numpy()
    if len(x) != len(y):
        raise DataError(f"branch {name!r} has {len(x)} feature rows for {len(y)} labels")
    if not np.isfinite(x).all():
        raise DataError(f"branch {name!r} has NaN or infinite features in {int((~np.isfinite(x)).any(1).sum())} "
                        f"row(s); check the images and the trunk's weights (a NaN in a checkpoint spreads)")
    mean, std, dead = _standardisation(x)
    z = ((x - mean) / std).astype(np.float32)  # solved in float32
    z[:, dead] = 0.0  # no signal float32 inference can resolve: these features get weight 0
    levels = branch.levels()
    main = np.arange(z.shape[1])[levels[0]]
    path: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    best, cols, taps = _choose(z[:, main], y, k, grid, cv, tick, path=path), main, 0
    if len(levels) > 1:  # with every tapped level, kept if that lowers the out-of-fold NLL
        trial_grid = [c for c in grid if c >= best[0] / 10]  # more features: C rarely drops
        w, b = path[min(trial_grid)]  # warm start: the main level's fit at that C, the tapped levels at 0
        start = (torch.zeros(len(w), z.shape[1], k).index_copy_(1, torch.from_numpy(main), w), b)
        trial = _choose(z, y, k, trial_grid, cv, tick, start=start)
        if trial[1] < best[1]:
            best, cols, taps = trial, np.arange(z.shape[1]), len(levels) - 1
    weight = np.zeros((k, z.shape[1]))
    weight[:, cols], bias = _fit(z[:, cols], y, k, best[0], best[4])  # levels left out keep weight 0
    weight = weight / std  # fold the standardisation in: W (x - m) / s + b = (W / s) x + (b - (W / s) m)
    _copy(classifier, weight, bias - weight @ mean)
    return best, taps


def _standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, dead) per feature column of ``x`` (N, D). A feature is dead when its spread is below
    ``MIN_SPREAD`` (1e-5) of its own magnitude or of the branch's typical feature (the RMS of all of them): then its
    variation is float32 rounding, of the input or of the trunk's own arithmetic, which changes with the batch
    size. Standardising it would multiply that noise by up to 1/std (weights of 5e6 on the features of weak plain
    torchvision members, whose answers then changed with the batch); it gets weight 0 instead."""
    mean, std = x.mean(0), x.std(0)
    scale = float(np.sqrt((x ** 2).mean())) if x.size else 0.0
    dead = std <= MIN_SPREAD * np.maximum(np.abs(mean), scale)
    std = np.where(dead, 1.0, std)
    return mean, std, dead


def fit_combiner_into(model, log_p: torch.Tensor, target: torch.Tensor, cv) -> tuple[torch.Tensor, float, float]:
    """Fit the combiner on branch log-probabilities ``log_p`` (N, M, K) and write it into ``model.head.fc``;
    returns (its weights (M, K), its own out-of-fold NLL and accuracy under ``cv``)."""
    nll, acc = combiner_oof(log_p, target, cv)
    w, b = solve_combiner(log_p, target)
    weight = torch.cat([torch.diag(w_m) for w_m in w], dim=1)  # (K, M*K) over [log p_1 ... log p_M]
    _copy(model.head.fc, weight.numpy(), b.numpy())
    return w, nll, acc


def combiner_oof(log_p: torch.Tensor, target: torch.Tensor, cv, pull: float = PULL) -> tuple[float, float]:
    """The combiner's own out-of-fold (NLL, accuracy) over the branches' out-of-fold log-probabilities."""
    held_out = torch.zeros(len(target), log_p.shape[2], dtype=torch.float64)
    for fit_idx, test_idx in cv.split(np.zeros(len(target)), target.numpy()):
        w, b = solve_combiner(log_p[fit_idx], target[fit_idx], pull)
        held_out[test_idx] = (log_p[test_idx] * w).sum(1) + b
    lp = held_out.log_softmax(1)
    return float(-lp[torch.arange(len(target)), target].mean()), float((lp.argmax(1) == target).double().mean())


def solve_combiner(log_p: torch.Tensor, target: torch.Tensor, pull: float = PULL
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w (M, K) >= 0, b (K,)) minimising NLL of sum_m w[m, k] log p_m(k) + b_k, plus ``pull`` * |w - 1/M|^2."""
    m, k = log_p.shape[1:]
    start = 1.0 / m
    u = torch.full((m, k), float(np.log(np.expm1(start))), dtype=torch.float64, requires_grad=True)  # softplus^-1
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([u, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        check_cancelled()
        opt.zero_grad()
        w = torch.nn.functional.softplus(u)
        logits = (log_p * w).sum(1) + b
        loss = torch.nn.functional.cross_entropy(logits, target) + pull * ((w - start) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.nn.functional.softplus(u).detach(), b.detach()


def _solve(x: torch.Tensor, y: torch.Tensor, fit_mask: torch.Tensor, w: torch.Tensor, b: torch.Tensor, c: float,
           tol: float = 1e-6) -> None:
    """Multinomial logistic regressions, one per row of ``fit_mask`` (F, N), all solved at once by one L-BFGS, in
    place from the given start (warm starts along the C path). Each minimises scikit-learn's objective
    ``sum_i CE_i + |W|^2 / (2C)`` over its fitted rows (the bias unpenalised); the sum over F separate problems has
    their optima as its own. x (N, D), y (N,), w (F, D, K), b (F, K)."""
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=MAX_ITER, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")
    weight = fit_mask.to(x.dtype) / len(y)  # (F, N): each fitted row once, scaled for the solver's tolerances
    target = y.expand(len(fit_mask), -1)

    def closure():
        check_cancelled()
        opt.zero_grad()
        logits = torch.einsum("nd,fdk->fkn", x, w) + b[:, :, None]  # (F, K, N)
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")  # (F, N)
        loss = (ce * weight).sum() + (w * w).sum() / (2 * c * len(y))
        loss.backward()
        return loss

    opt.step(closure)
    w.requires_grad_(False)
    b.requires_grad_(False)


def _folds(cv, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit mask (F, N), the fold each row is held out in (N,)) of a cross-validation splitter."""
    splits = list(cv.split(x, y))
    fit_mask = torch.zeros(len(splits), len(y), dtype=torch.bool)
    held_in = torch.empty(len(y), dtype=torch.long)
    for f, (fit_idx, test_idx) in enumerate(splits):
        fit_mask[f, torch.from_numpy(fit_idx)] = True
        held_in[torch.from_numpy(test_idx)] = f
    return fit_mask, held_in


def _choose(x: np.ndarray, y: np.ndarray, k: int, grid, cv, tick: Callable[[float], None] = lambda c: None, *,
            start: tuple[torch.Tensor, torch.Tensor] | None = None,
            path: dict[float, tuple[torch.Tensor, torch.Tensor]] | None = None
            ) -> tuple[float, float, float, np.ndarray]:
    """(C, out-of-fold NLL, out-of-fold accuracy, out-of-fold log-probs (N, K)) for the C of lowest NLL.

    The grid is walked from strong to weak regularisation, every fold solved at once for each C (:func:`_solve`),
    warm-started from the previous C (the first from ``start``, the folds' (weights (F, D, K), biases (F, K)), or
    0), and the walk stops once the NLL has risen twice in a row (it is unimodal in C in practice). ``path``, a
    dict, receives each C's fitted fold weights."""
    fit_mask, held_in = _folds(cv, x, y)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    w = start[0].clone() if start else xt.new_zeros(len(fit_mask), x.shape[1], k)
    b = start[1].clone() if start else xt.new_zeros(len(fit_mask), k)
    rows = torch.arange(len(y))
    best, worse = None, 0
    for c in sorted(grid):
        tick(c)
        _solve(xt, yt, fit_mask, w, b, c, tol=WALK_TOL)
        if path is not None:
            path[float(c)] = (w.clone(), b.clone())
        with torch.no_grad():
            logits = torch.einsum("nd,fdk->fnk", xt, w) + b[:, None]  # (F, N, K)
        lp = logits[held_in, rows].double().log_softmax(1).numpy()  # each row by the fold that held it out
        score = float(-lp[np.arange(len(y)), y].mean())
        if best is None or score < best[1]:
            best, worse = (float(c), score, float((lp.argmax(1) == y).mean()), lp, (w.mean(0), b.mean(0))), 0
        else:
            worse += 1
            if worse == 2:
                break
    return best


def _fit(x: np.ndarray, y: np.ndarray, k: int, c: float, start) -> tuple[np.ndarray, np.ndarray]:
    """(weight (K, D), bias (K,)) of the logistic regression on all of x, from ``start`` (the folds' mean); in
    float64, once per branch: the weights the model keeps are solved to scikit-learn's precision."""
    w, b = (t.double()[None] for t in start)
    _solve(torch.from_numpy(x).double(), torch.from_numpy(y).long(), torch.ones(1, len(y), dtype=torch.bool), w, b,
           c)
    return w[0].T.double().numpy(), b[0].double().numpy()


@torch.no_grad()
def _copy(linear: torch.nn.Linear, weight: np.ndarray, bias: np.ndarray) -> None:
    linear.weight.copy_(torch.from_numpy(weight).to(linear.weight.dtype))
    linear.bias.copy_(torch.from_numpy(bias).to(linear.bias.dtype))


CLOSED_FORM_FITS: dict[type, Callable] = {LateFusion: fit_late_head}  # fusion class -> its closed-form fit


def closed_form_fusion() -> str:
    """The registered fusion method whose model is fitted in closed form on frozen features (the first with a fit
    here: ``late``): what the ``late_oof`` variant, ``fuse``'s closed-form head, cross-fitting and ``auto`` build."""
    for name, cls in FUSIONS.items():
        if cls in CLOSED_FORM_FITS:
            return name
    raise ConfigError("no registered fusion method has a closed-form fit")


def fit_closed_form(model, features: Mapping[str, torch.Tensor], labels: torch.Tensor, **options):
    """Fit ``model``'s fusion method and head on frozen ``features`` in closed form (``late``:
    :func:`fit_late_head`, whose keywords ``options`` are), in place."""
    fit = CLOSED_FORM_FITS.get(type(getattr(model, "fuser", None)))
    if fit is None:
        able = [n for n, c in FUSIONS.items() if c in CLOSED_FORM_FITS]
        raise ConfigError(f"fusion {model.config.fusion!r} has no closed-form fit; train it with fusionnet.fit, or "
                          f"build the model with a method that has one: {', '.join(able)}")
    return fit(model, features, labels, **options)
