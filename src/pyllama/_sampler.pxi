# SamplerChain (owns a llama_sampler chain; stages are owned by the chain).

from libc.math cimport INFINITY, isfinite


cdef llama_sampler * _make_grammar_sampler(Vocab vocab, grammar, root, trigger_patterns,
                                           trigger_tokens) except NULL:
    cdef bytes g = _utf8(grammar, "grammar")
    cdef bytes r = _utf8(root, "grammar root")
    if not g.strip():
        raise GrammarError("the grammar is empty")
    if not r:
        raise GrammarError("the grammar root rule name is empty")
    cdef const llama_vocab * v = vocab._get()
    # llama.cpp's parser can hang, overflow the C stack or allocate without bound on some
    # grammars (reversed repetitions, deep nesting, long left chains, huge expansions):
    # pyllama._gbnf_check rejects those before they reach it.  It also reports syntax errors
    # the way llama.cpp's parser would, since that parser prints them to stderr (capturing them
    # would mean redirecting file descriptor 2 for every thread of the process).
    from pyllama._gbnf_check import check_before_llama
    check_before_llama(g.decode("utf-8"), r.decode("utf-8"), n_vocab=vocab.n_tokens,
                       token_count=lambda text: len(vocab.tokenize(text, False, True)))
    cdef char regex_err[256]
    cdef llama_sampler * smpl
    cdef list pats = [_utf8(p, "trigger pattern") for p in (trigger_patterns or ())]
    cdef list toks = list(trigger_tokens or ())
    cdef const char ** cpats = NULL
    cdef llama_token * ctoks = NULL
    cdef Py_ssize_t i
    pyllama_clear_last_error()
    if trigger_patterns is None and trigger_tokens is None:
        smpl = llama_sampler_init_grammar(v, g, r)
    else:
        if not pats and not toks:
            raise GrammarError("a lazy grammar needs at least one trigger pattern or trigger token")
        cpats = <const char **>calloc(max(len(pats), 1), sizeof(char *))
        ctoks = <llama_token *>calloc(max(len(toks), 1), sizeof(llama_token))
        try:
            for i in range(len(pats)):
                cpats[i] = PyBytes_AS_STRING(pats[i])
                # std::regex throws on a bad pattern inside llama.cpp, which aborts the process.
                if not pyllama_regex_check(cpats[i], regex_err, sizeof(regex_err)):
                    raise GrammarError(f"trigger pattern {_short(trigger_patterns[i])!r} is not a valid "
                                       f"(ECMAScript) regular expression: {_str(regex_err)}")
            for i in range(len(toks)):
                vocab._check_token(toks[i])
                ctoks[i] = toks[i]
            smpl = llama_sampler_init_grammar_lazy_patterns(v, g, r, cpats, len(pats), ctoks, len(toks))
        finally:
            free(cpats)
            free(ctoks)
    # Only a grammar the pre-check passed gets here: should llama.cpp still refuse it, say so
    # with what it logged (its own parse errors go to stderr, not to our log callback).
    _check(smpl != NULL, GrammarError, "invalid grammar: llama.cpp refused it: ",
           "no details were logged (with verbose logging, llama.cpp's stderr may say more)")
    return smpl


