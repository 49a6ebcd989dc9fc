"""Nothing the user already has is lost to a failed command: output folders are replaced only once complete.

:func:`output_folder` is how every command that writes a run folder gets it:

* ``out`` is checked first (a file where the folder should be, a file in its path, a run there without
  ``overwrite``, a folder that is or holds one of the command's inputs): refused with a
  :class:`~fusionnet.errors.ConfigError` before anything is written;
* a fresh ``out`` (absent or empty) is written in place, so an interrupted ``train`` can continue with ``--resume``;
* with ``overwrite`` over an existing run, the new run is written beside it, in ``.<name>.partial-<pid>``, and
  swapped in by two renames only when the command has finished. On any failure (bad input found late, an
  exception mid-training, a NaN stop, Ctrl-C, SIGTERM) the partial folder is removed and the old run is left
  byte-identical. After a ``kill -9`` the partial folder stays under its ``.partial-<pid>`` name; the next command
  writing beside it removes it (its process is gone), and restores a run caught between the two renames
  (``.<name>.replaced-<pid>``).

Paths the new run recorded in its JSON and Markdown files point into the partial folder while it is written; the
swap rewrites them to ``out``.

A finished run lists the files it wrote in ``out/.written.json``. ``--overwrite`` carries every other file of the old
folder (a user's predictions saved beside the run) into the new one and says so. In a folder written before that
list existed (or continued with ``train --resume``), the top-level files the new run does not write are carried over
unless they are of the kinds the commands write (``.pth``, ``.json``, ``.md``, ``.png``: an earlier run's
``selected.pth`` must not stand beside a new run); sub-folders are the run's own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from fusionnet.errors import ConfigError
from fusionnet.utils.files import atomic_write_text, pid_alive

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|replaced)-(?P<pid>\d+)$")
_TEXT_SUFFIXES = (".json", ".md", ".txt", ".csv")


class Terminated(BaseException):
    """SIGTERM arrived while a command was writing (raised like KeyboardInterrupt, so every cleanup runs)."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises :class:`Terminated` instead of killing the
    process on the spot, so the partial output is removed and the old one kept."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_output_folder(out: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()
                        ) -> Path:
    """``out`` as a run folder this command may write: refused (ConfigError) if it is a file, lies under a file,
    holds a run and ``overwrite`` is off, or is (or holds) one of the command's ``inputs`` (its data, members,
    teacher), which replacing it would delete."""
    p = Path(out)
    for given in inputs:
        source = Path(given).resolve()
        if source == p.resolve() or p.resolve() in source.parents:
            raise ConfigError(f"--out {str(p)!r} holds an input of this command ({str(given)!r}); replacing it "
                              f"would delete that input: choose another --out")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {str(p)!r} is a file; give a folder for the run")
    blocked = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"--out {str(p)!r}: a part of its folder path is a file ({str(blocked)!r}); choose "
                          f"another folder")
    if _has_run(p) and not overwrite:
        raise ConfigError(f"run folder {str(p)!r} exists already; choose another --out, or pass --overwrite "
                          f"to replace it (the old run stays until the new one is complete)")
    return p


def _has_run(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


@contextmanager
def output_folder(out: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()
                  ) -> Iterator[Path]:
    """The folder to write the run into (see the module docstring); swapped into ``out`` when the block ends
    without an exception. ``inputs``: the command's input paths, which ``out`` must not hold."""
    clean_leftovers(Path(out))  # first: a run it restores is then checked like any other
    final = check_output_folder(out, overwrite, inputs)
    if final.is_symlink():  # replace the folder the link points to, and keep the link
        final = final.resolve()
    if not _has_run(final):
        with _sigterm_raises():
            yield final
        _record_written(final)
        return
    work = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with _sigterm_raises():
            yield work
        _record_written(work)
        kept = _carry_over(final, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _swap_in(work, final)
    for what, files in zip(("kept", "replaced by the new run's own"), kept):
        if files:
            print(f"--overwrite {what} {len(files)} file(s) in {str(out)!r} that the earlier run did not write: "
                  f"{', '.join(files[:5])}{' ...' if len(files) > 5 else ''}")


WRITTEN = ".written.json"  # the files a command wrote into its run folder (relative paths)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != WRITTEN)


def _record_written(folder: Path) -> None:
    if folder.is_dir():
        atomic_write_text(folder / WRITTEN, json.dumps(_files(folder)))


RUN_OUTPUTS = (".pth", ".json", ".md", ".png")  # what commands write: never carried from a folder without a record


def _carry_over(old: Path, new: Path) -> tuple[list[str], list[str]]:
    """Copy into ``new`` the files of ``old`` that its command did not write (see the module docstring); returns
    (their relative paths, those the new run wrote a file of the same name over)."""
    try:
        written = set(json.loads((old / WRITTEN).read_text()))
    except (OSError, ValueError):
        written = None  # a run folder from before the record: its top-level files that are not run outputs
    theirs = [f for f in _files(old) if f not in (written or ()) and (
        written is not None or (len(Path(f).parts) == 1 and Path(f).suffix not in RUN_OUTPUTS))]
    kept = [f for f in theirs if not (new / f).exists()]
    for rel in kept:
        (new / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(old / rel, new / rel)
    return kept, [f for f in theirs if f not in kept]


def _swap_in(work: Path, final: Path) -> None:
    """``work`` becomes ``final``: recorded paths rewritten, the old run renamed aside, the new one renamed in,
    the old one removed. A failure before the new run is in place removes it and leaves the old one where it
    was (a full disk while rewriting, a rename the file system refuses)."""
    aside = final.parent / f".{final.name}.replaced-{os.getpid()}"
    try:
        _rewrite_paths(work, final)
        os.rename(final, aside)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        os.rename(work, final)
    except BaseException:
        os.rename(aside, final)
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _rewrite_paths(work: Path, final: Path) -> None:
    """Point the paths the run wrote into its text files (results.json's checkpoints, ...) at ``final``."""
    pairs = [(str(work.resolve()), str(final.resolve())), (str(work), str(final))]
    pairs += [(json.dumps(a)[1:-1], json.dumps(b)[1:-1]) for a, b in pairs]  # as JSON escapes them
    for path in work.rglob("*"):
        if path.suffix not in _TEXT_SUFFIXES or not path.is_file() or "cache" in path.relative_to(work).parts:
            continue
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        new = text
        for a, b in pairs:
            new = new.replace(a, b)
        if new != text:
            atomic_write_text(path, new)


def clean_leftovers(final: Path) -> list[Path]:
    """Folders beside ``final`` that a killed command left: ``.<name>.partial-<pid>`` of a dead process (removed)
    and ``.<name>.replaced-<pid>`` (removed if ``final`` is there, else renamed back to it). Returns them."""
    found = []
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.is_dir():
        return found
    for entry in parent.iterdir():
        m = _LEFTOVER.match(entry.name)
        if m is None or m["name"] != final.name or pid_alive(int(m["pid"])) and int(m["pid"]) != os.getpid():
            continue
        found.append(entry)
        if m["kind"] == "replaced" and not final.exists():
            os.rename(entry, final)
        else:
            shutil.rmtree(entry, ignore_errors=True)
    return found
