"""The practitioner's path from checkpoints they already have, behind the ``train``, ``predict``, ``vote`` and
``fuse`` commands.

* :func:`fuse_checkpoints`: the practitioner's question in one call: fuse my members, fit the fused head on my
  training data (the members' heads trained on as one, starting at their logit average; and the late_oof
  fusion), choose on validation, and report it beside soft voting of the same members on the test split: the
  entries of :mod:`fusionnet.workflows.pipeline`, as ``compare`` runs them.
* :func:`vote_files`: any output-ensemble method over saved ``.pt`` probability files (validation files for every
  choice, test files for the report).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from fusionnet.models.checkpoints import inspect_checkpoint
from fusionnet.config import FuseConfig
from fusionnet.config.commands import HEADS
from fusionnet.data.splits import load_splits
from fusionnet.data.datasets import check_unseen
from fusionnet.ensembles.methods import ENSEMBLES, MemberProbs
from fusionnet.errors import ConfigError, DataError
from fusionnet.models.factory import fuse_members
from fusionnet.engine.late_fit import closed_form_fusion
from fusionnet.models.plain import describe_members, load_member
from fusionnet.workflows.reading import members_reading, settle_sizes
from fusionnet.utils.files import atomic_copy, atomic_write_json, atomic_write_text
from fusionnet.utils.metrics import classification_metrics
from fusionnet.workflows.pipeline import SELECT_BY, ClosedForm, Context, Loaded, Table, Trained
from fusionnet.ensembles.voting import MemberOutputs, check_aligned
from fusionnet.workflows.rows import SELECTED_FUSION, fusion_id, label
from fusionnet.workflows.runs import member_names, write_vote


def check_class_order(outputs: MemberOutputs, min_gain: float = 0.25, *, model=None, val=None,
                      device="auto") -> str | None:
    """A member whose validation predictions fit another class order better than the one assumed (its classes
    mapped wrongly?): refused where it is decisive (the best one-to-one relabelling of its predictions, Hungarian
    on the confusion matrix, gains at least ``min_gain`` accuracy and doubles it, on at least 4 validation images
    per class); else, whenever any relabelling fits better, the warning to show (returned). None: the order fits."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    labels = outputs.labels
    if len(labels) < 4 * outputs.probs.shape[1]:
        return None
    confusion = np.array(classification_metrics(outputs.probs, labels)["confusion"])  # rows true, columns predicted
    rows, cols = linear_sum_assignment(-confusion)
    plain, best = float(np.trace(confusion)) / len(labels), float(confusion[rows, cols].sum()) / len(labels)
    if best <= plain:
        return None
    names = outputs.class_names
    swaps = ", ".join(f"its {names[c]!r} is the data's {names[r]!r}" for r, c in zip(rows, cols) if r != c)
    what = (f"member {outputs.member!r} scores {plain:.2f} on validation in the data's class order but {best:.2f} "
            f"if {swaps}")
    if model is not None and val is not None:  # a wrong size or resize mode scrambles predictions too: try them first
        from fusionnet.workflows.reading import reading_diagnosis

        advice = reading_diagnosis(model, val, device=device, beat=best)
        if advice is not None:
            return f"member {outputs.member!r} scores {plain:.2f} on validation as read now; {advice}"
    if best - plain >= min_gain and best >= 2 * plain:
        raise DataError(f"{what}: it was trained with another class order. Give that order (--classes, or "
                        f"classes.txt beside the checkpoint)")
    return (f"{what}; if it was trained with that class order, give it (--classes or classes.txt), else ignore "
            f"this (a weak member confuses classes)")


FUSE_ENSEMBLES = ("soft", "greedy", "stacking")  # the output ensembles fuse reports beside its fused heads