@cython.no_gc_clear   # __dealloc__ needs self.vocab.model (see _holds_model)
cdef class SamplerChain:
    """llama.cpp's sampler chain: stages run in the order they were added.

    The last stage must pick a token: greedy, dist or mirostat.
    """

    cdef llama_sampler * ptr
    cdef readonly Vocab vocab
    cdef list _grammar_stages     # indices into the chain, for the accept() check
    cdef list _names
    cdef readonly bint has_grammar
    cdef bint _holds_model        # a grammar stage points into the model's vocabulary
    # The chain is exactly [logit-bias ->] greedy: the engine can take the argmax of the
    # logits itself (same token, no candidate array).  The bias (distinct token ids), and
    # room to save the logits it patches:
    cdef readonly bint _plain_greedy
    cdef llama_logit_bias * _bias
    cdef float * _bias_saved
    cdef int32_t _n_bias
    cdef list _params            # the parameters each stage was built with (stage_params)
    cdef object _grammar_failed   # None, or why a grammar stage broke (reset() clears it)

    def __cinit__(self):
        self.ptr = NULL
        self._holds_model = False
        self._plain_greedy = False
        self._bias = NULL
        self._bias_saved = NULL
        self._n_bias = 0
        self._names = []
        self._grammar_stages = []
        self._params = []
        self._grammar_failed = None

    def __init__(self, Vocab vocab not None, bint no_perf=False):
        if self.ptr != NULL:
            raise RuntimeError("SamplerChain is already initialised")
        vocab._get()   # a closed model (or a Vocab built without a model) is refused here
        cdef llama_sampler_chain_params p = llama_sampler_chain_default_params()
        p.no_perf = no_perf
        self.vocab = vocab
        self.ptr = llama_sampler_chain_init(p)
        if self.ptr == NULL:
            raise MemoryError()

    cdef inline llama_sampler * _get(self) except NULL:
        """The chain; raises for a SamplerChain built with __new__ (or by a subclass whose
        __init__ did not call SamplerChain.__init__) instead of handing NULL to llama.cpp."""
        if self.ptr == NULL or self.vocab is None:
            raise RuntimeError("this SamplerChain is not initialised: create it with SamplerChain(vocab) "
                               "(a subclass must call super().__init__(vocab))")
        return self.ptr

    def __dealloc__(self):
        if self.ptr != NULL:
            llama_sampler_free(self.ptr)
            self.ptr = NULL
        self._set_bias(NULL, 0)
        if self._holds_model:
            self._holds_model = False
            if self.vocab is not None and self.vocab.model is not None:
                self.vocab.model._release_user()

    cdef void _hold_model(self):
        """Grammar stages keep a pointer to the vocabulary: Model.close() must wait for us."""
        if not self._holds_model:
            self.vocab.model._add_user()
            self._holds_model = True

    cdef SamplerChain _add(self, llama_sampler * stage, str name, dict params=None):
        if stage == NULL:
            raise ValueError(f"llama.cpp refused the {name} sampler: " + _last_error("invalid parameters"))
        llama_sampler_chain_add(self._get(), stage)
        self._names.append(name)
        self._params.append(params or {})
        self._plain_greedy = self._names == ["greedy"] or self._names == ["logit-bias", "greedy"]
        return self

    cdef llama_token _greedy_argmax(self, float * logits, int32_t n_vocab) noexcept nogil:
        """The token llama.cpp's [logit-bias ->] greedy chain picks: the first index whose
        (biased) logit is largest, compared with `>` as llama_sampler_greedy does.  The bias
        is added in place for the scan and the original values are put back afterwards."""
        cdef int32_t k
        cdef llama_token best
        for k in range(self._n_bias):
            self._bias_saved[k] = logits[self._bias[k].token]
            logits[self._bias[k].token] += self._bias[k].bias
        best = pyllama_argmax_f32(logits, n_vocab)
        for k in range(self._n_bias - 1, -1, -1):   # backwards: right even if a token repeats
            logits[self._bias[k].token] = self._bias_saved[k]
        return best

    cdef int _set_bias(self, const llama_logit_bias * bias, int32_t n) except -1:
        """Keep a copy of the chain's logit bias for _greedy_argmax (n == 0: none)."""
        free(self._bias)
        free(self._bias_saved)
        self._bias = NULL
        self._bias_saved = NULL
        self._n_bias = 0
        if n == 0:
            return 0
        self._bias = <llama_logit_bias *>malloc(n * sizeof(llama_logit_bias))
        self._bias_saved = <float *>malloc(n * sizeof(float))
        if self._bias == NULL or self._bias_saved == NULL:
            raise MemoryError()
        memcpy(self._bias, bias, n * sizeof(llama_logit_bias))
        self._n_bias = n
        return 0

    def add_greedy(self) -> SamplerChain:
        self._get()
        return self._add(llama_sampler_init_greedy(), "greedy")

    def add_dist(self, seed=0xFFFFFFFF) -> SamplerChain:
        self._get()
        cdef uint32_t sd = _seed(seed)
        return self._add(llama_sampler_init_dist(sd), "dist", {"seed": sd})

    def add_top_k(self, int k) -> SamplerChain:
        self._get()
        if k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {k}")
        return self._add(llama_sampler_init_top_k(k), "top-k", {"k": k})

    def add_top_p(self, float p, size_t min_keep=1) -> SamplerChain:
        self._get()
        _check_prob("top_p", p, allow_zero=False)
        return self._add(llama_sampler_init_top_p(p, min_keep), "top-p", {"p": p, "min_keep": min_keep})

    def add_min_p(self, float p, size_t min_keep=1) -> SamplerChain:
        self._get()
        _check_prob("min_p", p, allow_zero=True)
        return self._add(llama_sampler_init_min_p(p, min_keep), "min-p", {"p": p, "min_keep": min_keep})

    def add_typical(self, float p, size_t min_keep=1) -> SamplerChain:
        self._get()
        _check_prob("typical_p", p, allow_zero=False)
        return self._add(llama_sampler_init_typical(p, min_keep), "typical", {"p": p, "min_keep": min_keep})

    def add_temp(self, float t) -> SamplerChain:
        self._get()
        _check_finite("temperature", t, minimum=0.0)
        return self._add(llama_sampler_init_temp(t), "temp", {"t": t})

    def add_temp_ext(self, float t, float delta, float exponent) -> SamplerChain:
        self._get()
        _check_finite("temperature", t, minimum=0.0)
        _check_finite("dynatemp delta", delta, minimum=0.0)
        _check_finite("dynatemp exponent", exponent)
        return self._add(llama_sampler_init_temp_ext(t, delta, exponent), "temp-ext",
                         {"t": t, "delta": delta, "exponent": exponent})

    def add_xtc(self, float p, float t, size_t min_keep=1, seed=0xFFFFFFFF) -> SamplerChain:
        self._get()
        _check_prob("xtc probability", p, allow_zero=True)
        _check_prob("xtc threshold", t, allow_zero=True)
        cdef uint32_t sd = _seed(seed)
        return self._add(llama_sampler_init_xtc(p, t, min_keep, sd), "xtc",
                         {"p": p, "t": t, "min_keep": min_keep, "seed": sd})

    def add_top_n_sigma(self, float n) -> SamplerChain:
        self._get()
        _check_finite("top_n_sigma", n)
        return self._add(llama_sampler_init_top_n_sigma(n), "top-n-sigma", {"n": n})

    def add_mirostat(self, seed, float tau, float eta, int m=100) -> SamplerChain:
        self._get()
        _check_finite("mirostat_tau", tau, minimum=0.0)
        _check_finite("mirostat_eta", eta, minimum=0.0)
        if m < 1:
            raise ValueError(f"mirostat m must be >= 1, got {m}")
        cdef uint32_t sd = _seed(seed)
        return self._add(llama_sampler_init_mirostat(self.vocab.n_tokens, sd, tau, eta, m), "mirostat",
                         {"seed": sd, "tau": tau, "eta": eta, "m": m})

    def add_mirostat_v2(self, seed, float tau, float eta) -> SamplerChain:
        self._get()
        _check_finite("mirostat_tau", tau, minimum=0.0)
        _check_finite("mirostat_eta", eta, minimum=0.0)
        cdef uint32_t sd = _seed(seed)
        return self._add(llama_sampler_init_mirostat_v2(sd, tau, eta), "mirostat-v2", {"seed": sd, "tau": tau, "eta": eta})

    def add_penalties(self, int last_n=64, float repeat=1.0, float frequency=0.0,
                      float presence=0.0, *, int n_ctx=0) -> SamplerChain:
        """Repetition penalties over the last `last_n` tokens (0 disables them; -1: the whole
        context, `n_ctx` tokens, or the model's training context when n_ctx is 0)."""
        self._get()
        _check_finite("repeat_penalty", repeat, minimum=0.0)
        if repeat == 0.0:
            raise ValueError("repeat_penalty must be > 0 (1.0 disables it)")
        _check_finite("frequency_penalty", frequency)
        _check_finite("presence_penalty", presence)
        cdef int32_t window = self._window("penalty last_n", last_n, n_ctx)
        return self._add(llama_sampler_init_penalties(self.vocab.n_tokens, window, repeat, frequency, presence),
                         "penalties", {"last_n": window, "repeat": repeat, "frequency": frequency,
                                       "presence": presence})

    def add_dry(self, float multiplier, float base=1.75, int allowed_length=2, int last_n=-1,
                seq_breakers=("\n", ":", '"', "*"), *, int n_ctx=0) -> SamplerChain:
        """DRY repetition penalty over the last `last_n` tokens (-1, the default: the whole
        context, as for add_penalties; 0 disables it)."""
        self._get()
        _check_finite("dry_multiplier", multiplier, minimum=0.0)
        _check_finite("dry_base", base, minimum=1.0)
        if allowed_length < 0:
            raise ValueError(f"dry allowed_length must be >= 0, got {allowed_length}")
        cdef int32_t window = self._window("dry last_n", last_n, n_ctx)
        cdef list keep = [_utf8(brk, "DRY sequence breaker") for brk in seq_breakers]
        cdef const char ** arr = <const char **>calloc(max(len(keep), 1), sizeof(char *))
        cdef llama_sampler * s
        try:
            for i, b in enumerate(keep):
                if not b:
                    raise ValueError("DRY sequence breakers must not be empty")
                arr[i] = PyBytes_AS_STRING(b)
            s = llama_sampler_init_dry(self.vocab._get(), multiplier, base, allowed_length, window, arr, len(keep))
        finally:
            free(arr)
        return self._add(s, "dry", {"multiplier": multiplier, "base": base, "allowed_length": allowed_length,
                                    "last_n": window, "seq_breakers": [b.decode() for b in keep]})

    def add_logit_bias(self, bias) -> SamplerChain:
        """{token_id: bias}; float('-inf') forbids a token."""
        self._get()
        cdef dict items = dict(bias)
        cdef llama_logit_bias * arr = <llama_logit_bias *>calloc(max(len(items), 1), sizeof(llama_logit_bias))
        cdef llama_sampler * s
        try:
            for i, (tok, val) in enumerate(items.items()):
                self.vocab._check_token(tok)
                val = float(val)
                if val != val or val == INFINITY:
                    raise ValueError(f"logit_bias for token {tok} must be finite or -inf, got {val}")
                arr[i].token = tok
                arr[i].bias = val
            s = llama_sampler_init_logit_bias(self.vocab.n_tokens, len(items), arr)
            if s != NULL and not self._names:
                self._set_bias(arr, len(items))   # for the engine's greedy fast path
        finally:
            free(arr)
        return self._add(s, "logit-bias", {"bias": {int(t): float(b) for t, b in items.items()}})

    def add_grammar(self, grammar, root="root") -> SamplerChain:
        """Constrain output with a GBNF grammar (GrammarError if it does not parse)."""
        self._get()
        cdef llama_sampler * s = _make_grammar_sampler(self.vocab, grammar, root, None, None)
        self._hold_model()
        self._grammar_stages.append(len(self._names))
        self.has_grammar = True
        return self._add(s, "grammar", {"root": root})

    def add_grammar_lazy(self, grammar, root="root", trigger_patterns=(), trigger_tokens=()) -> SamplerChain:
        """A grammar that applies only after a trigger pattern (regex) or token appears."""
        self._get()
        cdef llama_sampler * s = _make_grammar_sampler(self.vocab, grammar, root, list(trigger_patterns),
                                                       list(trigger_tokens))
        self._hold_model()
        self._grammar_stages.append(len(self._names))
        self.has_grammar = True
        return self._add(s, "grammar-lazy", {"root": root, "trigger_patterns": list(trigger_patterns),
                                             "trigger_tokens": list(trigger_tokens)})

    cdef int32_t _window(self, str what, int last_n, int n_ctx) except -2:
        """A penalty window as llama.cpp's samplers take it.  They treat any negative value as 0
        (penalty off), so "-1 = the whole context" is resolved here; a window beyond any
        context is capped (the sampler allocates a ring buffer of that many tokens up front:
        2**31 would be std::bad_alloc)."""
        if last_n < -1:
            raise ValueError(f"{what} must be >= -1 (-1: the whole context, 0: off), got {last_n}")
        if n_ctx < 0:
            raise ValueError(f"n_ctx must be >= 0, got {n_ctx}")
        cdef int64_t whole = n_ctx if n_ctx > 0 else llama_model_n_ctx_train(self.vocab.model._get())
        if whole <= 0:
            whole = 4096
        if last_n == -1:
            return <int32_t>whole
        cdef int64_t cap = max(whole, _PENALTY_WINDOW_CAP)
        return <int32_t>min(<int64_t>last_n, cap)

    @property
    def stage_params(self) -> list:
        """(name, parameters) of each stage, as handed to llama.cpp: penalty windows resolved,
        seeds as the 32-bit value llama.cpp got (0xFFFFFFFF: a random seed), logit biases as
        {token: bias}.  Tests and debugging read what a call really built from this."""
        return [(n, dict(p)) for n, p in zip(self._names, self._params)]

    cdef int _check_selects(self) except -1:
        if not self._names or self._names[-1] not in ("greedy", "dist", "mirostat", "mirostat-v2"):
            raise ValueError("the sampler chain must end with a selecting stage (greedy, dist or mirostat)")
        return 0

    def sample(self, Context ctx not None, int idx=-1) -> int:
        """Sample and accept a token from the logits at batch index `idx` of ctx's last decode."""
        cdef llama_sampler * chain = self._get()
        self._check_selects()
        self._check_grammar_ok()
        cdef llama_token tok
        with ctx._lock:
            ctx._get()   # a closed context has no logits
            if ctx.n_vocab != self.vocab.n_tokens:
                raise ValueError(f"this sampler was built for a vocabulary of {self.vocab.n_tokens} tokens, "
                                 f"the context's model has {ctx.n_vocab}")
            ctx._output_index(idx)
            try:
                with nogil:
                    tok = llama_sampler_sample(chain, ctx.ptr, idx)
            except RuntimeError as e:
                self._grammar_error(e)
                raise
        return tok

    cdef int _check_grammar_ok(self) except -1:
        if self._grammar_failed is not None:
            raise GrammarError(f"a grammar stage of this sampler failed ({self._grammar_failed}); "
                               "call reset() before using it again")
        return 0

    cdef int _grammar_error(self, object e) except -1:
        """llama.cpp's grammar throws when the text that fires a lazy grammar's trigger (or a
        token it was told to accept) is not allowed by the grammar: its stacks are empty from
        then on.  Turn that into GrammarError and refuse the chain until reset()."""
        if self._grammar_stages and "grammar" in str(e):
            self._grammar_failed = str(e)
            raise GrammarError(f"the grammar rejected the generated text: {e} (for a lazy grammar: the text "
                               "that fired a trigger does not match the grammar); call reset() before "
                               "using this sampler again") from None
        return 0

    cdef bint _grammar_allows(self, llama_token token):
        """Would every grammar stage accept `token` now?  (Accepting a forbidden token
        makes llama.cpp abort the process, so we ask first.)"""
        cdef llama_token_data data
        cdef llama_token_data_array arr
        for i in self._grammar_stages:
            data.id = token
            data.logit = 0.0
            data.p = 0.0
            arr.data = &data
            arr.size = 1
            arr.selected = -1
            arr.sorted = False
            llama_sampler_apply(llama_sampler_chain_get(self.ptr, i), &arr)
            if not isfinite(data.logit):
                return False
        return True

    def accept(self, int token) -> None:
        """Tell the stateful stages (penalties, grammar, mirostat) that `token` was chosen."""
        cdef llama_sampler * chain = self._get()
        self._check_grammar_ok()
        self.vocab._check_token(token)
        if self._grammar_stages and not self._grammar_allows(token):
            raise GrammarError(f"token {token} ({self.vocab.token_text(token)!r}) is not allowed by the grammar here")
        try:
            llama_sampler_accept(chain, token)
        except RuntimeError as e:
            self._grammar_error(e)
            raise

    def accept_context(self, tokens) -> None:
        """Show the stages text that came before the answer (the prompt): penalties and DRY
        then count repetitions of it too, as llama.cpp's own tools and llama-server do.
        Negative keys (a MediaPrompt's image positions) are skipped.  Chains with a grammar
        stage refuse: a grammar constrains the answer only."""
        cdef llama_sampler * chain = self._get()
        if self._grammar_stages:
            raise ValueError("accept_context() needs a chain without a grammar stage")
        cdef list keep = [t for t in tokens if t >= 0]
        for t in keep:
            self.vocab._check_token(t)
        cdef Py_ssize_t i, n = len(keep)
        if n == 0:
            return
        cdef llama_token * buf = <llama_token *>malloc(n * sizeof(llama_token))
        if buf == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                buf[i] = keep[i]
            with nogil:
                for i in range(n):
                    llama_sampler_accept(chain, buf[i])
        finally:
            free(buf)

    def reset(self) -> None:
        llama_sampler_reset(self._get())
        self._grammar_failed = None

    def clone(self) -> SamplerChain:
        cdef SamplerChain c = SamplerChain.__new__(SamplerChain)
        c.vocab = self.vocab
        c.ptr = llama_sampler_clone(self._get())
        if c.ptr == NULL:
            raise MemoryError()
        c._grammar_stages = list(self._grammar_stages)
        c._names = list(self._names)
        c._params = [dict(p) for p in self._params]
        c._grammar_failed = self._grammar_failed
        c.has_grammar = self.has_grammar
        c._plain_greedy = self._plain_greedy
        c._set_bias(self._bias, self._n_bias)
        if self._holds_model:
            c._hold_model()
        return c

    @property
    def names(self) -> list:
        return list(self._names)

    def __len__(self):
        return llama_sampler_chain_n(self._get())

    @property
    def seed(self) -> int:
        return llama_sampler_get_seed(self._get())

    def perf(self) -> dict:
        cdef llama_perf_sampler_data d = llama_perf_sampler(self._get())
        return {"t_sample_ms": d.t_sample_ms, "n_sample": d.n_sample}

    def perf_reset(self) -> None:
        llama_perf_sampler_reset(self._get())

    def __repr__(self):
        return f"<pyllama.SamplerChain {' -> '.join(self._names) or '(empty)'}>"


cdef int64_t _PENALTY_WINDOW_CAP = 1 << 20   # tokens; windows past every context are capped here


cdef uint32_t _seed(object seed) except? 0xFFFFFFFF:
    if seed is None or seed == -1:
        return 0xFFFFFFFF   # LLAMA_DEFAULT_SEED: a random seed
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0 or seed > 0xFFFFFFFF:
        raise ValueError(f"seed must be in 0..2**32-1 (or -1/None for random), got {seed}")
    return <uint32_t>seed


# The rules for sampling values, in one place: the sampler stages check what reaches
# llama.cpp with them, and pyllama.sampling.SamplingParams validates with the same two.
cpdef int _check_finite(str name, double value, double minimum=-INFINITY) except -1:
    if not isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value}")
    return 0


cpdef int _check_prob(str name, double value, bint allow_zero) except -1:
    if not isfinite(value) or value < 0.0 or value > 1.0 or (value == 0.0 and not allow_zero):
        rng = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return 0
