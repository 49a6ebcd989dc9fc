"""``fusionnet inspect``: what a file is, in a few lines: a checkpoint (ours or another library's), the library's
saved outputs of a member on a split, or an ONNX export."""

from __future__ import annotations

import os
from pathlib import Path

from fusionnet.models.checkpoints import inspect_checkpoint, load_weights_file
from fusionnet.errors import CheckpointMismatchError
from fusionnet.utils.files import resolve_path


def describe(path: str | os.PathLike) -> str:
    p = resolve_path(path, what="file")
    if p.suffix.lower() == ".onnx":
        return describe_onnx(p)
    try:  # a checkpoint is read once; only a file that is not one is read again, as saved outputs
        info = inspect_checkpoint(p)
    except CheckpointMismatchError:
        from fusionnet.ensembles.voting import OUTPUTS_FORMAT, MemberOutputs

        obj = load_weights_file(p)
        if isinstance(obj, dict) and obj.get("format") == OUTPUTS_FORMAT:
            return describe_outputs(MemberOutputs.load(p), p)
        raise
    return info.summary() + _metrics_table((info.fusionnet or {}).get("metrics"))


def describe_outputs(outputs, path: Path) -> str:
    acc = float((outputs.probs.argmax(1) == outputs.labels).double().mean())
    return "\n".join([f"file:         {str(path)!r}",
                      "kind:         saved member outputs (fusionnet predict / MemberOutputs), what vote reads",
                      f"member:       {outputs.member}", f"split:        {outputs.split}",
                      f"rows:         {len(outputs.labels)} images x {outputs.probs.shape[1]} classes",
                      f"classes:      {', '.join(outputs.class_names)}",
                      f"accuracy:     {acc:.4f}",
                      f"checkpoint:   {outputs.checkpoint or 'not recorded'}"])


def describe_onnx(path: Path) -> str:
    try:
        import onnx
    except ImportError as exc:
        from fusionnet.errors import install_hint

        raise CheckpointMismatchError(f"{str(path)!r} is an ONNX file; reading it needs onnx: "
                                      f"{install_hint('export')}") from exc
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for damaged files
        raise CheckpointMismatchError(f"could not read {str(path)!r} as ONNX ({type(exc).__name__}: {exc})") from exc

    def shape(value) -> str:
        dims = value.type.tensor_type.shape.dim
        return "(" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + ")"

    lines = [f"file:         {str(path)!r}", f"kind:         ONNX model (opset {proto.opset_import[0].version})",
             "inputs:       " + ", ".join(f"{v.name} {shape(v)}" for v in proto.graph.input),
             "outputs:      " + ", ".join(f"{v.name} {shape(v)}" for v in proto.graph.output)]
    lines += [f"{p.key + ':':<14}{p.value}" for p in proto.metadata_props]
    return "\n".join(lines)


def _metrics_table(metrics: dict | None) -> str:
    """A checkpoint's metrics as ``name  value`` lines (numbers to 4 places; nested facts named, not dumped)."""
    if not metrics:
        return ""
    rows = []
    for name, value in metrics.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, dict):
            value = f"({len(value)} entries: {', '.join(list(value)[:4])}{' ...' if len(value) > 4 else ''})"
        rows.append(f"  {name:<18} {value}")
    return "\nmetrics:\n" + "\n".join(rows)
