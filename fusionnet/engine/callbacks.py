"""Training tricks as callbacks: objects the training loop calls at named points, beside the model, not in it.

``fit`` calls, in order: :meth:`Callback.on_fit_start` (once, after the model is on its device),
:meth:`Callback.on_batch` (the batch the model is about to see, after mixup),
:meth:`Callback.extra_loss` (after the forward pass; returned terms are added to the task loss, which is scaled by
every callback's ``task_loss_weight``),
:meth:`Callback.on_after_backward` (before gradient clipping and the optimiser step), :meth:`Callback.on_step_end`
(after the optimiser step), :meth:`Callback.on_fit_end` (once, also when training stops with an error). A callback
whose :meth:`Callback.eval_model` returns a model has that model validated and saved instead of the trained one
(EMA); :meth:`Callback.state_dict` goes into ``final.pth`` for ``resume``. A trick that needs something from the
model asks for it through the model interface (:mod:`fusionnet.models.interface`).

* :class:`ActivationCheckpointing` (``TrainConfig.checkpoint_activations``): each trainable trunk recomputes its
  activations in backward instead of storing them (less memory, about one more forward pass of time).
* :class:`BranchStreams` (``TrainConfig.branch_streams``): on CUDA, each branch on its own stream.
* :class:`GradientModulation` (``TrainConfig.ogm_alpha``): OGM-GE (Peng et al., CVPR 2022) for M branches.
* :class:`Distillation` (``fusionnet.workflows.distill``): KL to a teacher's predictions on the same view.
* :class:`CoDistillation` (``TrainConfig.codistill``): the branch heads and the fused head teach each other through
  their online ensemble (ONE / PCL style), for fusion that beats the vote after fine-tuning.
* :class:`WeightAverage` (``TrainConfig.ema_decay``): an exponential moving average of the weights (timm's
  ``ModelEmaV3``), validated and saved in place of the trained weights.

Adding a trick: a Callback subclass with a ``key`` and a ``from_config`` classmethod (it builds itself from a
TrainConfig, or returns None when the config leaves it off), registered in :data:`CALLBACKS`; a TrainConfig field
if it should be a setting (every command that trains then has its flag). Or pass the object to
``fit(callbacks=[...])``. A callback's resume state in ``final.pth`` is kept under its stable ``key`` (two of one
key in a run: ``key``, ``key#2``), so renaming a class never drops it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fusionnet.config import TrainConfig
from fusionnet.errors import ConfigError
from fusionnet.models.interface import Classifier, ModelOutput
from fusionnet.utils.probabilities import soft_vote_logits
from fusionnet.registry import Registry


class Callback:
    """Base class: every hook does nothing."""

    key: str = ""  # the stable name of its resume state (registered callbacks: their registry name)
    task_loss_weight: float = 1.0  # scales the loss on the labels (and aux heads); 0: only the callbacks' terms

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Callback | None":
        """The callback a TrainConfig asks for, or None where the config leaves it off."""
        return None

    def on_fit_start(self, model: Classifier) -> None:
        pass

    def on_schedule(self, steps_per_epoch: int, epochs: int) -> None:
        """Told once, before the first step, how long training will be (for ramp-ups)."""

    def on_batch(self, model: Classifier, x: torch.Tensor, target: torch.Tensor) -> None:
        pass

    def extra_loss(self, model: Classifier, output: ModelOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def on_after_backward(self, model: Classifier, output: ModelOutput, target: torch.Tensor) -> None:
        pass

    def on_step_end(self, model: Classifier) -> None:
        pass

    def on_fit_end(self, model: Classifier) -> None:
        pass

    def on_epoch_end(self, model: Classifier, row: dict) -> None:
        """After validation: ``row`` is the epoch's history record (epoch, train_loss, val_acc, val_nll, lr, ...)."""

    def eval_model(self) -> Classifier | None:
        """The model to validate and save instead of the trained one (None: the trained one)."""
        return None

    def sampler(self, n: int, generator: torch.Generator) -> torch.utils.data.Sampler | None:
        """The order in which an epoch draws the ``n`` training samples (None: the usual shuffle)."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Distillation(Callback):
    """Function matching (Beyer et al., CVPR 2022): the student learns the teacher's predictions on the very view
    it sees (after augmentation and mixup), by ``T^2 * KL(teacher_T || student_T)`` at temperature T; the teacher
    runs in eval mode without gradients. ``label_weight`` keeps that much of the loss on the labels (0: none)."""

    def __init__(self, teacher: torch.nn.Module, temperature: float = 1.0, label_weight: float = 0.0) -> None:
        self.teacher, self.temperature, self.task_loss_weight = teacher, temperature, label_weight
        self.target: torch.Tensor | None = None

    def on_fit_start(self, model: Classifier) -> None:
        device = next(model.parameters()).device
        self.teacher.to(device).eval().requires_grad_(False)

    def on_batch(self, model: Classifier, x: torch.Tensor, target: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            from fusionnet.errors import ConfigError

            raise ConfigError("distillation needs the images themselves for the teacher, not cached branch "
                              "features: train the student with cache_features=False")
        with torch.no_grad():
            self.target = self.teacher(x).float()

    def extra_loss(self, model: Classifier, output: ModelOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"distill": distillation_loss(output.logits.float(), self.target, self.temperature)}


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, the batch mean; logits (B, K) each. The teacher
    is detached: no gradient flows into it."""
    t = temperature
    return torch.nn.functional.kl_div((student / t).log_softmax(1), (teacher.detach() / t).log_softmax(1),
                                      log_target=True, reduction="batchmean") * t * t


