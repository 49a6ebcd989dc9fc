"""The stages of ``fusionnet auto`` in order, within the time limit (the pieces: :mod:`fusionnet.workflows.auto.screening`),
and its leaderboard. :func:`auto` is the library call, :func:`run_auto` the command's."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from fusionnet.config import AutoConfig, PlainConfig
from fusionnet.errors import ConfigError
from fusionnet.workflows.auto.screening import (Budget, Candidate, ScreenSettings, Screened, candidates_for, finalists,
                                      fused_model, scores_of, screen, select, late_oof_log_probs)


def auto(data: str | os.PathLike | AutoConfig, *, time_limit: str | float = "30m",
         out: str | os.PathLike = "runs/auto", overwrite: bool = False) -> dict:
    """Choose which trunks to fuse within ``time_limit`` and write the best model found as ``out/selected.pth``;
    returns the report (``results.json``). ``data``: the data folder, or a whole :class:`fusionnet.config.AutoConfig`
    (every setting; its own ``time_limit`` and ``out``). ``overwrite``: replace an earlier run in ``out`` once this
    one is complete."""
    cfg = data if isinstance(data, AutoConfig) else AutoConfig(data=str(data), time_limit=str(time_limit), out=str(out))
    return run_into_folder(cfg, overwrite)


def run_into_folder(cfg: AutoConfig, overwrite: bool = False) -> dict:
    """:func:`run_auto` into ``cfg.out``, replacing an earlier run there only once this one is complete (with
    ``overwrite``); every candidate is checked before the folder is touched."""
    from fusionnet.utils.staging import output_folder

    candidates = candidates_for(cfg)
    with output_folder(cfg.out, overwrite, inputs=[cfg.data, *(cfg.members or [])]) as work:
        return run_auto(cfg, out=work, candidates=candidates)


def run_auto(cfg: AutoConfig, *, out: str | os.PathLike, clock: Callable[[], float] = time.monotonic,
             log: Callable[[str], None] = print, candidates: list[Candidate] | None = None) -> dict:
    """Every stage of :mod:`fusionnet.workflows.auto.screening` into ``out``, each ending with ``selected.pth``
    (``candidates``: ``candidates_for(cfg)`` where the caller has them)."""
    from fusionnet.data.splits import load_splits
    from fusionnet.config import Reading
    from fusionnet.workflows.reading import members_reading

    budget, out = Budget(cfg.limit_s, clock), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    candidates = candidates or candidates_for(cfg)  # every refusal before any image is read
    reading = members_reading(cfg.members) if cfg.members else Reading()
    read_as = reading.split_fields()  # the members' reading, which every candidate is scored with
    splits = load_splits(cfg.data, image_column=cfg.image_column, label_column=cfg.label_column,
                         image_root=cfg.image_root,
                         size=max(c.size for c in candidates), val_fraction=cfg.val_fraction,
                         seed=cfg.seed, progress=cfg.progress, strict=cfg.strict, **read_as)
    if splits.test is None:
        raise ConfigError(f"{cfg.data!r} has no test/ folder; auto reports every model's test scores")
    settings = ScreenSettings(splits.class_names, cfg.taps, cfg.pretrained, cfg.seed, str(out / "cache"),
                              cfg.device, PlainConfig(classes=cfg.classes), reading=read_as)
    if cfg.members:  # members read again, now in the data's class order
        candidates = candidates_for(cfg, splits.class_names)
    report = Report(out, cfg, budget, splits)
    bar = tqdm(total=round(cfg.limit_s), unit="s", desc="auto", disable=not cfg.progress,
               bar_format="{desc}: {n_fmt}/{total_fmt} s {bar} {postfix}")
    stage = _stage(bar, budget)
    stage("screening")
    screened = _screen_all(candidates, splits, settings, cfg, budget, report, log, stage)
    labels = torch.as_tensor(splits.train.labels)
    single = _best_single(screened, splits)
    report.keep_if_better(fused_model([single], labels, settings), "screening",
                          f"best trunk on validation: {single.id}", row=report.rows[single.id], trunks=[single.id])
    stage("selection")
    selection = select(screened, labels, min_gain=cfg.min_gain, seed=cfg.seed, max_latency_ms=cfg.max_latency_ms,
                       max_params=cfg.max_params)
    report.selection(selection, screened, labels)
    log(f"selection: {' + '.join(selection.chosen)} ({selection.stopped})")
    stage("fusion")
    finalist = report.finalists(finalists(selection, screened, cfg.max_latency_ms, cfg.max_params), screened, labels)
    ids = finalist or selection.chosen
    chosen = [s for c in ids for s in screened if s.id == c]
    if len(chosen) > 1:
        report.keep_if_better(fused_model(chosen, labels, settings), "fusion",
                              "late_oof fusion of " + " + ".join(ids), row=cost_of(chosen), trunks=ids)
    stage("fine-tuning")
    if cfg.finetune:
        from fusionnet.workflows.auto.finetune import finetune_stage

        finetune_stage(chosen, splits, settings, cfg, budget, report, log)
    bar.close()
    return report.write()


def cost_of(chosen: list[Screened]) -> dict:
    """A set of trunks' summed inference time per image, parameters and screening seconds."""
    return {"ms_per_image": sum(s.ms_per_image for s in chosen), "params": sum(s.params for s in chosen),
            "seconds": sum(s.seconds for s in chosen)}


