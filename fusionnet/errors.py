"""The library's exceptions: every error caused by what the user passed is a :class:`FusionNetError`.

Each message names the file or value at fault and what to do. The subclasses also derive from the built-in type
that older code caught (``ValueError``, ``RuntimeError``, ``OSError``), so ``except ValueError`` keeps working.
The command line maps a ``FusionNetError`` to exit code 2 (bad input) and anything else to exit code 1.
"""

from __future__ import annotations

import math
from typing import Iterable


class FusionNetError(Exception):
    """Base class: something the user gave (a value, a file, a folder) is not what the library needs."""


class ConfigError(FusionNetError, ValueError):
    """A bad argument or setting value."""


class DataError(FusionNetError, ValueError):
    """The data on disk (or in memory) is not what the loader or ensemble needs."""


class CheckpointMismatchError(FusionNetError, RuntimeError):
    """A checkpoint cannot be read, or does not fit the module it is loaded into."""


class WeightsUnavailableError(FusionNetError, RuntimeError):
    """Pretrained weights could not be fetched (no network, no cache) and no local file was given."""


class MissingFileError(FusionNetError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class WriteError(FusionNetError, OSError):
    """A result could not be written (full disk, permissions, a file where a folder should be)."""


class MissingDependencyError(FusionNetError, ImportError):
    """An optional package (an extra such as ``fusionnet[lite]``) that this use needs is not installed."""


class TrainingError(FusionNetError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoints are kept."""


class CheckFailedError(Exception):
    """A result failed the library's own check (e.g. an ONNX export that does not compute what the model does):
    not the user's input, so exit code 1 on the CLI, with one line and nothing written."""


def install_hint(extra: str) -> str:
    """The command that installs an optional extra, for how fusionnet was installed: from a source checkout
    (``pip install -e .``) the checkout's own, else the package index's."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    try:
        direct = json.loads(metadata.distribution("fusionnet").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        direct = {}
    if direct.get("dir_info", {}).get("editable") and direct.get("url", "").startswith("file://"):
        return f'pip install -e "{unquote(urlparse(direct["url"]).path)}[{extra}]"'
    return f"pip install 'fusionnet[{extra}]'"


# ---- checking settings ------------------------------------------------------------------------------------------
def is_int(v) -> bool:
    """A whole number (not a bool, which Python counts as an int)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite(v) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_settings(rules: Iterable[tuple[bool, str]]) -> None:
    """Raise a :class:`ConfigError` with the message of the first rule that does not hold."""
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
