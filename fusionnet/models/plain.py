"""Members as practitioners have them: a plain torchvision/timm classifier state dict, loaded as a single-backbone
FusionNet with its trained classifier, its outputs in the data's class order, and its images read exactly as a
plain torchvision script reads them (:class:`fusionnet.config.Reading` with ``reader="torchvision"``).

A plain state dict says nothing of how it was trained, so what it cannot say comes from (first given wins):

1. the command's flags (:class:`fusionnet.config.PlainConfig`: ``--classes``, ``--size``, ``--resize``,
   ``--crop-pct``, ``--mean`` / ``--std``);
2. a manifest beside the checkpoint, ``<checkpoint stem>.json``, e.g. ``resnet18_best.json`` for
   ``resnet18_best.pth``: ``{"classes": [...], "size": 64, "resize": "stretch", "crop_pct": 1.0, "mean": [...],
   "std": [...]}`` (any subset);
3. ``classes.txt`` beside it (a class name per line), for the class order.

Otherwise the assumptions are stated by :func:`assumptions` (``fusionnet inspect`` prints them): the short side
resized and centre-cropped, the backbone's ImageNet normalisation, and a size chosen on validation by the commands
that read ``--data`` (:func:`fusionnet.workflows.reading.settle_sizes`); without data the size must be given.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Mapping, Sequence

import torch

from fusionnet.config import CANDIDATE_SIZES, PlainConfig, Reading
from fusionnet.errors import CheckpointMismatchError, ConfigError
from fusionnet.models.backbones import get_spec, list_backbones, whole_classifier
from fusionnet.models.branch import BranchConfig
from fusionnet.models.checkpoints import inspect_checkpoint
from fusionnet.models.factory import create_fusionnet, load_fusionnet

PathLike = str | os.PathLike


def manifest_path(path: PathLike) -> Path:
    return Path(path).with_suffix(".json")


def beside(path: PathLike) -> PlainConfig:
    """What the files beside a plain checkpoint say: its manifest, then classes.txt for the class order."""
    found = PlainConfig()
    manifest = manifest_path(path)
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"member manifest {str(manifest)!r} is not readable JSON ({exc})") from None
        known = {f.name for f in fields(PlainConfig)}
        if not isinstance(data, dict) or set(data) - known:
            extra = sorted(set(data) - known) if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"member manifest {str(manifest)!r}: unknown entries {extra}; it may hold "
                              f"{', '.join(sorted(known))}")
        try:
            found = PlainConfig(**data)
        except ConfigError as exc:
            raise ConfigError(f"member manifest {str(manifest)!r}: {exc}") from None
    classes_txt = Path(path).parent / "classes.txt"
    if found.classes is None and classes_txt.is_file():
        found.classes = [line.strip() for line in classes_txt.read_text().splitlines() if line.strip()]
    return found


def assumptions(path: PathLike, given: PlainConfig | None = None, info=None) -> list[str]:
    """What loading the plain checkpoint ``path`` (``info``: its :func:`inspect_checkpoint`, if read already) as a
    member would assume, a line each, and where each value comes from."""
    info = info or inspect_checkpoint(path)
    settings = (given or PlainConfig()).over(beside(path))
    arch = whole_classifier(info.architecture) or info.architecture
    spec = get_spec(arch) if arch in list_backbones() else None
    source = "its manifest" if manifest_path(path).is_file() else "classes.txt" \
        if (Path(path).parent / "classes.txt").is_file() else None
    lines = [f"backbone:     {arch or 'unknown'}" + (" (the whole trained classifier kept)"
                                                     if whole_classifier(info.architecture) else "")]
    lines.append(f"class order:  {settings.classes} ({source})" if settings.classes else
                 "class order:  unknown: give --classes, a manifest or classes.txt (ImageFolder's is sorted)")
    lines.append(f"size:         {settings.size} px" if settings.size else
                 f"size:         unknown: chosen on validation (NLL at {', '.join(map(str, CANDIDATE_SIZES))} px) by "
                 f"commands given --data; else give --size or \"size\" in a manifest")
    lines.append(f"resize:       {settings.resize or 'shorter'}" + ("" if settings.resize else
                 " (assumed: short side resized, centre crop; --resize stretch for Resize((s, s)))"))
    lines.append(f"crop_pct:     {settings.crop_pct or 1.0:g}" + ("" if settings.crop_pct else
                 " (assumed: Resize(s) + CenterCrop(s); --crop-pct 0.875 for Resize(256) + CenterCrop(224))"))
    lines.append(f"reads as:     {plain_reading(settings).describe()}")
    if spec is not None:
        for name in ("mean", "std"):
            value = getattr(settings, name)
            lines.append(f"{name + ':':<13} {value or getattr(spec, name)}"
                         + ("" if value else f" (assumed: {arch}'s pretrained normalisation; --{name} to change)"))
    lines.append("trained on:   unknown images: choices on a validation split may be optimistic (--val-list)")
    return lines


def plain_reading(settings: PlainConfig) -> Reading:
    """How a plain member trained by a torchvision script reads its images: torchvision's own eval transforms."""
    return Reading(settings.size, settings.resize or "shorter",
                   1.0 if settings.crop_pct is None else settings.crop_pct, "torchvision")