def _stage(bar, budget: Budget) -> Callable[[str], None]:
    def stage(name: str) -> None:
        bar.n = min(round(budget.spent()), bar.total)
        bar.set_postfix_str(f"{name}; {max(budget.left(), 0):.0f} s left")
        bar.refresh()
    return stage


def _best_single(screened: list[Screened], splits) -> Screened:
    return min(screened, key=lambda s: (scores_of(s.log_probs["val"], splits.val.labels)["nll"], s.id))


def _screen_all(candidates: list[Candidate], splits, settings: ScreenSettings, cfg: AutoConfig, budget: Budget,
                report: "Report", log, stage) -> list[Screened]:
    """Screen the candidates (as Ray tasks with ``--ray``) while the time allows; at least one is screened."""
    from fusionnet.utils.ray_tasks import ray_requested

    if ray_requested(cfg.ray):
        from fusionnet.workflows.auto.on_ray import screen_with_ray

        screened = screen_with_ray(candidates, cfg, settings, budget, log)
        for c in candidates:
            if c.id not in {s.id for s in screened}:
                report.skipped(c.id, "its screening task did not finish within the time limit")
    else:
        screened = []
        for candidate in candidates:
            cost = max((s.seconds for s in screened), default=0.0)  # the slowest so far: the estimate
            if screened and not budget.fits(cost):
                report.skipped(candidate.id, f"screening it (about {cost:.0f} s) would pass the time limit")
                continue
            screened.append(screen(candidate, splits, settings, log))
            stage(f"screening ({len(screened)}/{len(candidates)})")
    for s in screened:
        report.trunk(s)
    return screened


