"""One small network with the ensemble's accuracy: distillation of a fusion or an ensemble into a student.

``distill(cfg)`` (``fusionnet distill``) loads the teacher (:func:`load_teacher`: a FusionNet checkpoint, the soft
vote of several member checkpoints, a vote's folder (its weighted vote: :mod:`fusionnet.models.vote`), or the
val-selected fusion of a ``compare`` run folder), builds the student (any
registered backbone with a new head) and trains it with :func:`fusionnet.engine.train.fit` and the
:class:`fusionnet.engine.callbacks.Distillation` callback: teacher and student see the same augmented (and, with
``mixup``, mixed) view, the student matches the teacher's predictions by KL at a temperature, and the labels weigh
``label_weight``. With ``baseline`` the same student trains on labels alone with the same budget. The student is
an ordinary fusionnet model (save, load, predict, export, vote). The report (``distill.json``, ``distill.md``) has
each model's test accuracy, NLL and ECE, parameters, inference img/s and its time relative to the teacher's.

The teacher runs on every training step (on a CPU the step then costs about a student step plus a teacher forward
pass); the models are chosen on validation (best epoch by the config's monitor), never on test.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fusionnet.engine.callbacks import Distillation
from fusionnet.config import DistillConfig
from fusionnet.errors import ConfigError
from fusionnet.utils.probabilities import soft_vote_logits
from fusionnet.workflows.runs import checkpoints_in

class Teacher(nn.Module):
    """Logits of one model, or the log of the members' mean probabilities (their soft vote), with the classes put
    in the data's order (``order[i]``: the teacher's column of the data's class i)."""

    def __init__(self, models: Sequence[nn.Module], order: Sequence[int]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.register_buffer("order", torch.as_tensor(list(order), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.models[0](x).float() if len(self.models) == 1 else soft_vote_logits([m(x) for m in self.models])
        return logits[:, self.order]


def load_teacher(sources: Sequence[str], class_names: Sequence[str]) -> tuple[Teacher, list[Path]]:
    """The teacher for data with ``class_names``, refused before any training when its classes differ."""
    from fusionnet.models.factory import load_fusionnet
    from fusionnet.models.pretrained import is_vote_folder
    from fusionnet.models.vote import Vote

    paths = checkpoints_in(sources)
    models = [Vote.from_pretrained(p) if is_vote_folder(p) else load_fusionnet(p) for p in paths]  # a vote: its
    # log-probabilities are its logits
    for path, model in zip(paths, models):
        names = model.class_names
        if names is None or sorted(names) != sorted(class_names):
            raise ConfigError(f"teacher {str(path)!r} was trained on classes {names}, the data has "
                              f"{list(class_names)}; give a teacher trained on these classes")
        if list(names) != list(models[0].class_names):
            raise ConfigError(f"teacher members disagree on class order: {str(path)!r} has {names}, "
                              f"{str(paths[0])!r} has {models[0].class_names}")
    order = [list(models[0].class_names).index(c) for c in class_names]
    return Teacher(models, order), paths


def inference_rate(model: nn.Module, size: int, *, batch: int = 32, runs: int = 5) -> float:
    """Images per second of ``model`` on a batch of random images on the CPU (median of ``runs``)."""
    model = model.eval().to("cpu", memory_format=torch.channels_last)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def distill(cfg: DistillConfig, *, log=print) -> dict:
    """Train the student (and the label-only baseline) and write ``distill.json`` / ``distill.md`` to ``cfg.out``."""
    from fusionnet.data.splits import load_splits
    from fusionnet.models.factory import create_fusionnet, load_fusionnet
    from fusionnet.utils.files import atomic_write_json, atomic_write_text
    from fusionnet.engine.inference import evaluate
    from fusionnet.engine.train import fit

    from fusionnet.workflows.reading import members_reading

    reading = members_reading(checkpoints_in(cfg.teacher), size=cfg.size).split_fields()  # as the teacher reads
    splits = load_splits(cfg.data, image_column=cfg.image_column, label_column=cfg.label_column,
                         image_root=cfg.image_root,
                         size=cfg.size, val_fraction=cfg.val_fraction, seed=cfg.train.seed,
                         progress=cfg.train.progress, strict=cfg.strict, **reading)
    teacher, paths = load_teacher(cfg.teacher, splits.class_names)

    def student():  # reads its images as its teacher does
        torch.manual_seed(cfg.train.seed)
        return create_fusionnet([cfg.student], class_names=splits.class_names, pretrained=cfg.pretrained,
                                **reading)

    student()  # an unknown backbone fails here, before any training
    out = Path(cfg.out)
    runs = {"distilled": [Distillation(teacher, cfg.temperature, cfg.label_weight)]}
    if cfg.baseline:
        runs["labels"] = []
    rows = {"teacher": _scored(teacher, splits, cfg.size, evaluate, seconds=0.0, params=_params(teacher))}
    rows["teacher"]["checkpoints"] = [str(p) for p in paths]
    for name, callbacks in runs.items():
        t0 = time.perf_counter()
        train = replace(cfg.train, cache_features=False,  # the teacher needs the images, not cached features
                        run_name=f"student_{name}_seed{cfg.train.seed}")
        result = fit(student(), splits.train, splits.val, train, out_dir=out / name, callbacks=callbacks, log=log)
        best = load_fusionnet(result.best_path)
        rows[f"student {cfg.student} ({name})"] = {
            **_scored(best, splits, cfg.size, evaluate, seconds=time.perf_counter() - t0, params=_params(best)),
            "checkpoint": result.best_path, "best_epoch": result.best_epoch}
    for row in rows.values():
        row["time_vs_teacher"] = rows["teacher"]["img_s"] / row["img_s"]
    report = {"budget": {"data": cfg.data, "size": cfg.size, "student": cfg.student, "epochs": cfg.train.epochs,
                         "seed": cfg.train.seed, "temperature": cfg.temperature, "label_weight": cfg.label_weight,
                         "mixup": cfg.train.mixup}, "rows": rows}
    atomic_write_json(out / "distill.json", report)
    atomic_write_text(out / "distill.md", distill_markdown(report))
    return report


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _scored(model, splits, size: int, evaluate, *, seconds: float, params: int) -> dict:
    val = evaluate(model, splits.val, device="cpu")
    row = {"val_acc": val["acc"], "val_nll": val["nll"], "params": params, "train_seconds": seconds,
           "img_s": inference_rate(model, size)}
    if splits.test is not None:
        test = evaluate(model, splits.test, device="cpu")
        row.update(test_acc=test["acc"], test_nll=test["nll"], test_ece=test["ece"])
    return row


def distill_markdown(report: dict) -> str:
    b = report["budget"]
    lines = [f"# Distillation into {b['student']} ({b['epochs']} epochs, {b['size']} px, seed {b['seed']}, "
             f"T = {b['temperature']}, label weight {b['label_weight']})", "",
             "| model | val acc | test acc | test NLL | test ECE | params | img/s (CPU) | time vs teacher | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["rows"].items():
        lines.append(f"| {name} | {r['val_acc']:.4f} | {r.get('test_acc', float('nan')):.4f} | "
                     f"{r.get('test_nll', float('nan')):.4f} | {r.get('test_ece', float('nan')):.4f} | "
                     f"{r['params'] / 1e6:.1f}M | {r['img_s']:.0f} | {r['time_vs_teacher']:.2f}x | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"
