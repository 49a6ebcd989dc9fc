"""The domain-gap check: why does test accuracy sit below train and validation accuracy?

Two image folders side by side (``root/<class>/*`` or a flat folder of images):

* pixels and files: image size and aspect ratio, colour mode and file format, per-channel mean/std, brightness,
  class balance;
* features: a pretrained trunk's pooled features; a domain classifier (logistic regression, stratified 5-fold
  cross-validation) gives the AUC of telling the folders apart (0.5: indistinguishable), and the classes whose
  feature centroids moved most;
* a short verdict naming likely causes (resolution, colour, crop/aspect, class prior) and a PNG of the
  distributions.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fusionnet.utils.images import IMAGE_EXTENSIONS, images_in, read_rgb
from fusionnet.errors import DataError
from fusionnet.utils.files import resolve_path


@dataclass
class FolderStats:
    n: int
    classes: dict[str, int]
    sizes: list[tuple[int, int]] = field(repr=False)  # (width, height) per image
    modes: dict[str, int]
    formats: dict[str, int]
    channel_mean: list[float]
    channel_std: list[float]
    brightness: list[float] = field(repr=False)  # mean luminance per image, 0..1


def _images(source: str | os.PathLike, limit: int, seed: int) -> tuple[list[tuple[str, str]], int, str]:
    """((path, class) pairs, how many images the source has, where they are), in path order: a folder's class
    sub-folders when there are any, else the folder itself as one class; or the rows of a table or Hugging Face
    dataset, all of them or one split (``labels.csv#test``); at most ``limit`` of them, an even sample."""
    files, where = _listed(str(source)), str(source)
    if files is None:
        root = resolve_path(source, what="image folder")
        files, where = [(f, Path(f).parent.name if Path(f).parent != root else "") for f in images_in(root)], str(root)
    if not files:
        raise DataError(f"no images in {str(source)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if len(files) > limit:  # an even sample: a fixed seed, so reruns agree
        keep = np.random.default_rng(seed).choice(len(files), size=limit, replace=False)
        return [files[i] for i in sorted(keep)], len(files), where
    return files, len(files), where


def _listed(spec: str) -> list[tuple[str, str]] | None:
    """The (path, class) rows of a table or Hugging Face dataset ``spec`` (``source`` or ``source#split``), sorted
    by path; None where ``spec`` is a folder."""
    from fusionnet.data.splits import table_of

    source, _, split = spec.partition("#")
    table = table_of(source)
    if table is None:
        return None
    parts = {"train": table.train, "val": table.val or [], "test": table.test or []}
    if split and split not in parts:
        raise DataError(f"{spec!r}: unknown split {split!r}; use {source}#train, #val or #test")
    rows = parts[split] if split else [r for part in parts.values() for r in part]
    return sorted((path, table.class_names[y]) for path, y in rows)


def readable(files: list[tuple[str, str]], strict: bool = False) -> list[tuple[str, str]]:
    """The files PIL can decode; the others refused (``strict``) or left out with one warning naming them."""
    from fusionnet.data.datasets import report_skipped, unreadable

    found = {path: unreadable(path) for path, _ in files}
    good, skipped = [f for f in files if found[f[0]] is None], [s for s in found.values() if s is not None]
    report_skipped(skipped, strict)
    if not good:
        raise DataError(f"no readable image among {len(files)} (e.g. {skipped[0].path!r}: {skipped[0].reason})")
    return good


def folder_stats(files: list[tuple[str, str]], size: int = 64) -> tuple[FolderStats, np.ndarray]:
    """Statistics of the images, and the images resized to ``size`` as (N, size, size, 3) uint8 for features."""
    sizes, modes, formats, bright, means, sq, pixels = [], Counter(), Counter(), [], np.zeros(3), np.zeros(3), []
    for path, _ in files:
        with Image.open(path) as img:
            modes[img.mode] += 1
            formats[img.format or "?"] += 1
        rgb = read_rgb(path)
        sizes.append((rgb.shape[1], rgb.shape[0]))  # (width, height) as shown: upright by EXIF orientation
        small = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
        pixels.append(small)
        x = small.reshape(-1, 3) / 255.0
        means += x.mean(0)
        sq += (x ** 2).mean(0)
        bright.append(float((x @ np.array([0.299, 0.587, 0.114])).mean()))
    n = len(files)
    mean = means / n
    std = np.sqrt(np.maximum(sq / n - mean ** 2, 0))
    stats = FolderStats(n, dict(Counter(c for _, c in files)), sizes, dict(modes), dict(formats), mean.tolist(),
                        std.tolist(), bright)
    return stats, np.stack(pixels)


@torch.no_grad()
def trunk_features(pixels: np.ndarray, backbone: str, pretrained: bool) -> np.ndarray:
    from fusionnet.models.factory import create_fusionnet

    model = create_fusionnet([backbone], num_classes=2, pretrained=pretrained).eval()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    (branch,) = model.branches  # its name, which for a timm name is not the name given ('timm/x' -> 'x')
    return torch.cat([model.forward_branches(b)[branch] for b in x.split(64)]).numpy()


def domain_auc(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic regression telling features ``a`` from features ``b``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = np.concatenate([a, b]), np.r_[np.zeros(len(a)), np.ones(len(b))]
    folds = StratifiedKFold(n_splits=min(5, len(a), len(b)), shuffle=True, random_state=seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return float(roc_auc_score(y, cross_val_predict(clf, x, y, cv=folds, method="predict_proba")[:, 1]))


def class_shift(fa: np.ndarray, ca: list[str], fb: np.ndarray, cb: list[str]) -> dict[str, float]:
    """Per class present in both: cosine distance between its feature centroids in the two folders, largest first."""
    out = {}
    for c in sorted(set(ca) & set(cb)):
        ma = fa[np.array(ca) == c].mean(0)
        mb = fb[np.array(cb) == c].mean(0)
        out[c] = float(1 - ma @ mb / max(np.linalg.norm(ma) * np.linalg.norm(mb), 1e-12))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def verdict(a: FolderStats, b: FolderStats, auc: float) -> list[str]:
    """Likely causes, in words, from the statistics of the two folders."""
    causes = []
    area = lambda s: float(np.median([w * h for w, h in s.sizes])) ** 0.5  # noqa: E731
    ratio = area(b) / area(a)
    if ratio > 1.5 or ratio < 1 / 1.5:
        causes.append(f"resolution: median image side {area(a):.0f} px vs {area(b):.0f} px (x{ratio:.2f})")
    aspect = lambda s: float(np.median([w / h for w, h in s.sizes]))  # noqa: E731
    if abs(np.log(aspect(b) / aspect(a))) > 0.15:
        causes.append(f"crop / aspect ratio: median width/height {aspect(a):.2f} vs {aspect(b):.2f}")
    colour_gap = float(np.abs(np.subtract(a.channel_mean, b.channel_mean)).max())
    grey = lambda s: sum(v for m, v in s.modes.items() if m in ("L", "LA", "1", "I", "I;16")) / s.n  # noqa: E731
    if colour_gap > 0.08 or abs(grey(a) - grey(b)) > 0.2:
        causes.append(f"colour: channel means differ by up to {colour_gap:.2f} (RGB means {_fmt(a.channel_mean)} vs "
                      f"{_fmt(b.channel_mean)}); greyscale share {grey(a):.0%} vs {grey(b):.0%}")
    bright_gap = float(np.mean(b.brightness) - np.mean(a.brightness))
    if abs(bright_gap) > 0.08:
        causes.append(f"brightness: mean luminance {np.mean(a.brightness):.2f} vs {np.mean(b.brightness):.2f}")
    classes = sorted(set(a.classes) | set(b.classes))
    if len(classes) > 1:
        pa = np.array([a.classes.get(c, 0) / a.n for c in classes])
        pb = np.array([b.classes.get(c, 0) / b.n for c in classes])
        tv = 0.5 * float(np.abs(pa - pb).sum())
        if tv > 0.15:
            causes.append(f"class prior: class proportions differ (total variation {tv:.2f})")
    for fmt in sorted(set(a.formats) | set(b.formats)):  # a cause needs a size: a share that differs by 10 points
        na, nb = a.formats.get(fmt, 0), b.formats.get(fmt, 0)
        if abs(na / a.n - nb / b.n) > 0.10:
            causes.append(f"file format: {fmt} is {na / a.n:.0%} of train ({na} of {a.n}) vs {nb / b.n:.0%} of test "
                          f"({nb} of {b.n})")
    if auc > 0.75 and not causes:
        causes.append("content: the features tell the folders apart (AUC above 0.75) though no pixel statistic does")
    return causes


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in v) + ")"


@dataclass(frozen=True)
class GapSettings:
    """How :func:`gap_check` compares two folders."""

    backbone: str = "efficientnet_lite0"  # the pretrained trunk whose features tell the folders apart
    pretrained: bool = True
    size: int = 128  # images resized to this for the features
    max_images: int = 500  # sampled per folder (an even, seeded sample)
    seed: int = 0
    strict: bool = False  # refuse unreadable images (naming them) instead of leaving them out with one warning


def gap_check(train: str | os.PathLike, test: str | os.PathLike, settings: GapSettings = GapSettings(), *,
              out: str | os.PathLike | None = None) -> dict:
    """Compare two folders; returns (and with ``out`` writes ``gap.json``, ``gap.md``, ``gap.png``) the report."""
    s = settings
    backbone, pretrained, size, max_images, seed, strict = (s.backbone, s.pretrained, s.size, s.max_images, s.seed,
                                                            s.strict)
    found = [_images(source, max_images, seed) for source in (train, test)]
    files = [readable(f, strict) for f, _, _ in found]
    (sa, pa), (sb, pb) = (folder_stats(f, size) for f in files)
    fa, fb = (trunk_features(p, backbone, pretrained) for p in (pa, pb))
    auc = domain_auc(fa, fb, seed)
    shift = class_shift(fa, [c for _, c in files[0]], fb, [c for _, c in files[1]])
    causes = verdict(sa, sb, auc)
    report = {"train": found[0][2], "test": found[1][2], "backbone": backbone, "domain_auc": auc,
              "class_shift": shift, "causes": causes,
              "images": {"train": {"sampled": len(files[0]), "found": found[0][1]},
                         "test": {"sampled": len(files[1]), "found": found[1][1]}},
              "stats": {"train": _summary(sa), "test": _summary(sb)}}
    if out is not None:
        from fusionnet.utils.files import atomic_write_json, atomic_write_text
        from fusionnet.utils.plots import gap_figure

        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out) / "gap.json", report)
        atomic_write_text(Path(out) / "gap.md", gap_markdown(report))
        gap_figure(asdict(sa), asdict(sb), Path(out) / "gap.png")
    return report


def _summary(s: FolderStats) -> dict:
    d = asdict(s)
    w, h = zip(*s.sizes)
    d["sizes"] = {"median_width": float(np.median(w)), "median_height": float(np.median(h))}
    d["brightness"] = float(np.mean(s.brightness))
    return d


def gap_markdown(r: dict) -> str:
    level = "indistinguishable" if r["domain_auc"] < 0.6 else "somewhat apart" if r["domain_auc"] < 0.75 else \
        "clearly apart"
    sampled = "; ".join(f"{split}: {n['sampled']} of {n['found']} images" + (" (an even sample)" if n["sampled"] <
                                                                              n["found"] else "")
                        for split, n in r.get("images", {}).items())
    apart = r["domain_auc"] >= 0.6
    lines = [f"# Domain gap: {r['train']!r} vs {r['test']!r}", "", f"Compared {sampled}.", "",
             f"Domain classifier AUC on {r['backbone']} features: **{r['domain_auc']:.3f}** ({level}; 0.5 = the "
             f"folders cannot be told apart).", "",
             "Likely causes:" if apart else "Differences in the pixel statistics (the features do not tell the "
                                            "folders apart, so these are unlikely to explain a gap in accuracy):"]
    lines += [f"- {c}" for c in r["causes"]] or ["- none found in the pixel statistics"]
    if r["class_shift"]:
        top = list(r["class_shift"].items())[:3]
        lines += ["", "Classes whose features moved most (cosine distance of centroids): "
                  + ", ".join(f"{c} {d:.3f}" for c, d in top)]
    return "\n".join(lines) + "\n"
