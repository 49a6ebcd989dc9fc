"""Finding the model a finished run chose: a ``compare`` run's val-selected fusion (by the id and checkpoint path
its ``results.json`` records), a ``fuse`` run's ``selected.pth``, a ``train`` run's ``best.pth``. Used by
``distill --teacher``, ``serve`` and the experiments that take a run folder. And writing the ensemble a run chose
as one model (:func:`write_vote`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from fusionnet.errors import ConfigError, MissingFileError
from fusionnet.workflows.rows import SELECTED_ENSEMBLE, current_id, fusion_label, label

SELECTED = "FusionNet (selected on val)"  # the row label of results.json written before the ids (fusionnet 0.3)


GENERIC_STEMS = ("best", "final", "selected", "model", "checkpoint", "weights")


def member_name(path: str | Path) -> str:
    """What a member checkpoint is called in outputs and reports: its file stem (``resnet18_best.pth`` ->
    ``resnet18_best``), or its folder's name where the stem says nothing (``runs/lite0/best.pth`` -> ``lite0``)."""
    p = Path(path)
    return p.parent.name if p.stem in GENERIC_STEMS and p.parent.name else p.stem


def member_names(paths: Sequence[str | Path]) -> list[str]:
    """:func:`member_name` of each path, made unique with ``_2``, ``_3`` ... where two would be called alike."""
    return unique_names([member_name(p) for p in paths])


def unique_names(bases: Sequence[str]) -> list[str]:
    """``bases`` in order, a repeated one given ``_2``, ``_3`` ... so that no two are alike."""
    names: list[str] = []
    for base in bases:
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def checkpoints_in(sources: Sequence[str]) -> list[Path]:
    """The checkpoint files that ``sources`` (``--teacher``, ``serve MODEL``, ``predict`` and ``export``'s model)
    name: files as given; a ``fuse`` or ``auto`` run folder: ``selected.pth``; a ``compare`` run folder: its
    val-selected fusion; a ``train`` run folder: ``best.pth``."""
    from fusionnet.models.pretrained import is_hub_id, is_pretrained_folder, is_vote_folder, local_folder

    paths = []
    for source in sources:
        source = str(source)
        path = Path(source)
        if path.is_file():
            paths.append(path)
        elif is_pretrained_folder(path) or is_vote_folder(path):  # a model folder (save_pretrained, export
            # --format hf) or a vote's (Vote.save_pretrained, fuse's <out>/vote)
            paths.append(path)
        elif is_hub_id(source):
            paths.append(local_folder(source))  # a Hugging Face Hub id: huggingface_hub's download and cache
        elif (path / "selected.pth").is_file():  # fuse and auto write it (auto also writes results.json)
            paths.append(path / "selected.pth")
        elif (path / "results.json").is_file():
            paths.append(selected_in_comparison(path))
        elif (path / "best.pth").is_file():
            paths.append(path / "best.pth")
        else:
            raise MissingFileError(f"{source!r} is neither a checkpoint, a model folder or a vote's (config.json), "
                                   f"a Hub id (user/name) nor a run folder of compare (results.json), fuse or auto "
                                   f"(selected.pth) or train (best.pth)")
    return paths


