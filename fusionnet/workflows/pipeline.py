"""One pipeline for "make a model, score it on val and test, keep its outputs", shared by ``compare`` and ``fuse``.

A comparison is a list of entries. Each entry makes one model and runs the same three steps:

* :class:`Trained`: build it -> :func:`fusionnet.engine.train.fit` (best epoch on validation) -> load the best epoch;
* :class:`ClosedForm`: build it -> its fusion method's closed-form fit on the training split's cached features
  (:func:`fusionnet.engine.late_fit.fit_closed_form`) -> save it;
* :class:`Loaded`: a model the user trained already (``fuse``'s members);

then :func:`score` predicts validation and test once, saves both as member-output files (what every output
ensemble reads) and returns a :class:`Scored`. :class:`Table` turns scored entries and output-ensemble methods into
the rows of a report, and :meth:`Table.add_selected` adds the rows chosen on validation.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fusionnet.ensembles.calibration import fit_temperature, scaled_nll
from fusionnet.config import SELECT_BY
from fusionnet.data.splits import Splits
from fusionnet.data.datasets import training_record
from fusionnet.ensembles.methods import ENSEMBLES, EnsembleMethod, MemberProbs, MethodOutput, cross_validated
from fusionnet.errors import DataError
from fusionnet.models.checkpoints import read_checkpoint
from fusionnet.models.factory import save_model
from fusionnet.engine.feature_cache import cache_closed_form_features, cached_features, fit_closed_form_on
from fusionnet.utils.metrics import accuracy, classification_metrics, nll
from fusionnet.engine.train import TrainConfig, fit
from fusionnet.ensembles.voting import MemberOutputs, check_aligned, member_outputs
from fusionnet.workflows.rows import SELECTED_ENSEMBLE, SELECTED_FUSION, SELECTED_FUSION_SCALED, member_id

SPLITS = ("val", "test")


@dataclass
class Context:
    """What every entry of one comparison shares."""

    splits: Splits
    out: Path  # outputs/<name>_<split>.pt and models/<name>/ go here
    device: str = "auto"
    workers: int = 0
    progress: bool = True
    cache_dir: Callable[[str], str | None] = lambda name: None  # the feature cache of an entry, by its name
    predict_from_cache: bool = False  # predict val/test through the entry's feature cache (frozen trunks)
    keep: str = "all"  # which model files stay once an entry is scored: all | best (no final.pth: nothing resumes
    # a scored entry) | outputs (no model file; the saved outputs and the report stay)
    log: Callable[[str], None] = lambda _m: None

    @classmethod
    def of(cls, splits: Splits, out: Path, train: TrainConfig, *, log: Callable[[str], None] | None = None,
           **fields) -> "Context":
        """The one way a workflow makes its Context: device, workers and progress from its TrainConfig."""
        return cls(splits, Path(out), device=train.device, workers=train.num_workers, progress=train.progress,
                   log=log or (lambda _m: None), **fields)


@dataclass
class Scored:
    """An entry's val and test outputs and what it cost."""

    name: str
    kind: str  # member | fusion
    outputs: dict[str, MemberOutputs]
    info: dict = field(default_factory=dict)  # seconds, params, best epoch, checkpoint, val scores, ...
    model: nn.Module | None = None  # the scored model, on the CPU (for rows derived from it)


