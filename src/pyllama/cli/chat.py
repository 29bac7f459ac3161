"""``pyllama chat``: an interactive (or piped) conversation on stdin/stdout."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Iterator, Optional

from pyllama.cli._args import (_open_llm, add_model_arguments, add_sampling_arguments, resolve_model_arg,
                               sampling_overrides)
from pyllama.cli._common import EXIT_OK, _say, _write


def add_chat_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="interactive chat (reads messages from stdin)",
                       description="Chat with a model. Each line read from stdin is one message; the answer is "
                                   "streamed to stdout. Commands: /exit (or EOF) quits, /reset clears the "
                                   "history, a line '\"\"\"' starts and ends a multi-line message.")
    p.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_chat)


_CHAT_HELP = ('commands: /exit quit (also /quit, /bye, Ctrl-D), /reset clear the history, '
              '""" begin/end a multi-line message, /help this text')


def _chat_lines(interactive: bool) -> Iterator[str]:
    """User messages, one per item; multi-line messages between two '\"\"\"' lines."""
    use_input = interactive and sys.stdout.isatty()
    if use_input:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

    def read(prompt: str) -> Optional[str]:
        if use_input:
            try:
                return input(prompt)
            except EOFError:
                return None
        if interactive:
            sys.stderr.write(prompt)
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return None
        return line.rstrip("\r\n")

    while True:
        line = read(">>> ")
        if line is None:
            if interactive:
                sys.stderr.write("\n")
            return
        if line.strip() == '"""':
            buf = []
            while True:
                more = read("... ")
                if more is None or more.strip() == '"""':
                    break
                buf.append(more)
            line = "\n".join(buf)
            if not line.strip():
                continue
            yield line
            continue
        if line.strip():
            yield line


def cmd_chat(args: argparse.Namespace) -> int:
    overrides = sampling_overrides(args)
    path = resolve_model_arg(args.model)
    interactive = sys.stdin.isatty()
    from pyllama.errors import ContextLengthError

    with _open_llm(args, path) as llm:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        history: list = []
        if interactive:
            _say(f"chatting with {os.path.basename(path)}; {_CHAT_HELP}")
        for line in _chat_lines(interactive):
            cmd = line.strip()
            if cmd.startswith("/") and " " not in cmd:
                if cmd in ("/exit", "/quit", "/bye"):
                    break
                if cmd in ("/reset", "/clear"):
                    history.clear()
                    llm.reset()
                    if interactive:
                        _say("history cleared")
                    continue
                if cmd in ("/help", "/?"):
                    _say(_CHAT_HELP)
                    continue
                if interactive:
                    _say(f"unknown command {cmd}; {_CHAT_HELP}")
                    continue
                # piped input: a line that merely starts with "/" is a message
            history.append({"role": "user", "content": line})
            while True:
                try:
                    pieces = llm.chat(system + history, stream=True, **overrides)
                    break
                except ContextLengthError:
                    # Forget the oldest exchange(s) until the conversation fits again.
                    if len(history) <= 1:
                        raise
                    del history[:2 if len(history) > 2 else 1]
                    _say("the conversation no longer fits in the context; dropped the oldest exchange")
            parts: list = []
            try:
                for piece in pieces:
                    parts.append(piece)
                    _write(piece)
            except KeyboardInterrupt:
                if not interactive:
                    raise
                _write("\n")
                _say("answer interrupted")
                if parts:
                    history.append({"role": "assistant", "content": "".join(parts)})
                continue
            answer = "".join(parts)
            _write("\n")
            history.append({"role": "assistant", "content": answer})
            completion = getattr(pieces, "completion", None)
            if completion is not None and completion.finish_reason == "length" and interactive:
                _say("(answer cut: -n/--max-tokens or the context limit reached)")
    return EXIT_OK
