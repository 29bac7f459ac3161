"""``pyllama serve``: the OpenAI-compatible HTTP server (the ``[server]`` extra)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pyllama._net import LOOPBACK_HOST, is_loopback
from pyllama.cli._args import (_finite_float, _int, _model_path_of, add_hf_arguments, add_model_arguments,
                               add_spec_arguments)
from pyllama.cli._common import UsageError, _enable_verbose, _read_file, _say


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
    h.add_argument("--host", default=LOOPBACK_HOST, help=f"address to listen on (default {LOOPBACK_HOST})")
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
    for name in ("n_batch", "n_threads", "n_gpu_layers", "main_gpu", "tensor_split", "split_mode",
                 "use_mmap", "use_mlock", "mmproj_path", "spec_type",
                 "draft_max", "draft_min", "spec_ngram_size_n", "draft_model", "draft_p_min", "spec_cost_model",
                 "require_gpu"):
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
        from pyllama.server.main import serve
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
                      "model_alias": args.alias, "default_max_tokens": args.default_max_tokens}
    # --no-cache-prompt is the LLM's default (serve_llm_kwargs), --verbose uvicorn's log level
    # and llama.cpp's log: neither is a setting of the app.
    if args.max_body_bytes is not None:
        settings["max_body_bytes"] = args.max_body_bytes
    if args.max_header_bytes is not None:
        settings["max_header_bytes"] = args.max_header_bytes
    return serve(load, host=args.host, port=args.port, shutdown_timeout_s=args.shutdown_timeout_s,
                 log_level="info" if args.verbose else "warning",
                 on_listening=lambda url: _say(f"listening on {url} (loading the model; /health is 503 until "
                                               "it is ready)"), **settings)
