"""Output ensembles by voting, over saved member probabilities or over live member models.

Each trained member predicts each split once; :class:`MemberOutputs` keeps its softmax probabilities with the
metadata needed to refuse mixing things that do not belong together (class order, sample order, labels). Every
combination method here and in :mod:`fusionnet.ensembles.selection` works from those files, never re-running a network.

Names follow scikit-learn's ``VotingClassifier``: ``voting="soft"|"hard"``, ``weights``, ``transform()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fusionnet.models.checkpoints import load_weights_file
from fusionnet.data.datasets import as_dataset
from fusionnet.utils.probabilities import check_probs, check_stack, check_weights, soft_vote
from fusionnet.errors import ConfigError, DataError
from fusionnet.utils.files import atomic_torch_save, file_sha256, resolve_path
from fusionnet.engine.inference import predict

OUTPUTS_FORMAT = "fusionnet-member-outputs"


@dataclass
class MemberOutputs:
    """One member's softmax probabilities on one split, with what they depend on."""

    member: str  # a name, e.g. "efficientnet_lite0"
    split: str  # "val" | "test" | ...
    probs: torch.Tensor  # (N, K), rows sum to 1
    labels: torch.Tensor  # (N,)
    class_names: list[str]
    sample_ids: list[str]  # e.g. file paths, in row order
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.probs, self.labels = check_probs(self.probs, self.labels, f"member {self.member!r}")
        n, k = self.probs.shape
        if len(self.labels) != n or len(self.sample_ids) != n or len(self.class_names) != k:
            raise DataError(f"member {self.member!r}: probs {tuple(self.probs.shape)}, {len(self.labels)} labels, "
                             f"{len(self.sample_ids)} sample ids, {len(self.class_names)} class names disagree")

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_torch_save({"format": OUTPUTS_FORMAT, "member": self.member, "split": self.split,
                                  "probs": self.probs.float(), "labels": self.labels.long(),
                                  "class_names": list(self.class_names), "sample_ids": list(self.sample_ids),
                                  "checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256,
                                  "extra": self.extra}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MemberOutputs":
        obj = load_weights_file(resolve_path(path, what="member outputs"))
        if not isinstance(obj, dict) or obj.get("format") != OUTPUTS_FORMAT:
            raise DataError(f"{str(path)!r} is not a member-outputs file (save one with MemberOutputs.save, or "
                            f"`fusionnet predict`)")
        obj.pop("format")
        try:
            return cls(**obj)
        except TypeError as exc:
            raise DataError(f"{str(path)!r} is a member-outputs file with unexpected fields ({exc})") from exc


def member_outputs(model: nn.Module, data, *, member: str, split: str, checkpoint: str | os.PathLike | None = None,
                   sample_ids: Sequence[str] | None = None, **predict_kwargs) -> MemberOutputs:
    """Run ``model`` once over ``data`` (on ``device``, see :mod:`fusionnet.utils.distributed`) and keep its
    probabilities; ``forward`` gives the main logits only."""
    probs, labels = predict(model, data, **predict_kwargs)
    view = as_dataset(data)
    ids = [sample_id(i) for i in (sample_ids if sample_ids is not None else
                                  view.paths or map(str, range(len(data))))]
    return MemberOutputs(member=member, split=split, probs=probs, labels=labels,
                         class_names=list(view.class_names or [str(i) for i in range(probs.shape[1])]),
                         sample_ids=ids, checkpoint=str(checkpoint) if checkpoint else None,
                         checkpoint_sha256=file_sha256(checkpoint) if checkpoint else None)


SPLITS = ("train", "val", "test")


def sample_id(path) -> str:
    """The one canonical id of a sample: its file's resolved path (symlinks followed, so a data folder reached
    through a link and directly give the same ids) relative to the data root, ``split/class/name`` (so outputs
    saved on another machine, or after the folder moved, still align); a file outside a split folder keeps its
    resolved absolute path, and anything that is not a file stays as it is."""
    text = str(path)
    if not os.path.isfile(text):
        return text
    real = os.path.realpath(text)
    parts = real.split(os.sep)
    return "/".join(parts[-3:]) if len(parts) > 3 and parts[-3] in SPLITS else real


def check_aligned(outputs: Sequence[MemberOutputs]) -> None:
    """Refuse outputs that cannot be combined row by row: other classes, class order, samples or labels."""
    if not outputs:
        raise DataError("no member outputs given; pass at least one")
    ref = outputs[0]
    for o in outputs[1:]:
        where = f"member {o.member!r} ({o.split}) vs {ref.member!r} ({ref.split})"
        if o.class_names != ref.class_names:
            what = "class order" if sorted(o.class_names) == sorted(ref.class_names) else "classes"
            raise DataError(f"{where}: different {what}: {o.class_names} vs {ref.class_names}; predict every "
                             f"member with the same class_names")
        if o.sample_ids != ref.sample_ids and [sample_id(i) for i in o.sample_ids] != \
                [sample_id(i) for i in ref.sample_ids]:  # files saved before ids were canonical
            same_set = sorted(o.sample_ids) == sorted(ref.sample_ids)
            first = next(i for i, (a, b) in enumerate(zip(o.sample_ids, ref.sample_ids)) if a != b) \
                if len(o.sample_ids) == len(ref.sample_ids) else None
            raise DataError(f"{where}: " + ("samples in a different order" if same_set else "different samples")
                             + (f" (first difference at row {first})" if first is not None else
                                f" ({len(o.sample_ids)} vs {len(ref.sample_ids)} rows)")
                             + "; predict every member on the same dataset object, unshuffled")
        if not torch.equal(o.labels, ref.labels):
            first = int((o.labels != ref.labels).nonzero()[0]) if len(o.labels) == len(ref.labels) else 0
            raise DataError(f"{where}: same samples but different labels (first at row {first}); were they "
                            f"predicted on the same split?")


def stack_probs(outputs: Sequence[MemberOutputs] | Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """(M, N, K) from member outputs (checked for alignment), plain (N, K) tensors, or an (M, N, K) tensor."""
    if isinstance(outputs, torch.Tensor):
        return check_stack(outputs)[0]
    if len(outputs) and isinstance(outputs[0], MemberOutputs):
        check_aligned(outputs)  # type: ignore[arg-type]
        return torch.stack([o.probs for o in outputs])  # type: ignore[union-attr]
    if len(outputs) == 0:
        raise DataError("no member probabilities given; pass at least one member")
    return check_stack(torch.stack([torch.as_tensor(p) for p in outputs]))[0]


TIE_TOL = 1e-9  # relative: sums that differ by less are a tie (float64 sums of float32 inputs are exact to ~1e-16)


def hard_vote(probs: torch.Tensor, weights=None) -> torch.Tensor:
    """(M, N, K) -> (N, K): each row holds the (weighted) fraction of votes per class.

    Tie rule: among classes with the most votes, the one with the highest (weighted) mean probability wins; if that
    ties too, the lowest class index. Both stages compare float64 sums with one tolerance, so exact ties are ties
    whatever the input precision. The winner gets a tiny bonus so that ``argmax`` of the result is that winner.
    """
    probs = check_stack(probs)[0]
    return _hard(probs, check_weights(weights, probs.shape[0]))


def _hard(probs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """hard_vote on inputs already checked; ``w`` (M,) sums to 1."""
    m, n, k = probs.shape
    w, p64 = w.to(probs.device, torch.float64), probs.double()
    votes = torch.zeros(n, k, dtype=torch.float64, device=probs.device)
    votes.scatter_add_(1, p64.argmax(dim=2).T, w.expand(n, m).contiguous())  # (N, K) weighted vote shares
    tied = votes >= votes.max(dim=1, keepdim=True).values - TIE_TOL
    mass = torch.einsum("m,mnk->nk", w, p64).masked_fill(~tied, -1.0)  # weighted mean probabilities
    best = mass.max(dim=1, keepdim=True).values
    winner = (mass >= best - TIE_TOL).double().argmax(dim=1)  # the lowest index among exact ties
    out = votes.clone()
    out[torch.arange(n, device=probs.device), winner] += 1e-6
    return (out / out.sum(dim=1, keepdim=True)).to(probs.dtype)


class VotingEnsemble:
    """Voting over saved member outputs, with scikit-learn's names.

    >>> ens = VotingEnsemble(voting="soft", weights=[2, 1, 1])
    >>> proba = ens.predict_proba(test_outputs)      # (N, K)
    >>> pred = ens.predict(test_outputs)              # (N,)
    >>> per_member = ens.transform(test_outputs)      # (M, N, K)
    """

    def __init__(self, voting: str = "soft", weights: Sequence[float] | None = None) -> None:
        if voting not in ("soft", "hard"):
            raise ConfigError(f"voting must be 'soft' or 'hard', got {voting!r}")
        self.voting, self.weights = voting, weights

    def transform(self, outputs) -> torch.Tensor:
        return stack_probs(outputs)

    def predict_proba(self, outputs) -> torch.Tensor:
        probs = self.transform(outputs)  # checked here, once
        w = check_weights(self.weights, probs.shape[0])
        return soft_vote(probs, w, check=False) if self.voting == "soft" else _hard(probs, w)

    def predict(self, outputs) -> torch.Tensor:
        return self.predict_proba(outputs).argmax(dim=1)


class VotingModule(nn.Module):
    """Live members combined for deployment: ``forward(x)`` returns the ensemble's probabilities (B, K).

    Members return logits (``forward`` of any model gives the main logits only). Inputs go to each member's own
    device, so members moved with ``.to(device)`` together (or one by one) always see their inputs where they live.
    Optional per-member temperatures (from :func:`fusionnet.ensembles.calibration.fit_temperature`) divide the logits first.
    """

    def __init__(self, members: Sequence[nn.Module], *, voting: str = "soft", weights: Sequence[float] | None = None,
                 temperatures: Sequence[float] | None = None) -> None:
        super().__init__()
        VotingEnsemble(voting, weights)  # validates voting
        self.members = nn.ModuleList(members)
        self.voting = voting
        self.register_buffer("weights", check_weights(weights, len(members)).float())
        self.register_buffer("temperatures", torch.as_tensor(temperatures if temperatures is not None
                                                             else [1.0] * len(members), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for member, t in zip(self.members, self.temperatures):
            device = next((p.device for p in member.parameters()), x.device)
            logits = member(x.to(device))
            if not isinstance(logits, torch.Tensor):
                raise ConfigError(f"member {type(member).__name__} returned {type(logits).__name__}; voting members "
                                  f"must return logits (B, K) from forward (a FusionNet always does)")
            outs.append((logits.float() / t.to(device)).softmax(dim=1).to(x.device))
        probs = torch.stack(outs)  # (M, B, K), softmax outputs: valid by construction, not re-checked per batch
        return soft_vote(probs, self.weights, check=False) if self.voting == "soft" else _hard(probs, self.weights)
