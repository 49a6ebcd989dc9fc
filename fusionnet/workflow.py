"""The practitioner's path from checkpoints they already have, behind the ``train``, ``predict``, ``vote`` and
``fuse`` commands.

* :func:`load_member`: a single-backbone FusionNet from any member checkpoint: our own format, or a plain
  torchvision/timm classifier state dict (architecture guessed from its keys, its Linear head kept).
* :func:`fuse_checkpoints`: the practitioner's question in one call: fuse my members, fit the fused head on my
  training data (the members' heads trained on as one, starting at their logit average; and the stacked late
  fusion), choose on validation, and report it beside soft voting of the same members on the test split.
* :func:`vote_files`: any output-ensemble method over saved ``.pt`` probability files (validation files for every
  choice, test files for the report).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from fusionnet.backbones import list_backbones
from fusionnet.checkpoints import inspect_checkpoint
from fusionnet.data import load_splits
from fusionnet.ensembles import METHODS, MemberProbs
from fusionnet.errors import CheckpointMismatchError, ConfigError, is_int
from fusionnet.factory import create_fusionnet, fuse_members, load_fusionnet, save_model
from fusionnet.feature_cache import cached_features
from fusionnet.late_head import fit_late_head_on
from fusionnet.files import atomic_write_json, atomic_write_text
from fusionnet.metrics import classification_metrics, nll
from fusionnet.train import TrainConfig, fit
from fusionnet.voting import MemberOutputs, check_aligned, member_outputs, soft_vote


def load_member(path: str | os.PathLike, *, num_classes: int, class_names: list[str] | None = None):
    """A single-backbone FusionNet from a member checkpoint of any supported kind, with its classifier head."""
    info = inspect_checkpoint(path)
    if info.fusionnet is not None:
        model = load_fusionnet(path)
        if model.config.num_classes != num_classes:
            raise ConfigError(f"member {str(path)!r} has {model.config.num_classes} classes, the data {num_classes}")
        return model
    arch = info.architecture
    if arch not in list_backbones():
        raise CheckpointMismatchError(f"cannot tell which backbone {str(path)!r} is (it looks like {arch!r}); save "
                                      f"it as a fusionnet member, or load it with create_fusionnet(['<backbone>'], "
                                      f"checkpoints={{'<backbone>': path}})")
    if info.num_classes != num_classes:
        raise CheckpointMismatchError(f"member {str(path)!r} ({arch}) classifies {info.num_classes} classes but the "
                                      f"data has {num_classes}; fine-tune it on these classes first")
    model = create_fusionnet([arch], num_classes=num_classes, class_names=class_names, checkpoints={arch: path})
    if not model.load_reports[arch].head_kept:
        raise CheckpointMismatchError(f"member {str(path)!r}: its classifier head is not a plain Linear layer, so it "
                                      f"cannot start the fused head; train it as a fusionnet member")
    return model


HEADS = ("trained", "stacked")


def fuse_checkpoints(members: Sequence[str | os.PathLike], data: str | os.PathLike, *, out: str | os.PathLike,
                     size: int = 128, epochs: int = 10, lr: float = 1e-3, seed: int = 0, val_fraction: float = 0.15,
                     heads: Sequence[str] = HEADS, stacked_taps: int = 4, device: str = "auto", progress: bool = True,
                     log=print) -> dict:
    """Fuse the members, fit the fused head(s), and compare with the members' soft vote; writes ``out``.

    ``heads``: ``trained`` (the members' heads as one block-diagonal head, trained on cached features, the best
    epoch by validation NLL with epoch 0, the members' logit average, included) and/or ``stacked`` (late fusion:
    :func:`fusionnet.late_head.fit_late_head` on the training split, each branch offered up to ``stacked_taps``
    earlier trunk levels). With both, the one of lower validation NLL is reported as "FusionNet (selected on
    val)"."""
    if len(members) < 2:
        raise ConfigError(f"fuse needs at least 2 member checkpoints, got {len(members)}")
    bad = [h for h in heads if h not in HEADS]
    if bad or not heads:
        raise ConfigError(f"unknown fused head(s) {bad or '(none given)'}; choose from {', '.join(HEADS)}")
    if not (is_int(stacked_taps) and stacked_taps >= 0):
        raise ConfigError(f"stacked_taps must be a whole number >= 0, got {stacked_taps!r}")
    out = Path(out)
    splits = load_splits(data, size=size, val_fraction=val_fraction, seed=seed)
    if splits.test is None:
        raise ConfigError(f"{str(data)!r} has no test/ folder; fuse reports test metrics beside soft voting")
    names, k = splits.class_names, len(splits.class_names)
    loaded = [load_member(p, num_classes=k, class_names=names) for p in members]
    outputs = {split: [member_outputs(m, getattr(splits, split), member=Path(p).stem, split=split, device=device)
                       for m, p in zip(loaded, members)] for split in ("val", "test")}
    for split in outputs:
        check_aligned(outputs[split])
    fused: dict[str, dict[str, MemberOutputs]] = {}
    notes = []
    if "trained" in heads:
        cfg = TrainConfig(epochs=epochs, lr=lr, strategy="frozen", cache_features=True, validate_start=True,
                          monitor="nll", seed=seed, device=device, progress=progress, cache_dir=str(out / "cache"))
        result = fit(fuse_members(loaded, freeze_trunks=True), splits.train, splits.val, cfg, out_dir=out / "fused",
                     log=log)
        best = load_fusionnet(result.best_path)
        fused["FusionNet (fused members)"] = {s: member_outputs(best, getattr(splits, s), member="fused", split=s,
                                                                device=device) for s in ("val", "test")}
        notes.append(f"fused members: the head trained {epochs} epochs on cached features, best epoch "
                     f"{result.best_epoch} by validation NLL (epoch 0 = the members' logit average)")
    if "stacked" in heads:
        model = fuse_members(loaded, fusion="late", taps=stacked_taps)
        info = fit_late_head_on(model, splits, cache_dir=out / "cache", device=device, seed=seed, log=log)
        save_model(model, out / "stacked" / "best.pth", metrics={"late_head": asdict(info)})
        fused["FusionNet (stacked)"] = {}
        for s in ("val", "test"):  # through the cache: the trained head already cached val with these trunks
            data = getattr(splits, s)
            source, _ = cached_features(model, data, cache_dir=out / "cache", device=device, batch_size=64)
            fused["FusionNet (stacked)"][s] = member_outputs(model, source, member="stacked", split=s,
                                                             sample_ids=data.paths, device=device)
        notes.append("stacked: a classifier per member trunk and per-class branch weights, fitted on out-of-fold "
                     "predictions of the training split (members fine-tuned on it make those optimistic: "
                     "validation decides)")
    y_val, y = outputs["val"][0].labels, outputs["test"][0].labels
    rows = {f"member: {o.member}": classification_metrics(o.probs, y, names) for o in outputs["test"]}
    rows["soft voting"] = classification_metrics(soft_vote(torch.stack([o.probs for o in outputs["test"]])), y, names)
    val_nll = {}
    for label, outs in fused.items():
        check_aligned([outputs["test"][0], outs["test"]])
        rows[label] = classification_metrics(outs["test"].probs, y, names)
        val_nll[label] = nll(outs["val"].probs, y_val)
    chosen = min(val_nll, key=val_nll.get)
    if len(fused) > 1:
        rows["FusionNet (selected on val)"] = rows[chosen]
    report = {"members": [str(p) for p in members], "selected": chosen, "val_nll": val_nll,
              "methods": {n: {m: r[m] for m in ("acc", "macro_f1", "nll", "ece")} for n, r in rows.items()}}
    atomic_write_json(out / "fuse.json", report)
    lines = [f"Fused {len(members)} members. " + "; ".join(notes) + ".",
             f"Selected on validation NLL: {chosen}.", "",
             "| method | test acc | macro-F1 | NLL | ECE |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {r['acc']:.4f} | {r['macro_f1']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} |"
              for n, r in report["methods"].items()]
    atomic_write_text(out / "fuse.md", "\n".join(lines) + "\n")
    return report


