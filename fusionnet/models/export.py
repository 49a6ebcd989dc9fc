"""ONNX export of a trained model (any classifier: a FusionNet, a member), with a dynamic batch axis.

The exported graph takes images (B, 3, H, W) in [0, 1] at the size given and returns logits (B, K); every branch's
resize and normalisation is inside it. :func:`check_onnx` runs the file with onnxruntime and compares its logits
with PyTorch's.

Two exporters: PyTorch's TorchScript-based one (``torchscript``: a trace, seconds for several CNN trunks) and its
``torch.export``-based one (``dynamo``: PyTorch's recommended path, 10-20x slower to export the same model on a CPU:
7 s vs about 100 s for a two-trunk EfficientNet-Lite FusionNet, measured side by side). ``auto`` takes TorchScript
while PyTorch still ships it and falls back to ``dynamo``. Either file is checked the same way.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from fusionnet.errors import CheckFailedError, ConfigError, install_hint
from fusionnet.utils.files import atomic_write
from fusionnet.models.fusion import FusionNet
from fusionnet.models.interface import as_classifier
from fusionnet.models.vote import Vote


EXPORTERS = ("auto", "torchscript", "dynamo")


def export_onnx(model: nn.Module, path: str | os.PathLike, *, size: int = 224, opset: int = 18,
                exporter: str = "auto") -> Path:
    """Write ``model`` (in eval mode, on the CPU) as ONNX with input ``images`` and output ``logits``; the batch
    axis is dynamic. Needs ``pip install 'fusionnet[export]'`` (onnx, onnxscript, onnxruntime)."""
    data = onnx_bytes(model, size=size, opset=opset, exporter=exporter)
    return atomic_write(path, lambda f: f.write(data))


def export_checked(model: nn.Module, path: str | os.PathLike, images: torch.Tensor, *, size: int = 224,
                   exporter: str = "auto", photos: bool = False) -> float:
    """:func:`export_onnx`, written only if onnxruntime's logits on ``images`` are within
    :data:`EXPORT_TOLERANCE` of PyTorch's (else :class:`ExportMismatchError`, nothing written); returns the
    difference. ``photos``: the graph takes uint8 photos of any size and returns probabilities, the model's own
    resize in front (:mod:`fusionnet.models.onnx_photos`; a FusionNet, which records how it reads)."""
    data = onnx_bytes(model, size=size, exporter=exporter)
    diff = check_onnx(model, data, images)
    if not diff <= EXPORT_TOLERANCE:
        raise ExportMismatchError(f"the ONNX graph's logits differ from PyTorch's by {diff:.2e} (more than "
                                  f"{EXPORT_TOLERANCE:g}); {str(path)!r} was not written. Try --exporter "
                                  f"torchscript or dynamo (the other one)")
    if photos:
        reading = _reading(model, size)
        if reading is None:
            raise ConfigError("a graph that takes photos needs a FusionNet or a Vote (they record how they read an "
                              "image)")
        from fusionnet.models.onnx_photos import with_photo_input

        data = _with_metadata(with_photo_input(data, size=size, resize=reading.resize, crop_pct=reading.crop_pct,
                                               reader=reading.reader),
                              {"input": "photos: uint8 RGB, (batch, H, W, 3), any H and W; the model's resize, crop "
                                        "and normalisation are inside the graph",
                               "output": "probabilities: (batch, classes)"})
    atomic_write(path, lambda f: f.write(data))
    return diff


def onnx_bytes(model: nn.Module, *, size: int = 224, opset: int = 18, exporter: str = "auto") -> bytes:
    """The ONNX graph of ``model`` (with its metadata) as bytes; see :func:`export_onnx`."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the onnx and onnxscript packages: {install_hint('export')}") from exc
    if not isinstance(size, int) or size < 8:
        raise ConfigError(f"size must be an int >= 8, got {size!r}")
    was_training = model.training
    model = model.cpu().eval()
    example = torch.rand(2, 3, size, size)
    buffer = io.BytesIO()
    try:
        if exporter in ("auto", "torchscript"):
            try:
                _torchscript(model, example, buffer, opset)
            except Exception:
                if exporter == "torchscript":
                    raise
                buffer = io.BytesIO()  # this PyTorch has no TorchScript exporter (or it failed): torch.export
                _dynamo(model, example, buffer, opset)
        else:
            _dynamo(model, example, buffer, opset)
    finally:
        model.train(was_training)
    return _with_metadata(buffer.getvalue(), onnx_metadata(model, size))


def onnx_metadata(model: nn.Module, size: int) -> dict[str, str]:
    """What a consumer of the file needs besides the graph: the input it expects, the classes of its outputs and
    each branch's normalisation (applied inside the graph)."""
    import json

    meta = {"input": "images: float32 RGB, (batch, 3, H, W), values in [0, 1]; resize and normalisation are inside "
                     "the graph", "input_size": str(size), "output": "logits: (batch, classes); softmax for "
                                                                    "probabilities"}
    names = as_classifier(model).class_names
    if names:
        meta["class_names"] = json.dumps(list(names))
    reading = _reading(model, size)  # how an image reaches input_size before the graph
    if reading is not None:
        meta.update(resize=reading.resize, crop_pct=str(reading.crop_pct), reader=reading.reader,
                    reads=reading.describe())
    if isinstance(model, FusionNet):
        meta["normalisation"] = json.dumps(_normalisation(model))
    if isinstance(model, Vote):  # the graph is the whole vote: its members, weights and temperatures
        meta["output"] = "logits: (batch, classes), the log of the vote's probabilities; softmax gives them"
        meta["vote"] = json.dumps({"method": model.method, "members": model.member_table(),
                                   "ensemble_temperature": model.ensemble_temperature})
        meta["normalisation"] = json.dumps({n: _normalisation(m) for n, m in zip(model.names, model.members)})
    return meta


def _reading(model: nn.Module, size: int):
    """How ``model`` reads an image at ``size`` (a FusionNet or a Vote records it); None for another model."""
    if isinstance(model, FusionNet):
        return model.config.reading(size)
    return model.reading.at(size) if isinstance(model, Vote) else None


def _normalisation(model: FusionNet) -> dict:
    return {n: {"mean": br.mean.flatten().tolist(), "std": br.std.flatten().tolist()}
            for n, br in model.branches.items()}


def _with_metadata(data: bytes, meta: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(data)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    for key, value in [*kept, *meta.items()]:
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def _torchscript(model: nn.Module, example: torch.Tensor, buffer: io.BytesIO, opset: int) -> None:
    import warnings

    with warnings.catch_warnings():  # the trace records the input-shape check as a constant: that is intended
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # chosen knowingly; "auto" falls back when it is gone
        torch.onnx.export(model, (example,), buffer, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)


def _dynamo(model: nn.Module, example: torch.Tensor, buffer: io.BytesIO, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
    program.save(buffer)


EXPORT_TOLERANCE = 1e-3  # the largest |onnxruntime - PyTorch| logit difference an export may have


class ExportMismatchError(CheckFailedError, RuntimeError):
    """The exported graph does not compute what the model computes (beyond :data:`EXPORT_TOLERANCE`)."""


def check_onnx(model: nn.Module, graph: str | os.PathLike | bytes, images: torch.Tensor) -> float:
    """The largest absolute difference between PyTorch's and onnxruntime's logits on ``images``; ``graph``: an
    ONNX file or its bytes."""
    import onnxruntime as ort

    source = graph if isinstance(graph, bytes) else str(graph)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    (ours,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        reference = model.cpu().eval()(images)
    return float((torch.from_numpy(ours) - reference).abs().max())
