"""The LLM class: a GGUF model ready to generate, with the names users already type.

    from pyllama import LLM
    llm = LLM(model_path="model.gguf", n_ctx=2048, temperature=0)
    print(llm("The capital of France is", max_tokens=16))

Everything heavy happens in pyllama._core (the generation loop is Cython); this
module validates parameters, renders chat prompts, builds samplers and reports
timings.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from pyllama import _core
from pyllama.errors import ContextLengthError, ModelLoadError
from pyllama.sampling import FIELD_NAMES as SAMPLING_FIELDS
from pyllama.sampling import SamplingParams, _unknown_message, build_chain

logger = logging.getLogger("pyllama")

# LLM(...) arguments that configure loading / the context, as opposed to generation.
_DEFAULT_N_CTX_CAP = 4096
_MAX_AUTO_SLOTS = 16


def _check_kwargs(func: Callable) -> Callable:
    """Unknown keyword arguments raise TypeError naming the closest valid names
    (never silently dropped)."""
    sig = inspect.signature(func)
    valid = frozenset(p.name for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) - {"self"}
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    extra_valid = SAMPLING_FIELDS if has_var_kw else frozenset()

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        unknown = set(kwargs) - valid - extra_valid
        if unknown:
            raise TypeError(f"{func.__qualname__}(): " + _unknown_message(unknown, valid | extra_valid, "argument"))
        return func(*args, **kwargs)

    return wrapper


@dataclass
class Timings:
    """llama.cpp-style timings of one call (milliseconds)."""

    load_ms: float = 0.0
    prompt_n: int = 0          # prompt tokens evaluated (cached ones excluded)
    prompt_ms: float = 0.0
    cached_n: int = 0          # prompt tokens reused from the KV cache
    predicted_n: int = 0
    predicted_ms: float = 0.0
    sample_n: int = 0
    sample_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def prompt_per_second(self) -> float:
        return 1000.0 * self.prompt_n / self.prompt_ms if self.prompt_ms > 0 else 0.0

    @property
    def predicted_per_second(self) -> float:
        return 1000.0 * self.predicted_n / self.predicted_ms if self.predicted_ms > 0 else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["prompt_per_second"] = self.prompt_per_second
        d["predicted_per_second"] = self.predicted_per_second
        return d

    def __getitem__(self, key: str) -> Any:  # timings["predicted_ms"] works too
        return self.as_dict()[key]

    def format(self) -> str:
        """The lines llama.cpp prints after a run."""

        def rate(ms: float, n: int, unit: str) -> str:
            if n <= 0 or ms <= 0:
                return f"{ms:10.2f} ms / {n:5d} {unit}"
            return (f"{ms:10.2f} ms / {n:5d} {unit} ({ms / n:8.2f} ms per token, "
                    f"{1000.0 * n / ms:8.2f} tokens per second)")

        return "\n".join([
            f"llama_perf_context_print:        load time = {self.load_ms:10.2f} ms",
            f"llama_perf_sampler_print:    sampling time = {rate(self.sample_ms, self.sample_n, 'runs  ')}",
            f"llama_perf_context_print: prompt eval time = {rate(self.prompt_ms, self.prompt_n, 'tokens')}",
            f"llama_perf_context_print:        eval time = {rate(self.predicted_ms, self.predicted_n, 'runs  ')}",
            f"llama_perf_context_print:       total time = {self.total_ms:10.2f} ms / "
            f"{self.prompt_n + self.predicted_n:5d} tokens",
        ])


@dataclass
class Completion:
    """The result of one generation."""

    text: str
    tokens: list
    finish_reason: str            # "stop" | "length" | "eog"
    prompt_tokens: int
    timings: Timings = field(default_factory=Timings)

    @property
    def usage(self) -> dict:
        n = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def __str__(self) -> str:
        return self.text


class LLM:
    """A GGUF model, loaded and ready to generate.

    Load/context parameters are fixed at construction; every generation
    parameter (temperature, top_p, max_tokens, stop, grammar, json_schema, seed ...)
    can be given here as a default and overridden per call.
    """

    @_check_kwargs
    def __init__(
        self,
        model_path: Union[str, os.PathLike, None] = None,
        *,
        n_ctx: Optional[int] = None,
        n_batch: int = 512,
        n_ubatch: Optional[int] = None,
        n_threads: Optional[int] = None,
        n_threads_batch: Optional[int] = None,
        n_parallel: int = 1,
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        tensor_split: Optional[Sequence[float]] = None,
        split_mode: str = "layer",
        use_mmap: bool = True,
        use_mlock: bool = False,
        vocab_only: bool = False,
        kv_overrides: Optional[Mapping[str, Union[int, float, bool, str]]] = None,
        type_k: Optional[str] = None,
        type_v: Optional[str] = None,
        f16_kv: Optional[bool] = None,
        flash_attn: Union[bool, str, None] = None,
        kv_unified: bool = True,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        lora_path: Union[str, os.PathLike, None] = None,
        lora_scale: float = 1.0,
        rpc_servers: Union[str, Sequence[str], None] = None,
        embedding: bool = False,
        chat_template: Optional[str] = None,
        verbose: bool = False,
        model: Optional[str] = None,
        **sampling: Any,
    ) -> None:
        t0 = time.perf_counter()
        self._closed = True
        self.verbose = bool(verbose)
        if verbose:
            _enable_verbose_logging()
        if model_path is None:
            model_path = model
        if model_path is None:
            raise TypeError("LLM() needs model_path (a .gguf file, or a known name such as 'smollm2')")
        from pyllama.models import resolve_model

        raw_path = os.path.expanduser(os.fsdecode(os.fspath(model_path)))
        if os.path.isdir(raw_path):
            raise ModelLoadError(raw_path, "is a directory, not a GGUF file")
        if not os.path.exists(raw_path) and ("/" in raw_path or os.sep in raw_path
                                             or raw_path.lower().endswith(".gguf")):
            raise FileNotFoundError(2, "model file not found", raw_path)   # a path, not a model name
        self.model_path = str(resolve_model(os.fspath(model_path), progress=verbose or sys.stderr.isatty()))
        self.defaults = SamplingParams(**sampling)
        self._resolve_grammar(self.defaults)   # a bad grammar fails here, before loading

        for name, value in (("n_batch", n_batch), ("n_parallel", n_parallel)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 0):
            raise ValueError(f"n_ctx must be an int >= 0 (0 = the model's training context), got {n_ctx!r}")
        if n_ubatch is not None and (not isinstance(n_ubatch, int) or n_ubatch < 1):
            raise ValueError(f"n_ubatch must be an int >= 1, got {n_ubatch!r}")
        if not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
            raise ValueError(f"n_gpu_layers must be -1 (all) or >= 0, got {n_gpu_layers!r}")
        if f16_kv is not None:
            if f16_kv is False and type_k is None and type_v is None:
                warnings.warn("f16_kv=False is deprecated: it now means type_k='f32', type_v='f32'; "
                              "pass those instead", DeprecationWarning, stacklevel=3)
                type_k = type_v = "f32"
            # f16_kv=True: F16 is already llama.cpp's KV type, nothing to change.

        if isinstance(rpc_servers, str):
            rpc_servers = [s.strip() for s in rpc_servers.split(",") if s.strip()]
        self.rpc_servers = list(rpc_servers or [])
        for endpoint in self.rpc_servers:
            _add_rpc_server(endpoint)

        self._model = _core.Model(
            self.model_path, n_gpu_layers=n_gpu_layers, split_mode=split_mode, main_gpu=main_gpu,
            tensor_split=tensor_split, use_mmap=use_mmap, use_mlock=use_mlock, vocab_only=vocab_only,
            kv_overrides=dict(kv_overrides) if kv_overrides else None)
        self._closed = False
        self.vocab = self._model.vocab
        gbnf = self._resolve_grammar(self.defaults)
        if gbnf is not None:   # syntax errors surface now, not at the first call
            try:
                _core.validate_grammar(self.vocab, gbnf)
            except BaseException:
                self._model.close()
                self._closed = True
                raise
        self._eog_cache: Optional[list] = None
        self._chat_template = chat_template
        self._formatter = None
        self._lock = threading.RLock()

        n_ctx_train = self._model.n_ctx_train
        if n_ctx is None:
            n_ctx = min(n_ctx_train, _DEFAULT_N_CTX_CAP) if n_ctx_train > 0 else 2048
        elif n_ctx == 0:
            n_ctx = n_ctx_train
        self._ctx_params = dict(
            n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch or n_batch, n_threads=n_threads,
            n_threads_batch=n_threads_batch, type_k=type_k or "f16", type_v=type_v or "f16", flash_attn=flash_attn,
            kv_unified=bool(kv_unified), rope_freq_base=rope_freq_base, rope_freq_scale=rope_freq_scale)
        self._ctx: Optional[_core.Context] = None
        self._engine: Optional[_core.Engine] = None
        self._embed_ctx: Optional[_core.Context] = None
        self.embedding = embedding
        self._lora = None
        if lora_path is not None:
            self._lora = _core.LoraAdapter(self._model, os.fspath(lora_path))
            self._lora_scale = float(lora_scale)
        if not vocab_only:
            self._make_context(n_parallel)
        self.load_ms = (time.perf_counter() - t0) * 1000.0
        self._first_call = True

    # ---- lifecycle -----------------------------------------------------------

    def _make_context(self, n_seq: int) -> None:
        if self._ctx is not None:
            self._ctx.close()
        self._ctx = _core.Context(self._model, n_seq_max=n_seq, **self._ctx_params)
        if self._lora is not None:
            self._ctx.set_lora_adapters([(self._lora, self._lora_scale)])
        self._engine = _core.Engine(self._ctx)

    def close(self) -> None:
        """Free the context(s) and the weights now."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for c in (self._ctx, self._embed_ctx):
                if c is not None:
                    c.close()
            self._engine = None
            self._ctx = self._embed_ctx = None
            self._model.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"LLM({self.model_path!r}) was not closed; call close() or use 'with LLM(...)'",
                          ResourceWarning, stacklevel=2)
            try:
                self.close()
            except Exception:
                pass

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this LLM is closed")

    def reset(self) -> None:
        """Forget the KV cache (the prompt cache included)."""
        with self._lock:
            self._check_open()
            if self._engine is not None:
                self._engine.reset()

    # ---- information ---------------------------------------------------------

    @property
    def model(self) -> "_core.Model":
        return self._model

    @property
    def context(self) -> "_core.Context":
        self._check_open()
        if self._ctx is None:
            raise ValueError("this LLM was loaded with vocab_only=True: it has no context")
        return self._ctx

    @property
    def n_ctx(self) -> int:
        return self.context.n_ctx

    @property
    def metadata(self) -> dict:
        return self._model.metadata

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._model.description
        return f"<pyllama.LLM {os.path.basename(self.model_path)!r} {state}>"

    # ---- tokens ----------------------------------------------------------------

    def tokenize(self, text: Union[str, bytes], add_special: bool = True, parse_special: bool = False) -> list:
        self._check_open()
        return self.vocab.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: Sequence[int], remove_special: bool = False, unparse_special: bool = False) -> str:
        self._check_open()
        return self.vocab.detokenize(tokens, remove_special, unparse_special)

    def _eog_tokens(self) -> list:
        if self._eog_cache is None:
            v = self.vocab
            self._eog_cache = [t for t in range(v.n_tokens) if v.is_eog(t)]
        return self._eog_cache

    # ---- building requests -------------------------------------------------------

    def _params(self, overrides: Mapping[str, Any]) -> SamplingParams:
        if not overrides:
            return self.defaults
        return self.defaults.replace(**overrides)

    def _resolve_grammar(self, params: SamplingParams) -> Optional[str]:
        if params.grammar is None and params.grammar_path is None and params.json_schema is None:
            return None
        from pyllama.grammar import load_grammar

        return load_grammar(grammar=params.grammar, grammar_path=params.grammar_path, json_schema=params.json_schema)

    def _prompt_tokens(self, prompt: Union[str, Sequence[int]], add_special: bool = True,
                       parse_special: bool = False) -> list:
        if isinstance(prompt, (str, bytes)):
            tokens = self.vocab.tokenize(prompt, add_special=add_special, parse_special=parse_special)
        else:
            tokens = [int(t) for t in prompt]
            self.vocab.check_tokens(tokens)
        if not tokens:
            raise ValueError("the prompt is empty (no tokens); pass some text")
        n_ctx = self.context.n_ctx
        if len(tokens) >= n_ctx:
            raise ContextLengthError(f"the prompt has {len(tokens)} tokens but the context window (n_ctx) is "
                                     f"{n_ctx}; shorten the prompt or load with a larger n_ctx")
        return tokens

    def _request(self, prompt: Any, params: SamplingParams, tag: Any = None, *, add_special: bool = True,
                 parse_special: bool = False) -> "_core.GenerationRequest":
        tokens = self._prompt_tokens(prompt, add_special, parse_special)
        chain = build_chain(params, self.vocab, self._eog_tokens() if params.ignore_eos else ())
        gbnf = self._resolve_grammar(params)
        grammar = _core.SamplerChain(self.vocab).add_grammar(gbnf) if gbnf is not None else None
        max_tokens = -1 if params.max_tokens is None else params.max_tokens
        return _core.GenerationRequest(tokens, chain, grammar=grammar, max_tokens=max_tokens,
                                       stop=params.stop or (), stop_tokens=params.stop_tokens,
                                       ignore_eos=params.ignore_eos, tag=tag)

    def _completion(self, req: "_core.GenerationRequest", t_start: float, report: bool = True) -> Completion:
        n_gen = len(req.tokens)
        timings = Timings(
            load_ms=self.load_ms if self._first_call else 0.0,
            prompt_n=req.n_prompt_evaluated, prompt_ms=req.t_prompt_ms, cached_n=req.n_prompt - req.n_prompt_evaluated,
            predicted_n=max(n_gen - 1, 0) if req.finish_reason != "eog" else n_gen, predicted_ms=req.t_gen_ms,
            sample_n=n_gen + (1 if req.finish_reason == "eog" else 0), sample_ms=req.t_sample_ms,
            ttft_ms=req.t_first_token_ms, total_ms=(time.perf_counter() - t_start) * 1000.0)
        self._first_call = False
        reason = req.finish_reason
        comp = Completion(text=req.text, tokens=req.tokens, finish_reason=reason, prompt_tokens=req.n_prompt,
                          timings=timings)
        if report and self.verbose:
            print(timings.format(), file=sys.stderr, flush=True)
        return comp

    # ---- generation ---------------------------------------------------------------

    @_check_kwargs
    def complete(self, prompt: Union[str, Sequence[int]], *, callback: Optional[Callable[[str], Any]] = None,
                 add_special: bool = True, parse_special: bool = False, **overrides: Any) -> Completion:
        """Generate a completion of `prompt` (text or token ids).

        `callback(piece)` is called with each new piece of text as it is generated.
        """
        with self._lock:
            self._check_open()
            params = self._params(overrides)
            t0 = time.perf_counter()
            req = self._request(prompt, params, add_special=add_special, parse_special=parse_special)
            cb = None if callback is None else (lambda r, text: text and callback(text))
            self._engine.run([req], cb)
            return self._completion(req, t0)

    @_check_kwargs
    def invoke(self, prompt: Union[str, Sequence[int]], **overrides: Any) -> str:
        """Generate and return the text only."""
        return self.complete(prompt, **overrides).text

    __call__ = invoke

    @_check_kwargs
    def stream(self, prompt: Union[str, Sequence[int]], *, add_special: bool = True, parse_special: bool = False,
               **overrides: Any) -> Iterator[str]:
        """Yield the completion piece by piece (whole characters; a stop string never leaks).

        The returned iterator also exposes the final Completion as `.completion`
        once exhausted.
        """
        self._check_open()
        params = self._params(overrides)
        req = self._request(prompt, params, add_special=add_special, parse_special=parse_special)
        return _Stream(self, [req], single=True)

    # ---- batched generation ---------------------------------------------------------

    @_check_kwargs
    def generate(self, prompts: Sequence[Union[str, Sequence[int]]], *, n_parallel: Optional[int] = None,
                 per_prompt: Optional[Sequence[Mapping[str, Any]]] = None, share_prefix: bool = True,
                 **overrides: Any) -> list:
        """Generate completions for many prompts at once (one Completion per prompt, in order).

        All running sequences advance together in one llama_decode per step; when
        there are more prompts than parallel slots, a finished slot takes the next
        prompt at once.  `per_prompt` gives per-prompt overrides (a list of dicts,
        same length as prompts).  A prefix shared by all prompts is evaluated once.
        """
        if isinstance(prompts, (str, bytes)):
            raise TypeError("generate() takes a list of prompts; use complete() for one")
        with self._lock:
            reqs = self._batch_requests(prompts, per_prompt, overrides, n_parallel, share_prefix)
            t0 = time.perf_counter()
            self._engine.run(reqs)
            return [self._completion(r, t0) for r in reqs]

    @_check_kwargs
    def generate_stream(self, prompts: Sequence[Union[str, Sequence[int]]], *, n_parallel: Optional[int] = None,
                        per_prompt: Optional[Sequence[Mapping[str, Any]]] = None, share_prefix: bool = True,
                        **overrides: Any) -> Iterator[tuple]:
        """Like generate(), but yield (index, piece) events as the sequences advance."""
        with self._lock:
            reqs = self._batch_requests(prompts, per_prompt, overrides, n_parallel, share_prefix)
        return _Stream(self, reqs, single=False)

    def _batch_requests(self, prompts, per_prompt, overrides, n_parallel, share_prefix) -> list:
        self._check_open()
        prompts = list(prompts)
        if not prompts:
            return []
        if per_prompt is not None and len(per_prompt) != len(prompts):
            raise ValueError(f"per_prompt has {len(per_prompt)} entries for {len(prompts)} prompts")
        base = self._params(overrides)
        reqs = []
        for i, p in enumerate(prompts):
            params = base.replace(**per_prompt[i]) if per_prompt and per_prompt[i] else base
            reqs.append(self._request(p, params, tag=i))
        slots = self._plan_slots(reqs, n_parallel)
        if slots > self.context.n_seq_max:
            self._make_context(slots)
        if share_prefix and len(reqs) > 1:
            self._engine.share_prefix([r.prompt_tokens for r in reqs])
        return reqs

    def _plan_slots(self, reqs: list, n_parallel: Optional[int]) -> int:
        """How many sequences to run at once: as many as asked (or up to 16), limited
        by what fits in the KV memory; an impossible request fails before any work."""
        n_ctx = self.context.n_ctx
        need = []
        for r in reqs:
            gen = r.max_tokens if r.max_tokens >= 0 else 0
            need.append(r.n_prompt + gen)
        longest = max(need)
        if longest >= n_ctx:
            raise ContextLengthError(f"a prompt plus max_tokens needs {longest} tokens but n_ctx is {n_ctx}")
        if n_parallel is not None:
            if not isinstance(n_parallel, int) or n_parallel < 1:
                raise ValueError(f"n_parallel must be an int >= 1, got {n_parallel!r}")
            if n_parallel > _core.max_parallel_sequences():
                raise ValueError(f"n_parallel={n_parallel} exceeds llama.cpp's limit of "
                                 f"{_core.max_parallel_sequences()} sequences")
            wanted = min(n_parallel, len(reqs))
        else:
            wanted = min(len(reqs), _MAX_AUTO_SLOTS)
        fits = max(1, n_ctx // max(longest, 1))
        if n_parallel is not None and wanted > fits:
            raise ContextLengthError(f"{wanted} parallel sequences of up to {longest} tokens need "
                                     f"{wanted * longest} KV cells but n_ctx is {n_ctx}: lower n_parallel or "
                                     f"max_tokens, or load with n_ctx >= {wanted * longest}")
        return max(1, min(wanted, fits))

    # ---- chat ---------------------------------------------------------------------

    def _chat_formatter(self):
        if self._formatter is None:
            from pyllama.chat import formatter_for_model

            self._formatter = formatter_for_model(self._model, self._chat_template)
        return self._formatter

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text the model's chat template makes of `messages`."""
        return self._chat_formatter().render(list(messages), add_generation_prompt=add_generation_prompt, **kwargs)

    @_check_kwargs
    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False,
             response_format: Optional[Mapping[str, Any]] = None, tools: Optional[list] = None,
             **overrides: Any) -> Union[Completion, Iterator[str]]:
        """Answer a conversation using the model's own chat template.

        response_format={"type": "json_object"} constrains the answer to JSON;
        {"type": "json_schema", "json_schema": {"schema": {...}}} (or "schema": {...})
        to a schema.  stream=True returns an iterator of text pieces.
        """
        self._check_open()
        if response_format is not None:
            overrides = dict(overrides)
            overrides.update(_response_format_overrides(response_format))
        prompt, add_special = self._chat_formatter().render_for_tokenize(list(messages), tools=tools)
        if stream:
            return self.stream(prompt, add_special=add_special, parse_special=True, **overrides)
        return self.complete(prompt, add_special=add_special, parse_special=True, **overrides)

    # ---- embeddings -------------------------------------------------------------------

    def embed(self, texts: Union[str, Sequence[str]], normalize: bool = True) -> Any:
        """Embeddings of one text (1-D array) or many (2-D array, one row per text).
        Needs LLM(..., embedding=True)."""
        import numpy as np

        self._check_open()
        if not self.embedding:
            raise ValueError("load the model with LLM(..., embedding=True) to compute embeddings")
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not items:
            return np.zeros((0, self._model.n_embd), dtype=np.float32)
        with self._lock:
            toks = [self._prompt_tokens(t) for t in items]
            n_batch = self._ctx_params["n_batch"]
            for t in toks:
                if len(t) > n_batch:
                    raise ContextLengthError(f"a text of {len(t)} tokens exceeds n_batch={n_batch} for embeddings")
            n_seq = _embed_slots(min(len(items), 64), min(self._ctx_params["n_ctx"], n_batch))
            if self._embed_ctx is None or self._embed_ctx.n_seq_max < n_seq:
                if self._embed_ctx is not None:
                    self._embed_ctx.close()
                params = dict(self._ctx_params)
                params["n_ubatch"] = params["n_batch"]
                self._embed_ctx = _core.Context(self._model, embeddings=True, pooling="mean", n_seq_max=n_seq,
                                                **params)
            ctx = self._embed_ctx
            out = np.empty((len(items), self._model.n_embd), dtype=np.float32)
            i = 0
            while i < len(toks):
                batch = _core.Batch(n_batch, ctx.n_seq_max)
                seqs = []
                while i < len(toks) and len(seqs) < ctx.n_seq_max and batch.n_tokens + len(toks[i]) <= n_batch:
                    s = len(seqs)
                    for p, tok in enumerate(toks[i]):
                        batch.add(tok, p, s, True)
                    seqs.append(i)
                    i += 1
                ctx.kv_clear()
                ctx.decode(batch)
                for s, idx in enumerate(seqs):
                    out[idx] = ctx.embeddings_seq(s)
            if normalize:
                norms = np.linalg.norm(out, axis=1, keepdims=True)
                out = out / np.where(norms == 0, 1.0, norms)
            return out[0] if single else out


