"""Reading checkpoints as practitioners actually have them, diagnosing mismatches, and our own format.

* :func:`read_state_dict` takes a plain state dict, one wrapped in ``state_dict`` / ``model`` /
  ``model_state_dict``, keys prefixed by ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile), or a
  ``.safetensors`` file. Always ``weights_only=True``.
* :func:`load_trunk_state` loads one into a trunk, dropping classifier heads and GoogLeNet's aux heads, and
  raising :class:`CheckpointMismatchError` with a compact diagnosis (VGG16 vs VGG16-BN named as such).
* :func:`save_checkpoint` / :func:`read_checkpoint`: config + class names + state dict + metrics, written
  atomically (:func:`fusionnet.utils.files.atomic_write`), so a crash mid-write never corrupts a saved checkpoint.
* :func:`load_weights_file`: the one place a weights file is opened; every failure is a clear
  :class:`CheckpointMismatchError`.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from fusionnet.errors import CheckpointMismatchError, ConfigError
from fusionnet.utils.files import atomic_torch_save, resolve_path

FORMAT = "fusionnet"
FORMAT_VERSION = 2  # 2: pool "avgmax" means timm's mean of avg and max; version 1's "avgmax" is "catavgmax"
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")
AUX_PREFIXES = ("aux1.", "aux2.")


@dataclass
class StateDictSource:
    """Where the tensors of a checkpoint were found, for messages and ``fusionnet inspect``."""

    path: str
    wrapper: str | None = None  # the dict key the state dict sat under, e.g. "model_state_dict"
    prefixes: list[str] = field(default_factory=list)  # stripped key prefixes, e.g. ["module."]
    fusionnet: dict | None = None  # our own format's payload (without the state dict), if it was one


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], StateDictSource]:
    """Read any supported checkpoint file into a flat ``{key: tensor}`` dict with wrappers and prefixes removed."""
    p = resolve_path(path)
    source = StateDictSource(path=str(p))
    obj: Any = load_weights_file(p)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        source.fusionnet = {k: v for k, v in obj.items() if k != "state_dict"}
        source.wrapper = "state_dict"
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping) and _is_state_dict(obj[key]):
                source.wrapper, obj = key, obj[key]
                break
        else:
            raise CheckpointMismatchError(
                f"{str(p)!r} holds a dict without tensors under any of {', '.join(WRAPPER_KEYS)}; "
                f"its top-level keys: {', '.join(map(str, list(obj)[:10]))}")
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{str(p)!r} holds a {type(obj).__name__}, not a state dict")
    state = dict(obj)
    stripped = True
    while stripped:  # DDP around torch.compile gives "module._orig_mod." and the reverse also occurs
        stripped = False
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                source.prefixes.append(prefix)
                stripped = True
    return state, source


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def guess_architecture(state: Mapping[str, torch.Tensor]) -> str | None:
    """Best guess at the torchvision/timm architecture a state dict comes from, from its key layout."""
    keys = set(state)
    if "inception3a.branch1.conv.weight" in keys:
        return "googlenet"
    if "features.0.weight" in keys and state["features.0.weight"].ndim == 4:
        # VGG: conv weights are the 4-d features.N.weight (BatchNorm weights there are 1-d)
        convs = [k for k in keys if re.fullmatch(r"features\.\d+\.weight", k) and state[k].ndim == 4]
        bn = any(k.startswith("features.") and k.endswith("running_mean") for k in keys)
        depth = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}.get(len(convs))
        if depth:
            return depth + ("_bn" if bn else "")
    if "layer1.0.conv1.weight" in keys:
        blocks = [len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
        bottleneck = "layer1.0.conv3.weight" in keys
        table = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34",
                 (3, 4, 6, 3, True): "resnet50", (3, 4, 23, 3, True): "resnet101"}
        return table.get((*blocks, bottleneck), "resnet")
    if "features.1.conv.0.0.weight" in keys:
        return "mobilenet_v2"
    if "features.1.0.block.0.0.weight" in keys:
        return "efficientnet_b0" if "features.8.0.weight" in keys else "efficientnet (torchvision)"
    if "conv_stem.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "efficientnet (timm)"
    if "_conv_stem.weight" in keys:
        return "efficientnet (lukemelas)"
    return None


def head_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count of the checkpoint's classifier, if it has one we recognise."""
    for key in ("fc.weight", "classifier.6.weight", "classifier.1.weight", "classifier.weight", "head.fc.weight",
                "head.weight", "_fc.weight", "head.out.weight"):
        if key in state and state[key].ndim == 2:
            return int(state[key].shape[0])
    return None


