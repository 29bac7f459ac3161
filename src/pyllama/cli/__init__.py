"""The ``pyllama`` command: the parser of every sub-command and :func:`main`.

    pyllama run [-m MODEL | -hf USER/MODEL[:QUANT]] "prompt"   stream an answer to stdout
    pyllama chat [-m MODEL] [--system T]   interactive chat (stdin may be piped)
    pyllama info [MODEL]                   what a model is / how pyllama was built
    pyllama pull [NAME...] [--list] [-hf USER/MODEL[:QUANT]]
                                           download known models (or a Hugging Face GGUF) into the cache
    pyllama serve [-m MODEL | -hf USER/MODEL[:QUANT]] [-np N]
                                           an OpenAI-compatible HTTP server (the [server] extra)
    pyllama rpc-server [--host H] [--port P]
                                           share this machine's devices over ggml RPC

stdout carries only generated text; progress, logs and errors go to stderr.
Exit status: 0 ok, 1 runtime failure, 2 usage or input error, 130 Ctrl-C.

Each subcommand is one module here (``run``, ``chat``, ``info``, ``pull``, ``serve``,
``rpc_server``) with an ``add_<name>_parser(subparsers)`` function that registers its
arguments and sets ``func`` to a ``cmd_<name>(args) -> int`` handler; to add a subcommand,
write such a module and list its ``add_<name>_parser`` in ``SUBCOMMANDS``.  Shared argument
groups live in :mod:`pyllama.cli._args` (:func:`add_model_arguments`, loading / context;
:func:`add_sampling_arguments`, generation; speculation; ``-hf``), the exit statuses,
:class:`UsageError` and the stdout/stderr helpers in :mod:`pyllama.cli._common`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from typing import Optional, Sequence

# The helpers are re-exported: code and tests imported them from pyllama.cli when it was one module.
from pyllama.cli._args import (_model_path_of, add_hf_arguments, add_model_arguments,  # noqa: F401
                               add_sampling_arguments, add_spec_arguments, load_kwargs, resolve_hf_arg,
                               resolve_model_arg, sampling_overrides)
from pyllama.cli._common import (EXIT_BROKEN_PIPE, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK,  # noqa: F401
                                 EXIT_USAGE, PROG, UsageError, _configure_stdout, _Parser)
from pyllama.cli.chat import add_chat_parser, cmd_chat  # noqa: F401
from pyllama.cli.info import add_info_parser, cmd_info  # noqa: F401
from pyllama.cli.pull import add_pull_parser, cmd_pull  # noqa: F401
from pyllama.cli.rpc_server import add_rpc_server_parser, cmd_rpc_server  # noqa: F401
from pyllama.cli.run import add_run_parser, cmd_run  # noqa: F401
from pyllama.cli.serve import add_serve_parser, cmd_serve, serve_llm_kwargs  # noqa: F401

#: The subcommands, in help order.
SUBCOMMANDS: list = [add_run_parser, add_chat_parser, add_info_parser, add_pull_parser, add_serve_parser,
                     add_rpc_server_parser]


def build_parser() -> argparse.ArgumentParser:
    import pyllama

    parser = _Parser(prog=PROG, description="Run GGUF models with llama.cpp from the command line.",
                     epilog="Run 'pyllama COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {pyllama.__version__} (llama.cpp {pyllama.__llama_cpp_commit__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _exit_code_for(exc: BaseException) -> int:
    from pyllama.errors import ModelLoadError

    if isinstance(exc, (UsageError, ValueError, TypeError, ModelLoadError, FileNotFoundError,
                        IsADirectoryError, NotADirectoryError, PermissionError)):
        return EXIT_USAGE
    return EXIT_FAILURE


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename and exc.strerror and not isinstance(exc, UsageError):
        text = f"{exc.strerror}: {exc.filename}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    msg = lines[0] if lines else type(exc).__name__
    if len(lines) > 1:
        msg += " [...] (more with --verbose)"
    return msg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pyllama`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except (ValueError, TypeError):  # not the main thread
        pass
    try:
        _configure_stdout()
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        verbose = bool(getattr(args, "verbose", False))
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        except (ValueError, TypeError):
            pass
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
        sys.stderr.write("\n")
        sys.stderr.flush()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`pyllama run ... | head`): stop quietly.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001
        if verbose:
            traceback.print_exc()
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
        sys.stderr.write(f"{PROG}: error: {_one_line(exc)}\n")
        sys.stderr.flush()
        return _exit_code_for(exc)

