"""Per-branch diagnostics of a FusionNet: what does each backbone contribute?

* :func:`branch_ablation`: accuracy of the trained head when one branch's features are replaced by their mean over
  the data (mean ablation: the head keeps its input scale, the branch loses its information), and when only one
  branch is kept.
* :func:`linear_probes`: a logistic-regression probe per branch and on the concatenation, fitted on one split and
  scored on another (scikit-learn).
* :func:`embedding_2d`: a t-SNE map of pooled features, for plots.

All work from pooled features ``{branch: (N, D_i)}`` as :func:`fusionnet.feature_cache.compute_features` returns.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch


@torch.no_grad()
def branch_ablation(model, features: Mapping[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """{"all": acc, "without <b>": acc, "only <b>": acc} of ``model.forward_head`` under mean ablation."""
    model.eval()
    device = next(model.parameters()).device  # features go where the model lives
    features = {n: f.to(device) for n, f in features.items()}
    labels = torch.as_tensor(labels).to(device)
    means = {n: f.mean(0, keepdim=True).expand_as(f) for n, f in features.items()}

    def acc(feats) -> float:
        return float((model.forward_head(dict(feats)).argmax(1) == labels).float().mean())

    out = {"all": acc(features)}
    for name in features:
        out[f"without {name}"] = acc({n: (means[n] if n == name else f) for n, f in features.items()})
        out[f"only {name}"] = acc({n: (f if n == name else means[n]) for n, f in features.items()})
    return out


def linear_probes(train: Mapping[str, torch.Tensor], train_labels, test: Mapping[str, torch.Tensor], test_labels,
                  *, c: float = 1.0) -> dict[str, float]:
    """Test accuracy of a standardised logistic-regression probe on each branch's features and on all of them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def probe(x_tr: np.ndarray, x_te: np.ndarray) -> float:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
        clf.fit(x_tr, np.asarray(train_labels))
        return float(clf.score(x_te, np.asarray(test_labels)))

    out = {name: probe(train[name].numpy(), test[name].numpy()) for name in train}
    out["concatenated"] = probe(torch.cat(list(train.values()), 1).numpy(), torch.cat(list(test.values()), 1).numpy())
    return out


def embedding_2d(features: torch.Tensor, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """(N, D) -> (N, 2) with scikit-learn's t-SNE (perplexity capped below N)."""
    from sklearn.manifold import TSNE

    x = features.numpy()
    return TSNE(n_components=2, perplexity=min(perplexity, (len(x) - 1) / 3), random_state=seed,
                init="pca").fit_transform(x)