def is_plain(path: PathLike) -> bool:
    """Whether ``path`` is a plain state dict (not one of the library's own checkpoints)."""
    return inspect_checkpoint(path).fusionnet is None


def member_reading(path: PathLike, plain: PlainConfig | None = None) -> Reading:
    """How the member ``path`` reads its images: its own record (a fusionnet checkpoint: its config, the size of
    its training record), else the plain settings and the files beside it (size None where nothing says it). A
    vote's folder reads as its members do (its config.json records it)."""
    from fusionnet.models.pretrained import is_vote_folder, read_config

    fields = read_config(Path(path)).get("reading") if is_vote_folder(path) else None
    if fields:
        try:
            return Reading(**{k: fields[k] for k in ("size", "resize", "crop_pct", "reader") if k in fields})
        except (TypeError, ConfigError) as exc:
            raise CheckpointMismatchError(f"{str(Path(path) / 'config.json')!r}: its 'reading' {fields!r} is not one "
                                          f"fusionnet reads ({exc}); write the vote again (Vote.save_pretrained)") \
                from None
    info = inspect_checkpoint(path)
    if info.fusionnet is not None:
        config = info.fusionnet.get("config", {})
        size = config.get("image_size") or (info.fusionnet.get("data") or {}).get("input_size")
        return Reading(size, config.get("resize", "shorter"), config.get("crop_pct", 1.0),
                       config.get("reader", "albumentations"))
    return plain_reading((plain or PlainConfig()).over(beside(path)))


def load_member(path: PathLike, *, num_classes: int | None = None, class_names: list[str] | None = None,
                plain: PlainConfig | None = None):
    """A single-backbone FusionNet from a member checkpoint of any supported kind, with its classifier head, its
    outputs in the order of ``class_names`` (the data's; None: the member's own order). A fusionnet member knows
    its classes and preprocessing; a plain state dict takes them from ``plain`` and the files beside it.
    ``plain.size`` (a command's ``--size``) sets the input size of either kind."""
    info = inspect_checkpoint(path)  # a model folder reads as a fusionnet checkpoint
    if info.fusionnet is not None:
        model = load_fusionnet(path)
        model.config.image_size = (plain.size if plain is not None and plain.size is not None  # the command's --size
                                   else recorded_size(model, path, info))
        if num_classes is not None and model.config.num_classes != num_classes:
            raise ConfigError(f"member {str(path)!r} has {model.config.num_classes} classes, the data {num_classes}")
        return in_order(model, model.class_names, class_names, path)
    arch = info.architecture
    if whole_classifier(arch) and info.num_classes is not None:
        arch = whole_classifier(arch)  # VGG: keep its trained 25088->4096->4096->K classifier whole
    if arch not in list_backbones():
        raise CheckpointMismatchError(f"cannot tell which backbone {str(path)!r} is (it looks like {arch!r}); save "
                                      f"it as a fusionnet member, or load it with create_fusionnet(['<backbone>'], "
                                      f"checkpoints={{'<backbone>': path}})")
    settings = (plain or PlainConfig()).over(beside(path))
    order = _stated_order(path, settings.classes, class_names)
    k = num_classes if num_classes is not None else len(order)
    if info.num_classes != k:
        raise CheckpointMismatchError(f"member {str(path)!r} ({arch}) classifies {info.num_classes} classes but the "
                                      f"data has {k}; fine-tune it on these classes first")
    branch = BranchConfig(arch, mean=settings.mean, std=settings.std)
    reading = plain_reading(settings)
    model = create_fusionnet([branch], num_classes=k, class_names=order, checkpoints={arch: path},
                             **reading.model_fields())
    if not model.load_reports[arch].head_kept:
        raise CheckpointMismatchError(f"member {str(path)!r}: its classifier head is not a plain Linear layer, so it "
                                      f"cannot start the fused head; train it as a fusionnet member")
    return in_order(model, order, class_names, path)


