"""``pyllama serve``: the OpenAI-compatible HTTP server (the ``[server]`` extra)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from pyllama._net import LOOPBACK_HOST, is_loopback
from pyllama.cli._args import (_finite_float, _int, _model_path_of, add_hf_arguments, add_model_arguments,
                               add_sampling_arguments, add_spec_arguments, sampling_overrides)
from pyllama.cli._common import UsageError, _enable_verbose, _read_file, _say

#: llama-server's spellings of on/off/auto (common/arg.cpp: is_truthy, is_falsey, is_autoy).
_TRUTHY = ("on", "enabled", "true", "1")
_FALSEY = ("off", "disabled", "false", "0")
_AUTO = ("auto", "-1")
#: pyllama.embeddings.POOLING_TYPES (not imported: that loads the extension before --help).
POOLING_TYPES = ("none", "mean", "cls", "last", "rank")


def _on_off_auto(text: str) -> str:
    value = text.strip().lower()
    if value in _TRUTHY:
        return "on"
    if value in _FALSEY:
        return "off"
    if value in _AUTO:
        return "auto"
    raise argparse.ArgumentTypeError(f"expected on, off or auto, got {text!r}")


def _fraction(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return value


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (needs the [server] extra)",
        description="Serve a model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, "
                    "/v1/embeddings, /v1/models) and llama-server's own routes (/completion, /embedding, /props, "
                    "/apply-template, /health, /metrics, /slots, /tokenize, /detokenize). -np slots generate in "
                    "parallel, batched in one llama_decode per step; -c is the total KV size, split evenly over "
                    "the slots (as llama-server does). llama-server's flags are accepted under their names. "
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
    _add_llama_server_model_arguments(g)
    add_hf_arguments(p)
    add_spec_arguments(p)
    add_sampling_arguments(p, max_tokens_flag=False,
                           title="sampling defaults (llama-server's flags: each request may override them)")
    _add_chat_arguments(p)
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default=LOOPBACK_HOST, metavar="HOST[,HOST...]",
                   help=f"address to listen on (default {LOOPBACK_HOST}); several, comma-separated, listen on "
                        "each (same --port, not 0), e.g. 127.0.0.1,::1")
    h.add_argument("--port", type=_int(0, " (0 = any free port)"), default=8080, help="TCP port (default 8080)")
    h.add_argument("-a", "--alias", metavar="NAME[,NAME...]",
                   help="the model id clients see (default: the model's file name); several, comma-separated, are "
                        "its aliases and the first in sorted order is the id (as llama-server)")
    h.add_argument("--tags", metavar="TAG[,TAG...]", help="informational tags of the model, listed by /v1/models")
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
    h.add_argument("--http", choices=("auto", "httptools", "h11"), default="auto",
                   help="uvicorn's HTTP implementation (default auto: httptools when installed, the faster; "
                        "it sends header names in lowercase, h11 as the server spells them)")
    _add_llama_server_http_arguments(h)
    p.set_defaults(func=cmd_serve)


def _add_llama_server_model_arguments(g: Any) -> None:
    """Loading and context flags under llama-server's names (docs/server.md, "Flags")."""
    g.add_argument("-ub", "--ubatch-size", dest="n_ubatch", type=_int(1), metavar="N",
                   help="physical batch size: tokens per llama_decode micro-batch (default: -b)")
    g.add_argument("-fa", "--flash-attn", dest="flash_attn", type=_on_off_auto, metavar="on|off|auto",
                   help="flash attention (default auto)")
    g.add_argument("-ctk", "--cache-type-k", dest="type_k", metavar="TYPE", help="KV cache type of K (default f16)")
    g.add_argument("-ctv", "--cache-type-v", dest="type_v", metavar="TYPE", help="KV cache type of V (default f16)")
    g.add_argument("-kvu", "--kv-unified", dest="kv_unified", action="store_true", default=False,
                   help="one KV buffer shared by all slots: a request may use any free cell of the -c total, "
                        "instead of its own c/np (default off)")
    g.add_argument("-no-kvu", "--no-kv-unified", dest="kv_unified", action="store_false",
                   help="each slot has its own c/np cells (the default)")
    g.add_argument("--swa-full", dest="swa_full", action="store_true", default=False,
                   help="full-size KV cache for sliding-window-attention layers (more memory; a cached prompt "
                        "stays reusable)")
    g.add_argument("--embedding", "--embeddings", dest="embedding_flag", action="store_true",
                   help="accepted: embeddings are always on (/v1/embeddings, /embedding)")
    g.add_argument("--rerank", "--reranking", dest="reranking", action="store_true",
                   help="a reranker: rank pooling (--pooling rank), for /rerank")
    g.add_argument("--pooling", choices=POOLING_TYPES,
                   help="pooling of embeddings (default: the model's); none gives one vector per token "
                        "(/embedding only)")
    g.add_argument("--lora", dest="lora_path", metavar="FILE", help="a LoRA adapter applied to the model")
    g.add_argument("--context-shift", dest="context_shift", action="store_true", default=False,
                   help="a slot about to overflow drops the older half of its tokens and the answer goes on "
                        "(llama-server's context shift; not for recurrent models, nor with images)")
    g.add_argument("--no-context-shift", dest="context_shift", action="store_false",
                   help="a full slot ends its answer, finish_reason length (the default)")
    # llama-server's tuning knobs that have no counterpart here (docs/server.md lists why)
    g.add_argument("-cb", "--cont-batching", dest="ignored_cont_batching", action="store_true",
                   help="accepted: batching is always continuous")
    g.add_argument("-nocb", "--no-cont-batching", dest="ignored_cont_batching", action="store_false",
                   help="accepted and ignored: batching is always continuous")
    g.add_argument("-cram", "--cache-ram", dest="cache_ram_mib", type=_int(-1), metavar="MIB", default=8192,
                   help="host-memory prompt cache: slots' prompts are kept in RAM once their KV cells go to "
                        "another prompt, and loaded back for a prompt that starts with them (llama-server's; "
                        "default 8192 MiB, -1: no size limit, 0: off)")
    g.add_argument("--cache-idle-slots", dest="cache_idle_slots", action="store_true", default=True,
                   help="when a request starts, copy idle slots into the prompt cache (and free their cells "
                        "with --kv-unified): the default, as llama-server")
    g.add_argument("--no-cache-idle-slots", dest="cache_idle_slots", action="store_false",
                   help="copy a slot into the prompt cache only when it is about to lose its prompt")
    g.add_argument("-sps", "--slot-prompt-similarity", dest="slot_prompt_similarity", type=_fraction,
                   metavar="SIMILARITY", default=0.1,
                   help="a request takes the idle slot whose cached prompt it shares most only if that is more than "
                        "this share of its prompt; otherwise the least recently used slot (default 0.1, as "
                        "llama-server; 0: always the least recently used)")
    g.add_argument("-bs", "--backend-sampling", "--backend_sampling", dest="ignored_backend_sampling",
                   action="store_true", help="accepted and ignored: sampling runs on the CPU (the same tokens)")


