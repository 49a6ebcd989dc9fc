"""``fusionnet auto``'s last stage: fine-tune the chosen members and fit their late fusion cross-fitted
(:mod:`fusionnet.workflows.compare.crossfit`), when the measured training-step times say it fits in the time left.

The estimate: one training step of each chosen member timed on a real batch; an epoch is that times the steps of an
epoch, plus a validation pass; the stage trains each member ``E`` epochs on the whole training split and ``folds``
more times on ``(folds - 1) / folds`` of it, about ``E * epoch * (1 + (folds - 1))`` seconds per member. ``E`` is
the most epochs (up to :data:`MAX_EPOCHS`) whose estimate fits in what is left; under :data:`MIN_EPOCHS` the stage
is skipped and the report says why. A :class:`Deadline` callback stops any training the estimate got wrong at the
time limit, and then the stage's model is not considered.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from fusionnet.config import regime_train_config
from fusionnet.engine.callbacks import Callback
from fusionnet.errors import TrainingError

MIN_EPOCHS, MAX_EPOCHS = 2, 10


class TimeUp(TrainingError):
    """The time limit came during training."""


class Deadline(Callback):
    """Stops training (raises :class:`TimeUp`) after any step that ends past ``budget``'s limit."""

    def __init__(self, budget) -> None:
        self.budget = budget

    def on_step_end(self, model) -> None:
        if self.budget.left() <= 0:
            raise TimeUp("the time limit was reached during training")


def step_seconds(model, splits, batch_size: int, device: str) -> float:
    """One training step of ``model`` (every layer) on a real batch: the best of 2 after a warm-up."""
    from fusionnet.utils.distributed import place

    dev = place(model, device)
    model.set_trainable_stages(None)
    model.train()
    x = torch.stack([splits.train[i][0] for i in range(min(batch_size, len(splits.train)))]).to(dev)
    y = torch.as_tensor([splits.train[i][1] for i in range(len(x))], device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    model.cpu().eval()
    return min(times[1:])


def plan_epochs(epoch_s: list[float], folds: int, left_s: float) -> int:
    """The most epochs (<= MAX_EPOCHS) whose estimated cost for every member, fully and cross-fitted, fits."""
    per_epoch = sum(epoch_s) * folds  # the full training plus folds trainings on (folds-1)/folds of the data
    return min(MAX_EPOCHS, int(left_s // per_epoch)) if per_epoch > 0 else MAX_EPOCHS


def finetune_stage(chosen, splits, settings, cfg, budget, report, log) -> None:
    """Fine-tune the chosen members and keep their cross-fitted late fusion when validation prefers it."""
    from fusionnet.workflows.compare.crossfit import CrossFitted
    from fusionnet.workflows.pipeline import Context, Trained

    builders = {s.id: _builder(s.candidate, settings) for s in chosen}
    train = regime_train_config("finetune", seed=cfg.seed, progress=False, device=cfg.device, patience=3,
                                log=cfg.log, log_dir=cfg.log_dir)
    batches = math.ceil(len(splits.train) / train.batch_size)
    epoch_s = [step_seconds(build(), splits, train.batch_size, cfg.device) * batches * 1.2 for build in
               builders.values()]  # 1.2: the validation pass and the loader
    folds = cfg.folds if len(chosen) > 1 else 1  # one member: no fusion to cross-fit
    epochs = plan_epochs(epoch_s, folds, budget.left() - 0.03 * budget.limit_s)
    if epochs < MIN_EPOCHS:
        need = MIN_EPOCHS * sum(epoch_s) * folds
        report.skipped("fine-tuning", f"{MIN_EPOCHS} epochs of the {len(chosen)} chosen member(s), fully and "
                                      f"cross-fitted ({cfg.folds} folds), take about {need:.0f} s; "
                                      f"{max(budget.left(), 0):.0f} s were left")
        log(f"fine-tuning skipped: about {need:.0f} s needed, {max(budget.left(), 0):.0f} s left")
        return
    log(f"fine-tuning: {len(chosen)} member(s), {epochs} epochs each"
        + (f", their fusion cross-fitted with {folds} folds" if len(chosen) > 1 else ""))
    train = replace(train, epochs=epochs)
    quiet = (lambda m: None if m.startswith("epoch ") else log(m))  # a line per stage step, not per epoch
    ctx = Context.of(splits, report.out / "finetune", train, log=quiet)
    deadline = [Deadline(budget)]
    t0 = time.perf_counter()
    try:
        members = [Trained(name, lambda b=build: (b(), 0.0), train, kind="member",
                           callbacks=lambda: list(deadline)).run(ctx) for name, build in builders.items()]
        model = members[0].model if len(members) == 1 else CrossFitted(
            "finetuned_late_oof", builders, [m.model for m in members], 0.0, train, cfg.folds, seed=cfg.seed,
            callbacks=lambda: list(deadline)).run(ctx).model
    except TimeUp:
        report.skipped("fine-tuning", "the time limit came during training; the stage's model is not used")
        log("fine-tuning stopped at the time limit")
        return
    what = "fine-tuned " + " + ".join(builders) + (" (cross-fitted fusion)" if len(members) > 1 else "")
    report.keep_if_better(model, "finetuned", what, row={"seconds": time.perf_counter() - t0},
                          trunks=list(builders))


def _builder(candidate, settings):
    """A fresh member to fine-tune: the candidate's trunk with a Linear head (a backbone: pretrained; a member
    checkpoint: its own weights and head)."""
    def build():
        torch.manual_seed(settings.seed)
        if candidate.checkpoint is not None:
            from fusionnet.models.plain import load_member

            return load_member(candidate.checkpoint, class_names=settings.class_names, plain=settings.plain)
        from fusionnet.models.branch import BranchConfig
        from fusionnet.models.factory import create_fusionnet

        return create_fusionnet([BranchConfig(candidate.backbone, input_size=candidate.size)],
                                class_names=settings.class_names, pretrained=settings.pretrained,
                                **(settings.reading or {}))  # read as the members are, so they fuse
    return build
