"""Per-branch diagnostics of a FusionNet: what does each backbone contribute?

* :func:`branch_ablation`: accuracy of the trained head when one branch's features are replaced by their mean over
  the data (mean ablation: the head keeps its input scale, the branch loses its information), and when only one
  branch is kept.
* :func:`linear_probes`: a logistic-regression probe per branch and on the concatenation, fitted on one split and
  scored on another (scikit-learn).
* :func:`embedding_2d`: a t-SNE map of pooled features, for plots.
* :func:`linear_cka` / :func:`cka_matrix`: how similar two branches' representations are (1: the same up to rotation
  and scale), so redundant branches show as a bright block.
* :func:`per_class_accuracy`: where each branch (probe or head) and the fusion are right, class by class.
* :func:`grad_cam`: where in the image each branch looks for the predicted class.

All work from pooled features ``{branch: (N, D_i)}`` as :func:`fusionnet.engine.feature_cache.compute_features` returns.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from fusionnet.errors import DataError


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


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al., 2019) between two representations of the same N samples,
    (N, D1) and (N, D2): 1 for identical representations, invariant to orthogonal transforms and isotropic scaling."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise DataError(f"expected (N, D1) and (N, D2) features of the same samples, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-300))


def cka_matrix(features: Mapping[str, torch.Tensor]) -> tuple[list[str], np.ndarray]:
    """(branch names, (M, M) linear CKA between every pair of branches' features)."""
    names = list(features)
    m = np.ones((len(names), len(names)))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            m[i, j] = m[j, i] = linear_cka(features[a], features[names[j]])
    return names, m


def per_class_accuracy(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Recall per class (NaN for a class without samples): where each predictor is right."""
    pred, labels = torch.as_tensor(probs).argmax(1), torch.as_tensor(labels)
    return [float((pred[labels == k] == k).double().mean()) if (labels == k).any() else float("nan")
            for k in range(num_classes)]


def grad_cam(model, images: torch.Tensor, branch: str, target: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) on one branch's last feature map: (B, 3, H, W) -> (B, H, W) in [0, 1].

    The class scored is ``target`` (B,) or the model's prediction; gradients flow to the branch's trunk output
    even when the trunk is frozen. Needs a branch whose trunk outputs a (B, C, h, w) map.
    """
    br = model.branches[branch]
    if br.pool.layout != "NCHW":
        raise DataError(f"Grad-CAM needs a convolutional (B, C, h, w) feature map; branch {branch!r} outputs "
                         f"{br.pool.layout}")
    model.eval()
    device = next(model.parameters()).device
    images = images.to(device)
    with torch.enable_grad():
        fmaps = {name: b.feature_map(images).detach() for name, b in model.branches.items()}
        fmaps[branch].requires_grad_(True)  # a leaf: its gradient exists even when the trunk is frozen
        feats = {name: model.branches[name].pool(f) for name, f in fmaps.items()}
        logits = model.forward_head(feats)
        cls = logits.argmax(1) if target is None else torch.as_tensor(target, device=device)
        logits.gather(1, cls[:, None]).sum().backward()
    fmap, grad = fmaps[branch].detach(), fmaps[branch].grad
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): each channel's importance
    cam = torch.relu((weights * fmap).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = torch.nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).cpu()