def _add_chat_arguments(p: Any) -> None:
    g = p.add_argument_group("chat (llama-server's flags)")
    g.add_argument("--jinja", dest="jinja", action="store_true", default=True,
                   help="accepted: chat templates are always rendered with Jinja (in a sandbox)")
    g.add_argument("--no-jinja", dest="jinja", action="store_false",
                   help="accepted: the model's template is still rendered with Jinja, which gives the prompt "
                        "llama-server's built-in formats give")
    g.add_argument("--reasoning-format", dest="reasoning_format", choices=("none", "auto", "deepseek",
                                                                          "deepseek-legacy"),
                   help="where a thinking model's thoughts go: auto/deepseek: reasoning_content; none: left in "
                        "the content; deepseek-legacy: both (default auto)")
    g.add_argument("--reasoning-budget", dest="reasoning_budget", type=_int(-1), metavar="N",
                   help="thinking tokens at most: -1 unlimited (default), 0 no thinking")
    g.add_argument("-rea", "--reasoning", dest="reasoning", type=_on_off_auto, metavar="on|off|auto",
                   help="thinking on or off for templates that can switch it (enable_thinking); default auto")
    g.add_argument("--chat-template-kwargs", dest="chat_template_kwargs", type=_json_object, metavar="JSON",
                   help="extra chat template variables, a JSON object, e.g. '{\"enable_thinking\": false}'")
    g.add_argument("--no-prefill-assistant", dest="prefill_assistant", action="store_false", default=True,
                   help="a chat's final assistant message is answered after, not continued (llama-server's "
                        "default continues it)")


