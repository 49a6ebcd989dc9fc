"""The model a server holds, and nothing of HTTP (:mod:`fusionnet.serving.serve` puts it behind FastAPI, and
:mod:`fusionnet.serving.serve_ray` behind Ray Serve): a fusionnet checkpoint (a FusionNet), several member
checkpoints, ours or plain torchvision/timm state dicts (their soft vote; :mod:`fusionnet.models.plain`), a vote's
folder (its weighted, temperature-scaled soft vote; :mod:`fusionnet.models.vote`), or an ``.onnx`` file
(onnxruntime); uploads decoded with hard limits; each image brought to the model's input size the way the model
says (``resize``), then a batch run in the fastest mode measured that matches fp32 on the device."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fusionnet.config import PlainConfig, Reading
from fusionnet.errors import ConfigError
from fusionnet.utils.probabilities import soft_vote


class BadInput(Exception):
    """An upload the server refuses: ``status`` (4xx) and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    max_bytes: int = 20 * 2 ** 20  # an upload's size
    max_pixels: int = 40_000_000  # width x height, read from the header before decoding (decompression bombs)


# ---- the model ---------------------------------------------------------------------------------------------------
class ModelHandler:
    """A model to serve, with its decoding and batch inference; see the module docstring."""

    def __init__(self, sources: Sequence[str], *, device: str = "auto", limits: Limits | None = None,
                 plain: PlainConfig | None = None, size: int | None = None) -> None:
        """``plain``: how plain state-dict members were trained (:mod:`fusionnet.models.plain`); ``size``: the input
        size (default: the one the first model records, else 128)."""
        from fusionnet.utils.distributed import resolve_device

        if not sources:
            raise ConfigError("serve needs a model: a checkpoint, several member checkpoints, or an .onnx file")
        from fusionnet.models.pretrained import is_pretrained_folder, is_vote_folder

        paths = [Path(s) for s in sources]
        for p in paths:
            if not (p.is_file() or is_pretrained_folder(p) or is_vote_folder(p)):
                raise ConfigError(f"model file {str(p)!r} not found (a checkpoint, a model folder, a vote folder or "
                                  f"an .onnx file)")
        votes = [p for p in paths if is_vote_folder(p)]
        if votes and len(paths) > 1:
            raise ConfigError(f"serve takes a vote folder ({str(votes[0])!r}) alone, not beside other models: its "
                              f"members are in it")
        self.vote = bool(votes)
        self.paths, self.limits = paths, limits or Limits()
        self.device = resolve_device(device)
        self.onnx = paths[0].suffix == ".onnx"
        if self.onnx:
            if len(paths) > 1:
                raise ConfigError("serve takes one .onnx file (an export of one model), not several")
            self._load_onnx(paths[0])
        elif self.vote:
            self._load_vote(paths[0])
        else:
            self._load_checkpoints(paths, replace(plain or PlainConfig(), size=size) if size else plain)
        self.size = size or self.size
        if self.size is None:
            raise ConfigError(f"{str(paths[0])!r} does not say the input size it was trained at; give --size (e.g. "
                              f"--size 64 for a model trained on Resize((64, 64))) or \"size\" in its manifest, or "
                              f"let 'fusionnet predict MEMBER --data DATA' choose it on validation first")
        self.reading = self.reading.at(self.size)
        self.hash = _sha256(paths)
        from fusionnet.data.transforms import reading_transform

        self.transform = reading_transform(self.reading)

    def _load_checkpoints(self, paths: list[Path], plain: PlainConfig | None) -> None:
        from fusionnet.config.reading import common_reading
        from fusionnet.models.plain import load_member

        first = load_member(paths[0], plain=plain)
        rest = [load_member(p, class_names=first.class_names, plain=plain) for p in paths[1:]]
        self.models = [m.eval().to(self.device) for m in [first, *rest]]
        names = [m.class_names for m in self.models]
        if any(n is None for n in names) or any(n != names[0] for n in names):
            raise ConfigError(f"the members disagree on their classes (or do not know them): {names}")
        self.class_names = list(names[0])
        self.reading = common_reading({str(p): m.config.reading() for p, m in zip(paths, self.models)})
        self.size = self.reading.size  # each member's record (fusionnet) or manifest / --size (plain)
        if self.device.type == "cpu":  # predict's fastest correct CPU mode
            for m in self.models:
                m.to(memory_format=torch.channels_last)
        self.backbones = [[br.cfg.backbone for br in m.branches.values()] for m in self.models]
        self.member_names = [p.parent.name if p.name in ("best.pth", "final.pth") else p.stem for p in paths]

    def _load_vote(self, path: Path) -> None:
        """A vote's folder: one model (the vote), its members' temperature-scaled outputs its per-member view."""
        from fusionnet.models.vote import Vote

        vote = Vote.from_pretrained(path).to(self.device)  # in eval mode
        if self.device.type == "cpu":
            vote.to(memory_format=torch.channels_last)
        self.models, self.class_names, self.reading = [vote], vote.class_names, vote.reading
        self.size = vote.input_size
        self.backbones = [[br.cfg.backbone for br in m.branches.values()] for m in vote.members]
        self.member_names = list(vote.names)
        self.weights = vote.member_table()

    def _load_onnx(self, path: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "class_names" not in meta:
            raise ConfigError(f"{str(path)!r} carries no class names; export it with fusionnet export")
        self.class_names = json.loads(meta["class_names"])
        self.size = int(meta.get("input_size", 224))
        self.reading = Reading(self.size, meta.get("resize", "shorter"), float(meta.get("crop_pct", 1.0)),
                               meta.get("reader", "albumentations"))
        self.backbones, self.member_names, self.models = [], [path.stem], []

    def info(self) -> dict:
        kind = "onnx" if self.onnx else ("vote" if self.vote or len(self.models) > 1 else "fusionnet")
        weights = {"weights": self.weights} if self.vote else {}  # a vote folder's members, weights, temperatures
        return {"kind": kind, **weights, "classes": self.class_names, "backbones": self.backbones,
                "input_size": self.size,
                "reads": self.reading.describe(), "reading": self.reading.to_dict(), "members_read": self._read_as(),
                "members": self.member_names if kind == "vote" else [], "sha256": self.hash,
                "device": str(self.device)}

    def _read_as(self) -> list[str]:
        from fusionnet.models.plain import describe_members

        models = self.models[0].members if self.vote else self.models
        return describe_members(dict(zip(self.member_names, models)))

    def decode(self, data: bytes) -> torch.Tensor:
        """An upload as a (3, size, size) tensor in [0, 1]; :class:`BadInput` names whatever is wrong with it."""
        from PIL import Image, ImageOps, UnidentifiedImageError

        if not data:
            raise BadInput(400, "empty body: send an image file (multipart field 'file', or the raw bytes)")
        if len(data) > self.limits.max_bytes:
            raise BadInput(413, f"the upload is {len(data)} bytes; the limit is {self.limits.max_bytes}")
        try:
            with Image.open(io.BytesIO(data)) as img:
                pixels = img.size[0] * img.size[1]  # from the header: nothing decoded yet
                if pixels > self.limits.max_pixels:
                    raise BadInput(413, f"the image is {img.size[0]} x {img.size[1]} = {pixels} pixels; the limit is "
                                        f"{self.limits.max_pixels} (a decompression bomb, or resize it first)")
                img.load()
                if self.reading.reader == "torchvision":  # as ImageFolder decodes: no EXIF rotation
                    rgb = np.asarray(img.convert("RGB"))
                else:
                    rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        except BadInput:
            raise
        except UnidentifiedImageError:
            raise BadInput(415, "not an image PIL can read (send a JPEG, PNG, WebP, BMP, GIF or TIFF file)") from None
        except (OSError, ValueError, SyntaxError) as exc:  # truncated data, broken chunks, unsupported modes
            raise BadInput(422, f"the image could not be decoded: {exc}") from None
        except Image.DecompressionBombError as exc:
            raise BadInput(413, str(exc)) from None
        from fusionnet.data.transforms import apply_transform

        return apply_transform(self.transform, rgb)

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(probabilities (B, K), {member or branch: probabilities (B, K)}) for images (B, 3, size, size)."""
        if self.onnx:
            logits = self.session.run(None, {self.session.get_inputs()[0].name: batch.numpy()})[0]
            return torch.from_numpy(logits).float().softmax(1), {}
        from fusionnet.utils.distributed import autocast

        x = batch.to(self.device)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, "auto"):
            outputs = [m.forward_output(x) for m in self.models]
        if len(self.models) > 1:
            each = {n: o.logits.float().softmax(1).cpu() for n, o in zip(self.member_names, outputs)}
            return soft_vote(torch.stack(list(each.values()))), each
        out = outputs[0]
        parts = {n: a.float().softmax(1).cpu() for n, a in out.aux.items()}
        branch = out.extras.get("branch_logits")  # late / late_oof fusion: each branch's own classifier (B, M, K)
        if branch is not None:
            parts.update({n: branch[:, j].float().softmax(1).cpu() for j, n in enumerate(self.models[0].branches)})
        return out.logits.float().softmax(1).cpu(), parts


def _sha256(paths: Sequence[Path]) -> str:
    """One hash of the model files (a model or vote folder: its files), for /v1/model."""
    from fusionnet.utils.files import file_sha256

    if len(paths) == 1:
        return file_sha256(paths[0])
    return hashlib.sha256("".join(file_sha256(p) for p in paths).encode()).hexdigest()
