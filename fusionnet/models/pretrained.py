"""The folder format the ecosystem reads: ``config.json`` (plain JSON), ``model.safetensors`` (no pickle) and a
``README.md`` model card, as timm's and ``huggingface_hub``'s models are kept; a local folder or a Hugging Face Hub
id (``user/name``, fetched by ``huggingface_hub``'s own download and cache, which honours ``HF_HOME``,
``HF_HUB_OFFLINE`` and revisions).

:func:`save_pretrained` writes the folder (atomically: a complete folder or the one that was there),
:func:`from_pretrained` reads it back bit-identically; :func:`is_pretrained_folder` says whether a path is one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fusionnet.errors import CheckpointMismatchError, ConfigError, MissingFileError

FORMAT = "fusionnet-pretrained"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
VOTE_FORMAT, MEMBERS = "fusionnet-vote", "members"  # a vote's folder (fusionnet.models.vote): members/<name>/
# what a Hub snapshot of a model folder or of a vote folder holds (fnmatch patterns: * crosses "/")
HUB_FILES = [CONFIG, WEIGHTS, CARD, *(f"{MEMBERS}/*/{name}" for name in (CONFIG, WEIGHTS, CARD))]


def is_pretrained_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and read_config(p).get("format") == FORMAT


def is_vote_folder(path) -> bool:
    """Whether ``path`` is a vote's folder (:class:`fusionnet.models.vote.Vote`: its config.json says ``"format":
    "fusionnet-vote"``)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and read_config(p).get("format") == VOTE_FORMAT


def is_hub_id(source) -> bool:
    """Whether ``source`` names a Hugging Face Hub repository (``user/name``) rather than a local path."""
    text = str(source)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/"))


