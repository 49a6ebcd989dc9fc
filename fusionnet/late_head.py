"""Fit the head of a ``late``-fusion FusionNet on frozen branch features: stacking inside the network.

Stacking (Wolpert 1992; the "super learner" of van der Laan et al. 2007), with every part inside one model:

1. per branch, a multinomial logistic regression on its standardised pooled features, the L2 strength chosen
   from a grid by out-of-fold NLL (stratified k-fold cross-validation on the training split); a branch built
   with ``taps`` (pooled outputs of earlier trunk levels, :class:`fusionnet.fusion.BranchConfig`) uses them too
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

from fusionnet.errors import ConfigError, DataError

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)  # branch classifiers: inverse L2 strength
# on standardised features, walked upwards until the out-of-fold NLL has risen twice
PULL = 1e-2  # the combiner's L2 pull towards equal weights 1/M


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


def fit_closed_form_on(model, splits, *, cache_dir, device: str = "auto", seed: int = 0,
                       log: Callable[[str], None] | None = None, num_workers: int = 0):
    """The fusion method's closed-form fit (:meth:`fusionnet.fusers.Fuser.fit_closed_form`; ``late``:
    :func:`fit_late_head`) on the training images of ``splits`` (a :class:`fusionnet.data.Splits`), seen through
    the validation pipeline (un-augmented, as the frozen-trunk feature cache trains), features from the cache."""
    from fusionnet.data import eval_view
    from fusionnet.feature_cache import cached_features

    train = eval_view(splits.train, splits.val)
    feats, _ = cached_features(model, train, cache_dir=cache_dir, device=device, batch_size=64,
                               num_workers=num_workers)
    return model.fuser.fit_closed_form(model, feats.features, feats.targets, seed=seed, log=log)


def fit_late_head(model, features: Mapping[str, torch.Tensor], labels: torch.Tensor, *, folds: int = 5,
                  seed: int = 0, grid: tuple[float, ...] = GRID,
                  log: Callable[[str], None] | None = None) -> LateHeadFit:
    """Fit ``model``'s branch classifiers and combiner on ``features`` ({branch: (N, D_i)}, e.g. a
    :class:`~fusionnet.feature_cache.FeatureDataset`'s ``.features``) with ``labels`` (N,), in place."""
    from sklearn.model_selection import StratifiedKFold

    t0 = time.perf_counter()
    from fusionnet.fusers import LateFusion
    from fusionnet.fusion import FusionNet

    if not isinstance(model, FusionNet) or not isinstance(model.fuser, LateFusion) or model.config.head_hidden:
        what = f"fusion={model.config.fusion!r}" if isinstance(model, FusionNet) else type(model).__name__
        raise ConfigError(f"fit_late_head needs a FusionNet built with fusion='late' and head_hidden=None, got "
                          f"{what}")
    config = model.config
    names = list(model.branches)
    missing = [n for n in names if n not in features]
    if missing:
        raise DataError(f"no features for branch(es) {missing}; features hold {sorted(features)}")
    k = config.num_classes
    y = torch.as_tensor(labels).long().numpy()
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise DataError(f"labels must be class indices 0..{k - 1} for this {k}-class model, got values "
                        f"{int(y.min())}..{int(y.max())}")
    counts = np.bincount(y, minlength=k) if len(y) else np.zeros(k, dtype=int)
    if counts.min() < 2:
        rare = int(counts.argmin())
        raise DataError(f"class {rare} has {int(counts[rare])} training sample(s); fitting the late-fusion head "
                        f"needs at least 2 per class for its out-of-fold predictions. Add images of that class")
    n_folds = int(min(folds, counts.min()))
    cv = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    say = log or (lambda _m: None)

    branch_c, branch_taps, oof_nll, oof_acc, oof = {}, {}, {}, {}, []
    for name, classifier in zip(names, model.fuser.classifiers):
        x = torch.as_tensor(features[name]).double().numpy()
        if len(x) != len(y):
            raise DataError(f"branch {name!r} has {len(x)} feature rows for {len(y)} labels")
        if not np.isfinite(x).all():
            raise DataError(f"branch {name!r} has NaN or infinite features in {int((~np.isfinite(x)).any(1).sum())} "
                            f"row(s); check the images and the trunk's weights (a NaN in a checkpoint spreads)")
        mean, std = x.mean(0), x.std(0)
        std[std < 1e-12] = 1.0
        z = ((x - mean) / std).astype(np.float32)  # scikit-learn's solver keeps float32: 1.5x faster than
        # float64 here, the same C and out-of-fold NLL to 1e-4 (flowers5_128, 2935 x 1984 Lite0 features)
        levels = model.branches[name].levels()
        main = np.arange(z.shape[1])[levels[0]]
        best, cols = _choose(z[:, main], y, k, grid, cv), main
        branch_taps[name] = 0
        if len(levels) > 1:  # with every tapped level, kept if that lowers the out-of-fold NLL
            trial = _choose(z, y, k, [c for c in grid if c >= best[0] / 10], cv)  # more features: C rarely drops
            if trial[1] < best[1]:
                best, cols, branch_taps[name] = trial, np.arange(z.shape[1]), len(levels) - 1
        branch_c[name], oof_nll[name], oof_acc[name] = best[0], best[1], best[2]
        oof.append(best[3])
        weight = np.zeros((k, z.shape[1]))
        weight[:, cols], bias = _fit(z[:, cols], y, k, best[0])  # levels left out keep weight 0
        weight = weight / std  # fold the standardisation in: W (x - m) / s + b = (W / s) x + (b - (W / s) m)
        _copy(classifier, weight, bias - weight @ mean)
        say(f"late head: branch {name}: C={best[0]:g}, {branch_taps[name]} tapped levels, "
            f"out-of-fold acc {best[2]:.4f}, NLL {best[1]:.4f}")

    log_p = torch.from_numpy(np.stack(oof, axis=1))  # (N, M, K): the branches' out-of-fold log-probabilities
    target = torch.from_numpy(y)
    held_out = torch.zeros(len(y), k, dtype=torch.float64)
    for fit_idx, test_idx in cv.split(np.zeros(len(y)), y):  # the combiner's own out-of-fold score
        w, b = _fit_combiner(log_p[fit_idx], target[fit_idx])
        held_out[test_idx] = (log_p[test_idx] * w).sum(1) + b
    lp = held_out.log_softmax(1)
    oof_nll["combined"] = float(-lp[torch.arange(len(y)), target].mean())
    oof_acc["combined"] = float((lp.argmax(1) == target).double().mean())
    w, b = _fit_combiner(log_p, target)

    weight = torch.cat([torch.diag(w_m) for w_m in w], dim=1)  # (K, M*K) over [log p_1 ... log p_M]
    _copy(model.head.fc, weight.numpy(), b.numpy())
    say(f"late head: combiner out-of-fold acc {oof_acc['combined']:.4f}, NLL {oof_nll['combined']:.4f}; "
        f"weights per branch (mean over classes) "
        + ", ".join(f"{n} {float(w[i].mean()):.2f}" for i, n in enumerate(names)))
    return LateHeadFit(branch_c, {n: w[i].tolist() for i, n in enumerate(names)}, oof_nll, oof_acc, n_folds,
                       time.perf_counter() - t0, branch_taps)


