"""The practitioner's path from checkpoints they already have, behind the ``train``, ``predict``, ``vote`` and
``fuse`` commands.

* :func:`load_member`: a single-backbone FusionNet from any member checkpoint: our own format, or a plain
  torchvision/timm classifier state dict (architecture guessed from its keys, its Linear head kept).
* :func:`fuse_checkpoints`: the practitioner's question in one call: fuse my members, train the fused head on my
  data (head only, over cached features, starting at the members' logit average and chosen on validation), and
  report it beside soft voting of the same members on the test split.
* :func:`vote_files`: any output-ensemble method over saved ``.pt`` probability files (validation files for every
  choice, test files for the report).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from fusionnet.backbones import list_backbones
from fusionnet.checkpoints import inspect_checkpoint
from fusionnet.data import load_splits
from fusionnet.ensembles import METHODS, MemberProbs
from fusionnet.errors import CheckpointMismatchError, ConfigError
from fusionnet.factory import create_fusionnet, fuse_members, load_fusionnet
from fusionnet.files import atomic_write_json, atomic_write_text
from fusionnet.metrics import classification_metrics
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


def fuse_checkpoints(members: Sequence[str | os.PathLike], data: str | os.PathLike, *, out: str | os.PathLike,
                     size: int = 128, epochs: int = 10, lr: float = 1e-3, seed: int = 0, val_fraction: float = 0.15,
                     device: str = "auto", progress: bool = True, log=print) -> dict:
    """Fuse the members, train the fused head, and compare with the members' soft vote; writes ``out``."""
    if len(members) < 2:
        raise ConfigError(f"fuse needs at least 2 member checkpoints, got {len(members)}")
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
    fused = fuse_members(loaded, freeze_trunks=True)
    cfg = TrainConfig(epochs=epochs, lr=lr, strategy="frozen", cache_features=True, validate_start=True,
                      monitor="nll", seed=seed, device=device, progress=progress,
                      cache_dir=str(out / "cache"))
    result = fit(fused, splits.train, splits.val, cfg, out_dir=out / "fused", log=log)
    best = load_fusionnet(result.best_path)
    fused_test = member_outputs(best, splits.test, member="fused", split="test", device=device)
    y = outputs["test"][0].labels
    rows = {f"member: {o.member}": classification_metrics(o.probs, y, names) for o in outputs["test"]}
    rows["soft voting"] = classification_metrics(soft_vote(torch.stack([o.probs for o in outputs["test"]])), y, names)
    rows["FusionNet (fused members)"] = classification_metrics(fused_test.probs, y, names)
    report = {"members": [str(p) for p in members], "best_epoch": result.best_epoch,
              "methods": {n: {m: r[m] for m in ("acc", "macro_f1", "nll", "ece")} for n, r in rows.items()}}
    atomic_write_json(out / "fuse.json", report)
    lines = [f"Fused {len(members)} members; the head trained {epochs} epochs on cached features, best epoch "
             f"{result.best_epoch} by validation NLL (epoch 0 = the members' logit average).", "",
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

