"""Stacking: a meta-learner (scikit-learn) on the members' validation probabilities, scored out of fold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from fusionnet.utils.probabilities import check_stack
from fusionnet.errors import ConfigError, DataError
from fusionnet.utils.metrics import accuracy, nll


@dataclass
class StackingResult:
    test_probs: torch.Tensor  # (N_test, K) from the meta-learner fitted on all of val
    cv_acc: float  # honest estimate: out-of-fold accuracy on val
    cv_nll: float
    meta: object  # the fitted scikit-learn estimator


def _meta_learner(method: str, seed: int):
    if method == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=2000, C=1.0)
    if method == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, random_state=seed)
    raise ConfigError(f"unknown stacking meta-learner {method!r}; choose 'logreg' or 'hgb'")


def stacking(val: torch.Tensor, val_labels: torch.Tensor, test: torch.Tensor, *, method: str = "logreg",
             cv: int = 5, seed: int = 0) -> StackingResult:
    """A meta-learner on the members' concatenated probabilities (features (N, M*K)).

    It is fitted on the validation split only: out-of-fold predictions (stratified ``cv`` folds on val) give an
    honest score, then a final fit on all of val predicts ``test``. Test labels are never an input.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    val, val_labels = check_stack(val, val_labels, "validation")
    test, _ = check_stack(test, None, "test")
    x_val = rearrange(val, "m n k -> n (m k)").numpy()  # each sample: its members' probabilities side by side
    x_test = rearrange(test, "m n k -> n (m k)").numpy()
    y = val_labels.numpy()
    present = np.bincount(y)[np.bincount(y) > 0]
    n_folds = min(cv, int(present.min()))
    if n_folds < 2:
        raise DataError(f"stacking needs at least 2 validation samples of every class for its out-of-fold "
                        f"score; the rarest class has {int(present.min())}. Use a larger validation split")
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    k = val.shape[2]
    oof_t = _full_columns(cross_val_predict(_meta_learner(method, seed), x_val, y, cv=folds,
                                            method="predict_proba"), np.unique(y), k)
    meta = _meta_learner(method, seed).fit(x_val, y)
    test_probs = _full_columns(meta.predict_proba(x_test), meta.classes_, k)
    return StackingResult(test_probs.float(), accuracy(oof_t, val_labels), nll(oof_t, val_labels), meta)


def _full_columns(probs: np.ndarray, classes: np.ndarray, k: int) -> torch.Tensor:
    """scikit-learn's columns cover the classes seen in fitting; put them at their class index among all K."""
    out = torch.zeros(len(probs), k, dtype=torch.float64)
    out[:, torch.as_tensor(classes, dtype=torch.long)] = torch.from_numpy(probs).double()
    return out