def _fit_combiner(log_p: torch.Tensor, target: torch.Tensor, pull: float = PULL
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w (M, K) >= 0, b (K,)) minimising NLL of sum_m w[m, k] log p_m(k) + b_k, plus ``pull`` * |w - 1/M|^2."""
    m, k = log_p.shape[1:]
    start = 1.0 / m
    u = torch.full((m, k), float(np.log(np.expm1(start))), dtype=torch.float64, requires_grad=True)  # softplus^-1
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([u, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        w = torch.nn.functional.softplus(u)
        logits = (log_p * w).sum(1) + b
        loss = torch.nn.functional.cross_entropy(logits, target) + pull * ((w - start) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.nn.functional.softplus(u).detach(), b.detach()


def _logreg(c: float, warm_start: bool = False):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=1000, warm_start=warm_start)


def _quiet_fit(model, x: np.ndarray, y: np.ndarray):
    """Fit, without the warning for stopping at max_iter: with weak regularisation on separable features the
    solver converges slowly, and a near-optimum is close enough (C is chosen by out-of-fold NLL)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def _log_probs(decision: np.ndarray) -> np.ndarray:
    """scikit-learn's decision values as (N, K) log-probabilities (binary: one column z means logits [0, z])."""
    if decision.ndim == 1:
        decision = np.stack([np.zeros_like(decision), decision], axis=1)
    return torch.from_numpy(decision).log_softmax(dim=1).numpy()


def _choose(x: np.ndarray, y: np.ndarray, k: int, grid, cv) -> tuple[float, float, float, np.ndarray]:
    """(C, out-of-fold NLL, out-of-fold accuracy, out-of-fold log-probs (N, K)) for the C of lowest NLL.

    The grid is walked from strong to weak regularisation, each fold's model warm-started from the previous C,
    and the walk stops once the NLL has risen twice in a row (it is unimodal in C in practice)."""
    splits = list(cv.split(x, y))
    models = [_logreg(grid[0], warm_start=True) for _ in splits]
    best, worse = None, 0
    for c in sorted(grid):
        decision = None
        for model, (fit_idx, test_idx) in zip(models, splits):
            _quiet_fit(model.set_params(C=c), x[fit_idx], y[fit_idx])
            d = model.decision_function(x[test_idx])
            if decision is None:
                decision = np.zeros((len(y),) + d.shape[1:])
            decision[test_idx] = d
        lp = _log_probs(decision)
        score = float(-lp[np.arange(len(y)), y].mean())
        if best is None or score < best[1]:
            best, worse = (float(c), score, float((lp.argmax(1) == y).mean()), lp), 0
        else:
            worse += 1
            if worse == 2:
                break
    return best


def _fit(x: np.ndarray, y: np.ndarray, k: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight (K, D), bias (K,)) of a logistic regression on all of x."""
    lr = _quiet_fit(_logreg(c), x, y)
    if k == 2:  # one decision column z: logits [0, z]
        return np.vstack([np.zeros_like(lr.coef_), lr.coef_]), np.concatenate([[0.0], lr.intercept_])
    return lr.coef_, lr.intercept_


@torch.no_grad()
def _copy(linear: torch.nn.Linear, weight: np.ndarray, bias: np.ndarray) -> None:
    linear.weight.copy_(torch.from_numpy(weight).to(linear.weight.dtype))
    linear.bias.copy_(torch.from_numpy(bias).to(linear.bias.dtype))
