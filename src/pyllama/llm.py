"""The LLM class: a GGUF model ready to generate, with the names users already type.

    from pyllama import LLM
    llm = LLM(model_path="model.gguf", n_ctx=2048, temperature=0)
    print(llm("The capital of France is", max_tokens=16))

This module is the facade: loading, the context's lifetime and the public methods.  The work
behind them lives next door: pyllama._requests builds engine requests from a call's arguments
(and prepares every chat), pyllama.streams runs them (blocking, streamed, async),
pyllama.results holds what they return, pyllama.embeddings computes embeddings and
pyllama._lifecycle closes what is left open at exit.  The generation loop itself is Cython
(pyllama._core).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import threading
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from pyllama import _core
from pyllama import _requests as rq
from pyllama import embeddings, gpu, infill, rerank, streams
from pyllama._lifecycle import Counters, keep_forever, live_llms
from pyllama._requests import check_kwargs as _check_kwargs
from pyllama.errors import MediaError
from pyllama.log import enable_logging
from pyllama.multimodal import has_media
from pyllama.results import Chunk, Completion, Timings, TokenLogprob, TopLogprob, completion_from
from pyllama.sampling import SamplingParams
from pyllama.scheduler import ClosedError, Scheduler
from pyllama.streams import AsyncStream, Stream

__all__ = ["LLM", "AsyncStream", "Chunk", "Completion", "Stream", "Timings", "TokenLogprob", "TopLogprob"]

logger = logging.getLogger("pyllama")


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
        pooling: Optional[str] = None,
        swa_full: bool = False,
        chat_template: Optional[str] = None,
        cache_prompt: bool = True,
        cache_ram_mib: int = 0,
        cache_idle_slots: bool = True,
        slot_prompt_similarity: float = 0.1,
        context_shift: bool = False,
        spec_type: Optional[str] = None,
        draft_max: int = 16,
        draft_min: int = 0,
        spec_ngram_size_n: int = 3,
        draft_model: Union[str, os.PathLike, None] = None,
        draft_p_min: float = 0.0,
        spec_cost_model: bool = True,
        spec_synth_rates: Optional[Sequence[float]] = None,
        spec_synth_len: Optional[float] = None,
        require_gpu: bool = False,
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
        rq.resolve_grammar(self.defaults)   # a bad grammar fails here, before loading

        self._spec = rq.spec_settings(spec_type, draft_max, draft_min, spec_ngram_size_n, draft_model, draft_p_min,
                                      spec_synth_rates, spec_synth_len)
        if not isinstance(spec_cost_model, bool):
            raise TypeError(f"spec_cost_model must be True or False, got {spec_cost_model!r}")
        # True: each step drafts the length that pays on this machine (the engine's measured
        # decode cost by batch size); False: as llama.cpp, up to draft_max whatever it costs.
        self._spec_cost_model = spec_cost_model
        self._draft_weights: Optional[_core.Model] = None     # the draft model's weights (spec_type="draft")
        self._drafter = None                                  # its DraftModel, made with the context
        pooling = embeddings.check_pooling(pooling)
        if not isinstance(n_batch, int) or isinstance(n_batch, bool) or n_batch < 1:
            raise ValueError(f"n_batch must be an int >= 1, got {n_batch!r}")
        if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 0):
            raise ValueError(f"n_ctx must be an int >= 0 (0 = the model's training context), got {n_ctx!r}")
        if n_ubatch is not None and (not isinstance(n_ubatch, int) or n_ubatch < 1):
            raise ValueError(f"n_ubatch must be an int >= 1, got {n_ubatch!r}")
        if not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
            raise ValueError(f"n_gpu_layers must be -1 (all) or >= 0, got {n_gpu_layers!r}")
        rq.check_n_parallel(n_parallel, n_batch)
        # Host-memory prompt cache (llama-server's --cache-ram MiB, -1: no byte limit; 0: none).
        self._cache_ram = rq.prompt_cache_settings(cache_ram_mib, cache_idle_slots)
        self._slot_similarity = rq.slot_similarity(slot_prompt_similarity)   # _engine_pick_slot
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

        # Never silently on the CPU: n_gpu_layers asks for a device that this build or machine
        # lacks -> one warning (or GPUUnavailableError with require_gpu), before anything loads.
        if not isinstance(require_gpu, bool):
            raise TypeError(f"require_gpu must be True or False, got {require_gpu!r}")
        gpu_now = gpu.gpu_status()
        gpu.check_offload(n_gpu_layers, require_gpu, gpu_now)
        gpu.check_devices(n_gpu_layers, main_gpu, list(tensor_split) if tensor_split is not None else None, gpu_now)

        self._model = _core.Model(
            self.model_path, n_gpu_layers=n_gpu_layers, split_mode=split_mode, main_gpu=main_gpu,
            tensor_split=tensor_split, use_mmap=use_mmap, use_mlock=use_mlock, vocab_only=vocab_only,
            kv_overrides=dict(kv_overrides) if kv_overrides else None)
        self._closed = False
        self.vocab = self._model.vocab
        #: Where the layers went (llama.cpp's placement): ``str(llm.offload)`` reads
        #: "offloaded 31/31 layers to CUDA:CUDA0"; ``n_offloaded``, ``on_cpu``, ``devices``.
        self.offload = gpu.plan_offload(n_gpu_layers, self._model.n_layer, gpu_now)
        gbnf = rq.resolve_grammar(self.defaults)
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
        self._stats = Counters()

        n_ctx_train = self._model.n_ctx_train
        if n_ctx is None:
            n_ctx = min(n_ctx_train, rq.DEFAULT_N_CTX_CAP) if n_ctx_train > 0 else 2048
        elif n_ctx == 0:
            n_ctx = n_ctx_train
        self._ctx_params = dict(
            n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch or n_batch, n_threads=n_threads,
            n_threads_batch=n_threads_batch, type_k=type_k or "f16", type_v=type_v or "f16", flash_attn=flash_attn,
            kv_unified=bool(kv_unified), rope_freq_base=rope_freq_base, rope_freq_scale=rope_freq_scale,
            swa_full=bool(swa_full))
        self._ctx: Optional[_core.Context] = None
        self._engine: Optional[_core.Engine] = None
        self._sched: Optional[Scheduler] = None
        self._embed_ctx: Optional[_core.Context] = None
        self.embedding = embedding
        #: embed()'s pooling: None = as the GGUF says (llama-server's --pooling)
        self.pooling = pooling
        self.cache_prompt = bool(cache_prompt)
        self.context_shift = bool(context_shift)    # a full slot drops half its older tokens (_engine_shift)
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
        if self._spec is not None and not vocab_only and (self._model.is_recurrent or self._model.is_hybrid):
            # Rejected drafts must leave the sequence: a recurrent state cannot drop them.
            warnings.warn(f"spec_type={spec_type or 'draft'!r} is ignored: this model is recurrent or hybrid "
                          "(its memory cannot drop rejected draft tokens); generating without speculative "
                          "decoding", RuntimeWarning, stacklevel=2)
            self._spec = None
        if self._spec is not None and self._spec.get("draft_model") is not None:
            try:
                from pyllama.speculative import load_draft_weights

                self._draft_weights = load_draft_weights(self.vocab, self._spec.pop("draft_model"), n_gpu_layers,
                                                         vocab_only)
                if self._draft_weights is None:
                    self._spec = None
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
        live_llms.add(self)

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
        from . import hub

        del local_dir_use_symlinks  # accepted for llama-cpp-python code; nothing to do
        path, projector = hub.pretrained_files(
            repo_id, filename, additional_files, mmproj=mmproj and kwargs.get("mmproj_path") is None,
            revision=revision, cache_dir=cache_dir, local_dir=local_dir, token=token, progress=progress)
        if projector is not None:
            kwargs["mmproj_path"] = projector
        return cls(path, **kwargs)

    # ---- lifecycle -----------------------------------------------------------

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
        self._engine.context_shift, self._engine.slot_similarity = self.context_shift, self._slot_similarity
        if self._cache_ram is not None:      # (a new context: the old one's states may not fit it)
            self._engine.prompt_cache = _core.PromptCache(self._cache_ram[0], self._ctx.n_ctx, self._cache_ram[1])
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
                    keep_forever(self)
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
        live_llms.discard(self)

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

    def save_slot(self, slot: int, path: Union[str, "os.PathLike[str]"]) -> int:
        """Save idle slot `slot`'s prompt cache (its KV cells and their tokens) to `path`, as
        llama-server's slot save does (its file format); returns how many tokens it holds."""
        self._check_open()
        return self._engine.save_slot(slot, os.fspath(path))

    def restore_slot(self, slot: int, path: Union[str, "os.PathLike[str]"]) -> int:
        """Load a slot file (save_slot's or llama-server's) into idle slot `slot`: the next
        prompt that starts with its tokens reuses them.  Returns how many tokens it holds."""
        self._check_open()
        return self._engine.restore_slot(slot, os.fspath(path))

    def prompt_cache_info(self) -> Optional[dict]:
        """The host-memory prompt cache (``cache_ram_mib``): entries, tokens, bytes, limits,
        how many prompts were saved into it and loaded back; None without one."""
        self._check_open()
        pc = self._engine.prompt_cache
        return None if pc is None else pc.info()

    def metrics(self) -> dict:
        """Counters since load, with llama-server's metric names."""
        self._check_open()
        eng = self._engine
        s = self._stats
        busy = sum(1 for info in eng.slot_info() if info["busy"])
        return {
            "prompt_tokens_total": s.prompt_tokens, "prompt_seconds_total": s.prompt_ms / 1000.0,
            "prompt_tokens_cached_total": s.cached_tokens, "n_tokens_max": s.n_tokens_max,
            "tokens_predicted_total": s.predicted_tokens,
            "tokens_predicted_seconds_total": s.predicted_ms / 1000.0,
            "n_decode_total": eng.n_decode_total + s.decodes_before,
            "n_busy_slots_total": eng.n_busy_slots_total + s.busy_before,
            "n_busy_slots_per_decode": ((eng.n_busy_slots_total + s.busy_before)
                                        / max(1, eng.n_decode_total + s.decodes_before)),
            "requests_processing": busy, "requests_deferred": eng.n_waiting,
            "requests_total": s.requests, "spec_decode_num_draft_tokens_total": s.drafted,
            "spec_decode_num_accepted_tokens_total": s.draft_accepted, "spec_decode_num_drafts_total": s.draft_steps,
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

    # ---- building and running requests (pyllama._requests, pyllama.streams) -------------

    def _params(self, overrides: Mapping[str, Any]) -> SamplingParams:
        if not overrides:
            return self.defaults
        return self.defaults.replace(**overrides)

    def _prompt_tokens(self, prompt: Union[str, Sequence[int]], add_special: bool = True,
                       parse_special: bool = False) -> Any:
        return rq.prompt_tokens(self, prompt, add_special, parse_special)

    def _request(self, prompt: Any, params: SamplingParams, tag: Any = None,
                 **kwargs: Any) -> "_core.GenerationRequest":
        # Every request is built through this method: wrapping it sees them all.
        return rq.build_request(self, prompt, params, tag, **kwargs)

    def _completion(self, req: "_core.GenerationRequest", t_start: float, report: bool = True,
                    index: int = 0, echo_text: Optional[str] = None) -> Completion:
        if req.error is not None:
            raise req.error
        if req.finish_reason == "cancelled":
            raise ClosedError("this LLM was closed while the call was running") if self._closed else \
                RuntimeError("the request was cancelled")
        comp = completion_from(req, self.vocab, t_start=t_start, load_ms=self.load_ms if self._first_call else 0.0,
                               index=index, echo_text=echo_text)
        self._first_call = False
        self._stats.add(comp.timings, len(comp.tokens), req.n_draft_steps)
        if report and self.verbose:
            print(comp.timings.format(), file=sys.stderr, flush=True)
        return comp

    # ---- generation ---------------------------------------------------------------

    def _prepare_complete(self, prompt: Union[str, Sequence[int]], *, add_special: bool = True,
                          parse_special: bool = False, n: int = 1, logprobs: Union[bool, int, None] = None,
                          top_logprobs: Optional[int] = None, echo: bool = False,
                          logits_processors: Optional[Sequence[Callable[..., Any]]] = None,
                          stopping_criteria: Optional[Sequence[Callable[..., Any]]] = None,
                          **overrides: Any) -> rq.Prepared:
        self._check_open()
        params = self._params(overrides)
        lp = rq.logprobs_arg(logprobs, top_logprobs)
        hooks = {"logits_processors": logits_processors, "stopping_criteria": stopping_criteria}
        group = rq.build_group(self, prompt, params, n=n, logprobs=lp, echo=echo, add_special=add_special,
                               parse_special=parse_special, hooks=hooks)
        rq.ensure_slots(self, n)
        echo_text = self._echo_text(prompt, group[0]) if echo else None
        t0 = time.perf_counter()

        def finish(report: bool = True) -> Any:
            comps = [self._completion(r, t0, report=report, index=i, echo_text=echo_text)
                     for i, r in enumerate(group)]
            return comps[0] if n == 1 else comps

        return rq.Prepared([group[0]], group, finish)

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
        `logprobs=True` (with `top_logprobs=K`, 0..20) fills Completion.logprobs, of the model's
        own distribution (`post_sampling_probs=True`: of the one the sampler chain left); with
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
        streams.run(self, prep.leaders, cb)
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
               stopping_criteria: Optional[Sequence[Callable[..., Any]]] = None, prompt_progress: bool = False,
               **overrides: Any) -> "Stream":
        """Yield the completion piece by piece (whole characters; a stop string never leaks).

        The stream advances only while it is iterated: left open, it holds no other call
        up.  With `chunks=True` (implied by n > 1) it yields :class:`Chunk` objects that
        carry the choice index, token ids and log-probabilities; `prompt_progress=True` adds
        chunks with no text whose Chunk.prompt_progress reports the prompt's evaluation
        (llama-server's return_progress: where it starts, then each n_batch chunk).  Once
        exhausted, the iterator exposes the final Completion as `.completion` (all of them as
        `.completions`); `.close()` stops it early.  `logits_processors` and
        `stopping_criteria` work as in complete().
        """
        prep = self._prepare_complete(prompt, add_special=add_special, parse_special=parse_special, n=n,
                                      logprobs=logprobs, top_logprobs=top_logprobs,
                                      logits_processors=logits_processors, stopping_criteria=stopping_criteria,
                                      **overrides)
        return Stream(self, prep, mode="chunks" if chunks or n > 1 else "text", prompt_progress=prompt_progress)

    # ---- batched generation ---------------------------------------------------------

    def _prepare_generate(self, prompts: Sequence[Union[str, Sequence[int]]], *, n_parallel: Optional[int] = None,
                          per_prompt: Optional[Sequence[Mapping[str, Any]]] = None, share_prefix: bool = True,
                          logprobs: Union[bool, int, None] = None, top_logprobs: Optional[int] = None,
                          **overrides: Any) -> rq.Prepared:
        if isinstance(prompts, (str, bytes)):
            raise TypeError("generate() takes a list of prompts; use complete() for one")
        reqs = rq.batch_requests(self, prompts, per_prompt, overrides, n_parallel, share_prefix,
                                 rq.logprobs_arg(logprobs, top_logprobs))
        t0 = time.perf_counter()
        return rq.Prepared(reqs, reqs, lambda report=True: [self._completion(r, t0, report=report, index=i)
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
        streams.run(self, prep.leaders)
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

    @_check_kwargs
    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, chunks: bool = False,
             response_format: Optional[Mapping[str, Any]] = None, tools: Optional[list] = None,
             tool_choice: Any = None, n: int = 1, logprobs: Union[bool, int, None] = None,
             top_logprobs: Optional[int] = None, callback: Optional[Callable[[str], Any]] = None,
             allow_special_in_messages: bool = False, allow_files: bool = True,
             reasoning_format: str = "auto", reasoning_budget: int = -1,
             chat_template_kwargs: Optional[Mapping[str, Any]] = None,
             continue_final_message: bool = False, add_generation_prompt: bool = True,
             logits_processors: Optional[Sequence[Callable[..., Any]]] = None,
             stopping_criteria: Optional[Sequence[Callable[..., Any]]] = None, prompt_progress: bool = False,
             **overrides: Any) -> Any:
        """Answer a conversation using the model's own chat template.

        response_format={"type": "json_object"} constrains the answer to JSON;
        {"type": "json_schema", "json_schema": {"schema": {...}}} (or "schema": {...})
        to a schema.  stream=True returns an iterator of text pieces (:class:`Chunk` objects
        with chunks=True or n > 1).  `tools` (OpenAI function tools) with `tool_choice`
        ("auto", "required", "none" or a named function) may answer with
        Completion.tool_calls (see pyllama.tools); with tools the answer comes whole
        (stream=True yields its content once).  `n`, `logprobs`, `top_logprobs`, `callback`,
        `logits_processors` and `stopping_criteria` work as in complete().

        Reasoning models (docs/chat.md, "Reasoning models"): with `reasoning_format` "auto"
        (the default, for templates that think) or "deepseek", the thinking goes to
        Completion.reasoning and Completion.text holds the answer; streamed, text pieces and
        `callback` get the answer only and Chunks carry the thinking in Chunk.reasoning.
        "none" keeps the thinking in the text; "deepseek-legacy" keeps it there and fills
        Completion.reasoning too.  `reasoning_budget`: -1 unlimited, 0 no thinking, N at most
        N thinking tokens (then the end marker is forced and the answer follows).
        `chat_template_kwargs` are template variables (``{"enable_thinking": False}``).
        `continue_final_message=True` continues a final assistant message (the answer starts
        after its text, as llama-server does); add_generation_prompt=False omits the header.
        `prompt_progress` (stream=True with Chunks) as in stream().
        """
        call = rq.prepare_chat(self, messages, stream=stream, response_format=response_format, tools=tools,
                               tool_choice=tool_choice, allow_special_in_messages=allow_special_in_messages,
                               allow_files=allow_files, reasoning_format=reasoning_format,
                               reasoning_budget=reasoning_budget, chat_template_kwargs=chat_template_kwargs,
                               continue_final_message=continue_final_message,
                               add_generation_prompt=add_generation_prompt, n=n, logprobs=logprobs, top_logprobs=top_logprobs,
                               logits_processors=logits_processors, stopping_criteria=stopping_criteria,
                               **overrides)
        if stream and not call.whole:
            prep = rq.finish_chat(self._prepare_complete(call.prompt, **call.options), call)
            inner = Stream(self, prep, mode="chunks" if chunks or n > 1 else "text", prompt_progress=prompt_progress)
            if call.reasoning is None or not call.reasoning.reports:
                return inner
            from pyllama.chat.reasoning import ReasoningStream

            return ReasoningStream(inner, call.reasoning)
        flush = None
        if callback is not None and n == 1 and call.reasoning is not None and call.reasoning.separates:
            from pyllama.chat.reasoning import answer_callback

            callback, flush = answer_callback(callback, call.reasoning)
        result = self.complete(call.prompt, callback=callback, **call.options)
        if flush is not None:
            flush()
        return result if call.finish is None else call.finish(result)

    def _prepare_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> rq.Prepared:
        """The requests of a chat (rq.prepare_chat, the one chat preparation), finishing with
        the tools plan's parser and the thinking's split when there are some."""
        call = rq.prepare_chat(self, messages, **kwargs)
        return rq.finish_chat(self._prepare_complete(call.prompt, **call.options), call)

    # ---- async ----------------------------------------------------------------------

    async def _arun(self, prep: rq.Prepared) -> Any:
        return await streams.arun(self, prep)

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
        """chat() for asyncio (for an async stream use astream_chat).  Tool calls are a plan
        (prompt, grammar, parser) run like any other request: batched, cancelled with the task,
        and no executor thread held while it generates."""
        import asyncio

        if kwargs.get("stream"):
            raise ValueError("achat(stream=True): use astream_chat(messages, ...) for an async stream")
        kwargs.pop("stream", None)
        if kwargs.get("callback") is not None:
            raise TypeError("achat() takes no callback: use astream_chat()")
        kwargs.pop("callback", None)
        prep = await asyncio.to_thread(functools.partial(self._prepare_chat, messages, **kwargs))
        return await self._arun(prep)

    async def agenerate(self, prompts: Sequence[Union[str, Sequence[int]]], **kwargs: Any) -> list:
        """generate() for asyncio."""
        import asyncio

        prep = await asyncio.to_thread(functools.partial(self._prepare_generate, prompts, **kwargs))
        return await self._arun(prep)

    def astream(self, prompt: Union[str, Sequence[int]], **kwargs: Any) -> AsyncStream:
        """stream() for asyncio: ``async for piece in llm.astream(prompt): ...`` (Chunks with
        chunks=True or n > 1).  Leaving the loop early, or cancelling the task, cancels the
        request.  `prompt_progress=True` (with Chunks) adds chunks that report the prompt's
        evaluation (Chunk.prompt_progress, llama-server's return_progress)."""
        chunks, progress = bool(kwargs.pop("chunks", False)), bool(kwargs.pop("prompt_progress", False))
        mode = "chunks" if chunks or kwargs.get("n", 1) > 1 else "text"
        return AsyncStream(self, functools.partial(self._prepare_complete, prompt, **kwargs), mode, progress)

    def astream_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Any:
        """chat(stream=True) for asyncio (an AsyncStream; Chunks with chunks=True carry a
        reasoning model's thinking in Chunk.reasoning; prompt_progress as in astream)."""
        chunks, progress = bool(kwargs.pop("chunks", False)), bool(kwargs.pop("prompt_progress", False))
        kwargs.pop("stream", None)
        if kwargs.get("tools") and kwargs.get("tool_choice") != "none":
            raise ValueError("astream_chat() with tools: tool calls come whole, use achat()")
        mode = "chunks" if chunks or kwargs.get("n", 1) > 1 else "text"
        prepared: list = []

        def prepare() -> rq.Prepared:
            prep = self._prepare_chat(messages, **kwargs)
            prepared.append(prep)
            return prep

        inner = AsyncStream(self, prepare, mode, progress)
        if kwargs.get("reasoning_format", "auto") == "none":
            return inner
        from pyllama.chat.reasoning import AsyncReasoningStream

        return AsyncReasoningStream(inner, lambda: prepared[0].reasoning if prepared else None)

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
        return embeddings.embed(self, texts, normalize)

    # ---- reranking and fill-in-the-middle (pyllama.rerank, pyllama.infill) ---------------------

    def rerank(self, query: str, documents: Sequence[str], top_n: Optional[int] = None) -> list:
        """`documents` by relevance to `query`, best first (the `top_n` best when given): a list
        of :class:`pyllama.rerank.RerankResult` (index, relevance_score, document, n_tokens), as
        llama-server's /rerank scores them.  Needs a reranker (a classification head; pooling "rank"
        in its GGUF or LLM(pooling="rank")) loaded with embedding=True; others raise ValueError."""
        return rerank.rerank(self, query, documents, top_n)

    def infill(self, prefix: Any, suffix: Any, *, prompt: str = "", extra_context: Optional[Sequence[Mapping]] = None,
               spm_infill: bool = False, stream: bool = False, **kwargs: Any) -> Any:
        """Fill in the middle between `prefix` and `suffix` with a FIM model (others raise
        ValueError), the prompt laid out as llama-server's /infill does (pyllama.infill):
        `extra_context` files (``[{"filename", "text"}]``), then ``[FIM_PRE] prefix prompt
        [FIM_SUF] suffix [FIM_MID]``.  Other keyword arguments are complete()'s; stream=True
        returns stream()'s iterator."""
        n_predict = kwargs.get("max_tokens", self.defaults.max_tokens)
        tokens = infill.infill_prompt(self, prefix, suffix, prompt=prompt, extra_context=extra_context,
                                      spm_infill=spm_infill, n_predict=n_predict)
        return self.stream(tokens, **kwargs) if stream else self.complete(tokens, **kwargs)
