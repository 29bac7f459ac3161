# Model (owns llama_model *) and Vocab (a view of the model's tokenizer).

_SPLIT_MODES = {"none": LLAMA_SPLIT_MODE_NONE, "layer": LLAMA_SPLIT_MODE_LAYER, "row": LLAMA_SPLIT_MODE_ROW}

cdef class _ProgressState:
    cdef object callback
    cdef object error
    cdef bint cancelled


from libcpp cimport bool as cpp_bool

cdef cpp_bool _progress_trampoline(float progress, void * user_data) noexcept with gil:
    cdef _ProgressState st = <_ProgressState>user_data
    if st.error is not None:
        return False
    try:
        if PyErr_CheckSignals() != 0:
            raise KeyboardInterrupt
        result = st.callback(progress) if st.callback is not None else None
        if result is None or bool(result):
            return True
        st.cancelled = True
        return False
    except BaseException as e:   # KeyboardInterrupt included: cancel the load, re-raise after
        st.error = e
        return False


class UnsupportedTensorTypeError(ModelLoadError, ValueError):
    """A tensor of the model is stored in a type llama.cpp cannot compute with there."""


cdef int _GGUF_MIN_HEADER = 24   # magic, version, tensor count, kv count


cdef _precheck_model_file(str path):
    """The checks llama.cpp would turn into an abort or a vague message."""
    if not _os.path.exists(path):
        raise FileNotFoundError(2, "model file not found", path)
    if _os.path.isdir(path):
        raise ModelLoadError(path, "is a directory, not a GGUF file")
    try:
        size = _os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_GGUF_MIN_HEADER)
    except PermissionError:
        raise
    except OSError as e:
        raise ModelLoadError(path, f"cannot read it: {e.strerror or e}") from None
    if size == 0:
        raise ModelLoadError(path, "the file is empty")
    if head[:4] != b"GGUF":
        raise ModelLoadError(path, f"not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
    if size < _GGUF_MIN_HEADER:
        raise ModelLoadError(path, f"truncated: {size} bytes is shorter than a GGUF header")


from libc.stdint cimport int16_t, uint16_t


cdef void _collect_kv(void * user, const char * key, size_t key_len, int kind, long long ival,
                      double fval, const char * sval, size_t sval_len) noexcept with gil:
    meta = <dict>user
    try:
        # C-string semantics, as ggml's gguf_get_key / gguf_get_val_str give them: up to a NUL
        k = key[:key_len].split(b"\0", 1)[0].decode("utf-8", "replace")
        if kind == 1:
            meta[k] = sval[:sval_len].split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == 2:
            meta[k] = <unsigned long long>ival
        elif kind == 3:
            meta[k] = fval
        else:
            meta[k] = ival
    except BaseException:
        pass   # a key we cannot represent is simply not checked


def _gguf_precheck_metadata(path, bint fast=True, bint fallback=True):
    """(metadata dict, repeated token texts) as the model pre-check reads them; fast=False
    forces ggml's parser, fallback=False gives None where the scanner gives up.  For tests:
    both readers must agree."""
    return _gguf_metadata(_os.fsdecode(_os.fspath(path)), fast, fallback)


cdef _gguf_metadata(str path, bint fast=True, bint fallback=True, bint with_tensors=False):
    """(integer and string metadata as a dict, repeated token texts) of a GGUF file, read
    with the fast scanner (pyllama_checks.cpp) or, when it gives up, ggml's own parser.
    Integer arrays of u32/i32 give their largest element (per-layer values)."""
    cdef bytes cpath = _os.fsencode(path)
    cdef const char * cpath_c = cpath
    cdef dict meta = {}
    cdef size_t n_dup = 0
    cdef int has_tokens = 0, ok, bad_type = -1
    cdef char err[320]
    cdef char bad_tensor[256]
    if fast:
        with nogil:
            ok = pyllama_gguf_scan(cpath_c, _collect_kv, <void *>meta, &n_dup, &has_tokens, err, sizeof(err),
                                   bad_tensor, sizeof(bad_tensor), &bad_type)
        if ok > 0:
            if with_tensors:
                return meta, n_dup, (_str(bad_tensor), bad_type) if bad_type >= 0 else None
            return meta, n_dup
        if ok < 0:
            raise ModelLoadError(path, err.decode("utf-8", "replace"))
        if not fallback:
            return None
    meta = {}
    cdef gguf_init_params gp
    cdef gguf_context * g
    gp.no_alloc = True
    gp.ctx = NULL
    pyllama_clear_last_error()
    with nogil:
        g = gguf_init_from_file(cpath_c, gp)
    _check(g != NULL, ModelLoadError, "", "not a valid GGUF file (corrupt or truncated header)", path)
    cdef int64_t i, k
    cdef long long v
    cdef int t
    cdef size_t n, j
    cdef const void * d
    try:
        for i in range(gguf_get_n_kv(g)):
            key = _str(gguf_get_key(g, i))
            t = gguf_get_kv_type(g, i)
            if t == GGUF_TYPE_STRING:
                meta[key] = _str(gguf_get_val_str(g, i))
            elif t == GGUF_TYPE_ARRAY:
                if gguf_get_arr_type(g, i) in (GGUF_TYPE_UINT32, GGUF_TYPE_INT32) and gguf_get_arr_n(g, i) > 0:
                    d = gguf_get_arr_data(g, i)
                    n = gguf_get_arr_n(g, i)
                    best = None
                    for j in range(n):
                        # (two statements: a C conditional expression would turn i32 into u32)
                        if gguf_get_arr_type(g, i) == GGUF_TYPE_UINT32:
                            v = (<const uint32_t *>d)[j]
                        else:
                            v = (<const int32_t *>d)[j]
                        if best is None or v > best:
                            best = v
                    meta[key] = best
            elif t == GGUF_TYPE_FLOAT32:
                meta[key] = <double>(<const float *>gguf_get_val_data(g, i))[0]
            elif t == GGUF_TYPE_FLOAT64:
                meta[key] = (<const double *>gguf_get_val_data(g, i))[0]
            elif t in (GGUF_TYPE_UINT8, GGUF_TYPE_INT8, GGUF_TYPE_UINT16, GGUF_TYPE_INT16,
                       GGUF_TYPE_UINT32, GGUF_TYPE_INT32, GGUF_TYPE_UINT64, GGUF_TYPE_INT64):
                d = gguf_get_val_data(g, i)
                if t == GGUF_TYPE_UINT8: meta[key] = (<const uint8_t *>d)[0]
                elif t == GGUF_TYPE_INT8: meta[key] = (<const int8_t *>d)[0]
                elif t == GGUF_TYPE_UINT16: meta[key] = (<const uint16_t *>d)[0]
                elif t == GGUF_TYPE_INT16: meta[key] = (<const int16_t *>d)[0]
                elif t == GGUF_TYPE_UINT32: meta[key] = (<const uint32_t *>d)[0]
                elif t == GGUF_TYPE_INT32: meta[key] = (<const int32_t *>d)[0]
                elif t == GGUF_TYPE_UINT64: meta[key] = (<const uint64_t *>d)[0]
                else: meta[key] = (<const int64_t *>d)[0]
        k = gguf_find_key(g, b"tokenizer.ggml.tokens")
        if k >= 0 and gguf_get_kv_type(g, k) == GGUF_TYPE_ARRAY and gguf_get_arr_type(g, k) == GGUF_TYPE_STRING:
            with nogil:
                n_dup = pyllama_gguf_count_duplicate_strings(g, k)
        bad = None
        if with_tensors:
            # (ggml's parser does not give shapes without building tensors: names only here)
            for i in range(gguf_get_n_tensors(g)):
                name = _str(gguf_get_tensor_name(g, i))
                if gguf_get_tensor_type(g, i) != GGML_TYPE_F32 and (name.endswith("norm.weight") or name.endswith(".bias")):
                    bad = (name, <int>gguf_get_tensor_type(g, i))
                    break
    finally:
        gguf_free(g)
    if with_tensors:
        return meta, n_dup, bad
    return meta, n_dup


_ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")


cdef object _hparam(dict meta, dict ov, str arch, str name, object default):
    """{arch}.{name} as llama.cpp will see it: an int kv_override (applied as uint32) or the file's value."""
    key = f"{arch}.{name}"
    v = ov.get(key)
    if isinstance(v, int) and not isinstance(v, bool):
        return v % (1 << 32)
    v = meta.get(key)
    return v if isinstance(v, int) else default


cdef _precheck_metadata(str path, overrides, bint vocab_only):
    """Read the GGUF metadata (a corrupt header is a clean error here) and check what
    llama.cpp's loader GGML_ASSERTs on -- a crafted or broken file (or kv_overrides) would
    otherwise abort the process inside llama_model_load."""
    meta, n_dup, bad_tensor = _gguf_metadata(path, True, True, True)
    ov = dict(overrides or {})
    # Two tokens with the same text: llama_vocab::load GGML_ASSERTs (token_to_id is a map).
    if n_dup:
        raise ModelLoadError(path, f"the vocabulary lists {n_dup} token text(s) more than once "
                                   "(corrupt tokenizer.ggml.tokens)")
    if vocab_only:
        return   # llama.cpp reads no hyper-parameters then
    if bad_tensor is not None:
        name, t = bad_tensor
        tname = _str(ggml_type_name(<ggml_type>t)) if 0 <= t < <int>GGML_TYPE_COUNT else f"type {t}"
        raise UnsupportedTensorTypeError(
            path, f"tensor {name!r} is {tname}; llama.cpp needs norm weights and other 1-D tensors "
                  "(biases, scales) in F32 (its CPU kernels abort on anything else at the first "
                  "decode); re-convert the model, keeping those tensors F32")
    arch = ov.get("general.architecture")
    if not isinstance(arch, str):
        arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        return   # llama.cpp reports it ("unknown model architecture")

    n_layer = _hparam(meta, ov, arch, "block_count", None)
    if n_layer is None:
        return   # llama.cpp reports the missing key
    if not 0 < n_layer <= 512:
        raise ModelLoadError(path, f"{arch}.block_count is {n_layer}; llama.cpp supports 1..512 layers "
                                   "(corrupt metadata or a bad kv_overrides value)")
    for name in ("nextn_predict_layers", "posnet.block_count", "convnext.block_count"):
        v = _hparam(meta, ov, arch, name, 0)
        if not 0 <= v <= n_layer:
            raise ModelLoadError(path, f"{arch}.{name} is {v}, more than the {n_layer} layers of the model")
    n_expert = _hparam(meta, ov, arch, "expert_count", 0)
    n_used = _hparam(meta, ov, arch, "expert_used_count", 0)
    n_groups = _hparam(meta, ov, arch, "expert_group_count", 0)
    n_group_used = _hparam(meta, ov, arch, "expert_group_used_count", 0)
    if arch in ("hunyuan-dense", "hunyuan_vl") and n_expert <= 1:
        n_expert = n_used = 0
    if n_expert > 0:
        ok = (n_expert <= 1024 and 0 < n_used <= n_expert and 0 <= n_groups < n_expert
              and (n_groups <= 1 or (n_expert % n_groups == 0 and 0 < n_group_used < n_groups)))
    else:
        ok = n_used == 0 and n_groups == 0
    if not ok:
        raise ModelLoadError(path, f"inconsistent mixture-of-experts metadata: expert_count={n_expert}, "
                                   f"expert_used_count={n_used}, expert_group_count={n_groups}, "
                                   f"expert_group_used_count={n_group_used}")
    # Normalisation epsilons: ggml GGML_ASSERTs eps >= 0 in every norm op, at the first decode
    # (a NaN in layer_norm_rms_epsilon: found by fuzzing).
    for key in sorted(set(meta) | set(ov)):
        if isinstance(key, str) and key.startswith(arch + ".") and key.endswith("epsilon"):
            v = ov.get(key, meta.get(key))
            if isinstance(v, float) and not v >= 0.0:   # also catches NaN
                raise ModelLoadError(path, f"{key} is {v}; a normalisation epsilon must be a number >= 0 "
                                           "(corrupt metadata or a bad kv_overrides value)")
    # RoPE: a base frequency of 0, a negative or NaN one (or a NaN/negative scaling factor) loads
    # and then gives NaN logits and empty answers.
    for key in sorted(k for k in set(meta) | set(ov)
                      if isinstance(k, str) and k.startswith(f"{arch}.rope.freq_base")):
        v = ov.get(key, meta.get(key))
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isfinite(v) and v > 0):
            raise ModelLoadError(path, f"{key} is {v}; the RoPE base frequency must be a finite number > 0 "
                                       "(corrupt metadata or a bad kv_overrides value)")
    for key in (f"{arch}.rope.scaling.factor", f"{arch}.rope.scale_linear"):
        v = ov.get(key, meta.get(key))
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isfinite(v) and v >= 0):
            raise ModelLoadError(path, f"{key} is {v}; a RoPE scaling factor must be a finite number >= 0 "
                                       "(corrupt metadata or a bad kv_overrides value)")
    rope = ov.get(f"{arch}.rope.scaling.type")
    if not isinstance(rope, str):
        rope = meta.get(f"{arch}.rope.scaling.type")
    if isinstance(rope, str) and rope not in _ROPE_SCALING_TYPES:
        raise ModelLoadError(path, f"{arch}.rope.scaling.type is {rope!r}; llama.cpp knows "
                                   f"{', '.join(_ROPE_SCALING_TYPES)}")


