"""fusionnet: fuse pretrained image backbones into one classifier, and compare it with output ensembles.

Every run writes into its own folder (``--out``) and never over an earlier run unless ``--overwrite``.
Exit codes: 0 success; 2 bad usage or bad input (one line naming the value and the fix, no traceback); 1 an
unexpected failure (one line, and the path of a file holding the full traceback; ``--debug`` prints it instead).
"""

# (This module's docstring is the command's --help. For maintainers: the entry point builds the parser from the
# registered commands (fusionnet.cli.args), runs the command's handler (fusionnet.cli.handlers) and turns what
# fails into an exit code and one line.)
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
import warnings
from typing import Sequence

from fusionnet.cli.args import COMMANDS


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr (what is wrong, and where the help is) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fusionnet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print full tracebacks of unexpected failures")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help, **command.options))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `fusionnet` alone: the list of commands
        parser.print_help()
        return 0
    return _run(args)


# commands that compute for long: they use as many torch threads as cores are idle when they start
COMPUTES = ("demo", "train", "compare", "fuse", "distill", "auto", "predict", "gap")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as the commands print their own: one line on stderr, no source line."""
    print(f"WARNING: {message}", file=file or sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from fusionnet.errors import CheckFailedError, FusionNetError
    from fusionnet.utils.staging import Terminated

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning  # a person reads "WARNING: ...", not a source line
            if args.command in COMPUTES:
                from fusionnet.utils.threads import threads_for_idle_cores

                threads_for_idle_cores(log=lambda m: print(m, file=sys.stderr))
            _dispatch(args)
        sys.stdout.flush()  # a full or closed stdout fails here, inside the handler
    except KeyboardInterrupt:
        print(f"fusionnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"fusionnet {args.command}: terminated (SIGTERM); what --out held before is as it was",
              file=sys.stderr)
        return 143
    except CheckFailedError as exc:
        print(f"fusionnet {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (FusionNetError, FileNotFoundError) as exc:
        print(f"fusionnet {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or an environment failure (out of memory, a full disk): keep the traceback
        _silence_stdout()
        if args.debug:
            traceback.print_exc()
            return 1
        fd, log = tempfile.mkstemp(prefix="fusionnet-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            traceback.print_exc(file=f)
        print(f"fusionnet {args.command}: unexpected {type(exc).__name__}: {_one_line(exc)} (full traceback in "
              f"{log!r}; --debug prints it)", file=sys.stderr)
        return 1
    return 0


def _one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return " / ".join(lines[:4]) if lines else type(exc).__name__


def _silence_stdout() -> None:
    """After stdout failed (e.g. > /dev/full), point it at devnull so the interpreter's exit flush stays quiet."""
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - the failure was already reported
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _dispatch(args: argparse.Namespace) -> None:
    """Import the command's handler (only now: heavy modules load for the command that needs them) and run it."""
    handler(args.command)(args)


def handler(command: str):
    """The function that runs ``command`` (a ``"module:function"`` handler's module imported now)."""
    found = COMMANDS.get(command).handler
    if callable(found):
        return found
    module, function = found.split(":")
    return getattr(importlib.import_module(module), function)


if __name__ == "__main__":
    sys.exit(main())