def fuse_checkpoints(cfg: FuseConfig, *, out: str | os.PathLike, log=print) -> dict:
    """Fuse the members, fit the fused head(s) (:class:`FuseConfig`), and report them beside every member and the
    members' soft vote, greedy selection and stacking; the fused head of lower validation NLL is "FusionNet
    (selected on val)" and is copied to ``out/selected.pth``, the model to use. Writes ``fuse.json`` and
    ``fuse.md``, and the ensemble selected on validation as a vote's folder ``out/vote`` when it is a weighted soft
    vote of the members (:func:`write_vote`)."""
    out = Path(out)
    records = {p: (inspect_checkpoint(p).fusionnet or {}).get("data") for p in cfg.members}  # read once each
    reading = members_reading(cfg.members, cfg.plain, cfg.size)  # refuses members that read images differently

    def splits_at(size: int):
        return load_splits(cfg.data, image_column=cfg.image_column, label_column=cfg.label_column,
                           image_root=cfg.image_root,
                           size=size, val_fraction=cfg.val_fraction, seed=cfg.train.seed,
                           val_list=cfg.val_list, strict=cfg.strict, **reading.split_fields())
    splits = splits_at(reading.size or 128)
    if splits.test is None:
        raise ConfigError(f"{str(cfg.data)!r} has no test/ folder; fuse reports test metrics beside soft voting")
    classes = splits.class_names
    plain = replace(cfg.plain, size=cfg.size or cfg.plain.size)
    loaded = [load_member(p, num_classes=len(classes), class_names=classes, plain=plain) for p in cfg.members]
    names = cfg.names or member_names(cfg.members)  # file stems (or folders, for best.pth), made unique
    size = settle_sizes(dict(zip(names, loaded)), splits.val, device=cfg.train.device, log=log)
    if size is not None and size != reading.size:
        splits = splits_at(size)
    read_as = describe_members(dict(zip(names, loaded)))
    for line in read_as:
        log(f"reads: {line}")
    ctx = Context.of(splits, out, cfg.train, log=log, cache_dir=lambda _name: str(out / "cache"))
    unknown = [str(p) for p, record in records.items() if not (record or {}).get("files")]
    if unknown and cfg.val_list is None and not (Path(cfg.data) / "val").is_dir():
        ctx.log(f"WARNING: {unseen_warning(unknown, cfg.val_fraction, cfg.train.seed)}")
    for p, record in records.items():  # a member that saw this split's images would make its val scores meaningless
        for split in ("val", "test"):
            check_unseen(record, getattr(splits, split), split, f"member {str(p)!r}")
    members = [Loaded(name, m, str(p)).run(ctx) for m, p, name in zip(loaded, cfg.members, names)]
    warnings = [w for m, model in zip(members, loaded)
                if (w := check_class_order(m.outputs["val"], model=model, val=splits.val, device=ctx.device))]
    for w in warnings:
        ctx.log(f"WARNING: {w}")
    table = Table(members, classes)
    table.add_ensembles([ENSEMBLES.get(i) for i in FUSE_ENSEMBLES], seed=cfg.train.seed, log=ctx.log)
    for head in cfg.heads:
        log(f"== {label(_HEAD_IDS[head])}")
        table.add_fusion(_head_entry(head, cfg, loaded, out).run(ctx), _HEAD_IDS[head])
    table.add_selected()
    chosen = table.rows[SELECTED_FUSION]["chosen"]
    selected = out / "selected.pth"
    atomic_copy(table.fusion_outputs[chosen]["val"].checkpoint, selected)
    vote_note = write_vote(table, dict(zip(names, loaded)), [records[p] for p in cfg.members], out / "vote",
                           seed=cfg.train.seed)
    log(vote_note)
    return _write_fuse_report(cfg, out, table, chosen, selected, warnings, read_as, vote_note)


_HEAD_IDS = {head: fusion_id(head) for head in HEADS}


def _head_entry(head: str, cfg: FuseConfig, loaded: list, out: Path):
    """The pipeline entry of a fused head: the members' heads trained as one, or the late_oof fusion."""
    if head == "from_members":
        return Trained("fusion_from_members", lambda: (fuse_members(loaded, freeze_trunks=True), 0.0),
                       replace(cfg.train, cache_dir=str(out / "cache")))
    return ClosedForm("fusion_late_oof",
                      lambda: (fuse_members(loaded, fusion=closed_form_fusion(), taps=cfg.late_oof_taps), 0.0),
                      seed=cfg.train.seed)


def unseen_warning(members: list[str], val_fraction: float, seed: int) -> str:
    """What an unknown training split does to every choice made on validation."""
    return (f"{len(members)} member(s) do not record the images they were trained on ({', '.join(members)}): the "
            f"validation split here ({val_fraction:.0%} of train/, seed {seed}) may hold some of them, and then every "
            f"row chosen or fitted on validation (the selected fusion and ensemble, greedy weights, stacking, the "
            f"trained head's best epoch) is optimistic. Pass --val-list with the images they were validated on, or "
            f"give the data the val/ folder they were validated on")


