"""The vote as a model: the weighted, temperature-scaled soft vote of trained members, kept, loaded, pushed, served
and exported as one artifact, as a FusionNet is.

:class:`Vote` holds the members (FusionNets, e.g. from :func:`fusionnet.models.plain.load_member`), their names,
weights on the simplex and per-member temperatures. ``forward(x)`` returns the log of the vote's probabilities, so
that every consumer that applies a softmax (predict, evaluate, serve, ONNX) gets the vote itself.

Its folder (:meth:`Vote.save_pretrained`), in the layout of :mod:`fusionnet.models.pretrained`::

    config.json        {"format": "fusionnet-vote", "format_version": 1, "voting": "soft", "method": ...,
                        "members": [{"name", "weight", "temperature"}], "class_names", "metrics", ...}
    README.md          the model card
    members/<name>/    each member as a model folder (config.json, model.safetensors, README.md)

No pickle anywhere; a local folder or a Hugging Face Hub id (``user/name``) of one reads back bit-identically
(:meth:`Vote.from_pretrained`, :func:`fusionnet.load`).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from fusionnet.config import Reading
from fusionnet.errors import CheckpointMismatchError, ConfigError, MissingFileError
from fusionnet.models.fusion import FusionNet
from fusionnet.models.interface import Classifier, ModelOutput
from fusionnet.utils.probabilities import EPS, scale_probs, soft_vote
from fusionnet.models.pretrained import (CARD, CONFIG, MEMBERS, VOTE_FORMAT, WEIGHTS, checked_config, folder_payload,
                                         is_pretrained_folder, local_folder, save_pretrained, upload_folder, written_by)

FORMAT_VERSION = 1
WEIGHT_TOL = 1e-6  # how far from 1 the weights' sum may be
_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$")  # a member's name is its folder's name


class Vote(Classifier):
    """The soft vote of trained ``members`` (FusionNets that agree on their classes and on how they read an image):
    ``softmax(forward(x))`` is ``sum_i weights[i] * softmax(member_i(x) / temperatures[i])`` (the temperature
    applied to the member's probabilities as the ensemble method applied it, softmax(log p / T) with p clamped at
    1e-12), then temperature-scaled as a whole by ``ensemble_temperature`` the same way. ``names``: one per member, also its folder's name;
    ``weights``: non-negative, summing to 1 (None: equal); ``temperatures``: positive (None: all 1);
    ``method``: how the weights were chosen (e.g. ``"greedy selection (Caruana)"``), for the model card."""

    def __init__(self, members: Sequence[FusionNet], names: Sequence[str], *, weights: Sequence[float] | None = None,
                 temperatures: Sequence[float] | None = None, ensemble_temperature: float = 1.0,
                 voting: str = "soft", method: str = "soft voting", metrics: Mapping | None = None,
                 records: Mapping[str, dict] | None = None) -> None:
        super().__init__()
        if voting != "soft":
            raise ConfigError(f"a Vote is a soft vote (voting='soft'), got voting={voting!r}: a hard vote's outputs "
                              f"are vote fractions, not probabilities, so no consumer that applies a softmax "
                              f"(predict, serve, ONNX) could reproduce it; vote over saved outputs with "
                              f"'fusionnet vote --method hard' instead")
        names = [str(n) for n in names]
        _check_members(members, names)
        m = len(members)
        self.members = nn.ModuleList(members)
        self.names = names
        self.method, self.metrics = method, dict(metrics or {})
        self.records = {n: dict((records or {}).get(n) or {}) for n in names}  # each member's training record
        self.register_buffer("weights", torch.tensor(check_simplex(weights, m), dtype=torch.float64),
                             persistent=False)
        self.register_buffer("temperatures", torch.tensor(_positive(temperatures if temperatures is not None
                                                                    else [1.0] * m, m, "temperatures"),
                                                          dtype=torch.float64), persistent=False)
        self.ensemble_temperature = _positive([ensemble_temperature], 1, "ensemble_temperature")[0]
        self._reading = _common_reading(members, names)

    # ---- what consumers read -------------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """The classes of the outputs' columns (every member's, in its order)."""
        return list(self.members[0].class_names)

    @property
    def reading(self) -> Reading:
        """How the vote reads an image (each member's reading: they agree), with its input size."""
        return self._reading

    @property
    def input_size(self) -> int | None:
        """The side in pixels of the images the vote takes (None: not recorded)."""
        return self._reading.size

    def member_table(self) -> list[dict]:
        """``[{"name", "weight", "temperature"}]``, a dict per member: what config.json and the card list."""
        return [{"name": n, "weight": float(w), "temperature": float(t)}
                for n, w, t in zip(self.names, self.weights.tolist(), self.temperatures.tolist())]

    def in_order(self, class_names: Sequence[str]) -> "Vote":
        """This vote, its outputs reordered to ``class_names`` (the same classes in another order, e.g. the
        data's); refused if the classes differ."""
        from fusionnet.models.plain import in_order

        for name, member in zip(self.names, self.members):
            in_order(member, member.class_names, list(class_names), name)
        return self

    # ---- the vote --------------------------------------------------------------------------------------------------
    def member_probs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: probabilities}`` (B, K) float32 that each member brings to the vote: its softmax, temperature-
        scaled as the ensemble method scaled its saved probabilities (softmax(log p / T))."""
        out = {}
        for n, m, t in zip(self.names, self.members, self.temperatures.tolist()):
            p = m(x).float().softmax(dim=1)
            out[n] = p if t == 1.0 else scale_probs(p, t)
        return out

    def forward_output(self, x: torch.Tensor) -> ModelOutput:
        """The vote's logits (the log of its probabilities), with each member's (temperature-scaled) log-
        probabilities as ``aux`` (serve's per-member view)."""
        each = self.member_probs(x)
        mixed = soft_vote(torch.stack(list(each.values())), self.weights, check=False)  # float64 sum
        if self.ensemble_temperature != 1.0:
            mixed = scale_probs(mixed, self.ensemble_temperature)
        return ModelOutput(mixed.clamp_min(EPS).log(), aux={n: p.clamp_min(EPS).log() for n, p in each.items()})

    # ---- files --------------------------------------------------------------------------------------------------
    def config_json(self) -> dict:
        """The vote's config.json (its members' own configs are in their folders)."""
        return {"format": VOTE_FORMAT, "format_version": FORMAT_VERSION, "fusionnet_version": written_by(),
                "voting": "soft", "method": self.method, "members": self.member_table(),
                "ensemble_temperature": self.ensemble_temperature, "class_names": self.class_names,
                "reading": self.reading.to_dict(), "metrics": self.metrics}

    def save_pretrained(self, folder: str | os.PathLike, *, metrics: Mapping | None = None,
                        overwrite: bool = False) -> Path:
        """Write the vote's folder (config.json, README.md, ``members/<name>/`` model folders), atomically: a
        complete folder or the one that was there (replaced only with ``overwrite``). ``metrics``: saved with it
        (default: its own)."""
        from fusionnet.utils.staging import output_folder

        config = {**self.config_json(), "metrics": dict(metrics if metrics is not None else self.metrics)}
        with output_folder(folder, overwrite) as work:
            work = Path(work)
            work.mkdir(parents=True, exist_ok=True)
            for name, member in zip(self.names, self.members):
                save_pretrained(member, work / MEMBERS / name, data=self.records.get(name))
            (work / CONFIG).write_text(json.dumps(config, indent=1, default=str) + "\n")
            (work / CARD).write_text(vote_card(config, self))
        return Path(folder)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = False) -> str:
        """Upload the vote's folder (its members' folders included) to the Hugging Face Hub repository ``repo_id``
        (created if missing); returns its URL. A token: ``token``, ``HF_TOKEN`` or ``huggingface-cli login``'s."""
        return upload_folder(lambda folder: self.save_pretrained(folder), repo_id, token=token, private=private,
                             commit_message="fusionnet vote")

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, revision: str | None = None) -> "Vote":
        """The vote in a folder written by :meth:`save_pretrained`, or a Hugging Face Hub id of one
        (``"user/name"``, through ``huggingface_hub``'s cache); outputs are bit-identical."""
        folder = local_folder(source, revision)
        config = vote_config(folder)
        table = config["members"]
        members, records = [], {}
        for entry in table:
            member_folder = folder / MEMBERS / entry["name"]
            if not is_pretrained_folder(member_folder):
                raise MissingFileError(f"{str(folder / CONFIG)!r} lists member {entry['name']!r}, but "
                                       f"{str(member_folder)!r} is not a model folder (config.json, "
                                       f"model.safetensors); copy or download the whole vote folder, or write it "
                                       f"again (Vote.save_pretrained)")
            payload = folder_payload(member_folder)  # read once: the model and its training record
            members.append(FusionNet.from_payload(payload, config_file=member_folder / CONFIG,
                                                  weights_file=member_folder / WEIGHTS))
            records[entry["name"]] = payload["data"]
        try:
            vote = cls(members, [e["name"] for e in table], weights=[e["weight"] for e in table],
                       temperatures=[e.get("temperature", 1.0) for e in table],
                       ensemble_temperature=config.get("ensemble_temperature", 1.0),
                       voting=config.get("voting", "soft"), method=config.get("method", "soft voting"),
                       metrics=config.get("metrics"), records=records)
        except ConfigError as exc:
            raise ConfigError(f"{str(folder / CONFIG)!r}: {exc}") from None
        return vote.eval()  # as FusionNet.from_pretrained: ready to predict