@dataclass
class CheckpointInfo:
    """What ``fusionnet inspect PATH`` reports."""

    path: str
    num_keys: int
    num_params: int
    architecture: str | None
    num_classes: int | None
    aux_heads: list[str]
    aux_classes: int | None
    wrapper: str | None
    prefixes: list[str]
    fusionnet: dict | None

    def summary(self) -> str:
        lines = [f"checkpoint:   {self.path!r}",
                 f"keys:         {self.num_keys} ({self.num_params:,} values)",
                 f"architecture: {self.architecture or 'unknown'}",
                 f"classes:      {self.num_classes if self.num_classes is not None else 'no classifier found'}",
                 f"aux heads:    {', '.join(self.aux_heads) if self.aux_heads else 'none'}"
                 + (f" ({self.aux_classes} classes)" if self.aux_heads else ""),
                 f"wrapped in:   {self.wrapper or '(plain state dict)'}",
                 f"prefixes:     {', '.join(self.prefixes) if self.prefixes else 'none'}"]
        if self.fusionnet:
            cfg = self.fusionnet.get("config", {})
            lines.append(f"fusionnet:    branches {[b['backbone'] for b in cfg.get('branches', [])]}, "
                         f"fusion {cfg.get('fusion', 'concat')}, classes {self.fusionnet.get('class_names')}")
            data = self.fusionnet.get("data") or {}
            if data:
                lines.append(f"trained on:   {data.get('train_images')} images at {data.get('input_size')} px, "
                             f"split seed {data.get('seed')}")
        return "\n".join(lines)


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    state, source = read_state_dict(path)
    aux = sorted({k.split(".")[0] for k in state if k.startswith(AUX_PREFIXES)})
    aux_fc = [v for k, v in state.items() if k.startswith("aux1.") and k.endswith("fc2.weight")]
    arch = guess_architecture(state)
    if source.fusionnet:
        arch = "fusionnet(" + "+".join(
            b["backbone"] for b in source.fusionnet.get("config", {}).get("branches", [])) + ")"
    return CheckpointInfo(
        path=source.path, num_keys=len(state), num_params=sum(int(v.numel()) for v in state.values()),
        architecture=arch, num_classes=head_classes(state), aux_heads=aux,
        aux_classes=int(aux_fc[0].shape[0]) if aux_fc else None, wrapper=source.wrapper,
        prefixes=source.prefixes, fusionnet=source.fusionnet)


@dataclass
class LoadReport:
    """What loading a checkpoint into a branch did."""

    source: str
    dropped: list[str]  # checkpoint keys that belong to heads the trunk does not have
    head_kept: bool = False  # whether the checkpoint's Linear head was copied into FusionNet's head


def split_head(state: Mapping[str, torch.Tensor], head_prefixes: tuple[str, ...]) -> tuple[dict, dict]:
    """(trunk keys, head keys): head keys are those under the spec's head prefixes or GoogLeNet's aux heads."""
    heads = tuple(head_prefixes) + AUX_PREFIXES
    trunk = {k: v for k, v in state.items() if not k.startswith(heads)}
    head = {k: v for k, v in state.items() if k.startswith(heads)}
    return trunk, head


