"""ONNX export of a trained model (any classifier: a FusionNet, a member), with a dynamic batch axis.

The exported graph takes images (B, 3, H, W) in [0, 1] at the size given and returns logits (B, K); every branch's
resize and normalisation is inside it. :func:`check_onnx` runs the file with onnxruntime and compares its logits
with PyTorch's.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from fusionnet.errors import ConfigError
from fusionnet.files import atomic_write


def export_onnx(model: nn.Module, path: str | os.PathLike, *, size: int = 224, opset: int = 18) -> Path:
    """Write ``model`` (in eval mode, on the CPU) as ONNX with input ``images`` and output ``logits``; the batch
    axis is dynamic. Needs ``pip install 'fusionnet[export]'`` (onnx, onnxscript, onnxruntime)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError("ONNX export needs the onnx and onnxscript packages: pip install 'fusionnet[export]'") from exc
    if not isinstance(size, int) or size < 8:
        raise ConfigError(f"size must be an int >= 8, got {size!r}")
    was_training = model.training
    model = model.cpu().eval()
    example = torch.rand(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
        buffer = io.BytesIO()
        program.save(buffer)
    finally:
        model.train(was_training)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def check_onnx(model: nn.Module, path: str | os.PathLike, images: torch.Tensor) -> float:
    """The largest absolute difference between PyTorch's and onnxruntime's logits on ``images``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ours,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        reference = model.cpu().eval()(images)
    return float((torch.from_numpy(ours) - reference).abs().max())