OWN_DEFAULT_SIZE = 128  # fusionnet's training size by default (TrainRun.size, CompareConfig.size)


def recorded_size(model, path: PathLike, info=None) -> int:
    """The input size the fusionnet model ``model`` (loaded from ``path``; ``info``: its inspect_checkpoint, if read
    already) was trained at: its config's, else its training record's (before 0.4), else -- saved without its
    training record (``save_model(model, path)``) -- the library's default training size, said aloud."""
    if model.config.image_size is not None:
        return model.config.image_size
    info = info or inspect_checkpoint(path)
    size = (info.fusionnet.get("data") or {}).get("input_size")
    if size is not None:
        return size
    import warnings

    warnings.warn(f"{str(path)!r} records no input size (saved without its training record); reading its images at "
                  f"{OWN_DEFAULT_SIZE} px, the library's default training size: give --size if it was trained at "
                  f"another", UserWarning, stacklevel=3)
    return OWN_DEFAULT_SIZE


def _stated_order(path, member_classes: Sequence[str] | None, data_classes: list[str] | None) -> list[str]:
    if member_classes is None:
        raise ConfigError(f"member {str(path)!r} is a plain state dict, which does not say its class order; give "
                          f"the order it was trained with (--classes, a manifest {manifest_path(path).name!r} or a "
                          f"classes.txt beside it, a name per line). Trained with torchvision's ImageFolder on these "
                          f"folders, it is the sorted order"
                          + (f": --classes {' '.join(data_classes)}" if data_classes else ""))
    if len(set(member_classes)) != len(member_classes):
        raise ConfigError(f"member {str(path)!r}: its class order {list(member_classes)} names a class twice")
    return list(member_classes)


def in_order(model, own: list[str] | None, data: list[str] | None, path):
    """``model`` with its head's rows reordered from its own class order to the data's (refused if the classes
    differ)."""
    if own is None or data is None or list(own) == list(data):
        return model
    if sorted(own) != sorted(data):
        raise ConfigError(f"member {str(path)!r} classifies {list(own)}, the data has {list(data)}; members must be "
                          f"trained on the data's classes")
    rows = torch.tensor([list(own).index(name) for name in data])
    fc = model.head.fc
    with torch.no_grad():
        fc.weight.copy_(fc.weight[rows])
        fc.bias.copy_(fc.bias[rows])
    model.config.class_names = list(data)
    return model


def describe_members(models: Mapping[str, torch.nn.Module]) -> list[str]:
    """A line per member: how it reads an image and normalises it."""
    lines = []
    for name, m in models.items():
        norms = "; ".join(f"{b}: mean {tuple(round(v, 4) for v in br.mean.flatten().tolist())}, std "
                          f"{tuple(round(v, 4) for v in br.std.flatten().tolist())}" for b, br in m.branches.items())
        lines.append(f"{name}: {m.config.reading().describe()}; normalised with {norms}")
    return lines