def _write_fuse_report(cfg: FuseConfig, out: Path, table: Table, chosen: str, selected: Path,
                       warnings: list[str], read_as: list[str], vote_note: str) -> dict:
    """fuse.json (rows by id, each with its label and per-image test predictions ``pred``, beside
    ``test_labels``, for paired tests as in results.json) and fuse.md; ``chosen``: the selected fusion's row id."""
    best_member = table.pick([n for n, r in table.rows.items() if r["kind"] == "member"], SELECT_BY)
    report = {"members": [str(p) for p in cfg.members], "selected": chosen, "selected_model": str(selected),
              "best_member_on_val": best_member, "warnings": warnings, "test_labels": table.y_test.tolist(),
              "members_read": read_as, "vote": str(out / "vote") if (out / "vote").is_dir() else None,
              "methods": {n: {"label": label(n), **{m: r[m] for m in ("acc", "macro_f1", "nll", "ece", "pred")},
                              "val": r["val"]} for n, r in table.rows.items()}}
    atomic_write_json(out / "fuse.json", report)
    lines = [f"Fused {len(cfg.members)} members. Selected on validation NLL: "
             f"{label(chosen)}, written to {str(selected)!r} (use this file for predict and export). Best member "
             f"on validation: {label(best_member)}.", "",
             "| method | test acc | macro-F1 | NLL | ECE | val acc | val NLL |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["methods"].values():
        val = f"{r['val']['acc']:.4f} | {r['val']['nll']:.4f}" if r["val"] else "- | -"
        lines.append(f"| {r['label']} | {r['acc']:.4f} | {r['macro_f1']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | "
                     f"{val} |")
    lines += ["", *(f"WARNING: {w}" for w in warnings)] if warnings else []
    lines += ["", f"Vote: {vote_note}."]
    lines += ["", "How each member reads an image:", "", *(f"- {line}" for line in read_as)]
    lines += ["", "from_members: the members' heads as one, trained on cached features, the best epoch by "
                  "validation NLL (epoch 0 = the members' logit average). late_oof: a classifier per member trunk and "
                  "per-class branch weights fitted on out-of-fold predictions of the training split (members "
                  "fine-tuned on it make those optimistic: validation decides)."]
    atomic_write_text(out / "fuse.md", "\n".join(lines) + "\n")
    return report


def vote_files(val_files: Sequence[str | os.PathLike], test_files: Sequence[str | os.PathLike], method: str,
               *, seed: int = 0) -> dict:
    """Run one output-ensemble method (its id: ``soft``, ``greedy``, ...; :data:`ENSEMBLES`) over saved member
    outputs; returns the test metrics (and the method's weights and facts). Every choice uses the validation files;
    test labels are only scored."""
    spec = ENSEMBLES.get(method)
    if len(val_files) != len(test_files) or not val_files:
        raise ConfigError(f"give one validation and one test file per member, in the same member order; got "
                          f"{len(val_files)} and {len(test_files)}")
    val = [MemberOutputs.load(p) for p in val_files]
    test = [MemberOutputs.load(p) for p in test_files]
    for flag, files, outputs in (("val", val_files, val), ("test", test_files, test)):
        for path, o in zip(files, outputs):  # every choice is made on validation: a test file there would leak
            if o.split != flag:
                raise ConfigError(f"{str(path)!r} holds the {o.split!r} split (as it records), but was given as "
                                  f"--{flag}; pass validation files to --val and test files to --test")
    check_aligned(val)
    check_aligned(test)
    for v, t in zip(val, test):
        if v.member != t.member:
            raise ConfigError(f"validation file of {v.member!r} is paired with the test file of {t.member!r}; "
                              f"list the files in the same member order")
    probs = MemberProbs(torch.stack([o.probs for o in val]), val[0].labels, torch.stack([o.probs for o in test]),
                        seed)
    res = spec.run(probs)
    metrics = classification_metrics(res.test, test[0].labels, test[0].class_names)
    return {"method": spec.label, "id": spec.id, "members": [o.member for o in val], "weights": res.weights, **res.extra,
            **{m: metrics[m] for m in ("acc", "macro_f1", "nll", "ece")}, "probs": res.test}
