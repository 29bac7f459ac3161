# Context (owns llama_context *) and zero-copy float views of its logits/embeddings.

# Not in _llama.pxd: recurrent/hybrid memories and their partial (recurrent-only) states.
cdef extern from "llama.h" nogil:
    bint llama_model_is_hybrid(const llama_model * model) except +
    ctypedef uint32_t llama_state_seq_flags
    size_t llama_state_seq_get_size_ext(llama_context * ctx, llama_seq_id seq_id,
                                        llama_state_seq_flags flags) except +
    size_t llama_state_seq_get_data_ext(llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id,
                                        llama_state_seq_flags flags) except +
    size_t llama_state_seq_set_data_ext(llama_context * ctx, const uint8_t * src, size_t size,
                                        llama_seq_id dest_seq_id, llama_state_seq_flags flags) except +
    enum: LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY


cdef bint _memory_can_truncate(llama_model * m):
    """Can the model's memory drop the end of a sequence (llama_memory_seq_rm(s, p0 > 0, -1))?
    False for a recurrent state (Mamba, RWKV) or a hybrid's (Jamba, Falcon-H1, Granite 4, LFM2,
    Qwen3-Next...): it summarises every token seen, so only whole sequences can be removed."""
    return not (llama_model_is_recurrent(m) or llama_model_is_hybrid(m))


cdef object _seq_state_bytes(llama_context * ctx, int seq_id, llama_state_seq_flags flags, size_t size):
    """Sequence seq_id's state (llama_state_seq_get_data_ext with `flags`) as bytes, into a buffer of
    `size` (llama_state_seq_get_size_ext's answer); None when llama.cpp wrote nothing.  The copy
    runs without the GIL: a large KV cache takes a while."""
    cdef bytes data = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t * dst = <uint8_t *>PyBytes_AS_STRING(data)
    cdef size_t got
    with nogil:
        got = llama_state_seq_get_data_ext(ctx, dst, size, seq_id, flags)
    if got == 0:
        return None
    return data[:got] if got < size else data


_KV_TYPES = {
    "f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16, "q8_0": GGML_TYPE_Q8_0,
    "q4_0": GGML_TYPE_Q4_0, "q4_1": GGML_TYPE_Q4_1, "q5_0": GGML_TYPE_Q5_0, "q5_1": GGML_TYPE_Q5_1,
}
_POOLING = {
    None: LLAMA_POOLING_TYPE_UNSPECIFIED, "unspecified": LLAMA_POOLING_TYPE_UNSPECIFIED,
    "none": LLAMA_POOLING_TYPE_NONE, "mean": LLAMA_POOLING_TYPE_MEAN, "cls": LLAMA_POOLING_TYPE_CLS,
    "last": LLAMA_POOLING_TYPE_LAST, "rank": LLAMA_POOLING_TYPE_RANK,
}


@cython.no_gc_clear   # __dealloc__ needs self.owner: a view collected in a reference cycle
                     # must still release its Context, or decode() refuses forever
cdef class _FloatView:
    """A read-only buffer over floats owned by a Context (logits or embeddings).

    While a view is alive the Context refuses to decode or close (BufferError),
    because llama.cpp may reallocate or free the memory under it -- the same rule
    Python's bytearray applies to its exports.
    """
    cdef Context owner
    cdef float * data
    cdef Py_ssize_t n
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __getbuffer__(self, Py_buffer * buffer, int flags):
        if flags & 0x0001:  # PyBUF_WRITABLE
            raise BufferError("pyllama logits/embedding views are read-only")
        self.shape[0] = self.n
        self.strides[0] = sizeof(float)
        buffer.buf = <void *>self.data
        buffer.obj = self
        buffer.len = self.n * sizeof(float)
        buffer.readonly = 1
        buffer.itemsize = sizeof(float)
        buffer.format = "f"
        buffer.ndim = 1
        buffer.shape = self.shape
        buffer.strides = self.strides
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __releasebuffer__(self, Py_buffer * buffer):
        pass

    def __dealloc__(self):
        if self.owner is not None:
            self.owner._n_views -= 1


cdef object _float_array(Context owner, float * data, Py_ssize_t n, bint copy):
    import numpy as np
    cdef _FloatView view
    if copy:
        out = np.empty(n, dtype=np.float32)
        memcpy(<void *><size_t>out.ctypes.data, data, n * sizeof(float))
        return out
    view = _FloatView.__new__(_FloatView)
    view.owner = owner
    view.data = data
    view.n = n
    owner._n_views += 1
    arr = np.frombuffer(view, dtype=np.float32)
    return arr


# llama.cpp's CPU backend computes on OpenMP threads when it is built with OpenMP, and
# libgomp's thread pool does not survive fork(): in a child forked after the parent decoded
# with several threads, the next multi-threaded decode waits forever for threads that only
# existed in the parent.  We refuse that decode with a clear error instead.
cdef bint _omp_pool_used = False      # this process has decoded with n_threads > 1 (OpenMP build)
cdef bint _omp_pool_inherited = False  # our parent had, before it forked us
cdef object _uses_openmp = None


def _after_fork_in_child():
    global _omp_pool_inherited
    if _omp_pool_used:
        _omp_pool_inherited = True


if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_in_child)