cdef class Model:
    """A GGUF model loaded with llama.cpp: weights and vocabulary."""

    cdef llama_model * ptr
    cdef readonly str path
    cdef Vocab _vocab
    cdef dict _meta_cache
    cdef object __weakref__
    cdef int _n_users            # open Contexts and grammar samplers: they hold pointers into the model
    cdef bint _close_pending     # close() came while there were users: free when the last one goes

    def __cinit__(self):
        self.ptr = NULL
        self._n_users = 0
        self._close_pending = False

    def __init__(self, path, *, int n_gpu_layers=0, str split_mode="layer", int main_gpu=0,
                 tensor_split=None, use_mmap=None, bint use_mlock=False, bint vocab_only=False,
                 bint check_tensors=False, kv_overrides=None, devices=None, progress_callback=None):
        if self.ptr != NULL:
            raise RuntimeError("Model is already initialised")
        path = _os.fspath(path)
        if isinstance(path, bytes):
            path = _os.fsdecode(path)
        self.path = path
        if split_mode not in _SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {sorted(_SPLIT_MODES)}, got {split_mode!r}")
        if main_gpu < 0:
            raise ValueError(f"main_gpu must be >= 0, got {main_gpu}")
        if progress_callback is not None and not callable(progress_callback):
            raise TypeError("progress_callback must be callable")
        _precheck_model_file(path)
        _precheck_metadata(path, kv_overrides, vocab_only)

        cdef llama_model_params params = llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 2147483647
        params.split_mode = _SPLIT_MODES[split_mode]
        params.main_gpu = main_gpu
        params.vocab_only = vocab_only
        params.check_tensors = check_tensors
        if use_mmap is not None or use_mlock:
            mmap = True if use_mmap is None else bool(use_mmap)
            if mmap and use_mlock:
                params.load_mode = LLAMA_LOAD_MODE_MMAP_MLOCK
            elif mmap:
                params.load_mode = LLAMA_LOAD_MODE_MMAP
            elif use_mlock:
                params.load_mode = LLAMA_LOAD_MODE_MLOCK
            else:
                params.load_mode = LLAMA_LOAD_MODE_NONE

        cdef size_t max_dev = llama_max_devices()
        cdef float * split = NULL
        cdef llama_model_kv_override * overrides = NULL
        cdef ggml_backend_dev_t * devs = NULL
        cdef _ProgressState progress = _ProgressState()
        cdef bytes cpath = _os.fsencode(path)
        cdef const char * cpath_c = cpath
        cdef Py_ssize_t i
        progress.callback = progress_callback
        try:
            if tensor_split is not None:
                values = [float(x) for x in tensor_split]
                if len(values) > <Py_ssize_t>max_dev:
                    raise ValueError(f"tensor_split has {len(values)} entries; this build supports at most {max_dev} devices")
                if any(v < 0 or v != v for v in values):
                    raise ValueError(f"tensor_split entries must be >= 0, got {values}")
                split = <float *>calloc(max_dev, sizeof(float))
                for i, v in enumerate(values):
                    split[i] = v
                params.tensor_split = split
            if kv_overrides:
                overrides = _make_kv_overrides(kv_overrides)
                params.kv_overrides = overrides
            if devices is not None:
                devs = _make_device_list(devices)
                params.devices = devs
            params.progress_callback = _progress_trampoline
            params.progress_callback_user_data = <void *>progress
            pyllama_clear_last_error()
            with nogil:
                self.ptr = llama_model_load_from_file(cpath_c, params)
            if progress.error is not None:
                if self.ptr != NULL:
                    llama_model_free(self.ptr)
                    self.ptr = NULL
                if isinstance(progress.error, (KeyboardInterrupt, SystemExit)):
                    raise progress.error
                raise ModelLoadError(path, f"progress callback raised {progress.error!r}") from progress.error
            if self.ptr == NULL and progress.cancelled:
                raise ModelLoadError(path, "loading was cancelled by the progress callback")
            _check(self.ptr != NULL, ModelLoadError, "", "llama.cpp could not load it (not a supported model?)", path)
        finally:
            free(split)
            free(overrides)
            free(devs)
        self._vocab = Vocab._wrap(self)

    def __dealloc__(self):
        if self.ptr != NULL:
            llama_model_free(self.ptr)
            self.ptr = NULL

    cdef inline llama_model * _get(self) except NULL:
        if self.ptr == NULL or self._close_pending:
            raise ValueError("the model is closed" if self.path is not None else
                             "the model is not loaded (Model built without __init__?)")
        return self.ptr

    cdef void _add_user(self):
        self._n_users += 1

    cdef void _release_user(self):
        # Users: open Contexts, grammar samplers, and calls that run with the GIL released
        # (tokenize, detokenize, LoRA loading).  All counting happens with the GIL held.
        self._n_users -= 1
        if self._n_users <= 0 and self._close_pending and self.ptr != NULL:
            llama_model_free(self.ptr)
            self.ptr = NULL

    def close(self) -> None:
        """Free the weights now.  Contexts (and grammar samplers) created from this model keep
        it alive: while one is open, the weights are freed when the last of them is closed or
        freed.  Either way the model refuses new work from here on."""
        if self.ptr == NULL:
            return
        if self._n_users > 0:
            self._close_pending = True   # freeing now would pull the weights from under them
            return
        llama_model_free(self.ptr)
        self.ptr = NULL

    @property
    def closed(self) -> bool:
        return self.ptr == NULL or self._close_pending

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self.ptr == NULL or self._close_pending:
            return f"<pyllama.Model {self.path!r} (closed)>"
        return f"<pyllama.Model {self.path!r} {self.description}>"

    @property
    def vocab(self) -> Vocab:
        self._get()
        return self._vocab

    @property
    def metadata(self) -> dict:
        """All GGUF key/value pairs as strings (arrays are summarised by llama.cpp)."""
        if self._meta_cache is not None:
            return dict(self._meta_cache)
        cdef llama_model * m = self._get()
        cdef int32_t n = llama_model_meta_count(m), i
        out = {}
        for i in range(n):
            key = _meta_string(m, i, True)
            out[key] = _meta_string(m, i, False)
        self._meta_cache = out
        return dict(out)

    def meta(self, key: str):
        """One metadata value (as a string), or None."""
        return self.metadata.get(key)

    @property
    def description(self) -> str:
        cdef char buf[256]
        cdef int32_t n = llama_model_desc(self._get(), buf, sizeof(buf))
        return buf[:max(0, min(n, 255))].decode("utf-8", "replace")

    @property
    def architecture(self) -> str:
        return self.meta("general.architecture") or ""

    @property
    def ftype(self) -> str:
        return _str(llama_ftype_name(llama_model_ftype(self._get())))

    @property
    def size(self) -> int:
        return llama_model_size(self._get())

    @property
    def n_params(self) -> int:
        return llama_model_n_params(self._get())

    @property
    def n_ctx_train(self) -> int:
        return llama_model_n_ctx_train(self._get())

    @property
    def n_embd(self) -> int:
        return llama_model_n_embd(self._get())

    @property
    def n_layer(self) -> int:
        return llama_model_n_layer(self._get())

    @property
    def n_head(self) -> int:
        # llama.cpp aborts on a model without layers (vocab_only=True)
        return llama_model_n_head(self._get()) if llama_model_n_layer(self.ptr) > 0 else 0

    @property
    def n_head_kv(self) -> int:
        return llama_model_n_head_kv(self._get()) if llama_model_n_layer(self.ptr) > 0 else 0

    @property
    def has_encoder(self) -> bool:
        return llama_model_has_encoder(self._get())

    @property
    def has_decoder(self) -> bool:
        return llama_model_has_decoder(self._get())

    @property
    def is_recurrent(self) -> bool:
        return llama_model_is_recurrent(self._get())

    @property
    def is_hybrid(self) -> bool:
        """Attention layers plus recurrent ones (Jamba, Falcon-H1, Granite 4, LFM2, Qwen3-Next...)."""
        return llama_model_is_hybrid(self._get())

    def chat_template(self, name=None):
        """The model's chat template (tokenizer.chat_template[.name]), or None."""
        cdef bytes bname
        cdef const char * res
        if name is None:
            res = llama_model_chat_template(self._get(), NULL)
        else:
            bname = _utf8(name, "template name")
            res = llama_model_chat_template(self._get(), bname)
        return None if res == NULL else res.decode("utf-8", "replace")


