"""The files of a training run's folder, written as epochs end: ``history.json``, ``best.pth``, ``final.pth`` and,
at the end, ``history.png``; every file written atomically (:mod:`fusionnet.utils.files`)."""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from fusionnet.models import checkpoints as ckpt
from fusionnet.config import TrainConfig
from fusionnet.utils.files import atomic_write_json
from fusionnet.models.interface import Classifier

WRITE_SHARE = 0.1  # the share of training time that checkpoint writes may take (see RunWriter)
WRITE_BYTES_PER_S = 400e6  # the first write's cost is estimated from the weights' bytes at this pace (two 48 MB
# files of the demo's fusion models took 0.25 s here); every later write's is measured


class RunWriter:
    """The run folder's per-epoch files: ``history.json`` every epoch; ``best.pth`` and ``final.pth`` (the resume
    point) together, every epoch unless writing them would take more than WRITE_SHARE of the training time since
    the last write (short epochs, e.g. a head on cached features beside three trunks' weights: then every few
    epochs, so a crash loses at most ~10 write times of work; before the first write its time is estimated from
    the weights' size); always after the last epoch or an early stop;
    ``history.png`` at the end. An improved epoch that is not written yet is kept in memory (on the CPU)."""

    def __init__(self, out: Path, clf: Classifier, class_names, cfg: TrainConfig, data: dict | None = None) -> None:
        self.out, self.clf, self.class_names, self.cfg, self.data = out, clf, class_names, cfg, data
        self.write_s: float | None = None  # the last write's seconds (None: none yet, estimated)
        self.since_s = 0.0
        self.best: tuple[dict | None, dict] | None = None  # (state dict or None: the model as it is, metrics)

    def epoch(self, model: nn.Module, row: dict, improved: bool, resume_state: dict, last: bool) -> None:
        summary = {**row, "monitor": self.cfg.monitor, "best_epoch": resume_state["best_epoch"]}
        self.since_s += row["seconds"]
        if self.write_s is None:  # best.pth and final.pth, each the whole state dict
            weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            self.write_s = 2 * weights / WRITE_BYTES_PER_S
        due = last or self.since_s * WRITE_SHARE >= self.write_s
        if improved:
            state = None if due else {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best = (state, summary)
        atomic_write_json(self.out / "history.json", resume_state["history"])
        if not due:
            return
        t0 = time.perf_counter()
        config = self.clf.model_config()
        if self.best is not None:  # written first: final.pth's resume state never names a best epoch not on disk
            state, best_summary = self.best
            ckpt.save_checkpoint(self.out / "best.pth", config=config, class_names=self.class_names,
                                 state_dict=state if state is not None else model.state_dict(),
                                 metrics=best_summary, data=self.data)
            self.best = None
        ckpt.save_checkpoint(self.out / "final.pth", config=config, state_dict=model.state_dict(),
                             class_names=self.class_names, metrics=summary, extra=resume_state, data=self.data)
        self.write_s, self.since_s = time.perf_counter() - t0, 0.0

    def finish(self, history: list[dict]) -> None:
        from fusionnet.utils.plots import training_curves  # matplotlib only where a run folder is written

        training_curves(history, self.out / "history.png")
