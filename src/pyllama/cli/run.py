"""``pyllama run``: one prompt, the answer streamed to stdout."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Iterable

from pyllama.cli._args import (_model_path_of, _open_llm, add_hf_arguments, add_model_arguments,
                               add_sampling_arguments, add_spec_arguments, sampling_overrides)
from pyllama.cli._common import EXIT_OK, UsageError, _write


def _emit_stream(pieces: Iterable[str]) -> str:
    """Print pieces as they come; return the whole text.  Ends the output with a newline."""
    parts = []
    for piece in pieces:
        parts.append(piece)
        _write(piece)
    text = "".join(parts)
    if text and not text.endswith("\n"):
        _write("\n")
    return text


def _has_chat_template(llm: Any) -> bool:
    if getattr(llm, "_chat_template", None):
        return True
    try:
        return llm.model.chat_template() is not None
    except Exception:  # noqa: BLE001
        return False


def add_run_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="generate an answer to one prompt (streamed to stdout)",
                       description="Generate an answer to PROMPT and stream it to stdout. If the model has a "
                                   "chat template, the prompt is sent as one user message; --raw sends it as "
                                   "plain text to complete.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    p.add_argument("--raw", action="store_true", help="complete the prompt as plain text (no chat template)")
    p.add_argument("--system", metavar="TEXT", help="a system message (chat mode only)")
    p.add_argument("--image", "--audio", dest="media", action="append", default=None, metavar="FILE",
                   help="an image (PNG, JPEG, GIF, BMP) or, for audio projectors, a WAV/MP3/FLAC clip to put "
                        "before the prompt (needs --mmproj; repeat for several)")
    add_model_arguments(p)
    add_hf_arguments(p)
    add_spec_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
        if prompt.endswith("\n"):
            prompt = prompt[:-1]
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    if args.raw and args.system is not None:
        raise UsageError("--system needs chat mode; drop --raw")
    media = args.media or []
    if media and not args.mmproj_path and not (args.hf_repo and args.hf_mmproj):
        raise UsageError("--image/--audio need the model's projector: --mmproj FILE")
    if media and args.raw:
        raise UsageError("--image/--audio need chat mode; drop --raw")
    for f in media:
        if not os.path.isfile(f):
            raise UsageError(f"no such file: {f}")
    overrides = sampling_overrides(args)
    path = _model_path_of(args)
    if media and not args.mmproj_path:
        raise UsageError(f"--image/--audio need the model's projector: {args.hf_repo} has no mmproj file "
                         "(give --mmproj FILE)")
    with _open_llm(args, path) as llm:
        if media and not _has_chat_template(llm):
            raise UsageError("--image needs a model with a chat template (or --chat-template NAME)")
        if not args.raw and _has_chat_template(llm):
            messages = []
            if args.system is not None:
                messages.append({"role": "system", "content": args.system})
            content = prompt
            if media:
                content = [{"type": "image", "image": os.path.abspath(f)} for f in media]
                content.append({"type": "text", "text": prompt})
            messages.append({"role": "user", "content": content})
            pieces = llm.chat(messages, stream=True, **overrides)
        else:
            if args.system is not None:
                raise UsageError("--system needs a model with a chat template (or --chat-template NAME)")
            pieces = llm.stream(prompt, **overrides)
        _emit_stream(pieces)
    return EXIT_OK