def vote_config(folder: Path) -> dict:
    """A vote folder's config.json, checked: its format, its version, and a member table to read."""
    where = str(Path(folder) / CONFIG)
    config = checked_config(folder, VOTE_FORMAT, FORMAT_VERSION, "a vote's",
                            "Vote.save_pretrained or fusionnet fuse (<out>/vote)")
    table = config.get("members")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(table, list) or not table or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and _NAME.match(e["name"]) and number(e.get("weight"))
            and number(e.get("temperature", 1.0)) for e in table):
        raise CheckpointMismatchError(f"{where!r} has no valid member table (\"members\": [{{\"name\": a folder "
                                      f"name under {MEMBERS}/, \"weight\": a number, \"temperature\": a number}}, "
                                      f"...]); write the vote again (Vote.save_pretrained)")
    if config.get("voting", "soft") != "soft" or not number(config.get("ensemble_temperature", 1.0)):
        raise CheckpointMismatchError(f"{where!r}: 'voting' must be 'soft' and 'ensemble_temperature' a number; "
                                      f"write the vote again (Vote.save_pretrained)")
    return config


def check_simplex(weights: Sequence[float] | None, m: int) -> list[float]:
    """``weights`` as floats when they lie on the simplex (``m`` of them, non-negative, summing to 1); equal
    weights when None; else a ConfigError saying what is wrong."""
    if weights is None:
        return [1.0 / m] * m
    try:
        w = [float(v) for v in weights]
    except (TypeError, ValueError):
        raise ConfigError(f"the members' weights must be numbers, got {weights!r}") from None
    if len(w) != m:
        raise ConfigError(f"{len(w)} weights for {m} members; give one weight per member")
    if not all(math.isfinite(v) and v >= 0 for v in w):
        raise ConfigError(f"the members' weights {w} must be finite and non-negative")
    if abs(sum(w) - 1.0) > WEIGHT_TOL:
        raise ConfigError(f"the members' weights {w} sum to {sum(w):.6g}, not 1; a vote's weights lie on the "
                          f"simplex: divide them by their sum")
    return w


