"""The public API's one load / save pair: :func:`save` writes a model in fusionnet's own format, :func:`load` reads
any model file fusionnet reads (its own checkpoints, of any number of branches, or a plain torchvision / timm
state dict of one registered backbone)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from fusionnet.config import PlainConfig
from fusionnet.errors import ConfigError
from fusionnet.models.factory import save_model
from fusionnet.models.fusion import FusionNet
from fusionnet.models.plain import load_member
from fusionnet.models.pretrained import is_hub_id, is_vote_folder, local_folder
from fusionnet.models.vote import Vote


def save(model: FusionNet, path: str | os.PathLike, *, metrics: dict | None = None) -> Path:
    """Write ``model`` to ``path`` (config, class names, weights and ``metrics``), atomically: a crash leaves the
    file that was there. :func:`load`, ``fusionnet predict``, ``serve``, ``export`` and ``fuse`` read it. A
    :class:`~fusionnet.models.vote.Vote` is a folder of its members, not one file: ``vote.save_pretrained(folder)``."""
    if isinstance(model, Vote):
        raise ConfigError(f"fusionnet.save writes one model's checkpoint file; a Vote ({', '.join(model.names)}) "
                          f"is saved as a folder of its members: vote.save_pretrained({str(path)!r})")
    save_model(model, path, metrics=metrics)
    return Path(path)


def load(path: str | os.PathLike, *, class_names: Sequence[str] | None = None,
         plain: PlainConfig | None = None, revision: str | None = None) -> FusionNet | Vote:
    """The model in ``path``: a fusionnet checkpoint (any number of branches), a model folder
    (:meth:`FusionNet.save_pretrained`) or a Hugging Face Hub id of one (``"user/name"``, at ``revision``), or a
    plain state dict of one registered backbone (its classes, size and normalisation from ``plain``, a manifest or
    ``classes.txt`` beside it). ``class_names``: the order you want its outputs in (the model's own when None).
    A vote's folder (:meth:`Vote.save_pretrained`, ``fusionnet fuse``'s ``<out>/vote``) or Hub id gives the
    :class:`~fusionnet.models.vote.Vote`."""
    if is_hub_id(path):
        path = local_folder(path, revision)  # a Hub id: huggingface_hub's download and cache
    if is_vote_folder(path):
        vote = Vote.from_pretrained(path)
        return vote if class_names is None else vote.in_order(list(class_names))
    return load_member(path, class_names=list(class_names) if class_names is not None else None, plain=plain)