cdef int _check_thread_pool_after_fork() except -1:
    global _omp_pool_used, _uses_openmp
    if _omp_pool_inherited:
        raise RuntimeError(
            "this process was forked from one that had already run llama.cpp on several threads; "
            "llama.cpp's OpenMP thread pool does not survive fork(), so a multi-threaded decode here "
            "would hang.  Use one thread in the child (Context.set_threads(1) / LLM(..., n_threads=1)), "
            "or start worker processes with multiprocessing's 'spawn' or 'forkserver' method.")
    if not _omp_pool_used:
        if _uses_openmp is None:
            _uses_openmp = "OPENMP = 1" in system_info()
        _omp_pool_used = _uses_openmp
    return 0


_NON_CAUSAL_ARCHS = frozenset({"dream", "gemma-embedding", "llada", "llada-moe", "rnd1"})


cdef _check_mean_pooling_split(Model model, int n_ctx, int n_batch, int n_ubatch, int n_seq_max, pooling):
    """Mean pooling: llama.cpp reserves its worst-case graph with n_tokens / n_seq_max tokens
    per sequence, and GGML_ASSERTs (ggml_can_mul_mat) unless they divide evenly."""
    arch = model.architecture
    if pooling in (None, "unspecified"):
        if model.meta(f"{arch}.pooling_type") != "1":   # LLAMA_POOLING_TYPE_MEAN
            return
    elif pooling != "mean":
        return
    causal_meta = model.meta(f"{arch}.attention.causal")
    causal = causal_meta != "false" if causal_meta is not None else arch not in _NON_CAUSAL_ARCHS
    cdef int64_t ctx_len = n_ctx if n_ctx > 0 else llama_model_n_ctx_train(model.ptr)
    if causal:
        n_tokens = min(ctx_len, n_batch, n_ubatch)
    else:
        n_tokens = min((ctx_len + 255) // 256 * 256, n_batch, n_ubatch)
    if n_tokens % n_seq_max:
        raise ValueError(f"with mean pooling, llama.cpp needs its largest micro-batch ({n_tokens} tokens here: "
                         f"the smallest of n_ctx, n_batch and n_ubatch) to split evenly over n_seq_max={n_seq_max} "
                         f"sequences; use an n_seq_max that divides {n_tokens}, or n_ubatch="
                         f"{n_tokens // n_seq_max * n_seq_max}")


cdef bint _is_causal(Model model):
    """Does the model attend causally (the GGUF's {arch}.attention.causal, else by architecture)?"""
    arch = model.architecture
    causal_meta = model.meta(f"{arch}.attention.causal")
    return causal_meta != "false" if causal_meta is not None else arch not in _NON_CAUSAL_ARCHS


_KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
             "q5_0": 22 / 32, "q5_1": 24 / 32}


cdef _check_kv_fits(llama_model * m, int n_ctx, str type_k, str type_v):
    """Refuse an n_ctx whose KV cache could not fit in this machine many times over (a typo
    such as n_ctx=2**30): llama.cpp would try, and the process would be OOM-killed or thrash.
    A rough upper bound (every layer full-attention); generous on purpose."""
    if llama_model_is_recurrent(m) or llama_model_n_layer(m) <= 0:
        return   # (llama_model_n_head aborts on a model without layers)
    cdef int64_t n = n_ctx if n_ctx > 0 else llama_model_n_ctx_train(m)
    n_head = max(llama_model_n_head(m), 1)
    per_layer = llama_model_n_embd(m) // n_head * max(llama_model_n_head_kv(m), 1)
    need = n * llama_model_n_layer(m) * per_layer * (_KV_BYTES[type_k] + _KV_BYTES[type_v])
    try:
        total = _os.sysconf("SC_PAGE_SIZE") * _os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    for be in backends():
        for d in be["devices"]:
            if d["type"] != "cpu":
                total += d["memory_total"]
    if total > 0 and need > 4 * total:
        raise OutOfMemoryError(f"n_ctx={n} would need about {need / 2**30:.0f} GiB of KV cache, far more than this "
                         f"machine's {total / 2**30:.0f} GiB of memory; use a smaller n_ctx")


# What llama.cpp and ggml log when a buffer cannot be had (ggml_aligned_malloc on the host,
# alloc_tensor_range / the backends' allocators on a device).
_ALLOC_FAILURES = ("failed to allocate", "insufficient memory", "out of memory")