def _positive(values: Sequence[float], m: int, what: str) -> list[float]:
    try:
        v = [float(t) for t in values]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be numbers, got {values!r}") from None
    if len(v) != m or not all(math.isfinite(t) and t > 0 for t in v):
        raise ConfigError(f"{what} must be {m} finite positive number(s), got {v}")
    return v


def _check_members(members: Sequence, names: list[str]) -> None:
    """Members that can be voted: FusionNets with unique, folder-safe names and the same class names."""
    if not members or len(members) != len(names):
        raise ConfigError(f"a vote needs one or more members and a name for each; got {len(members)} members and "
                          f"{len(names)} names")
    bad = [n for n in names if not _NAME.match(n)]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"member names must be unique folder names (letters, digits, . _ + -), got {names}")
    for name, m in zip(names, members):
        if not isinstance(m, FusionNet):
            raise ConfigError(f"member {name!r} is a {type(m).__name__}; a Vote's members are FusionNets (load them "
                              f"with fusionnet.load), which save as model folders")
    classes = {n: m.class_names for n, m in zip(names, members)}
    first = classes[names[0]]
    if first is None or any(c != first for c in classes.values()):
        raise ConfigError(f"the members disagree on their class names or their order ({classes}); a vote's outputs "
                          f"need one class order: load each with the data's classes (load_member(path, "
                          f"class_names=...)), or vote over their saved outputs instead ('fusionnet vote')")