def selected_in_comparison(folder: Path) -> Path:
    """The checkpoint of the fusion variant validation chose in a compare run (``results.json``'s ``selected``)."""
    try:
        results = json.loads((Path(folder) / "results.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(folder)!r}: its results.json cannot be read ({exc}); give a checkpoint instead") \
            from exc
    chosen = results.get("selected", {}).get("fusion") or _chosen_by_label(results)
    if chosen is None:
        raise ConfigError(f"{str(folder)!r}: its results.json names no selected fusion model; give a checkpoint "
                          f"instead")
    checkpoint = chosen.get("checkpoint")
    if checkpoint and Path(checkpoint).is_file():
        return Path(checkpoint)
    raise MissingFileError(f"{str(folder)!r}: validation chose {current_id(chosen['id'])!r}, but its model file {checkpoint!r} "
                           f"is not there (was the comparison run with --keep outputs?); rerun it with --keep best, "
                           f"or give the checkpoint itself")


def _chosen_by_label(results: dict) -> dict | None:
    """A results.json of fusionnet 0.3 (no ``selected`` block): the chosen row's label matched to a variant."""
    label = results.get("methods", {}).get(SELECTED, {}).get("chosen")
    for variant, row in results.get("fusion", {}).items():
        if label == fusion_label(variant):
            return {"id": variant, "checkpoint": row.get("checkpoint")}
    return None


def write_vote(table, models: dict, records: list, folder: Path, *, seed: int = 0) -> str:
    """The ensemble a run (``fuse``, ``compare``) selected on validation as a vote's folder
    (:class:`fusionnet.models.vote.Vote`: its members with non-zero weight, their weights and temperatures) when
    its method is a weighted soft vote of the members (``EnsembleMethod.vote``); nothing for stacking or hard
    voting. ``table``: the run's :class:`~fusionnet.workflows.pipeline.Table`; ``models``: the members by name, in
    the table's order; ``records``: their training records. The folder belongs to the run (replaced when the run
    is); a vote that cannot be written never costs the finished run: the line returned (for the log and the
    report) says why instead."""
    import torch

    from fusionnet.ensembles.methods import ENSEMBLES
    from fusionnet.errors import FusionNetError

    row = table.rows.get(SELECTED_ENSEMBLE)
    if row is None:
        return "no ensemble was selected on validation: no vote folder written"
    chosen = row["chosen"]
    if not ENSEMBLES.get(chosen).vote:
        return (f"the selected ensemble, {label(chosen)}, is not a weighted soft vote of the members: no vote "
                f"folder written (use its saved outputs with 'fusionnet vote --method {chosen}')")
    res = ENSEMBLES.get(chosen).run(table.member_probs(seed))  # the row's weights and temperatures, refitted
    if "probs" in row and not torch.allclose(res.test.float(), row["probs"].float(), atol=1e-5):
        return (f"the selected ensemble, {label(chosen)}, did not give its row's probabilities again when refitted "
                f"(a method that is not deterministic): no vote folder written")
    try:
        vote = _vote_of(res, row, label(chosen), models, records)
        vote.save_pretrained(folder, overwrite=True)
    except (FusionNetError, OSError) as exc:
        return f"the selected ensemble, {label(chosen)}, could not be written as a vote folder ({exc})"
    return (f"the selected ensemble, {label(chosen)}, written as a vote folder {str(folder)!r} "
            f"({', '.join(f'{n} {w:.3f}' for n, w in zip(vote.names, vote.weights.tolist()))}): predict, serve, "
            f"export and fusionnet.load take it")


def _vote_of(res, row: dict, method: str, models: dict, records: list):
    """The Vote an ensemble method's output describes: members of non-zero weight (a member of weight 0 would cost
    a forward pass for nothing), weights renormalised over them, their temperatures, the row's metrics."""
    import re

    from fusionnet.models.vote import Vote

    m = len(models)
    weights, temps = res.weights or [1.0 / m] * m, res.extra.get("temperatures") or [1.0] * m
    keep = [i for i in range(m) if weights[i] > 0]
    names = unique_names([re.sub(r"[^A-Za-z0-9._+-]", "_", str(n)).lstrip(".") or f"member{i}"  # folder names
                          for i, n in enumerate(models)])
    members = list(models.values())
    metrics = {**{f"test_{k}": row[k] for k in ("acc", "macro_f1", "nll", "ece") if k in row},
               **{f"val_{k}": v for k, v in (row.get("val") or {}).items()}}
    return Vote([members[i] for i in keep], [names[i] for i in keep],
                weights=[weights[i] / sum(weights[j] for j in keep) for i in keep],
                temperatures=[temps[i] for i in keep], method=method, metrics=metrics,
                ensemble_temperature=res.extra.get("ensemble_temperature", 1.0),
                records={names[i]: records[i] or {} for i in keep})
