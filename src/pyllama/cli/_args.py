"""The argument groups several commands share (model loading, generation, speculation,
``-hf``) and their translation into ``LLM`` keyword arguments and a model file to load."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Callable, Optional

from pyllama.cli._common import UsageError, _read_file


# --------------------------------------------------------------------------- the argument groups


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
                   help="layers to offload to the GPU (-1 = all); on a build or machine without a GPU "
                        "this warns and runs on the CPU")
    g.add_argument("-mg", "--main-gpu", dest="main_gpu", type=_int(0), metavar="INDEX",
                   help="the GPU for the whole model (--split-mode none) or for intermediate results "
                        "(row); counted from 0 over the devices layers can go to")
    g.add_argument("-ts", "--tensor-split", dest="tensor_split", type=_tensor_split, metavar="N0,N1,...",
                   help="how much of the model each GPU takes, as proportions (e.g. 3,1)")
    g.add_argument("-sm", "--split-mode", dest="split_mode", choices=("none", "layer", "row"),
                   help="how to split the model over several GPUs (default layer)")
    g.add_argument("--require-gpu", dest="require_gpu", action="store_const", const=True, default=None,
                   help="fail (exit 1 with the reason) instead of running on the CPU when -ngl asks for a GPU "
                        "that this build or machine does not have")
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


def add_sampling_arguments(p: argparse.ArgumentParser, *, max_tokens_flag: bool = True,
                           title: str = "generation") -> None:
    """Generation options (mapped onto SamplingParams / LLM call overrides).  `serve` leaves
    out -n (its -n/--n-predict is the server's default and cap) and calls them defaults."""
    g = p.add_argument_group(title)
    if max_tokens_flag:
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
    g.add_argument("-s", "--seed", type=_int(-1), metavar="N", help="random seed (-1 = random; default random)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when this text is generated (not printed); repeatable")
    g.add_argument("--ignore-eos", action="store_true", default=None,
                   help="keep generating past end-of-generation tokens (until -n or the context is full)")
    cg = g.add_mutually_exclusive_group()
    cg.add_argument("--grammar", metavar="GBNF", help="constrain the output with this GBNF grammar (text)")
    cg.add_argument("--grammar-file", metavar="FILE", help="constrain the output with the GBNF grammar in FILE")
    cg.add_argument("--json-schema", metavar="SCHEMA",
                    help="constrain the output to JSON matching this schema: a file, or inline JSON")


def _spec_type(text: str) -> str:
    """--spec-type: pyllama's names, and llama-server's draft-simple for draft."""
    return "draft" if text == "draft-simple" else text


def _rates(text: str) -> list:
    """--spec-synth-rates P0,P1,...: numbers (their range is checked with --draft-max's value)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def add_spec_arguments(p: Any) -> None:
    """Speculative decoding, under llama-server's flag names (run and serve)."""
    g = p.add_argument_group("speculative decoding (drafted tokens verified in the same decode)")
    g.add_argument("--spec-type", dest="spec_type", type=_spec_type, choices=("none", "ngram-simple", "draft"),
                   default=None,
                   help="ngram-simple: draft the continuation of the last n-gram's earlier occurrence in the "
                        "prompt and answer (no second model; pays when the answer copies from its input); "
                        "draft (llama-server's draft-simple): a draft model (-md, which alone turns it on); "
                        "default none")
    g.add_argument("--spec-draft-n-max", "--draft-max", "--draft", dest="draft_max", type=_int(1), metavar="N",
                   help="at most N drafted tokens per step (default 16)")
    g.add_argument("--spec-draft-n-min", "--draft-min", dest="draft_min", type=_int(0), metavar="N",
                   help="do not verify drafts shorter than N tokens (default 0)")
    g.add_argument("--spec-ngram-simple-size-n", dest="spec_ngram_size_n", type=_int(1), metavar="N",
                   help="length of the n-gram looked up for ngram-simple (default 3)")
    g.add_argument("-md", "--model-draft", dest="draft_model", metavar="FILE",
                   help="a draft model: a smaller GGUF with the same vocabulary (checked at load)")
    g.add_argument("--spec-draft-p-min", "--draft-p-min", dest="draft_p_min", type=float, metavar="P",
                   help="stop a draft at a token the draft model gives less than probability P (default 0: never, as llama-server)")
    g.add_argument("--no-spec-cost-model", dest="spec_cost_model", action="store_const", const=False, default=None,
                   help="draft up to --draft-max tokens every step, as llama.cpp does, instead of the length that "
                        "pays on this machine (sized from the measured decode cost and each request's acceptance)")
    g.add_argument("--spec-synth-rates", dest="spec_synth_rates", type=_rates, metavar="P0,P1,...",
                   help="benchmarking only (the text is not valid): keep drafted token i with probability Pi "
                        "whatever the model says, one value per --draft-max position, non-increasing")
    g.add_argument("--spec-synth-len", dest="spec_synth_len", type=float, metavar="L",
                   help="benchmarking only: synthetic acceptance with this mean accepted length (the target's "
                        "token included), instead of --spec-synth-rates")


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


# --------------------------------------------------------------------------- from arguments to LLM(...)


_SAMPLING_DESTS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                   "last_n_tokens_size", *(dest for _, dest, _, _ in _FLOAT_SAMPLER_FLAGS), "dry_allowed_length",
                   "dry_penalty_last_n", "dry_sequence_breakers", "mirostat_mode", "seed", "stop", "ignore_eos",
                   "grammar")


_LOAD_DESTS = ("n_ctx", "n_batch", "n_threads", "n_gpu_layers", "main_gpu", "tensor_split", "split_mode",
               "chat_template", "use_mmap", "use_mlock",
               "mmproj_path", "spec_type", "draft_max", "draft_min", "spec_ngram_size_n", "draft_model", "draft_p_min",
               "spec_cost_model", "spec_synth_rates", "spec_synth_len", "require_gpu")


def _tensor_split(value: str) -> list:
    """-ts 3,1 (llama.cpp also accepts 3/1): non-negative proportions, one per GPU."""
    parts = [p for p in value.replace("/", ",").split(",") if p.strip()]
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {value!r}") from None
    if not shares or any(not (x >= 0) or x == float("inf") for x in shares):
        raise argparse.ArgumentTypeError(f"proportions must be finite numbers >= 0, got {value!r}")
    return shares


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


def _open_llm(args: argparse.Namespace, path: str) -> Any:
    from pyllama import LLM

    return LLM(path, **load_kwargs(args))


def resolve_model_arg(model: Optional[str]) -> str:
    """-m value (or the default model) -> an existing file, fetching a known model if needed
    (pyllama.models.resolve_model decides; a progress bar on a terminal)."""
    from pyllama import models

    try:
        return os.fspath(models.resolve_model(model or models.DEFAULT_MODEL, progress=True))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def resolve_hf_arg(args: argparse.Namespace) -> Any:
    """-hf/--hf-file -> a downloaded (or cached) pyllama.hub.HubModel, with the
    repository's projector unless --no-mmproj or --mmproj FILE was given."""
    from pyllama import hub

    if getattr(args, "model", None) and args.hf_repo:
        raise UsageError("give -m MODEL or -hf REPO, not both")
    if args.hf_file and not args.hf_repo:
        raise UsageError("--hf-file needs -hf REPO")
    want_mmproj = args.hf_mmproj and not getattr(args, "mmproj_path", None)
    return hub.pull_from_hub(args.hf_repo, hf_file=args.hf_file, mmproj=want_mmproj,
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
