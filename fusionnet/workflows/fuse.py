"""The practitioner's path from checkpoints they already have, behind the ``train``, ``predict``, ``vote`` and
``fuse`` commands.

* :func:`load_member`: a single-backbone FusionNet from any member checkpoint: our own format, or a plain
  torchvision/timm classifier state dict (architecture guessed from its keys, its Linear head kept).
* :func:`fuse_checkpoints`: the practitioner's question in one call: fuse my members, fit the fused head on my
  training data (the members' heads trained on as one, starting at their logit average; and the stacked late
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

from fusionnet.models.backbones import list_backbones
from fusionnet.models.checkpoints import inspect_checkpoint
from fusionnet.config import FuseConfig
from fusionnet.data.splits import load_splits
from fusionnet.data.datasets import check_unseen
from fusionnet.ensembles.methods import ENSEMBLES, MemberProbs
from fusionnet.errors import CheckpointMismatchError, ConfigError, DataError
from fusionnet.models.factory import create_fusionnet, fuse_members, load_fusionnet
from fusionnet.utils.files import atomic_copy, atomic_write_json, atomic_write_text
from fusionnet.utils.metrics import classification_metrics
from fusionnet.workflows.pipeline import SELECT_BY, ClosedForm, Context, Loaded, Table, Trained
from fusionnet.ensembles.voting import MemberOutputs, check_aligned
from fusionnet.workflows.rows import SELECTED_FUSION, fusion_id, label
from fusionnet.workflows.runs import member_names


def load_member(path: str | os.PathLike, *, num_classes: int, class_names: list[str] | None = None,
                member_classes: Sequence[str] | None = None):
    """A single-backbone FusionNet from a member checkpoint of any supported kind, with its classifier head, its
    outputs in the order of ``class_names`` (the data's). A fusionnet member knows its classes; a plain state dict
    needs ``member_classes`` (the order it was trained with) or a ``classes.txt`` beside it (a name per line)."""
    info = inspect_checkpoint(path)
    if info.fusionnet is not None:
        model = load_fusionnet(path)
        if model.config.num_classes != num_classes:
            raise ConfigError(f"member {str(path)!r} has {model.config.num_classes} classes, the data {num_classes}")
        return _in_order(model, model.class_names, class_names, path)
    arch = info.architecture
    if arch not in list_backbones():
        raise CheckpointMismatchError(f"cannot tell which backbone {str(path)!r} is (it looks like {arch!r}); save "
                                      f"it as a fusionnet member, or load it with create_fusionnet(['<backbone>'], "
                                      f"checkpoints={{'<backbone>': path}})")
    if info.num_classes != num_classes:
        raise CheckpointMismatchError(f"member {str(path)!r} ({arch}) classifies {info.num_classes} classes but the "
                                      f"data has {num_classes}; fine-tune it on these classes first")
    order = _stated_order(path, member_classes, class_names)
    model = create_fusionnet([arch], num_classes=num_classes, class_names=class_names, checkpoints={arch: path})
    if not model.load_reports[arch].head_kept:
        raise CheckpointMismatchError(f"member {str(path)!r}: its classifier head is not a plain Linear layer, so it "
                                      f"cannot start the fused head; train it as a fusionnet member")
    return _in_order(model, order, class_names, path)


def _stated_order(path, member_classes: Sequence[str] | None, data_classes: list[str] | None) -> list[str]:
    """The class order a plain state dict was trained with: given, or read from classes.txt beside it."""
    beside = Path(path).parent / "classes.txt"
    if member_classes is None and beside.is_file():
        member_classes = [line.strip() for line in beside.read_text().splitlines() if line.strip()]
    if member_classes is None:
        raise ConfigError(f"member {str(path)!r} is a plain state dict, which does not say its class order; give "
                          f"the order it was trained with (--classes, or a classes.txt beside it, a name per line). "
                          f"Trained with torchvision's ImageFolder on these folders, it is the sorted order: "
                          f"--classes {' '.join(data_classes or [])}")
    return list(member_classes)


def _in_order(model, own: list[str] | None, data: list[str] | None, path):
    """``model`` with its head's rows reordered from its own class order to the data's (refused if the classes
    differ)."""
    if own is None or data is None or list(own) == list(data):
        return model
    if sorted(own) != sorted(data):
        raise ConfigError(f"member {str(path)!r} classifies {list(own)}, the data has {list(data)}; members must be "
                          f"trained on the data's classes")
    rows = torch.tensor([list(own).index(name) for name in data])
    fc = model.head.fc
    with torch.no_grad():
        fc.weight.copy_(fc.weight[rows])
        fc.bias.copy_(fc.bias[rows])
    model.config.class_names = list(data)
    return model


def check_class_order(outputs: MemberOutputs, min_gain: float = 0.25) -> str | None:
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
    ``fuse.md``."""
    out = Path(out)
    records = {p: (inspect_checkpoint(p).fusionnet or {}).get("data") for p in cfg.members}  # read once each
    size = cfg.size or _members_size(records)
    splits = load_splits(cfg.data, size=size, val_fraction=cfg.val_fraction, seed=cfg.train.seed)
    if splits.test is None:
        raise ConfigError(f"{str(cfg.data)!r} has no test/ folder; fuse reports test metrics beside soft voting")
    classes = splits.class_names
    ctx = Context.of(splits, out, cfg.train, log=log, cache_dir=lambda _name: str(out / "cache"))
    loaded = [load_member(p, num_classes=len(classes), class_names=classes, member_classes=cfg.classes)
              for p in cfg.members]
    for p, record in records.items():  # a member that saw this split's images would make its val scores meaningless
        for split in ("val", "test"):
            check_unseen(record, getattr(splits, split), split, f"member {str(p)!r}")
    names = member_names(cfg.members)  # file stems (or folders, for best.pth), made unique
    members = [Loaded(name, m, str(p)).run(ctx) for m, p, name in zip(loaded, cfg.members, names)]
    warnings = [w for m in members if (w := check_class_order(m.outputs["val"])) is not None]
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
    return _write_fuse_report(cfg, out, table, chosen, selected, warnings)


_HEAD_IDS = {"trained": fusion_id("fused_members"), "stacked": fusion_id("stacked")}


def _head_entry(head: str, cfg: FuseConfig, loaded: list, out: Path):
    """The pipeline entry of a fused head: the members' heads trained as one, or the stacked late fusion."""
    if head == "trained":
        return Trained("fusion_fused_members", lambda: (fuse_members(loaded, freeze_trunks=True), 0.0),
                       replace(cfg.train, cache_dir=str(out / "cache")))
    return ClosedForm("fusion_stacked", lambda: (fuse_members(loaded, fusion="late", taps=cfg.stacked_taps), 0.0),
                      seed=cfg.train.seed)


def _members_size(records: dict) -> int:
    """The input size the members were trained at (their checkpoints' training records), else 128; members
    trained at different sizes need ``--size``."""
    sizes = {(record or {}).get("input_size") for record in records.values()} - {None}
    if len(sizes) > 1:
        raise ConfigError(f"the members were trained at different input sizes {sorted(sizes)}; give --size")
    return sizes.pop() if sizes else 128


def _write_fuse_report(cfg: FuseConfig, out: Path, table: Table, chosen: str, selected: Path,
                       warnings: list[str]) -> dict:
    """fuse.json (rows by id, each with its label) and fuse.md; ``chosen``: the selected fusion's row id."""
    best_member = table.pick([n for n, r in table.rows.items() if r["kind"] == "member"], SELECT_BY)
    report = {"members": [str(p) for p in cfg.members], "selected": chosen, "selected_model": str(selected),
              "best_member_on_val": best_member, "warnings": warnings,
              "methods": {n: {"label": label(n), **{m: r[m] for m in ("acc", "macro_f1", "nll", "ece")},
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
    lines += ["", "Fused members: the members' heads as one, trained on cached features, the best epoch by "
                  "validation NLL (epoch 0 = the members' logit average). Stacked: a classifier per member trunk and "
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