def save_pretrained(model, folder: str | os.PathLike, *, metrics: dict | None = None, data: dict | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``model`` (any FusionNet) to ``folder``: config.json, model.safetensors, README.md. ``metrics`` and
    ``data`` (what it was trained on: :func:`fusionnet.data.datasets.training_record`) go into the config and the
    card. An existing folder is replaced, only with ``overwrite`` and only once the new one is complete."""
    from safetensors.torch import save_file

    from fusionnet.utils.staging import output_folder

    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "fusionnet_version": written_by(),
              "model": model.model_config(), "class_names": model.class_names, "metrics": metrics or {},
              "data": data or {}}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with output_folder(folder, overwrite) as work:
        Path(work).mkdir(parents=True, exist_ok=True)
        (Path(work) / CONFIG).write_text(json.dumps(config, indent=1, default=str) + "\n")
        save_file(state, str(Path(work) / WEIGHTS), metadata={"format": FORMAT})
        (Path(work) / CARD).write_text(model_card(config))
    return Path(folder)


def written_by() -> str:
    """The fusionnet version that writes a folder ("unknown" run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusionnet")
    except PackageNotFoundError:
        return "unknown"


def push_to_hub(model, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "fusionnet model") -> str:
    """Upload ``model`` as a model folder to the Hugging Face Hub repository ``repo_id`` (created if missing), with
    ``huggingface_hub``'s own client; returns the repository's URL. A token: ``token``, ``HF_TOKEN`` or the one
    ``huggingface-cli login`` stored."""
    return upload_folder(lambda folder: save_pretrained(model, folder), repo_id, token=token, private=private,
                         commit_message=commit_message)


def upload_folder(write, repo_id: str, *, token: str | None = None, private: bool = False,
                  commit_message: str = "fusionnet model") -> str:
    """Upload the folder ``write(folder)`` writes (a model's or a vote's) to the Hub repository ``repo_id``: the
    files of :data:`HUB_FILES`, nothing else; returns the repository's URL."""
    import tempfile

    from huggingface_hub import HfApi, get_token

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ConfigError(f"a Hub repository is 'user/name', got {repo_id!r}")
    token = token or get_token()
    if not token:
        raise ConfigError("pushing to the Hub needs a token: run huggingface-cli login, set HF_TOKEN, or pass "
                          "--token")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write(Path(tmp) / "model")
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                          allow_patterns=HUB_FILES)
    return str(url)


def from_pretrained(source: str | os.PathLike, *, model_class, revision: str | None = None):
    """The model (a ``model_class``: FusionNet) in a folder written by :func:`save_pretrained`, or in a Hugging Face
    Hub repository of one (``"user/name"``, through ``huggingface_hub.snapshot_download``'s cache); outputs are
    bit-identical."""
    folder = local_folder(source, revision)
    return model_class.from_payload(folder_payload(folder), config_file=folder / CONFIG, weights_file=folder / WEIGHTS)


def local_folder(source, revision: str | None = None) -> Path:
    """A local folder as given, else a Hub repository id's snapshot folder (downloaded or from the cache)."""
    p = Path(source)
    if p.exists():
        if not (p / CONFIG).is_file():
            raise MissingFileError(f"{str(source)!r} has no {CONFIG}; a fusionnet model folder holds {CONFIG}, "
                                   f"{WEIGHTS} and {CARD} (written by save_pretrained or fusionnet export --format "
                                   f"hf), a vote folder {CONFIG}, {CARD} and {MEMBERS}/")
        return p
    if not is_hub_id(source):
        raise MissingFileError(f"{str(source)!r} is neither a model folder nor a Hub id ('user/name')")
    import huggingface_hub.constants as hub
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from fusionnet.models.weight_sources import host_reachable

    # the Hub when it answers (a newer revision comes down); else the cache alone, at once: offline, a download
    # would retry for a minute or more before failing
    cache_only = bool(hub.HF_HUB_OFFLINE) or not host_reachable(hub.ENDPOINT)
    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=HUB_FILES,
                                      local_files_only=cache_only))
    except LocalEntryNotFoundError:
        raise ConfigError(f"Hub model {str(source)!r} is not in the Hugging Face cache and cannot be downloaded "
                          f"(offline: HF_HUB_OFFLINE, or no network); download it once online, or give a folder") \
            from None
    except (RepositoryNotFoundError, HfHubHTTPError) as exc:
        raise ConfigError(f"Hub model {str(source)!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def folder_payload(folder: Path) -> dict:
    """The folder as the payload of fusionnet's own ``.pth`` format: config, class names, metrics, training record
    and state dict (fusionnet.models.checkpoints adds the format fields), so that whatever reads a checkpoint reads
    the folder too."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = checked_config(folder, FORMAT, FORMAT_VERSION, "a fusionnet model's", "save_pretrained")
    try:
        state = load_file(str(Path(folder) / WEIGHTS))
    except FileNotFoundError:
        raise MissingFileError(f"{str(folder)!r} has no {WEIGHTS}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointMismatchError(f"{str(Path(folder) / WEIGHTS)!r} cannot be read ({exc}); it is damaged: "
                                      f"write the folder again") from None
    return {"config": config["model"], "class_names": config.get("class_names"), "metrics": config.get("metrics") or {},
            "data": config.get("data") or {}, "state_dict": state}


def checked_config(folder: Path, format: str, version: int, what: str, writer: str) -> dict:
    """The folder's config.json when it says ``format`` in a version this fusionnet reads (at most ``version``);
    else a CheckpointMismatchError naming the file, ``what`` it should be and the ``writer`` that writes one."""
    config = read_config(folder)
    if config.get("format") != format:
        raise CheckpointMismatchError(f"{str(Path(folder) / CONFIG)!r} is not {what} config (no 'format': "
                                      f"{format!r}); give a folder written by {writer}")
    if int(config.get("format_version", 0)) > version:
        raise CheckpointMismatchError(f"{str(folder)!r} was written in format version {config['format_version']} by "
                                      f"fusionnet {config.get('fusionnet_version')}, newer than this fusionnet reads "
                                      f"({version}); upgrade fusionnet")
    return config


def read_config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointMismatchError(f"{str(Path(folder) / CONFIG)!r} cannot be read as JSON ({exc})") from None


def model_card(config: dict) -> str:
    """The folder's README.md: what the model is, its classes, its preprocessing, its metrics, how to load it."""
    m = config["model"]
    branches = [b["backbone"] for b in m["branches"]]
    kind = "a single-backbone classifier" if len(branches) == 1 else f"a FusionNet ({m['fusion']} fusion)"
    lines = ["---", "library_name: fusionnet", "tags: [image-classification, fusionnet]", "---", "",
             f"# {kind}: {', '.join(branches)}", "",
             f"Written by fusionnet {config['fusionnet_version']} (format version {config['format_version']}).", "",
             f"**Classes** ({m['num_classes']}): {', '.join(config.get('class_names') or []) or 'not named'}", "",
             "**Preprocessing** (done by the model's own reading in fusionnet): RGB in [0, 1], "
             f"{m.get('image_size') or 'the training'} px, resize mode {m.get('resize', 'shorter')!r}, centre crop "
             f"{m.get('crop_pct', 1.0)}, reader {m.get('reader', 'albumentations')!r}; each branch normalises with its "
             f"own mean/std: " + "; ".join(f"{b['backbone']} mean {b.get('mean') or 'its backbone default'} std "
                                           f"{b.get('std') or 'its backbone default'}" for b in m["branches"]), ""]
    if config.get("metrics"):
        lines += ["**Metrics saved with it**: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in config["metrics"].items()), ""]
    data = config.get("data") or {}
    if data:
        lines += [f"**Trained on** {len(data.get('files') or [])} images (split seed {data.get('seed')}, input "
                  f"size {data.get('input_size')} px).", ""]
    lines += ["**Intended use and limits**: the classes above, on images like those it was trained on; check for a "
              "domain gap (`fusionnet gap`) before trusting it on others.", "", "```python",
              "import fusionnet", "", "model = fusionnet.load(\"<this folder or user/name>\")",
              "logits = model(images)  # (B, 3, H, W) floats in [0, 1]", "```", ""]
    return "\n".join(lines)


class PretrainedMixin:
    """``model.save_pretrained(folder)`` and ``Model.from_pretrained(folder or "user/name")`` for a model class that
    rebuilds itself from a checkpoint payload (``from_payload``), as huggingface_hub's ``ModelHubMixin`` gives them."""

    def save_pretrained(self, folder: str | os.PathLike, *, metrics: dict | None = None,
                        overwrite: bool = False) -> Path:
        """Write this model as a folder the ecosystem reads (config.json, model.safetensors, a README.md model
        card): :func:`save_pretrained`."""
        return save_pretrained(self, folder, metrics=metrics, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = False) -> str:
        """Upload this model's folder to the Hugging Face Hub repository ``repo_id``: :func:`push_to_hub`."""
        return push_to_hub(self, repo_id, token=token, private=private)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, revision: str | None = None):
        """A model folder written by :meth:`save_pretrained`, or a Hugging Face Hub id of one (``"user/name"``):
        :func:`from_pretrained`."""
        return from_pretrained(source, model_class=cls, revision=revision)