@cython.no_gc_clear   # __dealloc__ needs self.model (the weights must outlive llama_free)
cdef class Context:
    """An inference context over a Model: KV memory, threads, logits."""

    cdef llama_context * ptr
    cdef readonly Model model
    cdef const llama_vocab * vocab
    cdef readonly int32_t n_vocab
    cdef pyllama_abort_state abort_state
    cdef int _n_views
    cdef object _lock
    cdef int32_t _last_n_outputs
    cdef bytes _last_output_flags
    cdef list _lora_refs
    cdef object __weakref__
    cdef bint _holds_model       # counted in model._n_users (so Model.close() cannot free it under us)
    cdef bint _in_eval           # a decode/encode is running (abort() only reaches that one)
    cdef readonly bint kv_unified
    cdef bint _causal            # causal attention (non-causal models need n_tokens <= n_ubatch)

    def __cinit__(self):
        self.ptr = NULL
        self._holds_model = False
        self._in_eval = False
        self._n_views = 0
        self.abort_state.abort_requested = 0
        self.abort_state.watch_sigint = 0
        # Created here, not in __init__: a Context built with __new__ (or by a subclass that
        # skips super().__init__) must still raise "the context is closed", not AttributeError.
        self._lock = _threading.RLock()

    def __init__(self, Model model not None, *, int n_ctx=0, int n_batch=512, int n_ubatch=512,
                 int n_seq_max=1, n_threads=None, n_threads_batch=None, str type_k="f16", str type_v="f16",
                 flash_attn=None, bint embeddings=False, pooling=None, float rope_freq_base=0.0,
                 float rope_freq_scale=0.0, bint offload_kqv=True, bint kv_unified=True,
                 bint swa_full=False, bint no_perf=False):
        if self.ptr != NULL:
            raise RuntimeError("Context is already initialised")
        cdef llama_model * m = model._get()
        cdef size_t max_seq
        cdef llama_context_params p
        # We are a user of the weights from here on (Model.close() from another thread then
        # marks the model close-pending instead of freeing the weights under us): the checks
        # below can let other threads run (file reads), and llama_init_from_model runs without
        # the GIL.  On any error we stop being one.
        self.model = model
        model._add_user()
        self._holds_model = True
        try:
            if n_ctx < 0:
                raise ValueError(f"n_ctx must be >= 0 (0 = the model's training context), got {n_ctx}")
            if n_batch < 1:
                raise ValueError(f"n_batch must be >= 1, got {n_batch}")
            if n_ubatch < 1:
                raise ValueError(f"n_ubatch must be >= 1, got {n_ubatch}")
            max_seq = llama_max_parallel_sequences()
            if n_seq_max < 1 or <size_t>n_seq_max > max_seq:
                raise ValueError(f"n_seq_max must be in 1..{max_seq}, got {n_seq_max}")
            threads = _cpu.default_threads() if n_threads is None else int(n_threads)
            threads_batch = threads if n_threads_batch is None else int(n_threads_batch)
            if threads < 1 or threads_batch < 1 or threads > 1024 or threads_batch > 1024:
                raise ValueError(f"n_threads/n_threads_batch must be in 1..1024, got {threads}/{threads_batch}")
            if type_k not in _KV_TYPES or type_v not in _KV_TYPES:
                raise ValueError(f"type_k/type_v must be one of {sorted(_KV_TYPES)}, got {type_k!r}/{type_v!r}")
            if pooling not in _POOLING:
                raise ValueError(f"pooling must be one of {[k for k in _POOLING if k]}, got {pooling!r}")
            if not (isfinite(rope_freq_base) and isfinite(rope_freq_scale)) or rope_freq_base < 0 or rope_freq_scale < 0:
                raise ValueError(f"rope_freq_base/rope_freq_scale must be finite numbers >= 0 (0 = the model's own "
                                 f"value), got {rope_freq_base}/{rope_freq_scale}")
            if n_ctx > 0 and n_ctx < 8:
                raise ValueError(f"n_ctx must be 0 or at least 8, got {n_ctx}")
            if (model.vocab.n_tokens == 0 or llama_model_n_layer(m) <= 0
                    or not llama_model_has_decoder(m) and not llama_model_has_encoder(m)):
                raise ValueError("this model has no weights to run (loaded with vocab_only=True?)")
            _check_kv_fits(m, n_ctx, type_k, type_v)
            causal = _is_causal(model)
            # llama.cpp reserves one output row per sequence at creation, and GGML_ASSERTs that this fits
            # in n_outputs_max = its n_batch, which is min(n_ctx, n_batch) for causal models.
            eff_batch = min(n_batch, n_ctx if n_ctx > 0 else llama_model_n_ctx_train(m)) if causal else n_batch
            if n_seq_max > eff_batch:
                raise ValueError(f"n_seq_max={n_seq_max} is more than the batch can hold (n_batch={n_batch}"
                                 + (f", n_ctx={n_ctx or llama_model_n_ctx_train(m)}" if causal else "")
                                 + f"): llama.cpp needs room for one output per sequence in a batch; "
                                 f"use n_batch >= {n_seq_max}")
            if embeddings and n_seq_max > 1:
                _check_mean_pooling_split(model, n_ctx, n_batch, n_ubatch, n_seq_max, pooling)

            p = llama_context_default_params()
            p.n_ctx = n_ctx
            p.n_batch = n_batch
            p.n_ubatch = min(n_ubatch, n_batch)
            p.n_seq_max = n_seq_max
            p.n_threads = threads
            p.n_threads_batch = threads_batch
            p.type_k = _KV_TYPES[type_k]
            p.type_v = _KV_TYPES[type_v]
            if flash_attn is None or flash_attn == "auto":
                p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_AUTO
            elif flash_attn is True or flash_attn == "on" or flash_attn == "enabled":
                p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED
            elif flash_attn is False or flash_attn == "off" or flash_attn == "disabled":
                p.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED
            else:
                raise ValueError(f"flash_attn must be True, False or 'auto', got {flash_attn!r}")
            p.embeddings = embeddings
            p.pooling_type = _POOLING[pooling]
            p.rope_freq_base = rope_freq_base
            p.rope_freq_scale = rope_freq_scale
            p.offload_kqv = offload_kqv
            p.kv_unified = kv_unified
            p.swa_full = swa_full
            p.no_perf = no_perf
            p.abort_callback = pyllama_abort_cb
            p.abort_callback_data = <void *>&self.abort_state
            pyllama_clear_last_error()
            with nogil:
                self.ptr = llama_init_from_model(m, p)
            if model._close_pending:
                # close() came while we were being created: it refuses new work, so do we
                # (the except below frees the context, then the weights).
                raise ValueError("the model was closed while this context was being created")
            if self.ptr == NULL:
                # A failed buffer allocation (KV cache, compute buffers; on a GPU, or the host)
                # is its own error class: the caller can retry smaller.
                reason = _last_error("invalid parameters or not enough memory")
                exc_type = OutOfMemoryError if any(m in reason.lower() for m in _ALLOC_FAILURES) else ValueError
                raise exc_type("llama.cpp could not create the context: " + reason)
            self.vocab = llama_model_get_vocab(m)
            self.n_vocab = llama_vocab_n_tokens(self.vocab)
            self._last_n_outputs = 0
            self.kv_unified = kv_unified
            self._causal = causal
        except BaseException:
            if self.ptr != NULL:
                llama_free(self.ptr)
                self.ptr = NULL
            self._drop_model()
            raise

    def __dealloc__(self):
        if self.ptr != NULL:
            llama_free(self.ptr)
            self.ptr = NULL
        self._drop_model()

    cdef void _drop_model(self):
        if self._holds_model:
            self._holds_model = False
            if self.model is not None:
                self.model._release_user()   # frees the weights if Model.close() is waiting

    cdef inline llama_context * _get(self) except NULL:
        if self.ptr == NULL:
            raise ValueError("the context is closed")
        return self.ptr

    def close(self) -> None:
        """Free the context (KV memory, buffers) now."""
        if self._n_views > 0:
            raise BufferError(f"{self._n_views} logits/embedding views of this context are still alive; "
                              "delete them (or use copy=True) before closing")
        with self._lock:
            if self.ptr != NULL:
                llama_free(self.ptr)
                self.ptr = NULL
            self._drop_model()

    @property
    def closed(self) -> bool:
        return self.ptr == NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def lock(self):
        """The lock that serialises use of this context across threads."""
        return self._lock

    @property
    def n_ctx(self) -> int:
        return llama_n_ctx(self._get())

    @property
    def n_ctx_seq(self) -> int:
        return llama_n_ctx_seq(self._get())

    @property
    def n_batch(self) -> int:
        return llama_n_batch(self._get())

    @property
    def n_ubatch(self) -> int:
        return llama_n_ubatch(self._get())

    @property
    def n_seq_max(self) -> int:
        return llama_n_seq_max(self._get())

    @property
    def n_threads(self) -> int:
        return llama_n_threads(self._get())

    @property
    def n_threads_batch(self) -> int:
        return llama_n_threads_batch(self._get())

    def set_threads(self, int n_threads, n_threads_batch=None) -> None:
        cdef int tb = n_threads if n_threads_batch is None else n_threads_batch
        if n_threads < 1 or tb < 1 or n_threads > 1024 or tb > 1024:
            raise ValueError(f"thread counts must be in 1..1024, got {n_threads}/{tb}")
        with self._lock:
            llama_set_n_threads(self._get(), n_threads, tb)

    def abort(self) -> None:
        """Ask a decode running in another thread to stop (it raises DecodeAborted).

        One-shot: it reaches only a decode that is running when abort() is called; with none
        running it does nothing, and a decode started after abort() returned runs normally.
        """
        # Both this test and _eval's start/end run with the GIL held, so they cannot interleave.
        if self._in_eval:
            self.abort_state.abort_requested = 1

    # ---- evaluation ---------------------------------------------------------

    cdef int _check_batch(self, Batch batch, bint encode=False) except -1:
        cdef int32_t n = batch.batch.n_tokens, i, k
        cdef uint32_t n_seq = llama_n_seq_max(self.ptr)
        cdef llama_token t
        cdef llama_seq_id s
        if n == 0:
            raise ValueError("cannot decode an empty batch")
        if <uint32_t>n > llama_n_batch(self.ptr):
            raise BatchCapacityError(f"batch of {n} tokens exceeds this context's n_batch={llama_n_batch(self.ptr)}")
        if (encode or not self._causal or llama_get_memory(self.ptr) == NULL) and <uint32_t>n > llama_n_ubatch(self.ptr):
            # llama.cpp GGML_ASSERTs this: an encoder (or non-causal attention) sees the whole
            # batch in one micro-batch.
            raise BatchCapacityError(f"batch of {n} tokens exceeds this context's n_ubatch={llama_n_ubatch(self.ptr)}; "
                                     f"{'encoding' if encode else 'a model with non-causal attention'} needs the "
                                     "whole batch in one micro-batch (use a larger n_ubatch)")
        for i in range(n):
            t = batch.batch.token[i]
            if t < 0 or t >= self.n_vocab:
                raise InvalidTokenError(f"token id {t} at batch index {i} is out of range for a vocabulary "
                                        f"of {self.n_vocab} tokens")
            for k in range(batch.batch.n_seq_id[i]):
                s = batch.batch.seq_id[i][k]
                if s < 0 or <uint32_t>s >= n_seq:
                    raise InvalidSequenceError(f"sequence id {s} at batch index {i} is outside [0, {n_seq}) "
                                               f"(n_seq_max={n_seq})")
            if batch.batch.pos[i] < 0 or <uint32_t>batch.batch.pos[i] >= llama_n_ctx(self.ptr):
                raise ContextLengthError(f"position {batch.batch.pos[i]} at batch index {i} is outside the "
                                         f"context window of {llama_n_ctx(self.ptr)} tokens")
        return 0

    cdef int _eval(self, Batch batch, bint encode) except -1:
        """Run llama_decode/llama_encode with the GIL released; Ctrl-C aborts it."""
        global pyllama_sigint_seen
        cdef llama_context * ctx = self._get()
        cdef int32_t rc
        cdef int32_t i, n_out = 0
        if self._n_views > 0:
            raise BufferError(f"{self._n_views} logits/embedding views of this context are still alive; "
                              "llama.cpp may reuse that memory: delete them (or use copy=True) first")
        self._check_batch(batch, encode)
        if llama_n_threads(ctx) > 1 or llama_n_threads_batch(ctx) > 1:
            _check_thread_pool_after_fork()
        for i in range(batch.batch.n_tokens):
            if batch.batch.logits[i]:
                n_out += 1
        watch = _in_main_thread() and pyllama_sigint_push()
        self.abort_state.watch_sigint = 1 if watch else 0
        # abort() is one-shot: forget any request that came while no decode ran.
        self.abort_state.abort_requested = 0
        self._in_eval = True
        pyllama_clear_last_error()
        try:
            while True:
                with nogil:
                    rc = pyllama_eval(ctx, batch.batch, 1 if encode else 0)
                if rc != 2 or self.abort_state.abort_requested or not watch or not pyllama_sigint_seen:
                    break
                # Ctrl-C stopped it.  Run Python's handler now: KeyboardInterrupt (or whatever
                # a user's handler raises) propagates from here.  A handler that returns has
                # handled the signal: the decode did not happen, so run it again.
                self._forget_batch(batch)
                pyllama_sigint_seen = 0
                PyErr_CheckSignals()
        finally:
            self._in_eval = False
            self.abort_state.watch_sigint = 0
            if watch:
                pyllama_sigint_pop()
        self._last_n_outputs = n_out if rc == 0 else 0
        self._last_output_flags = PyBytes_FromStringAndSize(<char *>batch.batch.logits, batch.batch.n_tokens) if rc == 0 else b""
        if rc == 0:
            return 0
        if rc == 2:
            requested = self.abort_state.abort_requested
            self.abort_state.abort_requested = 0
            self._forget_batch(batch)
            # Our abort callback only stops a decode for abort() or a SIGINT it watched, so
            # an abort nobody requested is llama.cpp's own (e.g. a backend's), not Ctrl-C.
            _check(requested, DecodeError, "llama.cpp aborted the computation: ", "see the 'pyllama' logger")
            raise DecodeAborted("decode aborted by Context.abort()")
        if rc == 1:
            raise KVCacheFullError("no room in the KV memory for this batch "
                                   f"({batch.batch.n_tokens} tokens; n_ctx={llama_n_ctx(ctx)}): free sequences "
                                   "with kv_seq_rm/kv_clear or use a larger n_ctx")
        _check(rc == 0, DecodeError, f"llama_{'encode' if encode else 'decode'} failed with code {rc}: ",
               "see the 'pyllama' logger")
        return 0

    cdef void _forget_batch(self, Batch batch):
        """After an abort, drop whatever part of the batch reached the KV memory."""
        cdef llama_memory_t mem = llama_get_memory(self.ptr)
        cdef int32_t i
        seen = {}
        for i in range(batch.batch.n_tokens):
            s = batch.batch.seq_id[i][0]
            p = batch.batch.pos[i]
            if s not in seen or p < seen[s]:
                seen[s] = p
        for s, p in seen.items():
            llama_memory_seq_rm(mem, s, p, -1)

    def decode(self, Batch batch not None) -> None:
        """Evaluate a batch (KVCacheFullError, DecodeError, KeyboardInterrupt on Ctrl-C)."""
        with self._lock:
            self._eval(batch, False)

    def encode(self, Batch batch not None) -> None:
        """Run the encoder of an encoder-decoder (or embedding) model over a batch."""
        with self._lock:
            self._get()
            # llama_encode runs the encoder graph; on a decoder-only model with a KV memory it
            # builds a graph the model does not have (segfault).  Memory-less models (BERT-style
            # embedders) encode; llama_decode forwards to llama_encode for them anyway.
            if not llama_model_has_encoder(self.model._get()) and llama_get_memory(self.ptr) != NULL:
                raise ValueError("this model has no encoder; use decode() (also for embeddings)")
            self._eval(batch, True)

    cdef int32_t _output_index(self, int idx) except -2147483648:
        if self._last_n_outputs <= 0:
            raise IndexError("no outputs: the last decode requested no logits (set logits=True on a token)")
        if idx < -self._last_n_outputs:
            raise IndexError(f"output index {idx} out of range: the last decode produced {self._last_n_outputs} outputs")
        if idx >= 0 and (idx >= len(self._last_output_flags) or not self._last_output_flags[idx]):
            raise IndexError(f"batch index {idx} did not request logits in the last decode "
                             f"(batch of {len(self._last_output_flags)} tokens)")
        return idx

    def logits(self, int idx=-1, bint copy=True):
        """Logits of the token at batch index `idx` of the last decode (-1: the last output).

        copy=True (default) returns a fresh array; copy=False returns a read-only
        zero-copy view, valid until the next decode: while it is alive, decode()
        and close() raise BufferError.
        """
        cdef float * p
        with self._lock:
            self._output_index(idx)
            pyllama_clear_last_error()
            p = llama_get_logits_ith(self._get(), idx)
            _check(p != NULL, IndexError, f"no logits for batch index {idx}: ", "it did not request logits")
            return _float_array(self, p, self.n_vocab, copy)

    def embeddings(self, int idx=-1, bint copy=True):
        """Embedding of the token at batch index `idx` (context created with embeddings=True)."""
        cdef float * p
        with self._lock:
            self._output_index(idx)
            p = llama_get_embeddings_ith(self._get(), idx)
            _check(p != NULL, IndexError, f"no embedding for batch index {idx} (embeddings=True? pooling='none'?)")
            return _float_array(self, p, llama_model_n_embd_out(self.model.ptr), copy)

    def embeddings_seq(self, int seq_id=0, bint copy=True):
        """Pooled embedding of a sequence (pooling other than 'none')."""
        cdef float * p
        with self._lock:
            if seq_id < 0 or <uint32_t>seq_id >= llama_n_seq_max(self._get()):
                raise InvalidSequenceError(f"sequence id {seq_id} is outside [0, {llama_n_seq_max(self.ptr)})")
            p = llama_get_embeddings_seq(self._get(), seq_id)
            _check(p != NULL, IndexError, f"no pooled embedding for sequence {seq_id} (embeddings=True with pooling?)")
            # rank pooling gives n_cls_out scores per sequence, not n_embd floats (reading
            # n_embd would run past llama.cpp's buffer)
            n = (llama_model_n_cls_out(self.model.ptr) if llama_get_pooling_type(self.ptr) == LLAMA_POOLING_TYPE_RANK
                 else llama_model_n_embd_out(self.model.ptr))
            if n <= 0:
                raise IndexError(f"no pooled output for sequence {seq_id}: the model has no classifier head")
            return _float_array(self, p, n, copy)

    # ---- KV memory ----------------------------------------------------------

    cdef inline llama_memory_t _mem(self) except? NULL:
        """The KV memory, or NULL for a context that has none (an encoder such as BERT: each
        batch is evaluated on its own).  llama.cpp's llama_memory_* functions treat NULL as an
        empty memory; callers must not dereference it themselves.  (Not `except NULL`: a NULL
        memory is no error, and Cython would then propagate an error that was never set.)"""
        return llama_get_memory(self._get())

    @property
    def has_memory(self) -> bool:
        """Does this context keep a KV memory between batches?  False for encoder models
        (BERT-family embedders, rerankers): every batch is evaluated on its own, the kv_*
        methods see an empty memory (kv_clear/kv_seq_rm/kv_seq_keep do nothing, kv_seq_pos_*
        give -1) and kv_seq_cp/kv_seq_add raise ValueError."""
        return llama_get_memory(self._get()) != NULL

    cdef int _need_memory(self, str what) except -1:
        if llama_get_memory(self._get()) == NULL:
            raise ValueError(f"{what}: this context has no KV memory (an encoder model such as BERT "
                             "evaluates each batch on its own)")
        return 0

    cdef inline int _check_seq(self, int seq_id, bint allow_all=False) except -1:
        if allow_all and seq_id == -1:
            return 0
        if seq_id < 0 or <uint32_t>seq_id >= llama_n_seq_max(self._get()):
            raise InvalidSequenceError(f"sequence id {seq_id} is outside [0, {llama_n_seq_max(self.ptr)})")
        return 0

    cdef void _forget_outputs(self):
        """The outputs of the last decode no longer describe the memory."""
        self._last_n_outputs = 0
        self._last_output_flags = b""

    def kv_clear(self, bint data=True) -> None:
        with self._lock:
            llama_memory_clear(self._mem(), data)

    def kv_seq_rm(self, int seq_id, int p0=-1, int p1=-1) -> bool:
        """Remove positions [p0, p1) of a sequence (-1: open end; seq_id -1: all sequences)."""
        with self._lock:
            self._check_seq(seq_id, True)
            return llama_memory_seq_rm(self._mem(), seq_id, p0, p1)

    def kv_seq_cp(self, int src, int dst, int p0=-1, int p1=-1) -> None:
        """Make positions [p0, p1) of sequence src part of sequence dst too (-1: open end).

        With kv_unified=False each sequence has its own KV buffer and llama.cpp can only copy
        a whole sequence (it GGML_ASSERTs otherwise): a partial range raises ValueError.
        """
        cdef int64_t size
        with self._lock:
            self._check_seq(src)
            self._check_seq(dst)
            self._need_memory("kv_seq_cp")
            if not self.kv_unified and src != dst:
                size = llama_n_ctx_seq(self.ptr)
                if (p0 > 0 and p0 + 1 < size) or (p1 > 0 and p1 + 1 < size):
                    raise ValueError(f"kv_seq_cp({src}, {dst}, p0={p0}, p1={p1}): with kv_unified=False "
                                     "llama.cpp copies only whole sequences (use p0=-1, p1=-1, or a "
                                     "context with kv_unified=True)")
            llama_memory_seq_cp(self._mem(), src, dst, p0, p1)

    def kv_seq_keep(self, int seq_id) -> None:
        with self._lock:
            self._check_seq(seq_id)
            llama_memory_seq_keep(self._mem(), seq_id)

    def kv_seq_add(self, int seq_id, int p0, int p1, int delta) -> None:
        with self._lock:
            self._check_seq(seq_id, True)
            self._need_memory("kv_seq_add")
            if not llama_memory_can_shift(self._mem()):
                raise ValueError("this model's KV memory cannot shift positions")
            llama_memory_seq_add(self._mem(), seq_id, p0, p1, delta)

    def kv_seq_pos_min(self, int seq_id) -> int:
        with self._lock:
            self._check_seq(seq_id)
            return llama_memory_seq_pos_min(self._mem(), seq_id)

    def kv_seq_pos_max(self, int seq_id) -> int:
        with self._lock:
            self._check_seq(seq_id)
            return llama_memory_seq_pos_max(self._mem(), seq_id)

    def kv_can_shift(self) -> bool:
        return llama_memory_can_shift(self._mem())

    def kv_can_truncate(self) -> bool:
        """Can kv_seq_rm drop the end of a sequence (positions p0 > 0 onward)?  False for
        recurrent and hybrid models (Mamba, RWKV, Jamba, Falcon-H1, Granite 4, LFM2,
        Qwen3-Next...): their state summarises every token seen, so kv_seq_rm(seq, p0 > 0)
        returns False and changes nothing; only whole sequences can be removed (p0 <= 0), and
        going back to an earlier point needs a saved state (seq_state_get / seq_state_set)."""
        return self.has_memory and _memory_can_truncate(self.model._get())

    # ---- state ----------------------------------------------------------------

    def state_get(self) -> bytes:
        """The context state (the KV memory) as bytes.

        Logits are not part of the state at this llama.cpp version: after restoring,
        decode at least one token before sampling.
        """
        cdef size_t size, got
        cdef bytes out
        cdef uint8_t * dst
        with self._lock:
            size = llama_state_get_size(self._get())
            out = PyBytes_FromStringAndSize(NULL, size)
            dst = <uint8_t *>PyBytes_AS_STRING(out)
            with nogil:
                got = llama_state_get_data(self.ptr, dst, size)
            return out[:got]

    def state_set(self, data) -> None:
        cdef const uint8_t[:] view = memoryview(data).cast("B")
        cdef size_t got
        with self._lock:
            self._get()
            if view.shape[0] == 0:
                raise ValueError("empty state")
            pyllama_clear_last_error()
            with nogil:
                got = llama_state_set_data(self.ptr, &view[0], view.shape[0])
            self._forget_outputs()
            _check(got != 0, ValueError, "state data does not match this context: ", "wrong model or size")

    def seq_state_get(self, int seq_id) -> bytes:
        with self._lock:
            self._check_seq(seq_id)
            out = _seq_state_bytes(self.ptr, seq_id, 0, llama_state_seq_get_size(self.ptr, seq_id))
            return b"" if out is None else out

    def seq_state_set(self, data, int seq_id) -> None:
        cdef const uint8_t[:] view = memoryview(data).cast("B")
        cdef size_t got
        with self._lock:
            self._check_seq(seq_id)
            if view.shape[0] == 0:
                raise ValueError("empty state")
            pyllama_clear_last_error()
            with nogil:
                got = llama_state_seq_set_data(self.ptr, &view[0], view.shape[0], seq_id)
            _check(got != 0, ValueError, "sequence state does not match this context: ", "wrong model or size")

    def state_save_file(self, path, tokens=()) -> None:
        cdef bytes p = _os.fsencode(path)
        cdef const char * pc = p
        cdef llama_token * toks = _token_array(tokens, self.n_vocab)
        cdef bint ok
        cdef size_t n = len(tokens)
        try:
            with self._lock:
                self._get()   # inside the lock: close() from another thread cannot come between
                with nogil:
                    ok = llama_state_save_file(self.ptr, pc, toks, n)
                _check(ok, OSError, f"could not save state to {_os.fsdecode(p)!r}")
        finally:
            free(toks)

    def state_load_file(self, path) -> list:
        cdef bytes p = _os.fsencode(path)
        cdef const char * pc = p
        if not _os.path.isfile(path):
            raise FileNotFoundError(2, "state file not found", _os.fsdecode(p))
        cdef size_t cap, n = 0
        cdef llama_token * toks = NULL
        cdef bint ok
        try:
            with self._lock:
                cap = llama_n_ctx(self._get()) + 1
                toks = <llama_token *>malloc(cap * sizeof(llama_token))
                if toks == NULL:
                    raise MemoryError()
                pyllama_clear_last_error()
                with nogil:
                    ok = llama_state_load_file(self.ptr, pc, toks, cap, &n)
                self._forget_outputs()
                _check(ok, ValueError, f"could not load state from {_os.fsdecode(p)!r}: ",
                       "not a state file of this model")
                return [toks[i] for i in range(n)]
        finally:
            free(toks)

    def seq_state_save_file(self, path, int seq_id, tokens=()) -> None:
        cdef bytes p = _os.fsencode(path)
        cdef const char * pc = p
        cdef llama_token * toks = _token_array(tokens, self.n_vocab)
        cdef size_t n = len(tokens), got
        try:
            with self._lock:
                self._check_seq(seq_id)   # checks the pointer too, inside the lock
                with nogil:
                    got = llama_state_seq_save_file(self.ptr, pc, seq_id, toks, n)
                _check(got != 0, OSError, f"could not save sequence state to {_os.fsdecode(p)!r}")
        finally:
            free(toks)

    def seq_state_load_file(self, path, int seq_id) -> list:
        cdef bytes p = _os.fsencode(path)
        cdef const char * pc = p
        if not _os.path.isfile(path):
            raise FileNotFoundError(2, "state file not found", _os.fsdecode(p))
        cdef size_t cap, n = 0, got
        cdef llama_token * toks = NULL
        try:
            with self._lock:
                self._check_seq(seq_id)
                cap = llama_n_ctx(self.ptr) + 1
                toks = <llama_token *>malloc(cap * sizeof(llama_token))
                if toks == NULL:
                    raise MemoryError()
                pyllama_clear_last_error()
                with nogil:
                    got = llama_state_seq_load_file(self.ptr, pc, seq_id, toks, cap, &n)
                _check(got != 0, ValueError, f"could not load sequence state from {_os.fsdecode(p)!r}: ",
                       "not a sequence state file of this model")
                return [toks[i] for i in range(n)]
        finally:
            free(toks)

    def set_lora_adapters(self, adapters) -> None:
        """Apply LoRA adapters: a list of (LoraAdapter, scale); [] removes them all."""
        cdef list items = list(adapters)
        cdef llama_adapter_lora ** arr = <llama_adapter_lora **>calloc(max(len(items), 1), sizeof(void *))
        cdef float * scales = <float *>calloc(max(len(items), 1), sizeof(float))
        cdef LoraAdapter a
        cdef int32_t rc
        self._lora_refs = items
        try:
            for i, (a, scale) in enumerate(items):
                scale = float(scale)
                if not isfinite(scale):
                    raise ValueError(f"LoRA scale must be a finite number, got {scale}")
                if a is None or a.ptr == NULL:
                    raise ValueError("a LoRA adapter that is not loaded (built without __init__?)")
                if a.model is not self.model:
                    raise ValueError("a LoRA adapter of another model")
                arr[i] = a.ptr
                scales[i] = scale
            with self._lock:
                rc = llama_set_adapters_lora(self._get(), arr, len(items), scales)
            _check(rc == 0, ValueError, f"llama.cpp refused the LoRA adapters (code {rc})")
        finally:
            free(arr)
            free(scales)

    # ---- performance ------------------------------------------------------------

    def perf(self) -> dict:
        """llama.cpp's context counters: load, prompt eval and eval times (ms) and counts."""
        cdef llama_perf_context_data d = llama_perf_context(self._get())
        return {"t_start_ms": d.t_start_ms, "t_load_ms": d.t_load_ms, "t_p_eval_ms": d.t_p_eval_ms,
                "t_eval_ms": d.t_eval_ms, "n_p_eval": d.n_p_eval, "n_eval": d.n_eval, "n_reused": d.n_reused}

    def memory_breakdown(self) -> list:
        """Where this context's memory lives, per buffer type (llama.cpp's breakdown): a list
        of ``{"buffer", "device", "host", "model", "context", "compute"}`` (bytes: weights,
        KV/recurrent state, compute buffers).  With layers offloaded, the GPU's buffer type
        ("CUDA0", "Vulkan0" ...) holds their weights and, with offload_kqv, their KV cells."""
        cdef pyllama_memory_entry entries[32]
        cdef int n, i
        with self._lock:
            n = pyllama_memory_breakdown(self._get(), entries, 32)
        if n < 0:
            raise RuntimeError("llama.cpp could not report the memory breakdown")
        out = []
        for i in range(min(n, 32)):
            out.append({"buffer": entries[i].buffer.decode("utf-8", "replace"),
                        "device": entries[i].device.decode("utf-8", "replace"),
                        "host": bool(entries[i].is_host), "model": entries[i].model,
                        "context": entries[i].context, "compute": entries[i].compute})
        return out

    def perf_reset(self) -> None:
        with self._lock:
            llama_perf_context_reset(self._get())

    def __repr__(self):
        if self.ptr == NULL:
            return "<pyllama.Context (closed)>"
        return f"<pyllama.Context n_ctx={self.n_ctx} n_seq_max={self.n_seq_max}>"


cdef llama_token * _token_array(tokens, int32_t n_vocab) except? NULL:
    cdef Py_ssize_t n = len(tokens), i
    if n == 0:
        return NULL
    cdef llama_token * arr = <llama_token *>malloc(n * sizeof(llama_token))
    if arr == NULL:
        raise MemoryError()
    for i in range(n):
        t = tokens[i]
        if t < 0 or t >= n_vocab:
            free(arr)
            raise InvalidTokenError(f"token id {t} is out of range for a vocabulary of {n_vocab} tokens")
        arr[i] = t
    return arr