cdef str _meta_string(llama_model * m, int32_t i, bint key):
    cdef int32_t cap = 256, n
    cdef char * buf = NULL
    try:
        while True:
            buf = <char *>realloc(buf, cap)
            if buf == NULL:
                raise MemoryError()
            if key:
                n = llama_model_meta_key_by_index(m, i, buf, cap)
            else:
                n = llama_model_meta_val_str_by_index(m, i, buf, cap)
            if n < 0:
                return ""
            if n < cap:
                return buf[:n].decode("utf-8", "replace")
            cap = n + 1
    finally:
        free(buf)


cdef llama_model_kv_override * _make_kv_overrides(dict overrides) except NULL:
    cdef Py_ssize_t n = len(overrides), i = 0
    cdef llama_model_kv_override * arr = <llama_model_kv_override *>calloc(n + 1, sizeof(llama_model_kv_override))
    if arr == NULL:
        raise MemoryError()
    try:
        for key, value in overrides.items():
            bkey = _utf8(key, "kv_overrides key")
            if not bkey or len(bkey) >= 128:
                raise ValueError(f"kv_overrides key must be 1..127 bytes, got {key!r}")
            memcpy(arr[i].key, <char *>bkey, len(bkey))
            if isinstance(value, bool):
                arr[i].tag = LLAMA_KV_OVERRIDE_TYPE_BOOL
                arr[i].val_bool = value
            elif isinstance(value, int):
                if not (-(1 << 63) <= value < (1 << 63)):
                    raise ValueError(f"kv_overrides[{key!r}] does not fit in int64: {value}")
                arr[i].tag = LLAMA_KV_OVERRIDE_TYPE_INT
                arr[i].val_i64 = value
            elif isinstance(value, float):
                arr[i].tag = LLAMA_KV_OVERRIDE_TYPE_FLOAT
                arr[i].val_f64 = value
            elif isinstance(value, str):
                bval = _utf8(value, "kv_overrides value")
                if len(bval) >= 128:
                    raise ValueError(f"kv_overrides[{key!r}] string must be under 128 bytes")
                arr[i].tag = LLAMA_KV_OVERRIDE_TYPE_STR
                memcpy(arr[i].val_str, <char *>bval, len(bval))
            else:
                raise TypeError(f"kv_overrides[{key!r}] must be bool, int, float or str, not {type(value).__name__}")
            i += 1
    except BaseException:
        free(arr)
        raise
    return arr


