"""The LLM class: a GGUF model ready to generate, with the names users already type.

    from pyllama import LLM
    llm = LLM(model_path="model.gguf", n_ctx=2048, temperature=0)
    print(llm("The capital of France is", max_tokens=16))

Everything heavy happens in pyllama._core (the generation loop is Cython); this
module validates parameters, renders chat prompts, builds samplers and reports
timings.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import math
import os
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from pyllama import _core
from pyllama.errors import ContextLengthError, MediaError
from pyllama.log import enable_logging
from pyllama.multimodal import has_media
from pyllama.sampling import FIELD_NAMES as SAMPLING_FIELDS
from pyllama.sampling import SamplingParams, _unknown_message, build_chain
from pyllama.scheduler import ClosedError, Scheduler, defer_until_dispatched

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
    draft_n: int = 0           # speculative decoding: tokens drafted (llama-server's names)
    draft_n_accepted: int = 0  # and accepted by the sampler chain

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

        lines = [
            f"llama_perf_context_print:        load time = {self.load_ms:10.2f} ms",
            f"llama_perf_sampler_print:    sampling time = {rate(self.sample_ms, self.sample_n, 'runs  ')}",
            f"llama_perf_context_print: prompt eval time = {rate(self.prompt_ms, self.prompt_n, 'tokens')}",
            f"llama_perf_context_print:        eval time = {rate(self.predicted_ms, self.predicted_n, 'runs  ')}",
            f"llama_perf_context_print:       total time = {self.total_ms:10.2f} ms / "
            f"{self.prompt_n + self.predicted_n:5d} tokens",
        ]
        if self.draft_n:
            lines.append(f"draft acceptance rate = {self.draft_n_accepted / self.draft_n:.5f} "
                         f"({self.draft_n_accepted:5d} accepted / {self.draft_n:5d} generated)")
        return "\n".join(lines)


@dataclass
class TopLogprob:
    """One of the most likely tokens at a position."""

    token: str
    id: int
    logprob: float
    bytes: Optional[list]

    def to_openai(self) -> dict:
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes}


@dataclass
class TokenLogprob:
    """A generated (or prompt) token with its log-probability under the model's raw
    distribution (before the sampler chain), and the most likely alternatives there."""

    token: str
    id: int
    logprob: float
    bytes: Optional[list]
    top_logprobs: list = field(default_factory=list)

    def to_openai(self) -> dict:
        """The shape of one entry of OpenAI's ``choices[].logprobs.content``."""
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes,
                "top_logprobs": [t.to_openai() for t in self.top_logprobs]}


@dataclass
class Completion:
    """The result of one generation."""

    text: str
    tokens: list
    finish_reason: str            # "stop" | "length" | "eog" | "tool_calls"
    prompt_tokens: int
    timings: Timings = field(default_factory=Timings)
    index: int = 0                # which of n answers (or which prompt of generate())
    logprobs: Optional[list] = None          # list[TokenLogprob], with logprobs=True
    prompt_logprobs: Optional[list] = None   # list[TokenLogprob] for prompt tokens 2..n (echo)
    tool_calls: Optional[list] = None        # OpenAI-shaped tool calls (chat with tools)
    content: Optional[str] = None            # the text outside tool calls (chat with tools)

    @property
    def usage(self) -> dict:
        n = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": self.timings.cached_n}}

    def logprobs_openai(self) -> Optional[dict]:
        """``{"content": [...]}`` as in OpenAI's chat completion choices, or None."""
        if self.logprobs is None:
            return None
        return {"content": [t.to_openai() for t in self.logprobs]}

    def __str__(self) -> str:
        return self.text


@dataclass
class Chunk:
    """A piece of a streamed answer: new text, the tokens behind it, their log-probabilities
    (with logprobs=True) and, on the last chunk of an answer, its finish_reason."""

    index: int
    text: str
    token_ids: list
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None