def _add_llama_server_http_arguments(h: Any) -> None:
    """Endpoint flags under llama-server's names."""
    h.add_argument("--slots", dest="slots_endpoint", action="store_true", default=True,
                   help="GET /slots answers (the default)")
    h.add_argument("--no-slots", dest="slots_endpoint", action="store_false",
                   help="GET /slots answers 501")
    h.add_argument("--metrics", dest="metrics_endpoint", action="store_true", default=True,
                   help="GET /metrics answers, in Prometheus text (the default here; llama-server needs the flag)")
    h.add_argument("--no-metrics", dest="metrics_endpoint", action="store_false",
                   help="GET /metrics answers 501 (llama-server's default)")
    h.add_argument("--props", dest="props_endpoint", action="store_true", default=False,
                   help="allow POST /props (it changes nothing yet, as in llama-server)")
    h.add_argument("--slot-save-path", dest="slot_save_path", metavar="DIR",
                   help="enable POST /slots/{id}?action=save|restore|erase; slot files live in DIR")
    h.add_argument("--cors-origins", dest="cors_origins", metavar="ORIGINS",
                   help="allowed browser origins, comma-separated (as --cors-origin)")
    h.add_argument("--no-ui", "--no-webui", dest="ignored_no_ui", action="store_true",
                   help="accepted: there is no web UI")


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


def _log_prompt_cache(llm: Any) -> None:
    """llama-server's start-up lines about its prompt cache (--verbose shows them)."""
    info = llm.prompt_cache_info()
    log = logging.getLogger("pyllama")
    if info is None:
        log.info("prompt cache is disabled - use `--cache-ram N` to enable it")
        return
    limit = f"{info['limit_bytes'] // 1048576} MiB" if info["limit_bytes"] else "no limit"
    log.info("prompt cache is enabled, size limit: %s", limit)
    if info["idle_slots"]:
        # (the tag is llama-server's own debug line for this setting: its tests and log readers look for it)
        log.info("idle slots will be saved to prompt cache%s upon starting a new task __TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__",
                 " and cleared" if llm.context.kv_unified else "")