def load_trunk_state(trunk: nn.Module, state: Mapping[str, torch.Tensor], *, backbone: str,
                     head_prefixes: tuple[str, ...], source: str) -> list[str]:
    """Load ``state`` (a whole classifier's or a trunk's) into ``trunk``; return the head keys it dropped.

    A trunk with GoogLeNet aux heads takes the checkpoint's aux heads where their shapes match (same class
    count); otherwise its aux heads keep their fresh initialisation.
    """
    body, head = split_head(state, head_prefixes)
    full = trunk.state_dict()
    expected = {k: v for k, v in full.items() if not k.startswith(AUX_PREFIXES)}
    missing = [k for k in expected if k not in body]
    unexpected = [k for k in body if k not in expected]
    wrong_shape = [f"{k}: checkpoint {tuple(body[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected if k in body and body[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(_diagnose(backbone, state, source, missing, unexpected, wrong_shape))
    aux = {k: v for k, v in head.items() if k.startswith(AUX_PREFIXES) and k in full and full[k].shape == v.shape}
    if aux and len(aux) != sum(k.startswith(AUX_PREFIXES) for k in full):
        aux = {}  # all or nothing: half-loaded aux heads would be worse than fresh ones
    # every non-aux key was checked above; aux heads are loaded all together or left fresh
    trunk.load_state_dict({**body, **aux}, strict=False)
    return sorted(k for k in head if k not in aux)


def _diagnose(backbone: str, state: Mapping[str, torch.Tensor], source: str, missing: list[str],
              unexpected: list[str], wrong_shape: list[str]) -> str:
    arch = guess_architecture(state)
    pair = {"vgg16": "vgg16_bn", "vgg16_bn": "vgg16"}
    base = backbone.removesuffix("_mlp")  # vgg16_mlp: VGG16 with its classifier's hidden layers
    if arch is not None and pair.get(base) == arch:
        bn = "with" if arch.endswith("_bn") else "without"
        return (f"checkpoint {source!r} was trained with {arch!r} ({bn} BatchNorm), but the branch is "
                f"{backbone!r}; build the branch as {arch + backbone[len(base):]!r} instead")
    lines = [f"checkpoint {source!r} does not fit backbone {backbone!r}"
             + (f" (it looks like {arch!r})" if arch and arch != backbone else "") + ":"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            more = f" ... and {len(items) - 3} more" if len(items) > 3 else ""
            lines.append(f"  {len(items)} {label}: {', '.join(items[:3])}{more}")
    return "\n".join(lines)


def load_weights_file(path: str | os.PathLike) -> Any:
    """The object in a ``.pt``/``.pth``/``.safetensors`` file, read without running any code in it.

    Every way a file can fail to be a weights-only checkpoint (empty, truncated, a text file, a pickled whole model
    or other code, a corrupt safetensors header) becomes one :class:`CheckpointMismatchError` naming the file.
    """
    p = resolve_path(path)
    if p.is_dir():
        from fusionnet.models.pretrained import MEMBERS, folder_payload, is_pretrained_folder, is_vote_folder

        if is_pretrained_folder(p):  # a model folder reads as our own checkpoint's payload
            return {"format": FORMAT, "version": FORMAT_VERSION, **folder_payload(p)}
        if is_vote_folder(p):
            raise ConfigError(f"{str(p)!r} is a vote folder (the weighted soft vote of several members), not one "
                              f"model's checkpoint: predict, serve, export, push, distill --teacher and fusionnet.load "
                              f"take it; where one model is needed (fuse --members, inspect), give its members' "
                              f"folders instead: {str(p / MEMBERS)}/<name>")
        raise CheckpointMismatchError(f"{str(p)!r} is a folder; pass the checkpoint file inside it")
    if p.stat().st_size == 0:
        raise CheckpointMismatchError(f"{str(p)!r} is empty (0 bytes); it was never written completely. Use "
                                      f"another checkpoint (a run folder keeps best.pth and final.pth)")
    text = text_kind(p)
    if text is not None:
        raise CheckpointMismatchError(f"{str(p)!r} is a {text} file, not a checkpoint; pass the .pth/.pt/"
                                      f".safetensors file of the model (a run folder keeps best.pth)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # not a pickle of objects: text, random bytes
            raise CheckpointMismatchError(f"could not read {str(p)!r} as a checkpoint: it is not a PyTorch or "
                                          f"safetensors file ({_first_line(exc)}). Re-save or re-download it") from None
        # weights_only refused to run code in the file; the unsafe bypass torch suggests is not advice we repeat
        raise CheckpointMismatchError(
            f"{str(p)!r} is not a weights-only checkpoint: it holds pickled Python objects (e.g. a whole model) "
            f"that fusionnet will not execute. Where the model was trained, re-save its weights with "
            f"torch.save(model.state_dict(), path)") from None
    except Exception as exc:  # torch, zipfile and safetensors raise many types for damaged files
        raise CheckpointMismatchError(
            f"could not read {str(p)!r} as a checkpoint ({_first_line(exc)}); the file is truncated, corrupt or "
            f"not a PyTorch/safetensors file. Re-save or re-download it") from exc


def text_kind(path: Path) -> str | None:
    """"JSON" or "text" when the file starts as UTF-8 text without NUL bytes (checkpoints are binary), else None."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"\0" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "JSON" if text.lstrip()[:1] in ("{", "[") else "text"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def save_checkpoint(path: str | os.PathLike, *, config: dict | None, state_dict: Mapping[str, torch.Tensor],
                    class_names: list[str] | None = None, metrics: dict | None = None,
                    extra: dict | None = None, data: dict | None = None) -> Path:
    """Write our own checkpoint format atomically (see :func:`fusionnet.utils.files.atomic_write`). ``data``: what the
    model was trained on (:func:`fusionnet.data.datasets.training_record`; files, seed, input size)."""
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "config": config, "data": data,
               "class_names": list(class_names) if class_names is not None else None,
               "metrics": dict(metrics or {}), "extra": dict(extra or {}),
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}
    return atomic_torch_save(payload, path)


def set_config_fields(path: str | os.PathLike, **fields) -> None:
    """Change fields of the model config saved in our own checkpoint at ``path`` (rewritten atomically)."""
    payload = read_checkpoint(path)
    payload["config"] = {**(payload.get("config") or {}), **fields}
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Our own format's payload (config, class names, metrics, state dict); refuses other files clearly.
    Older format versions are upgraded in memory."""
    p = resolve_path(path)
    obj = load_weights_file(p)
    if not (isinstance(obj, Mapping) and obj.get("format") == FORMAT):
        raise CheckpointMismatchError(
            f"{str(p)!r} is not a fusionnet checkpoint (no format={FORMAT!r} field); to use a plain state dict, "
            f"build the model with create_fusionnet(..., checkpoints={{'<backbone>': {str(p)!r}}})")
    version = obj.get("version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointMismatchError(f"{str(p)!r} has format version {version!r}; this fusionnet reads up "
                                      f"to {FORMAT_VERSION}: upgrade fusionnet")
    if not isinstance(obj.get("state_dict"), Mapping):
        raise CheckpointMismatchError(f"{str(p)!r} has no state_dict; the file is damaged")
    if version < 2 and isinstance(obj.get("config"), Mapping):
        for b in obj["config"].get("branches", []):
            if b.get("pool") == "avgmax":  # version 1 concatenated avg and max: timm calls that catavgmax
                b["pool"] = "catavgmax"
    return obj