def _embed_slots(wanted: int, n_tokens: int) -> int:
    """n_seq_max for an embeddings context: llama.cpp (mean pooling) aborts in ggml_mul_mat
    (GGML_ASSERT ggml_can_mul_mat) unless its worst-case ubatch of min(n_ctx, n_ubatch) tokens
    splits evenly across the sequences, so take the nearest divisor of n_tokens (up to 64
    sequences; fewer slots just mean more rounds)."""
    for d in range(wanted, 65):
        if n_tokens % d == 0:
            return d
    for d in range(min(wanted, 64), 0, -1):
        if n_tokens % d == 0:
            return d
    return 1


class _Stream:
    """Iterator over a running generation.  Steps the engine under the LLM's lock, one
    decode per step, so several streams (and other calls) interleave safely."""

    def __init__(self, llm: LLM, reqs: list, single: bool) -> None:
        self._llm = llm
        self._reqs = reqs
        self._single = single
        self._t0 = time.perf_counter()
        self._events: list = []
        self._emitted = [0] * len(reqs)   # characters of each request's text already yielded
        self._started = False
        self._finished = False
        self.completion: Optional[Completion] = None
        self.completions: Optional[list] = None
        self._unreported = False

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> Any:
        llm = self._llm
        while not self._events:
            if self._finished:
                if self._unreported:   # verbose timings after the last piece, not before it
                    self._unreported = False
                    if llm.verbose:
                        for c in self.completions or ():
                            print(c.timings.format(), file=sys.stderr, flush=True)
                raise StopIteration
            with llm._lock:
                llm._check_open()
                engine = llm._engine
                if not self._started:
                    for r in self._reqs:
                        engine.submit(r)
                    self._started = True
                try:
                    engine.step()
                except BaseException:
                    for r in self._reqs:
                        engine.cancel(r)
                    self._finished = True
                    raise
                # Take the new text from each request itself, not from this step's events:
                # another thread's complete()/generate() on this LLM may have advanced our
                # requests through the shared engine since our last step.
                for i, r in enumerate(self._reqs):
                    if self._emitted[i] < 0:
                        continue   # finished and fully yielded
                    text = r.text
                    if len(text) > self._emitted[i]:
                        piece = text[self._emitted[i]:]
                        self._events.append((r.tag, piece) if not self._single else piece)
                    self._emitted[i] = -1 if r.done else len(text)
                if all(r.done for r in self._reqs):
                    self._finished = True
                    comps = [llm._completion(r, self._t0, report=False) for r in self._reqs]
                    self._unreported = True
                    self.completions = comps
                    self.completion = comps[0] if self._single else None
        return self._events.pop(0)

    def close(self) -> None:
        """Stop generating (the unfinished requests are cancelled)."""
        if not self._finished and self._started:
            with self._llm._lock:
                for r in self._reqs:
                    if self._llm._engine is not None:
                        self._llm._engine.cancel(r)
        self._finished = True

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _response_format_overrides(fmt: Mapping[str, Any]) -> dict:
    kind = fmt.get("type")
    if kind == "json_object":
        schema = fmt.get("schema")
        if schema is not None:
            return {"json_schema": schema}
        from pyllama.grammar import grammar_path

        return {"grammar_path": grammar_path("json")}
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema", fmt.get("schema"))
        if schema is None:
            raise ValueError("response_format json_schema needs a 'schema'")
        return {"json_schema": schema}
    if kind in (None, "text"):
        return {}
    raise ValueError(f"unknown response_format type {kind!r} (use 'text', 'json_object' or 'json_schema')")


_rpc_registered: dict = {}
_rpc_lock = threading.Lock()


def _add_rpc_server(endpoint: str) -> None:
    """Register a remote RPC server once per process: ggml keeps the registration (and its
    devices) for the life of the process, and every model loaded afterwards can use them."""
    with _rpc_lock:
        if endpoint not in _rpc_registered:
            _rpc_registered[endpoint] = _core.rpc_add_server(endpoint)


_verbose_handler: Optional[logging.Handler] = None


def _enable_verbose_logging() -> None:
    """verbose=True: llama.cpp's log lines go to stderr, as llama.cpp prints them."""
    global _verbose_handler
    if _verbose_handler is None:
        _verbose_handler = logging.StreamHandler(sys.stderr)
        _verbose_handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(_verbose_handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    _core.set_log_level(logging.INFO)
