"""``fusionnet inspect``: what a file is, in a few lines: a checkpoint (ours or another library's), the library's
saved outputs of a member on a split, or an ONNX export."""

from __future__ import annotations

import os
from pathlib import Path

from fusionnet.models.checkpoints import inspect_checkpoint, load_weights_file, text_kind
from fusionnet.errors import CheckpointMismatchError
from fusionnet.models.plain import assumptions, member_reading
from fusionnet.utils.files import resolve_path


def describe(path: str | os.PathLike) -> str:
    p = resolve_path(path, what="file")
    if p.suffix.lower() == ".onnx":
        return describe_onnx(p)
    if p.is_file() and text_kind(p) is not None:
        return describe_text(p)
    try:  # a checkpoint is read once; only a file that is not one is read again, as saved outputs
        info = inspect_checkpoint(p)
    except CheckpointMismatchError:
        from fusionnet.ensembles.voting import OUTPUTS_FORMAT, MemberOutputs

        obj = load_weights_file(p)
        if isinstance(obj, dict) and obj.get("format") == OUTPUTS_FORMAT:
            return describe_outputs(MemberOutputs.load(p), p)
        raise
    if info.fusionnet is None:  # a plain state dict: what reading it as a member assumes
        return "\n".join([info.summary(), "as a member (fuse, predict, serve):"]
                         + ["  " + line for line in assumptions(p, info=info)])
    reading = member_reading(p)
    return info.summary() + f"\nreads images: {reading.describe()}" + _metrics_table(info.fusionnet.get("metrics"))


def describe_outputs(outputs, path: Path) -> str:
    acc = float((outputs.probs.argmax(1) == outputs.labels).double().mean())
    return "\n".join([f"file:         {str(path)!r}",
                      "kind:         saved member outputs (fusionnet predict / MemberOutputs), what vote reads",
                      f"member:       {outputs.member}", f"split:        {outputs.split}",
                      f"rows:         {len(outputs.labels)} images x {outputs.probs.shape[1]} classes",
                      f"classes:      {', '.join(outputs.class_names)}",
                      f"accuracy:     {acc:.4f}",
                      f"checkpoint:   {outputs.checkpoint or 'not recorded'}"])


def describe_text(path: Path) -> str:
    """A JSON file: what it is (a run's report, settings) and its top-level keys; other text is refused."""
    import json

    lines = [f"file:         {str(path)!r}"]
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointMismatchError(f"{str(path)!r} is a text file, not a checkpoint, saved outputs or an ONNX "
                                      f"export (what fusionnet inspect reads)") from None
    kinds = {"methods": "a comparison's or fuse's results (results.json / fuse.json)", "compare": "a compare "
             "run's settings (config.json)", "rows": "a distillation report (distill.json)"}
    kind = next((v for k, v in kinds.items() if isinstance(obj, dict) and k in obj), "a JSON file")
    lines.append(f"kind:         {kind}; not a checkpoint (fusionnet inspect reads .pth/.pt/.safetensors/.onnx)")
    if isinstance(obj, dict):
        lines.append(f"keys:         {', '.join(list(obj)[:12])}{' ...' if len(obj) > 12 else ''}")
        if isinstance(obj.get("selected"), dict):
            lines.append(f"selected:     {json.dumps(obj['selected'])}")
    elif isinstance(obj, list):
        lines.append(f"entries:      {len(obj)}")
    return "\n".join(lines)


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