cdef ggml_backend_dev_t * _make_device_list(devices) except NULL:
    names = list(devices)
    cdef ggml_backend_dev_t * arr = <ggml_backend_dev_t *>calloc(len(names) + 1, sizeof(ggml_backend_dev_t))
    cdef ggml_backend_dev_t dev
    if arr == NULL:
        raise MemoryError()
    for i, name in enumerate(names):
        b = _utf8(name, "device name")
        dev = ggml_backend_dev_by_name(b)
        if dev == NULL:
            free(arr)
            known = [d["name"] for be in backends() for d in be["devices"]]
            raise ValueError(f"unknown device {name!r}; available: {known}")
        arr[i] = dev
    return arr


_VOCAB_TYPES = {
    LLAMA_VOCAB_TYPE_NONE: "none", LLAMA_VOCAB_TYPE_SPM: "spm", LLAMA_VOCAB_TYPE_BPE: "bpe",
    LLAMA_VOCAB_TYPE_WPM: "wpm", LLAMA_VOCAB_TYPE_UGM: "ugm", LLAMA_VOCAB_TYPE_RWKV: "rwkv",
    LLAMA_VOCAB_TYPE_PLAMO2: "plamo2",
}


cdef class Vocab:
    """The tokenizer of a Model.  Keeps the model alive."""

    cdef readonly Model model
    cdef const llama_vocab * ptr
    cdef readonly int32_t n_tokens
    cdef readonly int bos, eos, eot, sep, nl, pad, mask
    cdef readonly int fim_pre, fim_suf, fim_mid, fim_pad, fim_rep, fim_sep
    cdef readonly bint add_bos, add_eos

    def __init__(self):
        raise TypeError("Vocab objects come from Model.vocab")

    @staticmethod
    cdef Vocab _wrap(Model model):
        cdef Vocab v = Vocab.__new__(Vocab)
        v.model = model
        v.ptr = llama_model_get_vocab(model.ptr)
        v.n_tokens = llama_vocab_n_tokens(v.ptr)
        v.bos = llama_vocab_bos(v.ptr)
        v.eos = llama_vocab_eos(v.ptr)
        v.eot = llama_vocab_eot(v.ptr)
        v.sep = llama_vocab_sep(v.ptr)
        v.nl = llama_vocab_nl(v.ptr)
        v.pad = llama_vocab_pad(v.ptr)
        v.mask = llama_vocab_mask(v.ptr)
        v.fim_pre = llama_vocab_fim_pre(v.ptr)
        v.fim_suf = llama_vocab_fim_suf(v.ptr)
        v.fim_mid = llama_vocab_fim_mid(v.ptr)
        v.fim_pad = llama_vocab_fim_pad(v.ptr)
        v.fim_rep = llama_vocab_fim_rep(v.ptr)
        v.fim_sep = llama_vocab_fim_sep(v.ptr)
        v.add_bos = llama_vocab_get_add_bos(v.ptr)
        v.add_eos = llama_vocab_get_add_eos(v.ptr)
        return v

    cdef inline const llama_vocab * _get(self) except NULL:
        if self.model is None or self.ptr == NULL:
            raise ValueError("this Vocab is not initialised (Vocab objects come from Model.vocab)")
        self.model._get()   # raises once the model is closed
        return self.ptr

    @property
    def type(self) -> str:
        return _VOCAB_TYPES.get(<int>llama_vocab_get_type(self._get()), "unknown")

    cdef inline int _check_token(self, long long token) except -1:
        if token < 0 or token >= self.n_tokens:
            raise InvalidTokenError(f"token id {token} is out of range for a vocabulary of {self.n_tokens} tokens")
        return 0

    def check_tokens(self, tokens) -> None:
        """Raise InvalidTokenError unless every id is in [0, n_tokens)."""
        for t in tokens:
            self._check_token(t)

    def tokenize(self, text, bint add_special=True, bint parse_special=False) -> list:
        """Text (str, or UTF-8 bytes) to token ids."""
        cdef const llama_vocab * v = self._get()
        cdef bytes data
        if isinstance(text, str):
            try:
                data = (<str>text).encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"text cannot be encoded as UTF-8: {e.reason} at index {e.start}") from None
        elif isinstance(text, (bytes, bytearray, memoryview)):
            data = bytes(text)
            # llama.cpp's pre-tokenizers throw (and abort the process) on malformed UTF-8.
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"bytes are not valid UTF-8: {e.reason} at byte {e.start}") from None
        else:
            raise TypeError(f"text must be str or bytes, not {type(text).__name__}")
        cdef Py_ssize_t n_bytes = len(data)
        if n_bytes > 0x3FFFFFF0:
            raise ValueError(f"text of {n_bytes} bytes is too long to tokenize")
        cdef int32_t cap = <int32_t>n_bytes + 8
        cdef llama_token * out = <llama_token *>malloc(cap * sizeof(llama_token))
        cdef int32_t n
        cdef const char * cdata = PyBytes_AS_STRING(data)
        if out == NULL:
            raise MemoryError()
        # While the GIL is released another thread may call Model.close(): count this call
        # as a user of the model, so the weights (and the vocabulary) outlive it.
        cdef Model model = self.model
        model._add_user()
        try:
            with nogil:
                n = llama_tokenize(v, cdata, <int32_t>n_bytes, out, cap, add_special, parse_special)
            # A Ctrl-C that came during a long tokenization: run Python's handler now (it
            # raises KeyboardInterrupt, or whatever a user's handler does; one that returns is
            # respected and we go on).
            PyErr_CheckSignals()
            if n < 0:
                if n == -2147483648:
                    raise ValueError("tokenization overflowed int32")
                cap = -n
                out = <llama_token *>realloc(out, cap * sizeof(llama_token))
                if out == NULL:
                    raise MemoryError()
                with nogil:
                    n = llama_tokenize(v, cdata, <int32_t>n_bytes, out, cap, add_special, parse_special)
                PyErr_CheckSignals()
                _check(n >= 0, RuntimeError, "llama_tokenize failed")
            return [out[i] for i in range(n)]
        finally:
            free(out)
            model._release_user()

    cdef bytes _detokenize(self, tokens, bint remove_special, bint unparse_special):
        cdef const llama_vocab * v = self._get()
        cdef Py_ssize_t n = len(tokens), i
        cdef llama_token * arr = <llama_token *>malloc(max(n, 1) * sizeof(llama_token))
        cdef int32_t cap, got
        cdef char * buf = NULL
        cdef Model model = self.model
        if arr == NULL:
            raise MemoryError()
        model._add_user()   # see tokenize(): Model.close() waits for us
        try:
            for i in range(n):
                t = tokens[i]
                self._check_token(t)
                arr[i] = t
            cap = <int32_t>(n * 8 + 16)
            while True:
                buf = <char *>realloc(buf, cap)
                if buf == NULL:
                    raise MemoryError()
                with nogil:
                    got = llama_detokenize(v, arr, <int32_t>n, buf, cap, remove_special, unparse_special)
                if got >= 0:
                    return PyBytes_FromStringAndSize(buf, got)
                cap = -got + 1
        finally:
            free(arr)
            free(buf)
            model._release_user()

    def detokenize(self, tokens, bint remove_special=False, bint unparse_special=False) -> str:
        """Token ids to text; bytes that are not valid UTF-8 become U+FFFD."""
        return self._detokenize(tokens, remove_special, unparse_special).decode("utf-8", "replace")

    def detokenize_bytes(self, tokens, bint remove_special=False, bint unparse_special=False) -> bytes:
        return self._detokenize(tokens, remove_special, unparse_special)

    def token_to_piece(self, int token, bint special=False, int lstrip=0) -> bytes:
        """The bytes of one token (may be part of a multi-byte character)."""
        cdef const llama_vocab * v = self._get()
        self._check_token(token)
        if lstrip < 0:
            raise ValueError("lstrip must be >= 0")
        cdef char buf[128]
        cdef int32_t n = llama_token_to_piece(v, token, buf, sizeof(buf), lstrip, special)
        cdef char * big
        if n >= 0:
            return buf[:n]
        big = <char *>malloc(-n)
        try:
            n = llama_token_to_piece(v, token, big, -n, lstrip, special)
            return big[:max(n, 0)]
        finally:
            free(big)

    def token_text(self, int token) -> str:
        self._check_token(token)
        return _str(llama_vocab_get_text(self._get(), token))

    def token_score(self, int token) -> float:
        self._check_token(token)
        return llama_vocab_get_score(self._get(), token)

    def token_attr(self, int token) -> int:
        self._check_token(token)
        return <int>llama_vocab_get_attr(self._get(), token)

    def is_eog(self, int token) -> bool:
        if token < 0 or token >= self.n_tokens:
            return False
        return llama_vocab_is_eog(self._get(), token)

    def is_control(self, int token) -> bool:
        if token < 0 or token >= self.n_tokens:
            return False
        return llama_vocab_is_control(self._get(), token)

    def __len__(self):
        return self.n_tokens

    def __repr__(self):
        return f"<pyllama.Vocab {self.type} n_tokens={self.n_tokens}>"


