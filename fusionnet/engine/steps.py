"""One training epoch and one step of ``fit``: forward, loss (task, aux heads, callbacks' terms), backward,
callbacks, clipping, optimiser and schedule; the non-finite check without waiting for the GPU every step."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from fusionnet.engine.inputs import batches as epoch_batches
from fusionnet.engine.state import Run
from fusionnet.errors import TrainingError
from fusionnet.utils.distributed import autocast


def train_epoch(run: Run, step: nn.Module, epoch: int) -> float:
    """One pass over the training source; ``step`` maps a batch to a ModelOutput (a TrainStep, DDP-wrapped under
    torchrun). The loss sum and the first non-finite step stay on the device; the host reads them every
    ``sync_every`` steps (the progress bar, the non-finite check) and at the end."""
    cfg = run.cfg
    epoch_seed = cfg.seed * 100_003 + epoch  # order and augmentation depend on (seed, epoch) only: resumable
    batches, count = epoch_batches(run, epoch, epoch_seed)
    step.train()
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=run.device)
    seen = 0
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress or run.rank != 0,
               leave=False, total=count)
    for i, (x, y) in enumerate(bar):
        loss = _step(run, step, x, y)
        total += loss.double() * len(y)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad)
        seen += len(y)
        if (i + 1) % cfg.sync_every == 0:
            _check_finite(run, first_bad, epoch)
            bar.set_postfix(loss=f"{float(total) / seen:.4f}")
    _check_finite(run, first_bad, epoch)
    t = torch.stack([total, torch.tensor(float(seen), dtype=torch.float64, device=run.device)])
    if run.world > 1:
        t = t.cpu()
        dist.all_reduce(t)
    return float(t[0]) / max(float(t[1]), 1)


def _check_finite(run: Run, first_bad: torch.Tensor, epoch: int) -> None:
    bad = int(first_bad)  # the one host read: waits for the queued steps
    if bad >= 0:
        raise TrainingError(f"the training loss became non-finite at epoch {epoch + 1}, step {bad + 1}; training "
                            f"stopped and the checkpoints of the last good epoch were kept. Lower lr (now "
                            f"{run.cfg.lr}), keep grad_clip on, or check the data for broken images")


def _step(run: Run, step: nn.Module, x, y: torch.Tensor) -> torch.Tensor:
    """Forward, loss (task + aux heads + callbacks' terms), backward, callbacks, clip, step; returns the loss
    (detached, on the device: nothing here waits for the GPU)."""
    cfg = run.cfg
    target = y
    if run.inputs.mix is not None and len(y) % 2 == 0:
        x, target = run.inputs.mix(x, y)  # soft targets (B, K); callbacks still see the hard labels
    with autocast(run.device, cfg.amp):
        for cb in run.callbacks:
            cb.on_batch(run.clf, x, y)
        out = step(x)
        loss = run.opt.criterion(out.logits.float(), target)
        for aux in out.aux.values() if cfg.aux_weight else ():  # aux heads only add training signal
            loss = loss + cfg.aux_weight * run.opt.criterion(aux.float(), target)
        loss = loss * math.prod(cb.task_loss_weight for cb in run.callbacks)
        for cb in run.callbacks:
            for term in cb.extra_loss(run.clf, out, y).values():
                loss = loss + term
    run.opt.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for cb in run.callbacks:
        cb.on_after_backward(run.clf, out, y)
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_([p for g in run.opt.optimizer.param_groups for p in g["params"] if p.grad is not None],
                                 cfg.grad_clip)
    run.opt.optimizer.step()
    run.opt.scheduler.step()
    for cb in run.callbacks:
        cb.on_step_end(run.clf)
    return loss.detach()