class Report:
    """The leaderboard as it grows, ``selected.pth`` (the best model on validation so far) and the report files."""

    def __init__(self, out: Path, cfg: AutoConfig, budget: Budget, splits) -> None:
        self.out, self.cfg, self.budget, self.splits = out, cfg, budget, splits
        self.rows: dict[str, dict] = {}
        self.steps: list[dict] = []
        self.stages: list[dict] = []
        self.skips: dict[str, str] = {}
        self.best: tuple[float, str] | None = None  # (val NLL, row id) of selected.pth
        self.stopped = ""
        self.finalist: list[str] | None = None  # the set validation chose among the finalists

    def skipped(self, what: str, why: str) -> None:
        self.skips[what] = why

    def trunk(self, s: Screened) -> None:
        self.rows[s.id] = {"kind": "trunk", "trunks": [s.id], **self._scored(s.log_probs), "oof_nll": s.oof_nll,
                           "oof_acc": s.oof_acc, "ms_per_image": s.ms_per_image, "params": s.params,
                           "seconds": s.seconds, "C": s.C, "taps": s.taps}

    def selection(self, selection, screened: list[Screened], labels) -> None:
        for step in selection.steps:
            row_id = self._late_oof_row(step.chosen, screened, labels)
            self.rows[row_id].update(oof_nll=step.oof_nll, oof_acc=step.oof_acc)
            self.steps.append({**asdict(step), "row": row_id})
        self.stopped = selection.stopped

    def finalists(self, sets: list[list[str]], screened: list[Screened], labels) -> list[str] | None:
        """Add a row for each finalist set (scored from the screened predictions) and return the one of lowest
        validation NLL, a set with more trunks only where it is lower by ``min_gain`` (None: no set of two or more
        trunks)."""
        best = None
        for ids in sets:
            row_id = self._late_oof_row(ids, screened, labels)
            self.rows[row_id]["finalist"] = True
            best_nll = self.rows["late_oof:" + "+".join(best)]["val"]["nll"] if best else None
            if best is None or self.rows[row_id]["val"]["nll"] < best_nll - (len(ids) > len(best)) * self.cfg.min_gain:
                best = ids  # a longer set must gain the same margin on validation as on the out-of-fold NLL
        self.finalist = best
        return best

    def _late_oof_row(self, ids: list[str], screened: list[Screened], labels) -> str:
        """The row of the late_oof fusion of the trunks ``ids``, scored from the screened predictions (once)."""
        chosen = [s for c in ids for s in screened if s.id == c]
        row_id = "late_oof:" + "+".join(ids)
        if row_id not in self.rows:
            self.rows[row_id] = {"kind": "fusion", "trunks": list(ids), **cost_of(chosen),
                                 **self._scored(late_oof_log_probs(chosen, labels, self.cfg.seed))}
        return row_id

    def _scored(self, log_probs: dict) -> dict:
        return {split: scores_of(log_probs[split], getattr(self.splits, split).labels) for split in ("val", "test")}

    def keep_if_better(self, model, stage: str, what: str, row: dict | None = None,
                       trunks: list[str] | None = None) -> None:
        """Score ``model`` (running it: the served answers), add its row, and write it as ``selected.pth`` when its
        validation NLL is the lowest so far."""
        from fusionnet.engine.inference import predict
        from fusionnet.models.factory import save_model

        log_probs = {}
        for split in ("val", "test"):
            probs, _ = predict(model, getattr(self.splits, split), device=self.cfg.device)
            log_probs[split] = probs.double().clamp_min(1e-12).log()
        trunks = trunks or [b.name for b in model.config.branches]
        row_id = f"{stage}:" + "+".join(trunks)
        self.rows[row_id] = {**(row or {}), "kind": stage, "trunks": trunks, **self._scored(log_probs),
                             "model": True}
        nll = self.rows[row_id]["val"]["nll"]
        kept = self.best is None or nll < self.best[0]
        if kept:
            save_model(model, self.out / "selected.pth", metrics={"auto": {"stage": stage, "row": row_id,
                                                                           "val": self.rows[row_id]["val"]}},
                       data={"input_size": int(self.splits.val[0][0].shape[-1]), "seed": self.cfg.seed,
                             "files": None, "train_images": len(self.splits.train)})
            self.best = (nll, row_id)
        self.stages.append({"stage": stage, "what": what, "row": row_id, "val_nll": nll, "selected": kept,
                            "seconds": self.budget.spent()})
        self.write()

    def write(self) -> dict:
        from fusionnet.utils.files import atomic_write_json, atomic_write_text
        from fusionnet.workflows.auto.report import leaderboard_markdown, pareto_figure

        report = {"data": self.cfg.data, "time_limit_s": self.cfg.limit_s, "seconds": self.budget.spent(),
                  "selected": self.best[1] if self.best else None, "selected_model": str(self.out / "selected.pth"),
                  "stages": self.stages, "selection": {"steps": self.steps, "stopped": self.stopped,
                                                       "finalist": self.finalist},
                  "skipped": self.skips, "rows": self.rows,
                  "settings": {k: v for k, v in asdict(self.cfg).items()}}
        atomic_write_json(self.out / "results.json", report)
        atomic_write_text(self.out / "leaderboard.md", leaderboard_markdown(report))
        pareto_figure(report, self.out / "pareto.png")
        return report