class CoDistillation(Callback):
    """Online co-distillation of a FusionNet with branch heads (``branch_heads=True``): every branch head and the
    fused head learn, beside their labels, the predictions of an online teacher on the same batch, by
    ``weight * ramp * T^2 * KL(teacher_T || head_T)`` summed over the heads (Deep Mutual Learning, ONE, PCL).

    The teacher is the soft vote of all the heads (``teacher="ensemble"``, detached: the heads learn from it, it
    learns only through them), or that vote computed by a temporal mean of the model's weights (``"mean"``, PCL's
    temporal-mean teacher: an EMA copy with decay ``mean_decay``, one more forward pass per step). ``ramp`` rises
    as ``exp(-5 (1 - t)^2)`` over the first ``rampup`` share of the steps (0: none), so the heads first learn from
    labels while the teacher is still poor."""

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "CoDistillation | None":
        return cls(cfg.codistill, cfg.codistill_temperature, teacher=cfg.codistill_teacher,
                   rampup=cfg.codistill_rampup) if cfg.codistill else None

    def __init__(self, weight: float = 1.0, temperature: float = 3.0, *, teacher: str = "ensemble",
                 rampup: float = 0.3, mean_decay: float = 0.999) -> None:
        if teacher not in ("ensemble", "mean"):
            raise ConfigError(f"codistill_teacher must be 'ensemble' or 'mean', got {teacher!r}")
        self.weight, self.temperature, self.teacher, self.rampup = weight, temperature, teacher, rampup
        self.mean_decay = mean_decay
        self.ramp_steps, self.step = 0, 0
        self.mean = None  # teacher "mean": the EMA copy of the model
        self.x = None

    def on_schedule(self, steps_per_epoch: int, epochs: int) -> None:
        self.ramp_steps = int(self.rampup * steps_per_epoch * epochs)

    def on_fit_start(self, model: Classifier) -> None:
        if self.teacher == "mean" and self.mean is None:
            from timm.utils import ModelEmaV3

            self.mean = ModelEmaV3(model, decay=self.mean_decay, use_warmup=True)
            self.mean.module.requires_grad_(False)

    def on_batch(self, model: Classifier, x, target: torch.Tensor) -> None:
        self.x = x

    def ramp(self) -> float:
        if self.step >= self.ramp_steps:
            return 1.0
        return math.exp(-5.0 * (1.0 - self.step / self.ramp_steps) ** 2)

    def extra_loss(self, model: Classifier, output: ModelOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        heads = [output.logits, *model.branch_head_logits(output).values()]
        if self.teacher == "ensemble":
            teacher = soft_vote_logits(heads)
        else:
            with torch.no_grad():
                module = self.mean.module.eval()
                mean_out = module.forward_head_output(self.x) if not isinstance(self.x, torch.Tensor) else \
                    module.forward_output(self.x)
                teacher = soft_vote_logits([mean_out.logits, *module.branch_head_logits(mean_out).values()])
        scale = self.weight * self.ramp()
        return {"codistill": scale * sum(distillation_loss(h.float(), teacher, self.temperature) for h in heads)}

    def on_step_end(self, model: Classifier) -> None:
        if self.mean is not None:
            self.mean.update(model, step=self.step)
        self.step += 1
        self.x = None

    def state_dict(self) -> dict:
        state = {"step": self.step}
        if self.mean is not None:
            state["mean"] = self.mean.module.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        if self.mean is not None and "mean" in state:
            self.mean.module.load_state_dict(state["mean"])


class WeightAverage(Callback):
    """EMA of the weights and buffers after every optimiser step (timm's ``ModelEmaV3`` with its decay warm-up:
    ``min(decay, 1 - (1 + step) ** -0.75)``, so a short run averages over its own length, not over the start)."""

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "WeightAverage | None":
        return cls(cfg.ema_decay) if cfg.ema_decay else None

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.ema = None
        self.step = 0

    def on_fit_start(self, model: Classifier) -> None:
        from timm.utils import ModelEmaV3

        if self.ema is None:
            self.ema = ModelEmaV3(model, decay=self.decay, use_warmup=True, warmup_power=0.75)
            self.ema.module.requires_grad_(False)

    def on_step_end(self, model: Classifier) -> None:
        self.ema.update(model, step=self.step)
        self.step += 1

    def eval_model(self) -> Classifier | None:
        return self.ema.module

    def state_dict(self) -> dict:
        return {"step": self.step, "weights": self.ema.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.ema.module.load_state_dict(state["weights"])


class Resample(Callback):
    """Boosting by resampling: each epoch draws the training samples in proportion to ``weights`` (N,), with
    replacement (:mod:`fusionnet.ensembles.members`)."""

    def __init__(self, weights) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)

    def sampler(self, n: int, generator: torch.Generator) -> torch.utils.data.Sampler:
        if len(self.weights) != n:
            raise ConfigError(f"sample weights have {len(self.weights)} entries for {n} training samples")
        return torch.utils.data.WeightedRandomSampler(self.weights, n, replacement=True, generator=generator)


class ActivationCheckpointing(Callback):
    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "ActivationCheckpointing | None":
        return cls() if cfg.checkpoint_activations else None

    def on_fit_start(self, model: Classifier) -> None:
        model.set_activation_checkpointing(True)

    def on_fit_end(self, model: Classifier) -> None:
        model.set_activation_checkpointing(False)


class BranchStreams(Callback):
    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "BranchStreams | None":
        return cls() if cfg.branch_streams else None

    def on_fit_start(self, model: Classifier) -> None:
        from fusionnet.models.streams import StreamRunner

        model.set_branch_runner(StreamRunner())

    def on_fit_end(self, model: Classifier) -> None:
        model.set_branch_runner(None)


class GradientModulation(Callback):
    """OGM-GE: scale the dominant branch's gradients by its coefficient and add Gaussian noise of the gradient's
    own spread (the GE part), so the slower branches get room to learn. Needs per-branch logit shares
    (``Classifier.branch_logit_shares``: a Linear head over concat or gated fusion)."""

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "GradientModulation | None":
        return cls(cfg.ogm_alpha) if cfg.ogm_alpha else None

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.last: dict[str, float] = {}  # the coefficients of the last step, by branch

    def on_after_backward(self, model: Classifier, output: ModelOutput, target: torch.Tensor) -> None:
        shares = model.branch_logit_shares(output)
        coeffs = ogm_coefficients(list(shares.values()), target, self.alpha)
        params = model.branch_parameters()
        self.last = dict(zip(shares, coeffs.tolist()))
        for name, k in self.last.items():
            if k >= 1:
                continue
            for p in params[name]:
                if p.grad is not None:
                    noise = torch.randn_like(p.grad) * p.grad.std() if p.grad.numel() > 1 else 0.0
                    p.grad.mul_(k).add_(noise)


def ogm_coefficients(branch_logits: Sequence[torch.Tensor], target: torch.Tensor, alpha: float) -> torch.Tensor:
    """OGM-GE's per-branch gradient coefficients (Peng et al., CVPR 2022), generalised to M branches.

    Each branch's score is the summed softmax probability its own logit contribution gives the true class; a
    branch whose score exceeds the mean of the others' by the ratio rho > 1 is dominant and gets
    ``1 - tanh(alpha * (rho - 1))``; the others get 1. Returns (M,) coefficients in (0, 1].
    """
    scores = torch.stack([lg.detach().float().softmax(1).gather(1, target[:, None]).sum() for lg in branch_logits])
    m = len(scores)
    others = (scores.sum() - scores) / max(m - 1, 1)
    rho = scores / others.clamp_min(1e-12)
    return torch.where(rho > 1, 1 - torch.tanh(alpha * (rho - 1)), torch.ones_like(rho))


class Tracking(Callback):
    """``TrainConfig.log``: each epoch's history record, and the settings, written where practitioners already look,
    with the libraries' own writers: tensorboard's ``SummaryWriter`` (scalars ``val/acc``, ``train/loss``, ...
    under ``log_dir/<run name>``) or an mlflow run (params and per-epoch metrics). Rank 0 only."""

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Tracking | None":
        return cls(cfg.log, cfg.log_dir, cfg.run_name or "fit", cfg) if cfg.log else None

    def __init__(self, kind: str, where: str | None, name: str, cfg: TrainConfig | None = None) -> None:
        from fusionnet.errors import MissingDependencyError, install_hint

        self.kind, self.cfg, self.writer = kind, cfg, None
        self.name = name.replace("/", "_")  # timm/test_resnet: one folder, not two
        module = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow"}.get(kind)
        if module is None:
            raise ConfigError(f"unknown log {kind!r}; choose tensorboard or mlflow")
        try:
            self.lib = __import__(module, fromlist=["_"])
        except ImportError as exc:
            raise MissingDependencyError(f"--log {kind} needs {kind}: {install_hint(kind)} ({exc})") from None
        self.where = where or ("runs/tensorboard" if kind == "tensorboard" else None)

    def on_fit_start(self, model: Classifier) -> None:
        from dataclasses import asdict

        from fusionnet.utils.distributed import rank_world

        if rank_world()[0] != 0:
            return
        params = {k: v for k, v in asdict(self.cfg).items() if isinstance(v, (int, float, str, bool))} \
            if self.cfg is not None else {}
        if self.kind == "tensorboard":
            from pathlib import Path

            self.writer = self.lib.SummaryWriter(log_dir=str(Path(self.where) / self.name))
            self.writer.add_text("settings", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        else:
            if self.where:
                self.lib.set_tracking_uri(self.where)
            self.writer = self.lib.start_run(run_name=self.name, nested=self.lib.active_run() is not None)
            self.lib.log_params(params)

    def on_epoch_end(self, model: Classifier, row: dict) -> None:
        if self.writer is None:
            return
        step = int(row["epoch"])
        values = {k.replace("_", "/", 1) if k.startswith(("val_", "train_")) else k: float(v)
                  for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))}
        if self.kind == "tensorboard":
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        else:
            self.lib.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def on_fit_end(self, model: Classifier) -> None:
        if self.writer is None:
            return
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.lib.end_run()
        self.writer = None


