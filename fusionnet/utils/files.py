"""File helpers shared by the whole library: paths shown with their fix, and one atomic writer.

:func:`atomic_write` is the only way the library writes a file that a crash must not corrupt (checkpoints,
member outputs, cached features, JSON reports): the bytes go to a uniquely named temporary file in the same folder,
are fsynced, then renamed over the target. Any failure removes the temporary file, and each write first removes
temporary files in its folder orphaned by a process killed mid-write (they can never be renamed any more).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable

from fusionnet.errors import MissingFileError, WriteError

ORPHAN_AGE_S = 600.0
_TEMP_NAME = re.compile(r"\.[^/]+\.(\d+)\.[^./]+\.tmp")  # a temporary file this old belongs to a dead writer: no live save takes ten minutes to start


def resolve_path(path: str | os.PathLike, *, what: str = "checkpoint") -> Path:
    """``path`` as a Path that exists, or a MissingFileError (a FileNotFoundError) showing it quoted and pointing at stray spaces."""
    p = Path(path)
    if p.exists():
        return p
    msg = f"{what} not found: {str(path)!r}"
    spaced = [part for part in p.parts if part != part.strip()]
    if spaced:
        fixed = Path(*[part.strip() for part in p.parts])
        msg += (f"; the path component(s) {', '.join(map(repr, spaced))} have leading/trailing spaces"
                + (f" - did you mean {str(fixed)!r}? (it exists)" if fixed.exists() else ""))
    near = _near_miss(p)
    if near is not None:
        msg += f"; did you mean {str(near)!r}? (it exists)"
    elif p.parent != p and not p.parent.exists():
        msg += f"; its folder {str(p.parent)!r} does not exist either"
    raise MissingFileError(msg)


def _near_miss(p: Path) -> Path | None:
    """The existing path that differs from ``p`` in one component by spaces, case or a typo, if exactly one does:
    the first component that does not exist is matched against its folder's entries."""
    import difflib

    parts = p.parts
    for i in range(len(parts)):
        head = Path(*parts[:i + 1])
        if head.exists():
            continue
        folder = Path(*parts[:i]) if i else Path(".")
        try:
            names = [e.name for e in folder.iterdir()]
        except OSError:
            return None
        wanted = parts[i]
        same = [n for n in names if n.strip().lower() == wanted.strip().lower()]
        close = same or difflib.get_close_matches(wanted, names, n=2, cutoff=0.8)
        if len(close) != 1:
            return None
        guess = folder / close[0] / Path(*parts[i + 1:]) if i + 1 < len(parts) else folder / close[0]
        return guess if guess.exists() else None
    return None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_orphaned_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files in ``folder`` left by :func:`atomic_write` calls whose process was killed.

    Temporary names are ``.<target>.<pid>.<random>.tmp``: a file whose writer process no longer exists (or, for a
    pid this machine cannot see, one older than ORPHAN_AGE_S) can never be renamed into place.
    """
    removed, now = [], time.time()
    for tmp in Path(folder).glob(".*.tmp"):
        m = _TEMP_NAME.fullmatch(tmp.name)
        if m is None:
            continue
        try:
            if int(m.group(1)) != os.getpid() and (not pid_alive(int(m.group(1)))
                                                   or now - tmp.stat().st_mtime > ORPHAN_AGE_S):
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # another process removed or renamed it meanwhile
            pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, fsync it, then rename it to ``path``.

    Readers see the old file or the new one, never half of one. On any failure (a full disk, an exception in
    ``write``, Ctrl-C) the temporary file is removed and a :class:`WriteError` (or the interrupt) propagates.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise WriteError(f"cannot write {str(p)!r}: a part of its folder path is a file; choose another "
                             f"path") from exc
    remove_orphaned_temp_files(p.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, _UMASKED)  # mkstemp's private 0600 would outlive the rename: follow the umask, as open() does
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        interrupt = _interrupt_behind(exc)
        if interrupt is not None and interrupt is not exc:  # Ctrl-C / SIGTERM inside torch.save's writer comes out
            raise interrupt  # as torch's RuntimeError "unexpected pos": it is the interrupt, not a full disk
        if isinstance(exc, OSError) or "enforce fail" in str(exc) or "unexpected pos" in str(exc):
            # torch reports a full disk as a RuntimeError from its zip writer; name the real cause
            raise WriteError(f"could not write {str(p)!r} ({_short(exc)}); check free disk space and "
                                 f"permissions of {str(p.parent)!r}. The previous file, if any, is intact") from exc
        raise
    return p


def _interrupt_behind(exc: BaseException) -> BaseException | None:
    """The interrupt (KeyboardInterrupt, SIGTERM's Terminated, SystemExit: not an Exception) that ``exc`` is or was
    raised while handling, if any."""
    seen = 0
    while exc is not None and seen < 20:
        if not isinstance(exc, Exception):
            return exc
        exc, seen = exc.__context__, seen + 1
    return None


def _umasked_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_UMASKED = _umasked_mode()


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy a file through :func:`atomic_write` (a crash leaves the old copy or the new one)."""
    with open(source, "rb") as src:
        return atomic_write(path, lambda f: shutil.copyfileobj(src, f))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Indented JSON through :func:`atomic_write`."""
    data = json.dumps(obj, indent=2, default=str).encode()
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def files_fingerprint(paths) -> list:
    """[path, size, mtime_ns] per file: what a cache of data derived from these files is keyed by."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file; of a folder (a model folder, a vote's with its members' folders), of its visible
    files' paths relative to it and their bytes, in path order (hidden files and folders left out)."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted((f for f in p.rglob("*") if f.is_file()
                    and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                   key=lambda f: f.relative_to(p).as_posix()) if p.is_dir() else [p]
    for file in files:
        if p.is_dir():
            h.update(file.relative_to(p).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _short(exc: BaseException) -> str:
    """``Type: first line`` of an exception, safe for empty messages."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
