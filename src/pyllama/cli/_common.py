"""What every ``pyllama`` sub-command shares: the program name, exit statuses, the usage
error, the one-line argparse parser, and writing to stdout (answers) and stderr (the rest)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

PROG = "pyllama"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class UsageError(Exception):
    """A bad argument or input the user can fix: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``pyllama: error: ...``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        sys.stderr.write(f"{PROG}: error: {message}{hint}\n")
        sys.exit(EXIT_USAGE)


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _read_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{what} is a directory: {path}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not UTF-8 text: {path} ({exc.reason})") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _configure_stdout() -> None:
    """Generated text is UTF-8 when redirected; never die on an unencodable character."""
    stream = sys.stdout
    if not hasattr(stream, "reconfigure"):
        return
    try:
        enc = (stream.encoding or "").lower().replace("-", "")
        if not stream.isatty() and enc != "utf8" and not os.environ.get("PYTHONIOENCODING"):
            stream.reconfigure(encoding="utf-8", errors="replace")
        else:
            stream.reconfigure(errors="replace")
    except (ValueError, OSError):
        pass


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _enable_verbose() -> None:
    from pyllama.log import enable_logging

    enable_logging()
