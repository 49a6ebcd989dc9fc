"""What a member's files do not say about how it reads images, settled on validation and stated.

* :func:`settle_sizes`: a plain member's input size, where no flag or manifest gives it: each candidate size
  (:data:`fusionnet.config.CANDIDATE_SIZES`) scored by NLL on the validation split read the member's way; the
  lowest wins, and the log says which it chose and why.
* :func:`reading_diagnosis`: before blaming a member's class order, whether another size or resize mode explains
  its poor validation fit better.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch

from fusionnet.config import CANDIDATE_SIZES, Reading
from fusionnet.data.transforms import reading_transform
from fusionnet.engine.inference import predict
from fusionnet.utils.metrics import accuracy, nll

MAX_IMAGES = 300  # validation images scored per candidate (a stratified sample): enough to tell sizes apart


def val_sample(val, max_images: int = MAX_IMAGES, seed: int = 0):
    """At most ``max_images`` of the validation split, every class in proportion (the split itself if smaller)."""
    labels = np.asarray(val.labels)
    if len(labels) <= max_images:
        return val
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, int(round(max_images * len(idx) / len(labels))))
        keep += rng.choice(idx, size=min(n, len(idx)), replace=False).tolist()
    return val.subset(sorted(keep), store=None)


def score_reading(model, val, reading: Reading, *, device="auto") -> dict:
    """Validation accuracy and NLL of ``model`` reading ``val``'s images as ``reading`` says."""
    data = val.with_transform(reading_transform(reading), store=None)
    probs, labels = predict(model, data, device=device)
    return {"acc": accuracy(probs, labels), "nll": nll(probs, labels)}


def settle_sizes(models: Mapping[str, torch.nn.Module], val, *, sizes=CANDIDATE_SIZES, device="auto",
                 log: Callable[[str], None] = print) -> int | None:
    """Give every model of unknown input size (``config.image_size`` None) one, chosen on validation: the size of
    lowest mean NLL over those models (one size for all: they are read as one batch). A size the other models
    record is used as it is. Returns the size the models now share (None: no model needed one)."""
    unknown = {name: m for name, m in models.items() if m.config.image_size is None}
    known = sorted({m.config.image_size for m in models.values()} - {None})
    if not unknown:
        return known[0] if len(known) == 1 else None
    sample = val_sample(val)
    candidates = known if len(known) == 1 else list(sizes)
    table = {s: {name: score_reading(m, sample, m.config.reading(s), device=device) for name, m in unknown.items()}
             for s in candidates}
    best = min(candidates, key=lambda s: float(np.mean([r["nll"] for r in table[s].values()])))
    for m in unknown.values():
        m.config.image_size = best
    if len(known) == 1:
        log(f"input size: {best} px, as the other members record it ({', '.join(unknown)} give none)")
    else:
        scores = ", ".join(f"{s} px {np.mean([r['nll'] for r in table[s].values()]):.3f}" for s in candidates)
        log(f"input size: {best} px, chosen on validation NLL ({len(sample)} images; {scores}) because nothing gives "
            f"the size {', '.join(unknown)} was trained at; pass --size (or \"size\" in a manifest) to fix it")
    return best


def reading_diagnosis(model, val, *, device="auto", sizes=CANDIDATE_SIZES, beat: float) -> str | None:
    """Whether another size or resize mode fits ``model`` on validation at least as well as a relabelled class
    order would (``beat``: that relabelling's accuracy): the advice to give instead of blaming the order, or
    None. Only a plain member's reading is tried (a fusionnet member records its own)."""
    own = model.config.reading()
    if own.reader != "torchvision":
        return None
    sample = val_sample(val)
    tried = {}
    for resize in ("shorter", "stretch"):
        for size in sizes:
            candidate = Reading(size, resize, own.crop_pct, own.reader)
            if candidate != own:
                tried[candidate] = score_reading(model, sample, candidate, device=device)["acc"]
    best = max(tried, key=tried.get)
    if tried[best] < beat:
        return None
    return (f"read at {best.size} px with --resize {best.resize} it scores {tried[best]:.2f} on validation: it was "
            f"probably trained that way. Give --size {best.size} --resize {best.resize} (or a manifest) rather than "
            f"another class order")


def members_reading(paths, plain=None, size: int | None = None) -> Reading:
    """The one reading of the member checkpoints ``paths`` (refused where they read differently; ``size``, the
    command's ``--size``, over what they record). Its size is None where no member says it."""
    from fusionnet.config.reading import common_reading
    from fusionnet.models.plain import member_reading

    readings = {str(p): member_reading(p, plain) for p in paths}
    if size is not None:
        readings = {name: r.at(size) for name, r in readings.items()}
    return common_reading(readings)