def serve_llm_kwargs(args: argparse.Namespace, path: str) -> dict:
    """LLM(...) arguments of `pyllama serve`: -c is the total KV, split over -np slots
    (kv_unified=False gives each slot its own n_ctx/np cells, as llama-server does)."""
    kw: dict = {"n_parallel": args.n_parallel, "kv_unified": bool(getattr(args, "kv_unified", False)),
                "embedding": True, "verbose": bool(args.verbose)}
    for name in ("n_batch", "n_ubatch", "n_threads", "n_gpu_layers", "main_gpu", "tensor_split", "split_mode",
                 "use_mmap", "use_mlock", "mmproj_path", "spec_type",
                 "draft_max", "draft_min", "spec_ngram_size_n", "draft_model", "draft_p_min", "spec_cost_model",
                 "spec_synth_rates", "spec_synth_len", "require_gpu", "flash_attn", "type_k", "type_v", "lora_path", "pooling", "context_shift",
                 "cache_ram_mib", "cache_idle_slots", "slot_prompt_similarity"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    if getattr(args, "reranking", False):
        if kw.get("pooling", "rank") != "rank":
            raise UsageError(f"--reranking needs rank pooling, not --pooling {kw['pooling']}")
        kw["pooling"] = "rank"
    if getattr(args, "swa_full", False):
        kw["swa_full"] = True
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


def _csv(value: Any) -> list:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _cors_origins(args: argparse.Namespace) -> list:
    """--cors-origin (repeatable) and llama-server's --cors-origins (comma-separated)."""
    return list(args.cors_origin or ()) + _csv(getattr(args, "cors_origins", None))


def _hosts(args: argparse.Namespace) -> list:
    """--host: one address or several, comma-separated (llama-server's syntax)."""
    from pyllama.server.main import parse_hosts

    try:
        hosts = parse_hosts(args.host)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if len(hosts) > 1 and args.port == 0:
        raise UsageError("--port 0 is not supported with several --host addresses (as in llama-server)")
    return hosts


def llama_server_settings(args: argparse.Namespace) -> dict:
    """The ServerSettings of llama-server's flags: sampling defaults (--temp, --seed ...), the
    chat's reasoning and template variables, and the endpoints' switches."""
    out: dict = {"sampling_defaults": sampling_overrides(args),
                 "slots_endpoint": args.slots_endpoint, "props_endpoint": args.props_endpoint,
                 "metrics_endpoint": args.metrics_endpoint,
                 "prefill_assistant": args.prefill_assistant, "verbose_responses": bool(args.verbose),
                 "model_tags": _csv(args.tags)}
    aliases = sorted(set(_csv(args.alias)))     # llama-server keeps them in a std::set
    out["model_alias"] = aliases[0] if aliases else None
    out["model_aliases"] = aliases
    if args.slot_save_path is not None:
        if not os.path.isdir(args.slot_save_path):
            raise UsageError(f"--slot-save-path: not a directory: {args.slot_save_path}")
        out["slot_save_path"] = os.path.abspath(args.slot_save_path)
    if args.reasoning_format is not None:
        out["reasoning_format"] = args.reasoning_format
    if args.reasoning_budget is not None:
        out["reasoning_budget"] = args.reasoning_budget
    variables = dict(args.chat_template_kwargs or {})
    if args.reasoning in ("on", "off"):     # as llama-server: the template's enable_thinking
        variables["enable_thinking"] = args.reasoning == "on"
    if variables:
        from pyllama.chat.reasoning import check_reasoning_args

        try:
            out["chat_template_kwargs"] = check_reasoning_args("auto", -1, variables)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--chat-template-kwargs: {exc}") from None
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from pyllama.server.main import serve
    except ImportError as exc:
        raise UsageError(f"pyllama serve needs the server extra: pip install 'pyllama[server]' ({exc})") from None
    if args.chat_template and args.chat_template_file:
        raise UsageError("give --chat-template or --chat-template-file, not both")
    keys = _api_keys(args)
    hosts = _hosts(args)
    exposed = [h for h in hosts if not is_loopback(h)]
    if exposed and not keys:
        _say(f"WARNING: listening on {', '.join(exposed)} without --api-key: anyone who can reach port {args.port} "
             "can use this server")
    settings: dict = {"api_keys": keys, "cors_origins": _cors_origins(args), "max_queue": args.max_queue,
                      "default_max_tokens": args.default_max_tokens}
    settings.update(llama_server_settings(args))      # (a bad flag fails before any download)
    path = _model_path_of(args)
    llm_kwargs = serve_llm_kwargs(args, path)
    if args.verbose:
        _enable_verbose()

    def load() -> Any:
        from pyllama import LLM

        llm = LLM(path, **llm_kwargs)
        _log_prompt_cache(llm)
        _say(f"model loaded: {os.path.basename(path)}, {args.n_parallel} slots of "
             f"{llm_kwargs['n_ctx'] // args.n_parallel} tokens"
             + (f", projector {os.path.basename(args.mmproj_path)}" if args.mmproj_path else ""))
        return llm

    # --no-cache-prompt is the LLM's default (serve_llm_kwargs), --verbose uvicorn's log level
    # and llama.cpp's log: neither is a setting of the app.
    if args.max_body_bytes is not None:
        settings["max_body_bytes"] = args.max_body_bytes
    if args.max_header_bytes is not None:
        settings["max_header_bytes"] = args.max_header_bytes
    return serve(load, host=hosts, port=args.port, shutdown_timeout_s=args.shutdown_timeout_s, http=args.http,
                 log_level="info" if args.verbose else "warning",
                 on_listening=lambda url: _say(f"listening on {url} (loading the model; /health is 503 until "
                                               "it is ready)"), **settings)