CALLBACKS: Registry[type[Callback]] = Registry("callback")  # in the order fit runs them


def register_callback(key: str):
    """Class decorator: a :class:`Callback` subclass that every ``fit`` asks (``from_config(cfg)``) whether it
    runs; ``key`` is its stable name, under which its resume state is saved. Keys are unique."""
    def add(cls: type[Callback]) -> type[Callback]:
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            raise ConfigError(f"register_callback({key!r}) decorates a Callback subclass, got {cls!r}")
        cls.key = key
        return CALLBACKS.register(key, cls)
    return add


def list_callbacks() -> list[str]:
    """The registered callbacks' keys, in the order fit runs them."""
    return CALLBACKS.names()


for _key, _cls in (("checkpoint_activations", ActivationCheckpointing), ("branch_streams", BranchStreams),
                   ("ogm", GradientModulation), ("ema", WeightAverage), ("codistill", CoDistillation),
                   ("distillation", Distillation), ("resample", Resample), ("tracking", Tracking)):
    register_callback(_key)(_cls)


def from_config(cfg: TrainConfig) -> list[Callback]:
    """The callbacks a :class:`fusionnet.config.TrainConfig` asks for: each registered one builds itself."""
    return [cb for cls in CALLBACKS.values() if (cb := cls.from_config(cfg)) is not None]


def state_key(callback: Callback, run: Sequence[Callback]) -> str:
    """Where ``callback``'s resume state is kept: its ``key`` (an unregistered one's: its class name), with
    ``#2``, ``#3`` ... for the second and later callbacks of one key in ``run``."""
    def key(cb: Callback) -> str:
        return cb.key or type(cb).__name__
    same = [cb for cb in run if key(cb) == key(callback)]
    n = next(i for i, cb in enumerate(same) if cb is callback)
    return key(callback) if n == 0 else f"{key(callback)}#{n + 1}"