@cython.no_gc_clear   # __dealloc__ needs self.model (it frees the adapter only while the model lives)
cdef class LoraAdapter:
    """A LoRA adapter (GGUF) loaded for a Model; apply it with Context.set_lora_adapters."""

    cdef llama_adapter_lora * ptr
    cdef readonly Model model
    cdef readonly str path

    def __cinit__(self):
        self.ptr = NULL

    def __init__(self, Model model not None, path):
        if self.ptr != NULL:
            raise RuntimeError("LoraAdapter is already initialised")
        path = _os.fsdecode(_os.fspath(path))
        _precheck_model_file(path)
        cdef bytes p = _os.fsencode(path)
        cdef const char * pc = p
        cdef llama_model * m = model._get()
        pyllama_clear_last_error()
        model._add_user()   # Model.close() from another thread must not free it under the load
        try:
            with nogil:
                self.ptr = llama_adapter_lora_init(m, pc)
        finally:
            model._release_user()
        _check(self.ptr != NULL, ModelLoadError, "not a LoRA adapter for this model: ", "llama.cpp refused it", path)
        self.model = model
        self.path = path

    def __dealloc__(self):
        # Adapters are freed together with their model; free earlier only while it lives.
        if self.ptr != NULL and self.model is not None and self.model.ptr != NULL:
            llama_adapter_lora_free(self.ptr)
        self.ptr = NULL
