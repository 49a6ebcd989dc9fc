"""Devices, mixed precision and ``torchrun``: where a model runs.

The rule every function that runs a model follows (``fit``, ``predict``, ``member_outputs``, the feature cache,
the analysis helpers): it takes a ``device`` (``"auto"``: CUDA when available, else the CPU), moves the model
there with :func:`place`, and moves each batch to the same device. A model is never left on one device while its
inputs go to another.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from fusionnet.errors import ConfigError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this machine has no CUDA GPU; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                          f"use 'cuda:0' to 'cuda:{torch.cuda.device_count() - 1}' (or 'cuda')")
    return device


def place(model: nn.Module, device: str | torch.device = "auto") -> torch.device:
    """Move ``model`` to ``device`` (resolved) and return that device: the one rule for where a model runs."""
    device = resolve_device(device)
    model.to(device)
    return device


def to_device(batch, device: torch.device, non_blocking: bool = False):
    """A tensor, or a dict of tensors (cached branch features), on ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
    return batch.to(device, non_blocking=non_blocking)


def autocast(device: torch.device, amp: bool | str = "auto"):
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported) when ``amp`` is "auto" or True; on the CPU only when
    ``amp`` is True (bf16: faster inference where the CPU has bf16 units, at a measured cost in agreement; see
    experiments/bench_bf16.py), never by default."""
    if amp not in ("auto", True, False):
        raise ConfigError(f"amp must be 'auto', True or False, got {amp!r}")
    if device.type == "cpu" and amp is True:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    if device.type != "cuda" or amp is False:
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device: str = "auto") -> torch.device:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on GPU); outside torchrun, the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")
    return resolve_device(device)


def average_buffers(model: nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over ranks: each rank updated them from its own batches."""
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world)