def vote_files(val_files: Sequence[str | os.PathLike], test_files: Sequence[str | os.PathLike], method: str,
               *, seed: int = 0) -> dict:
    """Run one output-ensemble method over saved member outputs; returns the test metrics (and the method's
    weights and facts). Every choice uses the validation files; test labels are only scored."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if len(val_files) != len(test_files) or not val_files:
        raise ConfigError(f"give one validation and one test file per member, in the same member order; got "
                          f"{len(val_files)} and {len(test_files)}")
    val = [MemberOutputs.load(p) for p in val_files]
    test = [MemberOutputs.load(p) for p in test_files]
    check_aligned(val)
    check_aligned(test)
    for v, t in zip(val, test):
        if v.member != t.member:
            raise ConfigError(f"validation file of {v.member!r} is paired with the test file of {t.member!r}; "
                              f"list the files in the same member order")
    probs = MemberProbs(torch.stack([o.probs for o in val]), val[0].labels, torch.stack([o.probs for o in test]),
                        seed)
    res = METHODS[method](probs)
    metrics = classification_metrics(res.test, test[0].labels, test[0].class_names)
    return {"method": method, "members": [o.member for o in val], "weights": res.weights, **res.extra,
            **{m: metrics[m] for m in ("acc", "macro_f1", "nll", "ece")}, "probs": res.test}