def val_scores(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, NLL and the NLL after the split's own temperature (:func:`fusionnet.ensembles.calibration.scaled_nll`)."""
    return {"acc": accuracy(probs, labels), "nll": nll(probs, labels), "nll_scaled": scaled_nll(probs, labels)}


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def score(model: nn.Module, ctx: Context, name: str, kind: str, *, checkpoint: str | None = None,
          cached: bool = False) -> Scored:
    """Predict val and test once with ``model``; save both as member outputs. ``cached``: through the entry's
    feature cache (eval-mode branch outputs computed once, shared with its training)."""
    t0 = time.perf_counter()
    outputs = {}
    for split in SPLITS:
        data = getattr(ctx.splits, split)
        source = data
        if cached:
            source, _ = cached_features(model, data, cache_dir=ctx.cache_dir(name), device=ctx.device,
                                        batch_size=64, num_workers=ctx.workers)
        outputs[split] = member_outputs(model, source, member=name, split=split, checkpoint=checkpoint,
                                        sample_ids=data.paths, batch_size=64, device=ctx.device,
                                        progress=ctx.progress, num_workers=ctx.workers if source is data else 0)
        outputs[split].save(ctx.out / "outputs" / f"{name}_{split}.pt")
    val = outputs["val"]
    info = {"predict_seconds": time.perf_counter() - t0, "params": params(model), "checkpoint": checkpoint,
            "val": val_scores(val.probs, val.labels)}
    return Scored(name, kind, outputs, info, model.cpu().eval())


@dataclass
class Trained:
    """Build a model (``build() -> (model, seconds already spent on it)``), train it, score its best epoch."""

    name: str
    build: Callable[[], tuple[nn.Module, float]]
    train: TrainConfig
    kind: str = "fusion"
    callbacks: Callable[[], list] = list  # training callbacks made when the entry runs (e.g. a teacher)
    after: Callable | None = None  # (best model, ctx, val source, best.pth) -> info: e.g. choose its output

    def run(self, ctx: Context) -> Scored:
        model, prior_s = self.build()
        t0 = time.perf_counter()
        result = fit(model, ctx.splits.train, ctx.splits.val, self.train, out_dir=ctx.out / "models" / self.name,
                     log=ctx.log, callbacks=self.callbacks())
        best = _best_epoch(model, result.best_path)
        cached = ctx.predict_from_cache and result.used_cache
        chosen = {} if self.after is None else self.after(best, ctx, self._val_source(best, ctx, cached),
                                                          result.best_path)
        train_s = time.perf_counter() - t0
        scored = score(best, ctx, self.name, self.kind, checkpoint=result.best_path, cached=cached)
        scored.info.update(train_seconds=train_s, best_epoch=result.best_epoch, epochs_run=len(result.history),
                           seconds=prior_s + train_s + scored.info["predict_seconds"], **chosen)
        _tidy(ctx, ctx.out / "models" / self.name)
        return scored


    def _val_source(self, model: nn.Module, ctx: Context, cached: bool):
        if not cached:
            return ctx.splits.val
        feats, _ = cached_features(model, ctx.splits.val, cache_dir=ctx.cache_dir(self.name), device=ctx.device,
                                   batch_size=64, num_workers=ctx.workers)
        return feats


def choose_output(model: nn.Module, ctx: Context, val_source, checkpoint: str) -> dict:
    """After co-distillation: what the model predicts (fused head, branch vote, or both), chosen on validation
    NLL and written into its best.pth."""
    from fusionnet.engine.inference import choose_and_save_prediction

    return {"predict_with": choose_and_save_prediction(model, val_source, checkpoint, device=ctx.device,
                                                       log=ctx.log)}


def _best_epoch(model: nn.Module, path: str) -> nn.Module:
    """The trained model with the weights of the epoch chosen on validation (read from best.pth into the model
    already built: no trunk is built twice)."""
    model.load_state_dict(read_checkpoint(path)["state_dict"])
    return model.eval()


@dataclass
class ClosedForm:
    """Build a model on frozen trunks, fit its fusion method in closed form on the training split, score it."""

    name: str
    build: Callable[[], tuple[nn.Module, float]]
    seed: int = 0
    kind: str = "fusion"
    warning: str | None = None  # logged and kept with the row (e.g. a fit on features of fine-tuned trunks)

    def run(self, ctx: Context) -> Scored:
        return self.start(ctx).result()

    def start(self, ctx: Context, *, background: bool = False) -> "Pending":
        """Build the model; with ``background``, where its features can be cached and torch has two threads or
        more, compute them for every split here (the trunk pass: what later entries load from the shared
        cache), then fit and score it in a thread of its own while this one goes on (each with half the torch
        threads; its log lines held until :meth:`Pending.result`). Otherwise all of it here, at once."""
        if self.warning:
            ctx.log(f"WARNING: {self.warning}")
        t0 = time.perf_counter()
        model, prior_s = self.build()
        threads = torch.get_num_threads()
        if not (background and threads >= 2 and ctx.cache_dir(self.name) is not None):
            return Pending.done(self._fit_and_score(model, prior_s, t0, ctx))
        cache_closed_form_features(model, ctx.splits, cache_dir=ctx.cache_dir(self.name), device=ctx.device,
                                   num_workers=ctx.workers, progress=ctx.progress)
        return Pending.in_thread(lambda quiet: self._fit_and_score(model, prior_s, t0, quiet), ctx, threads)

    def _fit_and_score(self, model: nn.Module, prior_s: float, t0: float, ctx: Context) -> Scored:
        fitted = fit_closed_form_on(model, ctx.splits, cache_dir=ctx.cache_dir(self.name), device=ctx.device,
                                    seed=self.seed, log=ctx.log, num_workers=ctx.workers, progress=ctx.progress)
        facts = asdict(fitted)
        path = str(ctx.out / "models" / self.name / "best.pth")
        save_model(model, path, metrics={"closed_form_fit": facts},
                   data=training_record(ctx.splits.train, self.seed))
        train_s = time.perf_counter() - t0
        scored = score(model, ctx, self.name, self.kind, checkpoint=path, cached=True)
        scored.info.update(train_seconds=train_s, best_epoch=None, epochs_run=0, closed_form_fit=facts,
                           seconds=prior_s + train_s + scored.info["predict_seconds"])
        if self.warning:
            scored.info["warning"] = self.warning
        _tidy(ctx, ctx.out / "models" / self.name)
        return scored


class Pending:
    """An entry's result, ready or being made in a thread of its own (:meth:`ClosedForm.start`)."""

    def __init__(self) -> None:
        self._scored: Scored | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._held: list[str] = []
        self._ctx: Context | None = None
        self._threads = 0  # torch's thread count to restore once the thread is done (0: nothing to restore)
        self._cancel = threading.Event()

    @classmethod
    def done(cls, scored: Scored) -> "Pending":
        pending = cls()
        pending._scored = scored
        return pending

    @classmethod
    def in_thread(cls, work: Callable[[Context], Scored], ctx: Context, threads: int) -> "Pending":
        """Run ``work(quiet ctx)`` in a thread, torch's threads halved meanwhile: the two threads share the cores
        instead of contending. ``work`` checks :func:`fusionnet.utils.threads.check_cancelled` as it goes, so
        :meth:`stop` ends it within a step (a daemon thread too: a process that exits anyway does not wait)."""
        from fusionnet.utils.threads import cancel_with

        pending = cls()
        pending._ctx, pending._threads = ctx, threads
        quiet = replace(ctx, log=pending._held.append, progress=False)

        def target() -> None:
            cancel_with(pending._cancel)
            try:
                pending._scored = work(quiet)
            except BaseException as exc:  # handed to result(), raised in the caller's thread
                pending._error = exc

        torch.set_num_threads(max(1, threads // 2))
        pending._thread = threading.Thread(target=target, name="fusionnet-closed-form", daemon=True)
        pending._thread.start()
        return pending

    def result(self) -> Scored:
        """The scored entry, once its thread is done; its log lines are passed on now, its error raised here."""
        if self._thread is not None:
            self._thread.join()  # waited for, not cancelled
            self._thread = None
            self.stop()
            for line in self._held:
                self._ctx.log(line)
        if self._error is not None:
            raise self._error
        return self._scored

    def raise_if_failed(self) -> None:
        """Raise the thread's error now if it has failed already (the caller need not finish its own work first)."""
        if self._thread is not None and not self._thread.is_alive() and self._error is not None:
            self.result()

    def stop(self) -> None:
        """Done with it, whatever happened: a thread still running (the caller failed or was interrupted) is
        cancelled and waited for; torch gets its threads back."""
        if self._thread is not None:
            self._cancel.set()
            self._thread.join()
            self._thread = None
        if self._threads:
            torch.set_num_threads(self._threads)
            self._threads = 0


def _tidy(ctx: Context, folder: Path) -> None:
    """Remove the model files ``ctx.keep`` does not keep (the entry is scored; its model stays in memory)."""
    drop = {"all": (), "best": ("final.pth",), "outputs": ("final.pth", "best.pth")}[ctx.keep]
    for name in drop:
        (folder / name).unlink(missing_ok=True)


@dataclass
class Loaded:
    """A model trained elsewhere (e.g. the user's member checkpoint): scored only."""

    name: str
    model: nn.Module
    checkpoint: str | None = None
    kind: str = "member"

    def run(self, ctx: Context) -> Scored:
        scored = score(self.model, ctx, self.name, self.kind, checkpoint=self.checkpoint)
        scored.info.update(train_seconds=0.0, seconds=scored.info["predict_seconds"])
        return scored


class Table:
    """The rows of a report: test metrics of every scored entry and ensemble method, with their val scores."""

    def __init__(self, members: list[Scored], class_names: list[str]) -> None:
        val = [m.outputs["val"] for m in members]
        test = [m.outputs["test"] for m in members]
        check_aligned(val)
        check_aligned(test)
        self.members, self.class_names = members, class_names
        self.y_val, self.y_test = val[0].labels, test[0].labels
        self.rows: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}
        self.candidates: dict[str, list[str]] = {"fusion": [], "ensemble": []}  # what the selected rows choose from
        self.fusion_outputs: dict[str, dict[str, MemberOutputs]] = {}
        self.not_probabilities: set[str] = set()  # ensemble rows whose outputs are vote fractions (hard voting)
        for m in members:
            self.add(member_id(m.name), m.outputs["test"].probs, m.info["seconds"], m.info["params"],
                     m.info["val"], "member")

    def add(self, row_id: str, test_probs: torch.Tensor, seconds: float, params: int, val: dict | None, kind: str,
            **extra) -> None:
        m = classification_metrics(test_probs, self.y_test, self.class_names)
        self.rows[row_id] = {"acc": m["acc"], "macro_f1": m["macro_f1"], "nll": m["nll"], "ece": m["ece"],
                            "seconds": seconds, "params": params, "val": val, "kind": kind,
                            "confusion": m["confusion"], "pred": test_probs.argmax(1).tolist(), "probs": test_probs,
                            **extra}

    def member_probs(self, seed: int = 0) -> MemberProbs:
        return MemberProbs(torch.stack([m.outputs["val"].probs for m in self.members]), self.y_val,
                           torch.stack([m.outputs["test"].probs for m in self.members]), seed)

    def add_ensembles(self, methods: list[EnsembleMethod] | None = None, seed: int = 0,
                      log: Callable[[str], None] = lambda _m: None) -> None:
        """Every registered output-ensemble method (or ``methods``) over the members' saved outputs (chosen among
        on validation); a row each, under the method's id."""
        probs = self.member_probs(seed)
        member_s = sum(m.info["seconds"] for m in self.members)
        member_params = [m.info["params"] for m in self.members]
        for spec in ENSEMBLES.values() if methods is None else methods:
            method = spec.id
            t0 = time.perf_counter()
            try:
                res: MethodOutput = spec.run(probs)
            except DataError as exc:  # e.g. stacking on a validation split too small for its folds
                self.skipped[method] = str(exc)
                log(f"skipped {method}: {exc}")
                continue
            used = sum(p for p, w in zip(member_params, res.weights or [1] * len(member_params)) if w > 0)
            scores = res.val_scores if res.val is None else val_scores(res.val, self.y_val)
            honest = scores if res.val is None else self._cross_validated(spec, probs)
            self.add(method, res.test, member_s + time.perf_counter() - t0, used, scores, "ensemble",
                     val_cv=honest, **res.extra)
            self.candidates["ensemble"].append(method)
            if not spec.probabilities:  # vote fractions: not chosen by a proper score (add_selected)
                self.not_probabilities.add(method)

    def _cross_validated(self, spec: EnsembleMethod, probs: MemberProbs) -> dict | None:
        """A method's validation scores cross-validated on validation (what the selected ensemble chooses by)."""
        try:
            oof = cross_validated(spec, probs)
        except DataError:  # e.g. a fold too small for the method's own fit
            return None
        return None if oof is None else val_scores(oof, self.y_val)

    def add_fusion(self, scored: Scored, row_id: str) -> None:
        check_aligned([self.members[0].outputs["val"], scored.outputs["val"]])
        check_aligned([self.members[0].outputs["test"], scored.outputs["test"]])
        self.fusion_outputs[row_id] = scored.outputs
        self.add(row_id, scored.outputs["test"].probs, scored.info["seconds"], scored.info["params"],
                 scored.info["val"], "fusion")
        self.candidates["fusion"].append(row_id)

    def pick(self, names: list[str], by: str) -> str:
        """The row with the best validation score (NLL, scaled or not: lowest; accuracy: highest); the first on
        ties. An output ensemble is scored by its ``val_cv`` (fitted on the other folds of validation), so methods
        fitted on validation do not win by their in-sample fit. A row whose validation scores are already
        out-of-fold fits (e.g. LR stacking's) has no separate scaled NLL: its NLL stands for it."""
        def key(n: str) -> tuple[float, int]:
            val = self.rows[n].get("val_cv") or self.rows[n]["val"]  # ensembles: cross-validated on validation
            return (-val["acc"] if by == "acc" else val.get(by, val["nll"]), names.index(n))
        return min(names, key=key)

    def add_selected(self, by: str = SELECT_BY) -> None:
        """The selected fusion (``selected:fusion``, and its temperature-scaled copy) among the fusion entries, and
        the selected ensemble (``selected:ensemble``) among the output ensembles of the members; a table without
        fusion entries gets the selected ensemble only."""
        if self.candidates["fusion"]:
            self._add_selected_fusion(by)
        ensembles = [n for n in self.candidates["ensemble"] if self.rows[n]["val"] is not None
                     and (by == "acc" or n not in self.not_probabilities)]  # accuracy is defined on vote fractions
        if ensembles:
            best_ensemble = self.pick(ensembles, by)
            e = self.rows[best_ensemble]
            self.add(SELECTED_ENSEMBLE, e["probs"], e["seconds"], e["params"], e["val"], "selected",
                     chosen=best_ensemble, chosen_by="val_cv" if e.get("val_cv") else "val")

    def _add_selected_fusion(self, by: str) -> None:
        best_fusion = self.pick(self.candidates["fusion"], by)
        chosen, r = self.fusion_outputs[best_fusion], self.rows[best_fusion]
        self.add(SELECTED_FUSION, chosen["test"].probs, r["seconds"], r["params"], r["val"],
                 "selected", chosen=best_fusion)
        temp = fit_temperature(chosen["val"].probs, self.y_val)
        self.add(SELECTED_FUSION_SCALED, temp.apply(chosen["test"].probs), r["seconds"],
                 r["params"], val_scores(temp.apply(chosen["val"].probs), self.y_val), "calibrated",
                 temperature=temp.temperature)