class LLM:
    """A GGUF model, loaded and ready to generate.

    Load/context parameters are fixed at construction; every generation
    parameter (temperature, top_p, max_tokens, stop, grammar, json_schema, seed ...)
    can be given here as a default and overridden per call.

    One LLM may be used from many threads and coroutines at once: their requests share
    its `n_parallel` sequences and advance together, one ``llama_decode`` per step.  A
    stream advances only while it is iterated; an idle one never holds others up.
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
        mmproj_path: Union[str, os.PathLike, None] = None,
        clip_model_path: Union[str, os.PathLike, None] = None,
        embedding: bool = False,
        chat_template: Optional[str] = None,
        cache_prompt: bool = True,
        spec_type: Optional[str] = None,
        draft_max: int = 16,
        draft_min: int = 0,
        spec_ngram_size_n: int = 3,
        draft_model: Union[str, os.PathLike, None] = None,
        draft_p_min: float = 0.75,
        spec_cost_model: bool = True,
        verbose: bool = False,
        model: Optional[str] = None,
        **sampling: Any,
    ) -> None:
        t0 = time.perf_counter()
        self._closed = True
        self.verbose = bool(verbose)
        if verbose:
            enable_logging()
        if model_path is None:
            model_path = model
        if model_path is None:
            raise TypeError("LLM() needs model_path (a .gguf file, or a known name such as 'smollm2')")
        from pyllama.models import resolve_model

        # A path, or a known model name fetched on first use (a progress bar on a terminal).
        self.model_path = str(resolve_model(model_path, progress=True if verbose else None))
        self.defaults = SamplingParams(**sampling)
        self._resolve_grammar(self.defaults)   # a bad grammar fails here, before loading

        self._spec = _spec_settings(spec_type, draft_max, draft_min, spec_ngram_size_n, draft_model, draft_p_min)
        if not isinstance(spec_cost_model, bool):
            raise TypeError(f"spec_cost_model must be True or False, got {spec_cost_model!r}")
        # True: each step drafts the length that pays on this machine (the engine's measured
        # decode cost by batch size); False: as llama.cpp, up to draft_max whatever it costs.
        self._spec_cost_model = spec_cost_model
        self._draft_weights: Optional[_core.Model] = None     # the draft model's weights (spec_type="draft")
        self._drafter = None                                  # its DraftModel, made with the context
        if not isinstance(n_batch, int) or isinstance(n_batch, bool) or n_batch < 1:
            raise ValueError(f"n_batch must be an int >= 1, got {n_batch!r}")
        if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 0):
            raise ValueError(f"n_ctx must be an int >= 0 (0 = the model's training context), got {n_ctx!r}")
        if n_ubatch is not None and (not isinstance(n_ubatch, int) or n_ubatch < 1):
            raise ValueError(f"n_ubatch must be an int >= 1, got {n_ubatch!r}")
        if not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
            raise ValueError(f"n_gpu_layers must be -1 (all) or >= 0, got {n_gpu_layers!r}")
        _check_n_parallel(n_parallel, n_batch)
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
            _core.rpc_add_server(endpoint)   # once per process: _core keeps the registry

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
        self._lock = threading.RLock()          # the embeddings context, re-creating the context
        self._stats = _Counters()

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
        self._sched: Optional[Scheduler] = None
        self._embed_ctx: Optional[_core.Context] = None
        self.embedding = embedding
        self.cache_prompt = bool(cache_prompt)
        self._lora = None
        if lora_path is not None:
            if not isinstance(lora_scale, (int, float)) or not math.isfinite(lora_scale):
                self._model.close()
                self._closed = True
                raise ValueError(f"lora_scale must be a finite number, got {lora_scale!r}")
            self._lora = _core.LoraAdapter(self._model, os.fspath(lora_path))
            self._lora_scale = float(lora_scale)
        # The multimodal projector (images/audio in chat messages); clip_model_path is
        # llama-cpp-python's name for it.
        self.multimodal: Optional[_core.Multimodal] = None
        mmproj = mmproj_path if mmproj_path is not None else clip_model_path
        if mmproj_path is not None and clip_model_path is not None and os.fspath(mmproj_path) != os.fspath(clip_model_path):
            self._model.close()
            self._closed = True
            raise ValueError("give the projector once: mmproj_path or clip_model_path, not two different files")
        if mmproj is not None:
            if vocab_only:
                self._model.close()
                self._closed = True
                raise ValueError("mmproj_path needs the model's weights; it cannot be used with vocab_only=True")
            try:
                self.multimodal = _core.Multimodal(self._model, os.fspath(mmproj), use_gpu=n_gpu_layers != 0,
                                                   n_threads=n_threads)
            except BaseException:
                self._model.close()
                self._closed = True
                raise
        if self._spec is not None and self._spec.get("draft_model") is not None:
            try:
                self._load_draft_model(self._spec.pop("draft_model"), n_gpu_layers, vocab_only)
            except BaseException:
                if self.multimodal is not None:
                    self.multimodal.close()
                self._model.close()
                self._closed = True
                raise
        if not vocab_only:
            self._make_context(n_parallel)
        self.load_ms = (time.perf_counter() - t0) * 1000.0
        self._first_call = True
        _live_llms.add(self)

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: Optional[str] = None,
        additional_files: Optional[Sequence[str]] = None,
        local_dir: Union[str, os.PathLike, None] = None,
        local_dir_use_symlinks: Union[bool, str] = "auto",
        cache_dir: Union[str, os.PathLike, None] = None,
        *,
        revision: Optional[str] = None,
        token: Union[str, bool, None] = None,
        mmproj: bool = False,
        progress: Optional[bool] = None,
        **kwargs: Any,
    ) -> "LLM":
        """Download a GGUF model from the Hugging Face Hub (into its cache) and load it.

        llama-cpp-python's signature: ``LLM.from_pretrained("user/repo", "*Q4_K_M.gguf",
        n_ctx=2048)``. ``filename`` is a name or a glob that must match one file (all the
        parts of a split model count as one); None picks the file as ``pyllama run -hf``
        does (Q4_K_M, else Q8_0, else the first GGUF; a ``"user/repo:Q8_0"`` tag picks the
        quantisation). ``additional_files`` are downloaded too (names or globs).
        ``local_dir`` downloads there instead of the cache; ``local_dir_use_symlinks`` is
        accepted for compatibility and ignored (recent huggingface_hub ignores it too).
        ``cache_dir``, ``revision`` and ``token`` are huggingface_hub's (the token defaults to
        $HF_TOKEN). ``mmproj=True`` also loads the repository's projector (``*mmproj*.gguf``)
        unless ``mmproj_path`` is given. The other keyword arguments go to ``LLM(...)``.

        Needs ``pip install 'pyllama[hf]'`` (ImportError otherwise). Raises the errors of
        :func:`pyllama.models.pull_from_hub` (HubRepoNotFoundError, HubFileNotFoundError,
        HubOfflineError, ...) before anything is loaded.
        """
        from . import models

        del local_dir_use_symlinks  # accepted for llama-cpp-python code; nothing to do
        hub_args: dict = {"revision": revision, "cache_dir": cache_dir, "local_dir": local_dir, "token": token,
                          "progress": progress}
        if filename is None:
            pulled = models.pull_from_hub(repo_id, mmproj=mmproj and kwargs.get("mmproj_path") is None,
                                          **hub_args)
            path = pulled.path
            if pulled.mmproj_path is not None:
                kwargs["mmproj_path"] = pulled.mmproj_path
            if additional_files:
                models.fetch_from_hub(pulled.repo_id, pulled.filename, additional_files=list(additional_files),
                                      **hub_args)
        else:
            path = models.fetch_from_hub(repo_id, filename, additional_files=list(additional_files or ()),
                                         **hub_args)
            if mmproj and kwargs.get("mmproj_path") is None:
                files = models.list_hub_files(repo_id, revision=revision, cache_dir=cache_dir, token=token)
                projector = models.select_hf_mmproj(files, models.select_hf_glob(files, filename))
                if projector is not None:
                    kwargs["mmproj_path"] = models.download_hub_files(repo_id, [projector], **hub_args)[0]
        return cls(path, **kwargs)

    # ---- lifecycle -----------------------------------------------------------

    def _load_draft_model(self, path: Any, n_gpu_layers: int, vocab_only: bool) -> None:
        """The draft model's weights, checked against the target's vocabulary before anything
        else is made (llama.cpp's rules: pyllama.speculative.check_draft_vocab)."""
        from pyllama.models import resolve_model
        from pyllama.speculative import check_draft_vocab

        if vocab_only:
            raise ValueError("draft_model needs the target's weights; it cannot be used with vocab_only=True")
        weights = _core.Model(str(resolve_model(path)), n_gpu_layers=n_gpu_layers)
        try:
            check_draft_vocab(self.vocab, weights.vocab)
        except BaseException:
            weights.close()
            raise
        self._draft_weights = weights

    def _make_context(self, n_seq: int) -> None:
        """(Re-)create the context with n_seq sequences.  Only while no request exists."""
        old_sched = self._sched
        if self._ctx is not None:
            self._ctx.close()
        self._ctx = _core.Context(self._model, n_seq_max=n_seq, **self._ctx_params)
        if self._draft_weights is not None:
            from pyllama.speculative import DraftModel

            if self._drafter is not None:
                self._drafter.close()
            # One draft sequence per slot, as many KV cells as the target's context.
            self._drafter = DraftModel(self._draft_weights, n_seq=n_seq, n_ctx=self._ctx.n_ctx,
                                       n_batch=self._ctx.n_batch, n_threads=self._ctx_params["n_threads"],
                                       p_min=self._spec["draft_p_min"], flash_attn=self._ctx_params["flash_attn"])
            self._drafter.n_vocab_target = self.vocab.n_tokens
        if self._lora is not None:
            self._ctx.set_lora_adapters([(self._lora, self._lora_scale)])
        self._engine = _core.Engine(self._ctx, cache_prompt=self.cache_prompt,
                                    spec_cost_model=self._spec_cost_model)
        if old_sched is None:
            self._sched = Scheduler(self._engine)
        else:
            old_sched.engine = self._engine

    def close(self) -> None:
        """Free the context(s) and the weights now.  A call running in another thread (a
        decode in progress included) stops promptly and raises ValueError("... closed")."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sched, ctx = self._sched, self._ctx
            if sched is not None and ctx is not None:
                sched.begin_close()
                ctx.abort()                       # a decode in progress stops now
                if self._drafter is not None:
                    self._drafter.context.abort()   # and so does a draft model's
                if not sched.close(timeout=10.0):
                    # A step did not end (cannot happen short of a hung backend): freeing the
                    # context under it would crash; keep it alive until the process ends.
                    _keep_forever(self)
                    return
                # Every accepted request ends now, with ClosedError, and its listener is told.
                sched.end_all(ClosedError("this LLM was closed while the call was running"))
            for c in (self._ctx, self._embed_ctx):
                if c is not None:
                    c.close()
            self._engine = None
            self._ctx = self._embed_ctx = None
            if self.multimodal is not None:
                self.multimodal.close()
            if self._drafter is not None:
                self._drafter.close()
                self._drafter = None
            if self._draft_weights is not None:
                self._draft_weights.close()
            self._model.close()
        _live_llms.discard(self)

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
            raise ClosedError("this LLM is closed")

    def reset(self) -> None:
        """Forget the KV cache (the prompt cache included).  Running calls are cancelled."""
        self._check_open()
        if self._sched is None:
            return
        with self._sched.exclusive():
            # Every running call ends ("cancelled") and its listener is told, before any
            # other step can run.
            self._sched.end_all()
        self._sched.wake()

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
    def n_parallel(self) -> int:
        """How many sequences (slots) generate at once."""
        return self.context.n_seq_max

    @property
    def metadata(self) -> dict:
        return self._model.metadata

    def slots(self) -> list:
        """One dict per sequence slot (as llama-server's /slots): id, busy, paused, n_ctx,
        n_cached (tokens of its prompt cache), n_prompt, n_decoded."""
        self._check_open()
        n_ctx = self.context.n_ctx_seq
        return [dict(info, n_ctx=n_ctx) for info in self._engine.slot_info()]

    def metrics(self) -> dict:
        """Counters since load, with llama-server's metric names."""
        self._check_open()
        eng = self._engine
        s = self._stats
        busy = sum(1 for info in eng.slot_info() if info["busy"])
        return {
            "prompt_tokens_total": s.prompt_tokens, "prompt_seconds_total": s.prompt_ms / 1000.0,
            "tokens_predicted_total": s.predicted_tokens,
            "tokens_predicted_seconds_total": s.predicted_ms / 1000.0,
            "n_decode_total": eng.n_decode_total + s.decodes_before,
            "n_busy_slots_total": eng.n_busy_slots_total + s.busy_before,
            "n_busy_slots_per_decode": ((eng.n_busy_slots_total + s.busy_before)
                                        / max(1, eng.n_decode_total + s.decodes_before)),
            "requests_processing": busy, "requests_deferred": eng.n_waiting,
            "requests_total": s.requests,
        }

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
                       parse_special: bool = False) -> Any:
        if isinstance(prompt, _core.MediaPrompt):
            if self.multimodal is None or prompt.multimodal is not self.multimodal:
                raise MediaError("this MediaPrompt was made by another LLM's projector")
            tokens = prompt
        elif _is_chat(prompt):
            tokens = self.chat_prompt(prompt)
        elif isinstance(prompt, (str, bytes)):
            tokens = self.vocab.tokenize(prompt, add_special=add_special, parse_special=parse_special)
        else:
            tokens = [int(t) for t in prompt]
            self.vocab.check_tokens(tokens)
        if not tokens:
            raise ValueError("the prompt is empty (no tokens); pass some text")
        n_ctx = self.context.n_ctx_seq
        if len(tokens) >= n_ctx:
            raise ContextLengthError(f"the prompt has {len(tokens)} tokens but the context window (n_ctx) is "
                                     f"{n_ctx}; shorten the prompt or load with a larger n_ctx")
        return tokens

    def _request(self, prompt: Any, params: SamplingParams, tag: Any = None, *, add_special: bool = True,
                 parse_special: bool = False, tokens: Optional[list] = None, logprobs: Any = None,
                 echo: bool = False, seed_offset: int = 0,
                 hooks: Optional[Mapping[str, Any]] = None) -> "_core.GenerationRequest":
        if tokens is None:
            tokens = self._prompt_tokens(prompt, add_special, parse_special)
        if seed_offset and params.seed is not None and params.seed >= 0:
            params = params.replace(seed=(params.seed + seed_offset) & 0xFFFFFFFF)
        chain = build_chain(params, self.vocab, self._eog_tokens() if params.ignore_eos else (),
                            n_ctx=self.context.n_ctx_seq)
        # The windows of the stages that count repetitions, as the chain resolved them (-1: n_ctx).
        window = max((p["last_n"] for name, p in chain.stage_params if name in ("penalties", "dry")), default=0)
        if window and params.penalize_prompt:
            # The repetition stages see the prompt too (llama.cpp's tools, llama-server and
            # llama-cpp-python all do): a repeat penalty also keeps the answer from echoing it.
            keys = getattr(tokens, "tokens", tokens)        # a MediaPrompt's keys; images are skipped
            chain.accept_context(keys[-window:])
        gbnf = self._resolve_grammar(params)
        grammar = _core.SamplerChain(self.vocab).add_grammar(gbnf) if gbnf is not None else None
        max_tokens = -1 if params.max_tokens is None else params.max_tokens
        spec = self._spec if params.speculative is not False else None
        if spec is not None:
            spec = {k: v for k, v in spec.items() if k != "draft_p_min"}
            if self._drafter is not None:
                spec["drafter"] = self._drafter
        return _core.GenerationRequest(tokens, chain, grammar=grammar, max_tokens=max_tokens,
                                       stop=params.stop or (), stop_tokens=params.stop_tokens,
                                       ignore_eos=params.ignore_eos, tag=tag, logprobs=logprobs,
                                       prompt_logprobs=echo and logprobs is not None,
                                       cache_prompt=params.cache_prompt, **(spec or {}), **(hooks or {}))

    def _group(self, prompt: Any, params: SamplingParams, *, n: int, logprobs: Any, echo: bool, tag: Any = None,
               add_special: bool = True, parse_special: bool = False,
               hooks: Optional[Mapping[str, Any]] = None) -> list:
        """The requests of one prompt: a leader and n - 1 followers that share its prompt
        evaluation (llama_memory_seq_cp) and differ by seed."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if n > _core.max_parallel_sequences():
            raise ValueError(f"n={n} exceeds llama.cpp's limit of {_core.max_parallel_sequences()} sequences")
        tokens = self._prompt_tokens(prompt, add_special, parse_special)
        leader = self._request(prompt, params, tag, tokens=tokens, logprobs=logprobs, echo=echo, hooks=hooks)
        group = [leader]
        for i in range(1, n):
            f = self._request(prompt, params, tag, tokens=tokens, logprobs=logprobs, seed_offset=i, hooks=hooks)
            leader.add_follower(f)
            group.append(f)
        return group

    def _ensure_slots(self, n: int) -> None:
        """At least n sequences: re-create the context when it has fewer.  Requests of other
        calls that are generating are waited for (this thread steps with them); paused ones (an
        unread stream) give their slot up and move to the new context when the engine can hand
        them over (Engine.preempt_paused/adopt), where they resume, re-evaluated."""
        if n <= self.context.n_seq_max:
            return
        if n > self._ctx_params["n_batch"]:
            raise ValueError(f"{n} sequences at once exceed n_batch={self._ctx_params['n_batch']}")

        def generating() -> bool:
            return any(not r.paused for r in self._engine.requests())

        while True:
            with self._lock, self._sched.exclusive():
                if n <= self.context.n_seq_max:
                    return
                engine = self._engine
                if not generating() and engine.preempt_paused() == 0:
                    # Nothing holds a slot (an unread stream gave its slot up): re-create the
                    # context; queued and preempted requests move over and resume there.
                    self._stats.decodes_before += engine.n_decode_total
                    self._stats.busy_before += engine.n_busy_slots_total
                    self._make_context(n)
                    self._engine.adopt(engine)
                    return
                if not generating():
                    raise ValueError(f"{n} sequences at once need n_parallel >= {n}, and this LLM (n_parallel="
                                     f"{self.context.n_seq_max}) holds paused calls (an unread stream); load it "
                                     f"with LLM(..., n_parallel={n})")
            # Other calls are generating: step with them until only paused ones are left.
            self._sched.drive(lambda: not generating())

    def _logprobs_arg(self, logprobs: Any, top_logprobs: Any) -> Any:
        """None (off) or the number of top alternatives (0..20) to record per token."""
        if top_logprobs is None:
            top_logprobs = 0
        if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool) or not 0 <= top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be an int in 0..20, got {top_logprobs!r}")
        if logprobs is None or logprobs is False:
            if top_logprobs:
                raise ValueError("top_logprobs needs logprobs=True")
            return None
        if logprobs is True:
            return top_logprobs
        if isinstance(logprobs, int) and 0 <= logprobs <= 20:   # OpenAI's legacy completions: logprobs=K
            return max(logprobs, top_logprobs)
        raise ValueError(f"logprobs must be True/False (or an int 0..20 as in OpenAI's completions), got {logprobs!r}")

    def _token_logprob(self, entry: tuple) -> TokenLogprob:
        tok, lp, top = entry
        text, raw = self._token_text(tok)
        return TokenLogprob(token=text, id=tok, logprob=lp, bytes=raw,
                            top_logprobs=[self._top_logprob(t, l) for t, l in top])

    def _top_logprob(self, tok: int, lp: float) -> TopLogprob:
        text, raw = self._token_text(tok)
        return TopLogprob(token=text, id=tok, logprob=lp, bytes=raw)

    def _token_text(self, tok: int) -> tuple:
        """(text, utf-8 bytes) of one token, as OpenAI reports it (special tokens rendered)."""
        piece = self.vocab.token_to_piece(tok, True)
        return piece.decode("utf-8", "replace"), list(piece)

    def _completion(self, req: "_core.GenerationRequest", t_start: float, report: bool = True,
                    index: int = 0, echo_text: Optional[str] = None) -> Completion:
        if req.error is not None:
            raise req.error
        if req.finish_reason == "cancelled":
            raise ClosedError("this LLM was closed while the call was running") if self._closed else \
                RuntimeError("the request was cancelled")
        n_gen = len(req.tokens)
        prompt_n = req.n_prompt_evaluated
        timings = Timings(
            load_ms=self.load_ms if self._first_call else 0.0,
            prompt_n=prompt_n, prompt_ms=req.t_prompt_ms if prompt_n else 0.0,
            cached_n=req.n_cached_tokens if prompt_n else req.n_prompt,
            predicted_n=max(n_gen - 1, 0) if req.finish_reason != "eog" else n_gen, predicted_ms=req.t_gen_ms,
            sample_n=n_gen + (1 if req.finish_reason == "eog" else 0), sample_ms=req.t_sample_ms,
            ttft_ms=req.t_first_token_ms, total_ms=(time.perf_counter() - t_start) * 1000.0,
            draft_n=req.n_drafted, draft_n_accepted=req.n_draft_accepted)
        self._first_call = False
        self._stats.add(timings)
        logprobs = [self._token_logprob(e) for e in req.logprobs] if req.n_logprobs >= 0 else None
        prompt_logprobs = None
        if req.prompt_logprobs:
            prompt_logprobs = [self._token_logprob(e) for e in req.prompt_logprobs_list]
        text = req.text if echo_text is None else echo_text + req.text
        comp = Completion(text=text, tokens=req.tokens, finish_reason=req.finish_reason, prompt_tokens=req.n_prompt,
                          timings=timings, index=index, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        if report and self.verbose:
            print(timings.format(), file=sys.stderr, flush=True)
        return comp

    # ---- running requests ---------------------------------------------------------

    def _run(self, reqs: list, callback: Optional[Callable[[Any, str], Any]] = None) -> None:
        """Submit the request groups `reqs` (leaders) and return when they and their
        followers are finished; other callers' requests advance in the same steps."""
        sched = self._sched
        watched = [r for lead in reqs for r in [lead, *lead.followers]]
        cursors = [0] * len(watched)

        def deliver() -> None:
            for i, r in enumerate(watched):
                # One read of the pieces (another thread may be stepping): each piece once.
                pieces = r.parts_since(cursors[i])
                cursors[i] += len(pieces)
                for piece in pieces:
                    callback(r, piece)

        if sched.in_step():
            raise RuntimeError("an LLM listener cannot start another generation on the same LLM")
        try:
            for lead in reqs:
                sched.submit(lead)
            sched.drive(lambda: all(r.done for r in watched), deliver if callback is not None else None)
            if callback is not None:
                deliver()
        except BaseException:
            sched.cancel(watched)
            raise

    # ---- generation ---------------------------------------------------------------

    def _prepare_complete(self, prompt: Union[str, Sequence[int]], *, add_special: bool = True,
                          parse_special: bool = False, n: int = 1, logprobs: Union[bool, int, None] = None,
                          top_logprobs: Optional[int] = None, echo: bool = False,
                          logits_processors: Optional[Sequence[Callable[..., Any]]] = None,
                          stopping_criteria: Optional[Sequence[Callable[..., Any]]] = None,
                          **overrides: Any) -> "_Prepared":
        self._check_open()
        params = self._params(overrides)
        lp = self._logprobs_arg(logprobs, top_logprobs)
        hooks = {"logits_processors": logits_processors, "stopping_criteria": stopping_criteria}
        group = self._group(prompt, params, n=n, logprobs=lp, echo=echo, add_special=add_special,
                            parse_special=parse_special, hooks=hooks)
        self._ensure_slots(n)
        echo_text = self._echo_text(prompt, group[0]) if echo else None
        t0 = time.perf_counter()

        def finish(report: bool = True) -> Any:
            comps = [self._completion(r, t0, report=report, index=i, echo_text=echo_text)
                     for i, r in enumerate(group)]
            return comps[0] if n == 1 else comps

        return _Prepared([group[0]], group, finish)

    @_check_kwargs
    def complete(self, prompt: Union[str, Sequence[int]], *, callback: Optional[Callable[[str], Any]] = None,
                 add_special: bool = True, parse_special: bool = False, n: int = 1,
                 logprobs: Union[bool, int, None] = None, top_logprobs: Optional[int] = None, echo: bool = False,
                 logits_processors: Optional[Sequence[Callable[..., Any]]] = None,
                 stopping_criteria: Optional[Sequence[Callable[..., Any]]] = None,
                 **overrides: Any) -> Any:
        """Generate a completion of `prompt` (text or token ids).

        `callback(piece)` is called, in this thread, with each new piece of text.
        `n > 1` returns a list of n completions that share one evaluation of the prompt
        (identical at temperature 0, different otherwise; reproducible with a seed).
        `logprobs=True` (with `top_logprobs=K`, 0..20) fills Completion.logprobs; with
        `echo=True` as well, Completion.prompt_logprobs scores the prompt's tokens
        (`max_tokens=0`: score only) and the text starts with the prompt.

        Python hooks, run inside continuous batching (the request still shares every decode):
        `logits_processors` are called as ``processor(input_ids, scores)`` before sampling each
        token — `input_ids` the prompt and the tokens so far (NumPy intc), `scores` this
        request's logits row (NumPy float32, edit it in place or return new scores);
        `stopping_criteria` as ``criterion(input_ids, scores)`` after each token, True ends the
        request (finish_reason "stop"; the stopping token's text is dropped).  Logprobs stay the
        model's own.  A hook that raises ends this call with its exception, nothing else.
        With n > 1 every choice calls the same hooks on its own row.
        """
        prep = self._prepare_complete(prompt, add_special=add_special, parse_special=parse_special, n=n,
                                      logprobs=logprobs, top_logprobs=top_logprobs, echo=echo,
                                      logits_processors=logits_processors, stopping_criteria=stopping_criteria,
                                      **overrides)
        cb = None if callback is None else (lambda r, text: callback(text))
        self._run(prep.leaders, cb)
        return prep.finish()

    def _echo_text(self, prompt: Any, req: "_core.GenerationRequest") -> str:
        if isinstance(prompt, str):
            return prompt
        if req.media is not None:   # the text around the images
            return self.vocab.detokenize(req.media.text_tokens(), remove_special=True)
        return self.vocab.detokenize(req.prompt_tokens, remove_special=True)

    @_check_kwargs
    def invoke(self, prompt: Union[str, Sequence[int]], *, callback: Optional[Callable[[str], Any]] = None,
               **overrides: Any) -> str:
        """Generate and return the text only."""
        return self.complete(prompt, callback=callback, **overrides).text

    __call__ = invoke

    @_check_kwargs
    def stream(self, prompt: Union[str, Sequence[int]], *, add_special: bool = True, parse_special: bool = False,
               chunks: bool = False, n: int = 1, logprobs: Union[bool, int, None] = None,
               top_logprobs: Optional[int] = None, logits_processors: Optional[Sequence[Callable[..., Any]]] = None,
               stopping_criteria: Optional[Sequence[Callable[..., Any]]] = None, **overrides: Any) -> "Stream":
        """Yield the completion piece by piece (whole characters; a stop string never leaks).

        The stream advances only while it is iterated: left open, it holds no other call
        up.  With `chunks=True` (implied by n > 1) it yields :class:`Chunk` objects that
        carry the choice index, token ids and log-probabilities.  Once exhausted, the
        iterator exposes the final Completion as `.completion` (all of them as
        `.completions`); `.close()` stops it early.  `logits_processors` and
        `stopping_criteria` work as in complete().
        """
        prep = self._prepare_complete(prompt, add_special=add_special, parse_special=parse_special, n=n,
                                      logprobs=logprobs, top_logprobs=top_logprobs,
                                      logits_processors=logits_processors, stopping_criteria=stopping_criteria,
                                      **overrides)
        return Stream(self, prep, mode="chunks" if chunks or n > 1 else "text")

    # ---- batched generation ---------------------------------------------------------

    def _prepare_generate(self, prompts: Sequence[Union[str, Sequence[int]]], *, n_parallel: Optional[int] = None,
                          per_prompt: Optional[Sequence[Mapping[str, Any]]] = None, share_prefix: bool = True,
                          logprobs: Union[bool, int, None] = None, top_logprobs: Optional[int] = None,
                          **overrides: Any) -> "_Prepared":
        if isinstance(prompts, (str, bytes)):
            raise TypeError("generate() takes a list of prompts; use complete() for one")
        reqs = self._batch_requests(prompts, per_prompt, overrides, n_parallel, share_prefix,
                                    self._logprobs_arg(logprobs, top_logprobs))
        t0 = time.perf_counter()
        return _Prepared(reqs, reqs, lambda report=True: [self._completion(r, t0, report=report, index=i)
                                                          for i, r in enumerate(reqs)])

    @_check_kwargs
    def generate(self, prompts: Sequence[Union[str, Sequence[int]]], *, n_parallel: Optional[int] = None,
                 per_prompt: Optional[Sequence[Mapping[str, Any]]] = None, share_prefix: bool = True,
                 logprobs: Union[bool, int, None] = None, top_logprobs: Optional[int] = None,
                 **overrides: Any) -> list:
        """Generate completions for many prompts at once (one Completion per prompt, in order).

        All running sequences advance together in one llama_decode per step; when
        there are more prompts than parallel slots, a finished slot takes the next
        prompt at once.  `per_prompt` gives per-prompt overrides (a list of dicts,
        same length as prompts).  A prefix shared by all prompts is evaluated once.
        """
        prep = self._prepare_generate(prompts, n_parallel=n_parallel, per_prompt=per_prompt,
                                      share_prefix=share_prefix, logprobs=logprobs, top_logprobs=top_logprobs,
                                      **overrides)
        self._run(prep.leaders)
        return prep.finish()

    @_check_kwargs
    def generate_stream(self, prompts: Sequence[Union[str, Sequence[int]]], *, n_parallel: Optional[int] = None,
                        per_prompt: Optional[Sequence[Mapping[str, Any]]] = None, share_prefix: bool = True,
                        chunks: bool = False, logprobs: Union[bool, int, None] = None,
                        top_logprobs: Optional[int] = None, **overrides: Any) -> "Stream":
        """Like generate(), but yield (index, piece) events as the sequences advance
        (:class:`Chunk` objects with chunks=True)."""
        prep = self._prepare_generate(prompts, n_parallel=n_parallel, per_prompt=per_prompt,
                                      share_prefix=share_prefix, logprobs=logprobs, top_logprobs=top_logprobs,
                                      **overrides)
        return Stream(self, prep, mode="chunks" if chunks else "events")

    def _batch_requests(self, prompts, per_prompt, overrides, n_parallel, share_prefix, logprobs=None) -> list:
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
            reqs.append(self._request(p, params, tag=i, logprobs=logprobs))
        slots = self._plan_slots(reqs, n_parallel)
        if slots > self.context.n_seq_max and not self._engine.busy:
            try:
                self._ensure_slots(slots)
            except ValueError:
                pass   # busy meanwhile: the prompts queue for the slots there are
        if share_prefix and len(reqs) > 1:
            with self._sched.exclusive():
                self._engine.share_prefix([r.prompt_tokens for r in reqs])
        return reqs

    def _plan_slots(self, reqs: list, n_parallel: Optional[int]) -> int:
        """How many sequences to run at once: as many as asked (or up to 16), limited
        by what fits in the KV memory and a batch; an impossible request fails before any work."""
        n_ctx = self.context.n_ctx
        need = []
        for r in reqs:
            gen = r.max_tokens if r.max_tokens >= 0 else 0
            need.append(r.n_prompt + gen)
        longest = max(need)
        if longest >= n_ctx:
            raise ContextLengthError(f"a prompt plus max_tokens needs {longest} tokens but n_ctx is {n_ctx}")
        n_batch = self._ctx_params["n_batch"]
        if n_parallel is not None:
            _check_n_parallel(n_parallel, n_batch)
            wanted = min(n_parallel, len(reqs))
        else:
            wanted = min(len(reqs), _MAX_AUTO_SLOTS, n_batch)
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

    def chat_tokens(self, messages: Sequence[Mapping[str, Any]], *, tools: Optional[list] = None,
                    allow_special_in_messages: bool = False, add_generation_prompt: bool = True,
                    **kwargs: Any) -> list:
        """The prompt tokens of a conversation.  Message contents are data: text in them
        that spells a control token (``<|im_start|>``) stays text, unless
        `allow_special_in_messages=True`; only the template's own markup is special."""
        if has_media(messages):
            raise MediaError("these messages hold images or audio: use chat_prompt(messages) (or chat()), "
                             "which tokenizes them with the projector")
        fmt = self._chat_formatter()
        if hasattr(fmt, "render_tokens"):
            return fmt.render_tokens(list(messages), self.vocab, add_generation_prompt=add_generation_prompt,
                                     tools=tools, allow_special_in_messages=allow_special_in_messages, **kwargs)
        prompt, add_special = fmt.render_for_tokenize(list(messages), add_generation_prompt=add_generation_prompt,
                                                      tools=tools, **kwargs)
        return self.vocab.tokenize(prompt, add_special=add_special, parse_special=True)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], *, tools: Optional[list] = None,
                    allow_special_in_messages: bool = False, add_generation_prompt: bool = True,
                    allow_files: bool = True, **kwargs: Any) -> Any:
        """The prompt of a conversation, ready for complete()/stream()/generate(): its tokens
        (as chat_tokens gives them) or, when a message has image or audio parts, a
        :class:`~pyllama._core.MediaPrompt` tokenized with the projector (``mmproj_path``).

        Media parts: ``{"type": "image_url", "image_url": {"url": ...}}`` with a ``data:``
        URL, a ``file://`` URL or a local path (`allow_files=False` accepts only data URLs);
        ``{"type": "image", "image": bytes | path | Bitmap}``; ``{"type": "input_audio",
        "input_audio": {"data": <base64>, "format": "wav" | "mp3"}}`` for audio projectors.
        Remote http(s) URLs are refused: pyllama makes no network requests.
        """
        self._check_open()
        if not has_media(messages):
            return self.chat_tokens(messages, tools=tools, allow_special_in_messages=allow_special_in_messages,
                                    add_generation_prompt=add_generation_prompt, **kwargs)
        if self.multimodal is None:
            raise MediaError("the messages hold images or audio but this model was loaded without a projector: "
                             "LLM(model, mmproj_path='mmproj.gguf')")
        from pyllama.chat import normalize_messages
        from pyllama.multimodal import chat_media_prompt

        return chat_media_prompt(self._chat_formatter(), self.vocab, self.multimodal, normalize_messages(messages),
                                 allow_files=allow_files, add_generation_prompt=add_generation_prompt,
                                 allow_special_in_messages=allow_special_in_messages, tools=tools, **kwargs)

    @_check_kwargs
    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False,
             response_format: Optional[Mapping[str, Any]] = None, tools: Optional[list] = None,
             tool_choice: Any = None, n: int = 1, logprobs: Union[bool, int, None] = None,
             top_logprobs: Optional[int] = None, callback: Optional[Callable[[str], Any]] = None,
             allow_special_in_messages: bool = False, allow_files: bool = True,
             logits_processors: Optional[Sequence[Callable[..., Any]]] = None,
             stopping_criteria: Optional[Sequence[Callable[..., Any]]] = None, **overrides: Any) -> Any:
        """Answer a conversation using the model's own chat template.

        response_format={"type": "json_object"} constrains the answer to JSON;
        {"type": "json_schema", "json_schema": {"schema": {...}}} (or "schema": {...})
        to a schema.  stream=True returns an iterator of text pieces.  `tools` (OpenAI
        function tools) with `tool_choice` ("auto", "required", "none" or a named
        function) may answer with Completion.tool_calls (see pyllama.tools).  `n`,
        `logprobs`, `top_logprobs`, `callback`, `logits_processors` and `stopping_criteria`
        work as in complete().
        """
        self._check_open()
        overrides = dict(overrides, logits_processors=logits_processors, stopping_criteria=stopping_criteria)
        if response_format is not None:
            overrides.update(_response_format_overrides(response_format))
        if tools and tool_choice != "none":
            from pyllama import tools as tools_mod

            return tools_mod.chat_with_tools(self, messages, tools=tools, tool_choice=tool_choice or "auto",
                                             stream=stream, n=n, logprobs=logprobs, top_logprobs=top_logprobs,
                                             callback=callback, allow_special_in_messages=allow_special_in_messages,
                                             allow_files=allow_files, **overrides)
        tokens = self.chat_prompt(messages, tools=tools or None, allow_special_in_messages=allow_special_in_messages,
                                  allow_files=allow_files)
        if stream:
            return self.stream(tokens, n=n, logprobs=logprobs, top_logprobs=top_logprobs, **overrides)
        return self.complete(tokens, n=n, logprobs=logprobs, top_logprobs=top_logprobs, callback=callback,
                             **overrides)

    def _prepare_chat(self, messages: Sequence[Mapping[str, Any]], *, response_format: Optional[Mapping[str, Any]] = None,
                      allow_special_in_messages: bool = False, allow_files: bool = True,
                      **kwargs: Any) -> "_Prepared":
        if response_format is not None:
            kwargs.update(_response_format_overrides(response_format))
        tokens = self.chat_prompt(messages, allow_special_in_messages=allow_special_in_messages,
                                  allow_files=allow_files)
        return self._prepare_complete(tokens, **kwargs)

    def _prepare_tool_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> "_Prepared":
        """The requests of a chat with tools (pyllama.tools' plan), finishing with its parser."""
        from pyllama import tools as tools_mod

        kwargs.pop("stream", None)   # the result comes whole: the caller streams it, if at all
        plan = tools_mod.plan_tool_chat(self, messages, **kwargs)
        if plan.tools is None:
            return self._prepare_chat(plan.messages, **plan.options)
        prep = self._prepare_complete(plan.prompt, **plan.options)
        complete = prep.finish
        prep.finish = lambda report=True: plan.finish(complete(report=report))
        return prep

    # ---- async ----------------------------------------------------------------------

    async def _arun(self, prep: "_Prepared") -> Any:
        """Run prepared requests without blocking the event loop: the scheduler's driver
        thread steps the engine (batching them with every other caller's requests) and the
        last finishing request wakes this coroutine."""
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        watched = prep.requests
        remaining = set(watched)

        def resolve() -> None:
            if not fut.done():
                fut.set_result(None)

        def listener(r: Any) -> None:   # runs in the thread that holds the stepper role
            if not r.done or not remaining:
                return
            remaining.discard(r)
            for f in r.followers:        # a group that ended together may report only its leader
                if f.done:
                    remaining.discard(f)
            if not remaining:
                try:
                    loop.call_soon_threadsafe(resolve)
                except RuntimeError:   # the event loop is gone: nobody waits any more
                    pass

        for r in watched:
            r.listener = listener
        sched = self._sched
        try:
            for lead in prep.leaders:
                sched.submit(lead, driven=True)
            if not all(r.done for r in watched):
                await fut
        except BaseException:
            sched.cancel(watched)   # a submit that failed, or the task was cancelled
            raise
        return await _finish_off_loop(prep)

    async def acomplete(self, prompt: Union[str, Sequence[int]], **kwargs: Any) -> Any:
        """complete() for asyncio: the event loop keeps running while the model works, and
        other coroutines' requests batch with this one.  Cancelling the task cancels the
        request and frees its sequence."""
        import asyncio

        if kwargs.get("callback") is not None:
            raise TypeError("acomplete() takes no callback: use astream()")
        kwargs.pop("callback", None)
        prep = await asyncio.to_thread(functools.partial(self._prepare_complete, prompt, **kwargs))
        return await self._arun(prep)

    async def achat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Any:
        """chat() for asyncio (for an async stream use astream_chat)."""
        import asyncio

        if kwargs.get("stream"):
            raise ValueError("achat(stream=True): use astream_chat(messages, ...) for an async stream")
        kwargs.pop("stream", None)
        if kwargs.get("callback") is not None:
            raise TypeError("achat() takes no callback: use astream_chat()")
        kwargs.pop("callback", None)
        if kwargs.get("tools") and kwargs.get("tool_choice") != "none":
            # Tool calls are a plan (prompt, grammar, parser) run like any other request: batched,
            # cancelled with the task, and no executor thread held while it generates.
            prep = await asyncio.to_thread(functools.partial(self._prepare_tool_chat, messages, **kwargs))
            return await self._arun(prep)
        kwargs.pop("tools", None)
        kwargs.pop("tool_choice", None)
        prep = await asyncio.to_thread(functools.partial(self._prepare_chat, messages, **kwargs))
        return await self._arun(prep)

    async def agenerate(self, prompts: Sequence[Union[str, Sequence[int]]], **kwargs: Any) -> list:
        """generate() for asyncio."""
        import asyncio

        prep = await asyncio.to_thread(functools.partial(self._prepare_generate, prompts, **kwargs))
        return await self._arun(prep)

    def astream(self, prompt: Union[str, Sequence[int]], **kwargs: Any) -> "AsyncStream":
        """stream() for asyncio: ``async for piece in llm.astream(prompt): ...`` (Chunks with
        chunks=True or n > 1).  Leaving the loop early, or cancelling the task, cancels the
        request."""
        chunks = bool(kwargs.pop("chunks", False))
        mode = "chunks" if chunks or kwargs.get("n", 1) > 1 else "text"
        return AsyncStream(self, functools.partial(self._prepare_complete, prompt, **kwargs), mode)

    def astream_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> "AsyncStream":
        """chat(stream=True) for asyncio."""
        chunks = bool(kwargs.pop("chunks", False))
        kwargs.pop("stream", None)
        if kwargs.get("tools") and kwargs.get("tool_choice") != "none":
            raise ValueError("astream_chat() with tools: tool calls come whole, use achat()")
        kwargs.pop("tools", None)
        kwargs.pop("tool_choice", None)
        mode = "chunks" if chunks or kwargs.get("n", 1) > 1 else "text"
        return AsyncStream(self, functools.partial(self._prepare_chat, messages, **kwargs), mode)

    # ---- embeddings -------------------------------------------------------------------

    def embed(self, texts: Union[str, Sequence[str]], normalize: bool = True) -> Any:
        """Embeddings of one text (1-D array) or many (2-D array, one row per text).
        Needs LLM(..., embedding=True).

        Pooling: as the GGUF says when it names one (BERT-family encoders: CLS or mean, as
        llama.cpp's llama-embedding and llama-server pool them), else mean pooling (decoder
        LMs, which name none).  A reranker (rank pooling) gives its classifier's scores, one
        row of ``n_cls_out`` floats per text (raw unless ``normalize``).

        Texts are packed into batches of at most min(n_batch, n_ctx) tokens (several
        rounds when they do not fit together); a single text longer than that raises
        ContextLengthError (a ValueError) naming the limit."""
        import numpy as np

        self._check_open()
        if not self.embedding:
            raise ValueError("load the model with LLM(..., embedding=True) to compute embeddings")
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not items:
            return np.zeros((0, self._model.n_embd), dtype=np.float32)
        if any(isinstance(t, _core.MediaPrompt) or _is_chat(t) for t in items):
            raise TypeError("embed() takes texts (or token lists), not chats or prompts with images")
        with self._lock:
            toks = [self._prompt_tokens(t) for t in items]
            n_batch = self._ctx_params["n_batch"]
            # One round's tokens must fit the batch and the KV memory together (the context
            # below is unified: every sequence may use any of its n_ctx cells).
            budget = min(self._ctx_params["n_ctx"], n_batch)
            for t in toks:
                if len(t) > budget:
                    raise ContextLengthError(
                        f"a text of {len(t)} tokens exceeds the embedding limit of {budget} tokens "
                        f"(the smaller of n_batch={n_batch} and n_ctx={self._ctx_params['n_ctx']})")
            # The GGUF's own pooling ({arch}.pooling_type: 1 mean, 2 cls, 3 last, 4 rank) when it
            # names one other than none, else mean (decoder LMs name none).
            pooling = {"1": "mean", "2": "cls", "3": "last", "4": "rank"}.get(
                str(self._model.meta(f"{self._model.architecture}.pooling_type")), "mean")
            if pooling == "mean":
                # llama.cpp needs its worst-case micro-batch to split evenly over the sequences
                # (see _embed_slots); with non-causal attention (encoders) that micro-batch is
                # n_batch or n_ctx padded to 256, so take a divisor of all of them.
                split = budget
                if self._model.meta(f"{self._model.architecture}.attention.causal") == "false":
                    split = math.gcd(budget, n_batch, 256)
                n_seq = _embed_slots(min(len(items), 64), split)
            else:
                n_seq = min(len(items), 64, budget)
            if self._embed_ctx is None or self._embed_ctx.n_seq_max < n_seq:
                if self._embed_ctx is not None:
                    self._embed_ctx.close()
                    self._embed_ctx = None
                params = dict(self._ctx_params)
                params["n_ubatch"] = params["n_batch"]
                # kv_unified: with per-sequence KV buffers (kv_unified=False) each sequence would
                # get only n_ctx / n_seq_max cells and one long text of a round would not fit.
                params["kv_unified"] = True
                self._embed_ctx = _core.Context(self._model, embeddings=True, pooling=pooling, n_seq_max=n_seq,
                                                **params)
            ctx = self._embed_ctx
            out = None
            i = 0
            while i < len(toks):
                batch = _core.Batch(budget, ctx.n_seq_max)
                seqs = []
                n_tokens = 0
                while i < len(toks) and len(seqs) < ctx.n_seq_max and n_tokens + len(toks[i]) <= budget:
                    n_tokens += len(toks[i])
                    seqs.append(i)
                    i += 1
                batch.add_sequences([toks[j] for j in seqs], logits_all=True)   # sequence s = seqs[s]
                ctx.kv_clear()   # (a no-op for an encoder: it keeps no KV memory)
                ctx.decode(batch)
                for s, idx in enumerate(seqs):
                    row = ctx.embeddings_seq(s)
                    if out is None:   # n_embd floats, or n_cls_out scores for a reranker
                        out = np.empty((len(items), len(row)), dtype=np.float32)
                    out[idx] = row
            if normalize:
                norms = np.linalg.norm(out, axis=1, keepdims=True)
                out = out / np.where(norms == 0, 1.0, norms)
            return out[0] if single else out