def _common_reading(members: Sequence[FusionNet], names: list[str]) -> Reading:
    """The one reading of the members (the one batch every member reads), or a ConfigError naming them."""
    from fusionnet.config.reading import common_reading

    try:
        return common_reading({n: m.config.reading() for n, m in zip(names, members)})
    except ConfigError as exc:
        raise ConfigError(f"members {names} cannot be one Vote model, which reads one batch one way: {exc}. Vote "
                          f"over their saved outputs instead ('fusionnet predict' per member, then 'fusionnet "
                          f"vote')") from None


def vote_card(config: dict, vote: Vote) -> str:
    """The vote folder's README.md: what it is, its members, classes, preprocessing, metrics, how to load it."""
    rows = [f"| {e['name']} | {', '.join(br.cfg.backbone for br in m.branches.values())} | {e['weight']:.4f} | "
            f"{e['temperature']:.4g} |" for e, m in zip(config["members"], vote.members)]
    classes = config["class_names"]
    lines = ["---", "library_name: fusionnet", "tags: [image-classification, fusionnet, ensemble]", "---", "",
             f"# A weighted soft vote of {len(rows)} members ({config['method']})", "",
             f"Written by fusionnet {config['fusionnet_version']} (vote format version {config['format_version']}). "
             "Its probabilities are the weighted mean of each member's softmax of its logits divided by its "
             "temperature" + (f", then temperature-scaled as a whole (T = {config['ensemble_temperature']:.4g})"
                              if config["ensemble_temperature"] != 1.0 else "") + "; each member is a model folder "
             "under `members/<name>/`.", "",
             "| member | backbones | weight | temperature |", "| --- | --- | --- | --- |", *rows, "",
             f"**Classes** ({len(classes)}): {', '.join(classes)}", "",
             f"**Preprocessing** (done by fusionnet, the same for every member): RGB in [0, 1], "
             f"{vote.reading.describe()}; each member's branches normalise with their own mean/std (see their "
             f"cards).", ""]
    if config.get("metrics"):
        lines += ["**Metrics saved with it**: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in config["metrics"].items()), ""]
    lines += ["**Intended use and limits**: the classes above, on images like those its members were trained on; "
              "it costs a forward pass per member. Its weights were chosen on a validation split: check for a "
              "domain gap (`fusionnet gap`) before trusting it on other images.", "", "```python",
              "import fusionnet", "", "vote = fusionnet.load(\"<this folder or user/name>\")",
              "probs = vote(images).softmax(1)  # (B, 3, H, W) floats in [0, 1] -> the vote's probabilities",
              "```", "", "Or: `fusionnet predict`, `fusionnet serve` and `fusionnet export` with this folder.", ""]
    return "\n".join(lines)