#: Speculative decoding methods pyllama implements: llama-server's --spec-type name for n-gram
#: self-speculation, and "draft" for a draft model (llama-server turns that on with -md).
SPEC_TYPES = ("ngram-simple", "draft")


def _spec_settings(spec_type: Optional[str], draft_max: Any, draft_min: Any, ngram_n: Any,
                   draft_model: Any, draft_p_min: Any = 0.75) -> Optional[dict]:
    """The GenerationRequest arguments of LLM(spec_type=...), checked before anything loads
    (plus "draft_model" and "draft_p_min" for LLM itself when a draft model is given)."""
    for name, value, low, high in (("draft_max", draft_max, 1, 256), ("draft_min", draft_min, 0, 256),
                                   ("spec_ngram_size_n", ngram_n, 1, 64)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")
    if draft_min > draft_max:
        raise ValueError(f"draft_min ({draft_min}) must not exceed draft_max ({draft_max})")
    if (not isinstance(draft_p_min, (int, float)) or isinstance(draft_p_min, bool)
            or not 0.0 <= draft_p_min <= 1.0):
        raise ValueError(f"draft_p_min must be a number in [0, 1], got {draft_p_min!r}")
    if draft_model is not None and not isinstance(draft_model, (str, os.PathLike)) and not callable(draft_model):
        raise TypeError("draft_model must be a GGUF path, a known model name or a drafter(token_ids, limit) "
                        f"callable, got {type(draft_model).__name__}")
    if spec_type is None and draft_model is not None:
        spec_type = "draft"          # as llama-server: -md alone turns draft-model speculation on
    if spec_type in (None, "none"):
        if draft_model is not None:
            raise ValueError("draft_model was given but spec_type='none' turns speculation off")
        return None
    if spec_type not in SPEC_TYPES:
        raise ValueError(f"unknown spec_type {spec_type!r}: pyllama implements {', '.join(SPEC_TYPES)} "
                         "(or None for plain decoding)")
    if spec_type == "draft" and draft_model is None:
        raise ValueError("spec_type='draft' needs draft_model (a GGUF with the target's vocabulary)")
    if spec_type != "draft" and draft_model is not None:
        raise ValueError(f"draft_model is for spec_type='draft', not {spec_type!r}")
    spec = {"draft_max": draft_max, "draft_min": draft_min, "ngram_n": ngram_n}
    if spec_type == "draft" and callable(draft_model):
        spec.update(drafter=draft_model)    # the caller's own draft source, called per request
    elif spec_type == "draft":
        spec.update(draft_model=draft_model, draft_p_min=float(draft_p_min))
    return spec


def _is_chat(prompt: Any) -> bool:
    """A list of message dicts (generate() takes chats among its prompts)."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], Mapping))


def _check_n_parallel(n_parallel: Any, n_batch: int) -> None:
    """n_parallel sequences must be possible: llama.cpp's own limit, and one batch row each
    (llama.cpp reserves n_seq_max outputs per batch: more sequences than n_batch abort it)."""
    if not isinstance(n_parallel, int) or isinstance(n_parallel, bool) or n_parallel < 1:
        raise ValueError(f"n_parallel must be an int >= 1, got {n_parallel!r}")
    if n_parallel > _core.max_parallel_sequences():
        raise ValueError(f"n_parallel={n_parallel} exceeds llama.cpp's limit of "
                         f"{_core.max_parallel_sequences()} sequences (n_seq_max)")
    if n_parallel > n_batch:
        raise ValueError(f"n_parallel={n_parallel} exceeds n_batch={n_batch}: every sequence needs room in a "
                         "batch; raise n_batch or lower n_parallel")


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




class _Prepared:
    """Requests built for one call: the leaders to submit, every request to watch (followers
    included, in answer order) and how to turn them into the call's result."""

    __slots__ = ("leaders", "requests", "finish")

    def __init__(self, leaders: list, requests: list, finish: Callable[[], Any]) -> None:
        self.leaders = leaders
        self.requests = [r for lead in leaders for r in [lead, *lead.followers]] if requests is leaders else requests
        self.finish = finish


class _Cursor:
    """How much of one request a consumer has seen: pieces, tokens, logprob entries.
    Reading from a cursor is O(new items), never O(everything so far)."""

    __slots__ = ("parts", "tokens", "logprobs", "finished")

    def __init__(self) -> None:
        self.parts = self.tokens = self.logprobs = 0
        self.finished = False

    def take(self, llm: LLM, r: Any, index: int, mode: str) -> Optional[Any]:
        """The next item for a consumer in `mode` ("text", "events", "chunks"), or None."""
        # `done` first: once it is seen, every piece is already there.  Each count is read
        # once (another thread may be stepping), so no piece is skipped or taken twice.
        done = r.done
        pieces = r.parts_since(self.parts)
        self.parts += len(pieces)
        text = "".join(pieces)
        finish = r.finish_reason if done and not self.finished else None
        if finish is not None:
            self.finished = True
        if mode == "text":
            return text or None
        if mode == "events":
            return (index, text) if text else None
        token_ids = r.tokens_since(self.tokens)
        self.tokens += len(token_ids)
        logprobs = None
        if r.n_logprobs >= 0:
            entries = r.logprobs_since(self.logprobs)
            self.logprobs += len(entries)
            logprobs = [llm._token_logprob(e) for e in entries]
        if not text and not token_ids and not logprobs and finish is None:
            return None
        if finish == "cancelled":   # the consumer cancelled it: no finish to report
            finish = None
        return Chunk(index=index, text=text, token_ids=token_ids, logprobs=logprobs, finish_reason=finish)


class Stream:
    """Iterator over a running generation (LLM.stream / chat(stream=True) / generate_stream).

    It advances only while it is iterated: between next() calls its requests are paused,
    so a stream left open costs other callers nothing (its slot is lent out if needed and
    its KV cells re-used when it resumes)."""

    def __init__(self, llm: LLM, prep: _Prepared, mode: str) -> None:
        self._llm = llm
        self._prep = prep
        self._reqs = prep.requests
        self._mode = mode
        self._cursors = [_Cursor() for _ in self._reqs]
        self._events: deque = deque()
        self._started = False
        self._finished = False
        self._reported = False
        self.completion: Optional[Completion] = None
        self.completions: Optional[list] = None

    def __iter__(self) -> "Stream":
        return self

    def _collect(self) -> bool:
        for i, r in enumerate(self._reqs):
            item = self._cursors[i].take(self._llm, r, i if self._mode != "events" else r.tag, self._mode)
            if item is not None:
                self._events.append(item)
        return bool(self._events)

    def __next__(self) -> Any:
        llm = self._llm
        while not self._events:
            if self._finished:
                if not self._reported:   # verbose timings after the last piece, not before it
                    self._reported = True
                    if llm.verbose:
                        for c in self.completions or ():
                            print(c.timings.format(), file=sys.stderr, flush=True)
                raise StopIteration
            llm._check_open()
            sched = llm._sched
            if sched.in_step():
                raise RuntimeError("a stream cannot be advanced from inside an LLM listener")
            reqs = self._reqs
            try:
                if not self._started:
                    self._started = True
                    for lead in self._prep.leaders:
                        sched.submit(lead)
                else:
                    sched.set_paused(reqs, False)
                sched.drive(lambda: self._collect() or all(r.done for r in reqs))
            except BaseException:
                self._finished = True
                sched.cancel(reqs)
                raise
            if all(r.done for r in reqs):
                self._collect()
                self._finished = True
                comps = self._prep.finish(report=False)   # timings are printed after the last piece
                self.completions = comps if isinstance(comps, list) else [comps]
                self.completion = self.completions[0] if len(self.completions) == 1 or self._mode != "events" \
                    else None
                if self._mode == "events":
                    self.completion = None
            else:
                sched.set_paused([r for r in reqs if not r.done], True)
        return self._events.popleft()

    def close(self) -> None:
        """Stop generating (the unfinished requests are cancelled, their slots freed)."""
        if not self._finished and self._started:
            sched = self._llm._sched
            if sched is not None:
                sched.cancel(self._reqs)
        self._finished = True
        self._reported = True

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._started and not self._finished:
            try:
                self._llm._sched.cancel_soon(self._reqs)
            except Exception:   # noqa: BLE001 - interpreter teardown
                pass


_END = object()


class AsyncStream:
    """Async iterator over a running generation (LLM.astream / astream_chat).  The driver
    thread steps the engine; each step's new text reaches this iterator through the event
    loop, so the loop never waits on llama.cpp.

    Backpressure: once `max_queued` pieces wait unread, the stream's requests are paused
    (they leave the batch and may lend their slot out, as a synchronous Stream between
    next() calls); reading resumes them.  Leaving the loop early (``break``), dropping the
    stream, or cancelling the task that reads it cancels the requests."""

    #: Unread pieces after which the requests pause (reading them down to a quarter resumes).
    max_queued = 64

    def __init__(self, llm: LLM, prepare: Callable[[], _Prepared], mode: str) -> None:
        self._llm = llm
        self._prepare = prepare
        self._mode = mode
        self._prep: Optional[_Prepared] = None
        self._queue: Any = None
        self._flow: Optional[_Flow] = None
        self._done = False
        self._submitted = False
        self.completion: Optional[Completion] = None
        self.completions: Optional[list] = None

    def __aiter__(self) -> "AsyncStream":
        return self

    async def _start(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        self._prep = prep = await asyncio.to_thread(self._prepare)
        self._queue = queue = asyncio.Queue()
        reqs = prep.requests
        cursors = [_Cursor() for _ in reqs]
        index = {id(r): i for i, r in enumerate(reqs)}
        llm = self._llm
        mode = self._mode
        counted = [False] * len(reqs)
        n_done = [0]
        # What the listener needs lives here, not on self: the stream can then be collected
        # (and cancelled by __del__) as soon as its reader drops it.
        self._flow = flow = _Flow(llm._sched, reqs, self.max_queued)
        mailbox = _Mailbox.of(loop)

        def pump(i: int, items: list) -> None:
            r = reqs[i]
            item = cursors[i].take(llm, r, i, mode)
            if item is not None:
                items.append(item)
            if r.done and not counted[i]:
                counted[i] = True
                n_done[0] += 1
                if n_done[0] == len(reqs):
                    items.append(_END)

        def listener(r: Any) -> None:   # runs in the thread that holds the stepper role
            items: list = []
            pump(index[id(r)], items)
            if r.done:
                for f in r.followers:    # a group that ended together may report only its leader
                    i = index.get(id(f))
                    if i is not None and f.done and not counted[i]:
                        pump(i, items)
            if items:
                flow.queued(len(items))   # may pause the requests: before the reader can see them
                if not mailbox.post(queue, items, lambda: llm._sched.cancel(reqs)):
                    llm._sched.cancel(reqs)          # the event loop is closed: nobody reads any more

        for r in reqs:
            r.listener = listener
        self._submitted = True
        for lead in prep.leaders:
            llm._sched.submit(lead, driven=True)
        if all(r.done for r in reqs):      # finished at submit (max_tokens=0)
            for r in reqs:
                listener(r)

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._prep is None:
                await self._start()
            item = await self._queue.get()
        except BaseException:
            self._cancel()
            raise
        self._flow.read(1)
        if item is _END:
            await self._finish()
            raise StopAsyncIteration
        return item

    async def _finish(self) -> None:
        self._done = True
        comps = await _finish_off_loop(self._prep)
        self.completions = comps if isinstance(comps, list) else [comps]
        self.completion = self.completions[0]

    def _cancel(self) -> None:
        if not self._done:
            self._done = True
            if self._prep is not None and self._submitted:
                self._llm._sched.cancel(self._prep.requests)

    async def aclose(self) -> None:
        """Stop generating (cancels the unfinished requests)."""
        self._cancel()

    def __del__(self) -> None:
        if not getattr(self, "_done", True) and self._prep is not None and self._submitted:
            try:
                self._llm._sched.cancel_soon(self._prep.requests)
            except Exception:   # noqa: BLE001 - interpreter teardown
                pass


class _Flow:
    """Backpressure of one AsyncStream: pieces put by the stepping thread, pieces read by
    the event loop; the requests pause while `limit` wait unread.  Each counter has one
    writer; the pause decision and its undoing share a small lock, so a paused request is
    always resumed once its reader has caught up."""

    __slots__ = ("sched", "reqs", "limit", "n_put", "n_read", "paused", "lock")

    def __init__(self, sched: Scheduler, reqs: list, limit: int) -> None:
        self.sched = sched
        self.reqs = reqs
        self.limit = max(1, int(limit))
        self.n_put = 0
        self.n_read = 0
        self.paused = False
        self.lock = threading.Lock()

    def queued(self, n: int) -> None:
        """`n` items are about to be queued (the stepping thread, between steps)."""
        # Both counters are read under the lock on both sides: a pause decided on a stale
        # n_read after the reader had caught up would never be undone (the reader then waits
        # for pieces that a paused request never makes).
        with self.lock:
            self.n_put += n
            if not self.paused and self.n_put - self.n_read >= self.limit:
                self.paused = True
                for r in self.reqs:
                    if not r.done:
                        r.paused = True

    def read(self, n: int) -> None:
        """The reader took `n` items (the event loop)."""
        with self.lock:
            self.n_read += n
            if self.paused and self.n_put - self.n_read <= self.limit // 4:
                self.paused = False
                self.sched.set_paused(self.reqs, False)


async def _finish_off_loop(prep: _Prepared) -> Any:
    """The call's result; built in a worker thread when it has log-probabilities (thousands of
    objects for a long answer), so the event loop never stalls on it."""
    if any(r.n_logprobs >= 0 or r.prompt_logprobs for r in prep.requests):
        import asyncio

        return await asyncio.to_thread(prep.finish)
    return prep.finish()


class _Mailbox:
    """Hands pieces from the stepping thread to one event loop, waking the loop once per
    dispatch, after the last listener (scheduler.defer_until_dispatched): a step that feeds 32
    streams of one loop costs one ``call_soon_threadsafe``, not 32, and the loop thread does
    not wake up to compete for the GIL while the other listeners still run.  Order is kept:
    the posts of every stream are drained first in, first out."""

    __slots__ = ("loop_ref", "lock", "pending", "scheduled", "__weakref__")
    _by_loop: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _by_loop_lock = threading.Lock()

    def __init__(self, loop: Any) -> None:
        self.loop_ref = weakref.ref(loop)   # the table's value must not keep its key alive
        self.lock = threading.Lock()
        self.pending: list = []
        self.scheduled = False

    @classmethod
    def of(cls, loop: Any) -> "_Mailbox":
        with cls._by_loop_lock:
            box = cls._by_loop.get(loop)
            if box is None:
                box = cls._by_loop[loop] = cls(loop)
            return box

    def post(self, queue: Any, items: list, on_lost: Callable[[], Any]) -> bool:
        """Queue `items` into the asyncio `queue` (any thread).  False: the loop is closed.
        `on_lost()` runs if the loop closes before the wake-up reaches it."""
        loop = self.loop_ref()
        with self.lock:
            if loop is None or loop.is_closed():
                return False
            self.pending.append((queue, items, on_lost))
            if self.scheduled:      # a wake-up is on its way and will take these too
                return True
            self.scheduled = True
        if not defer_until_dispatched(self._wake):
            self._wake()
        return True

    def _wake(self) -> None:
        loop = self.loop_ref()
        try:
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:        # closed meanwhile: nobody will drain what was posted
            with self.lock:
                lost, self.pending = self.pending, []
                self.scheduled = False
            for _queue, _items, on_lost in lost:
                on_lost()

    def _drain(self) -> None:       # in the event loop
        with self.lock:
            batch, self.pending = self.pending, []
            self.scheduled = False
        for queue, items, _on_lost in batch:
            for item in items:
                queue.put_nowait(item)


class _Counters:
    """Totals for LLM.metrics()."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.prompt_ms = 0.0
        self.predicted_tokens = 0
        self.predicted_ms = 0.0
        self.requests = 0
        self.decodes_before = 0    # from engines replaced by a re-created context
        self.busy_before = 0

    def add(self, t: Timings) -> None:
        self.requests += 1
        self.prompt_tokens += t.prompt_n
        self.prompt_ms += t.prompt_ms
        self.predicted_tokens += t.predicted_n
        self.predicted_ms += t.predicted_ms


# Every open LLM, so that interpreter exit closes them before daemon threads and module
# teardown can free memory under a running decode.
_live_llms: "weakref.WeakSet[LLM]" = weakref.WeakSet()
_immortal: list = []


def _keep_forever(obj: Any) -> None:
    """Never free `obj` (a context a stuck step still uses): one leak at exit beats a crash."""
    import ctypes

    _immortal.append(obj)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


@atexit.register
def _close_all_at_exit() -> None:
    for llm in list(_live_llms):
        try:
            llm.close()
        except Exception:   # noqa: BLE001 - exit must go on
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
