# A generation request (GenerationRequest): its prompt, sampler, limits and hooks, and
# everything it produces -- tokens, text (stop strings held back until they can't match),
# log-probabilities -- as the Engine (_engine.pxi) advances it.  With the helpers for the
# Python hooks (logits processors, stopping criteria) and log-probability rows.
#
# The engine's files, in the order _core.pyx includes them: _request.pxi (the request),
# _engine.pxi (slots, prompt cache, queue, preemption, the step), _speculation.pxi
# (drafting and verification), _engine_sampling.pxi (choosing each request's next token).

from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.ref cimport Py_REFCNT
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.math cimport exp, expf, log


DEF _MAX_TOP_LOGPROBS = 20
DEF _MAX_DRAFT = 256          # drafted tokens per request per step, at most


cdef int _logprob_stats(const float * logits, int32_t n_vocab, int k, float * max_out, double * logsum_out,
                        int32_t * top_ids, float * top_vals) noexcept nogil:
    """max and log(sum(exp(l - max))) of a logits row, and its k largest entries (first
    index first among equals: the order greedy sampling uses).  Returns how many."""
    cdef int32_t i
    cdef int cnt = 0, j
    cdef float m = logits[0], v
    cdef double s = 0.0
    for i in range(1, n_vocab):
        if logits[i] > m:
            m = logits[i]
    for i in range(n_vocab):
        s += expf(logits[i] - m)
    if k > 0:
        for i in range(n_vocab):
            v = logits[i]
            if cnt < k or v > top_vals[cnt - 1]:
                j = cnt if cnt < k else k - 1
                while j > 0 and top_vals[j - 1] < v:
                    top_vals[j] = top_vals[j - 1]
                    top_ids[j] = top_ids[j - 1]
                    j -= 1
                top_vals[j] = v
                top_ids[j] = i
                if cnt < k:
                    cnt += 1
    max_out[0] = m
    logsum_out[0] = log(s)
    return cnt


# ---- Python hooks (logits processors, stopping criteria) ---------------------------
# Only requests that carry hooks pay for them: the engine tests one flag per sampled token,
# everything else (NumPy arrays, Python calls) happens on the hooked path alone.

cdef object _numpy_module = None


cdef object _np():
    global _numpy_module
    if _numpy_module is None:
        import numpy
        _numpy_module = numpy
    return _numpy_module


cdef object _float_row(float * row, int32_t n_vocab, bint writable):
    """A NumPy float32 array over a logits row, without a copy.  It is only valid while the
    hooks run (the next decode overwrites the row, and may move the buffer)."""
    return _np().frombuffer(PyMemoryView_FromMemory(<char *>row, n_vocab * sizeof(float),
                                                    PyBUF_WRITE if writable else PyBUF_READ),
                            dtype=_np().float32)


cdef tuple _check_hooks(object hooks, str what):
    """None or an iterable of callables -> a tuple of them (TypeError otherwise)."""
    if hooks is None:
        return ()
    if callable(hooks) and not hasattr(hooks, "__iter__"):
        raise TypeError(f"{what} must be a list of callables, got a single {type(hooks).__name__}: "
                        "wrap it in a list")
    try:
        out = tuple(hooks)
    except TypeError:
        raise TypeError(f"{what} must be a list of callables, got {type(hooks).__name__}") from None
    for h in out:
        if not callable(h):
            raise TypeError(f"{what} must be callables, got {type(h).__name__}")
    return out


cdef object _forget_row(object error, bint row_view):
    """A hook raised while `scores` viewed the engine's logits buffer: clear the locals of the
    traceback's finished frames, so that no debugger or traceback printer reads the view after
    the buffer is reused."""
    if row_view and error.__traceback__ is not None:
        import traceback
        traceback.clear_frames(error.__traceback__)
    return error


cdef int _check_not_kept(object scores, Py_ssize_t n_refs, str what) except -1:
    """`scores` viewed the engine's logits buffer: a hook that kept a reference to it would
    read freed memory later (the buffer is reused and may move).  Refuse that, at once."""
    if Py_REFCNT(scores) > n_refs:
        raise _HookFailure(BufferError(
            f"a {what} kept a reference to `scores`, a view of the engine's logits buffer that is only "
            f"valid during the call: keep scores.copy() instead"))
    return 0


class _HookFailure(Exception):
    """A logits processor or stopping criterion raised (or broke the rules): carries the
    exception the request ends with.  Not a RuntimeError: the step must not mistake it for
    a sampler failure."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


cdef object _retryable(object exc):
    """Mark an error that a later retry of the same request may not meet (KV cells held by
    other sequences)."""
    exc.retryable = True
    return exc


cdef tuple _logprob_entry(const float * logits, int32_t n_vocab, llama_token tok, int k):
    """(token, logprob, ((id, logprob), ...top k)) from a raw logits row."""
    cdef float m
    cdef double ls
    cdef int32_t top_ids[_MAX_TOP_LOGPROBS]
    cdef float top_vals[_MAX_TOP_LOGPROBS]
    cdef int cnt, j
    with nogil:
        cnt = _logprob_stats(logits, n_vocab, k, &m, &ls, top_ids, top_vals)
    top = tuple([(top_ids[j], <double>top_vals[j] - m - ls) for j in range(cnt)])
    return (tok, <double>logits[tok] - m - ls, top)


cdef class GenerationRequest:
    """One prompt to run through an Engine, with its own sampler and stop conditions.

    `logprobs=K` (0..20) records, for every generated token, its log-probability and the
    K most likely alternatives under the model's raw distribution (before the sampler
    chain), or with `post_sampling_probs=True` under the distribution the chain left (its
    candidates after top-k/top-p/min-p/temperature..., as llama-server's post_sampling_probs;
    alternatives of probability 0 left out); `prompt_logprobs=True` does the former for every
    prompt token after the first.
    `n_followers` more requests (see `followers`) share this one's prompt evaluation.

    Python hooks (llama-cpp-python's / transformers' callables), run by the engine in the
    stepping thread, for this request only (it still batches with the others):

    - `logits_processors`: each is called as `processor(input_ids, scores)` once per sampled
      token, between the decode and the sampling, in order, before the sampler chain and the
      grammar.  `input_ids` is a read-only NumPy intc array of the tokens so far (prompt, then
      generated; an image or audio position holds a negative placeholder); `scores` is a
      writable NumPy float32 array of the n_vocab logits for this position, the engine's own
      buffer (no copy), valid only during the call: keep `scores.copy()`, never `scores`
      itself (a kept reference ends the request with BufferError).  Return `scores` (edited
      in place) or a new array of the same shape (copied in).  `logprobs` still report the
      model's raw distribution, as llama-cpp-python's do.
    - `stopping_criteria`: each is called as `criterion(input_ids, scores)` after each token
      the request keeps (not the end-of-generation token, nor a `stop_tokens` one), with that
      token last in `input_ids` and the scores it was sampled from (after the processors;
      not to be edited, nor kept, as for processors).  All of them run; any True ends the
      request with finish_reason "stop": the token stays in `tokens`, but, as in
      llama-cpp-python, its text is not part of the output (nor its logprobs entry); text
      held back before it is released.  `stopped_by_criterion` says so.

    An exception in a hook (or a processor's result of the wrong shape) ends this request
    with that exception (finish_reason "error", `error` set); the other requests go on.
    Hooks must not run generation on the same engine (the stepping thread is theirs).
    """

    # inputs
    cdef readonly list prompt_tokens
    cdef readonly MediaPrompt media      # images/audio in the prompt, or None
    cdef list media_spans                # (start, n_tokens, chunk index) of each medium
    cdef list pos_spans                  # media.pos_spans: M-RoPE media (see _pos_of); [] otherwise
    cdef readonly SamplerChain sampler
    cdef readonly SamplerChain grammar   # a chain holding only grammar stage(s), or None
    cdef llama_token_data * candidates   # n_vocab scratch entries for grammar re-sampling
    cdef readonly bint post_sampling_probs   # logprobs under the distribution the chain left
    cdef llama_token_data * cand_data    # post_sampling_probs: the chain's candidates at the last sampling
    cdef size_t n_cand
    cdef float * cand_logits             # post_sampling_probs: scratch, their logits
    cdef readonly int max_tokens
    cdef readonly tuple stop
    cdef frozenset stop_tokens
    cdef readonly bint ignore_eos
    cdef bint render_special
    cdef public object tag
    cdef int max_stop_len
    cdef readonly int n_logprobs         # -1: off; else top alternatives per token
    cdef bint _wants_prompt_lp            # this request scores its prompt (see prompt_logprobs)
    cdef readonly bint cache_prompt      # may reuse a slot's cached prefix
    cdef readonly tuple logits_processors    # Python hooks (see __init__); () when none
    cdef readonly tuple stopping_criteria
    cdef bint has_hooks                  # either of the two: the engine takes _sample_hooked
    cdef bint _initialized
    # sharing (settable from any thread; the engine reads them between steps)
    cdef public bint paused
    cdef public bint cancel_requested
    cdef public object listener          # for the scheduler: called after a step that changed us
    cdef public bint report_progress     # an event after each prompt chunk (a stream's prompt_progress)
    # scheduling state
    cdef bint submitted
    cdef int slot
    cdef int n_past              # tokens of this request in its sequence's KV memory
    cdef int n_prompt_done       # prompt tokens fed so far (cached ones included)
    cdef readonly int n_discarded        # tokens context shifts dropped from its sequence
    cdef int n_cached            # prompt tokens that came from the cache / shared prefix
    cdef llama_token next_token  # sampled, not yet fed
    cdef bint has_next
    cdef int batch_idx
    cdef int prompt_idx0         # batch index of the first prompt token fed this step (prompt logprobs)
    cdef int n_fed               # prompt (or refill) tokens of this request in the current batch
    cdef bint preempted
    cdef int room_needed         # preempted to make room for others: the KV cells it needs back (0: none)
    cdef list kv_tokens          # what our sequence held when we were preempted
    cdef list refill             # tokens to re-evaluate before generation continues
    cdef readonly GenerationRequest leader   # n > 1: the request whose prompt we share
    cdef list _followers
    cdef bint forked
    # results
    cdef list out_tokens
    cdef bytes pending_bytes     # an unfinished UTF-8 sequence
    cdef str held                # text held back: it might start a stop string
    cdef list parts
    cdef list _logprobs
    cdef Py_ssize_t n_lp_released   # _logprobs[:n_lp_released] go with released text
    cdef list lp_spans           # [start, end] character span (end -1: not yet known) of the text
                                 # of each entry not released yet, in positions of the pushed text
    cdef bint lp_keep_last       # the last entry is a stop token's: it stays when the text is cut
    cdef Py_ssize_t chars_pushed     # characters of decoded text given to _push_text (and _flush)
    cdef Py_ssize_t chars_released   # characters of it released (the rest: held, or cut)
    cdef list _prompt_logprobs
    # hooks' state (hooked requests only)
    cdef object _ids             # NumPy intc buffer: prompt + generated tokens (read-only to users)
    cdef int * _ids_ptr          # its data, for appending
    cdef Py_ssize_t _n_ids       # how many of it are filled (0: not built yet)
    cdef object _scores_copy     # NumPy float32 row, when the context's row must stay untouched
    cdef bint _row_shared        # this step, our logits row is also a request group partner's
    cdef readonly bint stopped_by_criterion   # a stopping criterion ended the request
    # Speculative decoding (n-gram self-speculation, see Engine._draft_tokens / _verify):
    cdef readonly int draft_max          # at most this many drafted tokens per step (0: off)
    cdef readonly int draft_min          # drafts shorter than this are not worth a verification
    cdef readonly int ngram_n            # length of the n-gram looked up in prompt + output
    cdef int spec_cap                    # the current draft length: grows while drafts are accepted
    cdef list draft                      # tokens drafted into this step's batch, after next_token
    cdef int draft_idx0                  # batch index of the first of them
    cdef dict ngram_pos                  # n-gram -> index (in prompt + output) of what followed it last
    cdef Py_ssize_t n_indexed            # positions of prompt + output entered in ngram_pos
    cdef readonly long long n_drafted, n_draft_accepted, n_draft_steps   # steps: verifications
    cdef long long spec_runs_ended       # verifications that ended at a rejected draft (for p)
    cdef int spec_skips                  # steps since the cost model last let this request draft
    cdef tuple synth_probs               # synthetic acceptance (benchmarks): P(accept drafted token i | i-1 taken)
    cdef object synth_rng                # ... and its random source (random.Random, seeded like the request)
    cdef llama_token forced_token        # _sample_one emits this instead of what it sampled (-1: none)
    cdef readonly int n_keep             # context shift: tokens kept after BOS (-1: the whole prompt)
    cdef readonly int n_discard          # context shift: tokens dropped (0: half of the rest)
    cdef readonly object drafter         # drafter(token_ids, limit) -> tokens, instead of n-grams
    cdef readonly object finish_reason
    cdef public object error     # the exception that ended this request (finish_reason "error")
    # timings (ms)
    cdef double t_submit, t_first, t_prompt, t_gen, t_sample, t_start

    def __cinit__(self):
        self.candidates = NULL
        self.cand_logits = NULL
        self._initialized = False

    def __dealloc__(self):
        free(self.candidates)
        self.candidates = NULL
        free(self.cand_logits)
        self.cand_logits = NULL

    def __init__(self, prompt_tokens, SamplerChain sampler not None, *, SamplerChain grammar=None,
                 int max_tokens=-1, stop=(), stop_tokens=(), bint ignore_eos=False, bint render_special=False,
                 tag=None, logprobs=None, bint prompt_logprobs=False, bint cache_prompt=True,
                 logits_processors=None, stopping_criteria=None, int draft_max=0, int draft_min=0,
                 int ngram_n=3, drafter=None, bint post_sampling_probs=False, synth_probs=None,
                 synth_seed=None, int n_keep=0, int n_discard=0):
        if self._initialized:
            raise RuntimeError("GenerationRequest is already initialised")
        if sampler.ptr == NULL:
            raise ValueError("the sampler chain is not initialised")
        if isinstance(prompt_tokens, MediaPrompt):
            # Media positions hold negative keys (see _mtmd.pxi); the text is checked as usual.
            self.media = prompt_tokens
            self.media_spans = list(self.media.spans)
            self.pos_spans = list(self.media.pos_spans)
            self.prompt_tokens = list(self.media.tokens)
            if self.media.multimodal.model is not sampler.vocab.model:
                raise ValueError("the MediaPrompt was tokenized for another model than the sampler's")
            if prompt_logprobs:
                raise MediaError("prompt log-probabilities (echo) are not available for prompts with "
                                 "images or audio")
            sampler.vocab.check_tokens(self.media.text_tokens())
        else:
            self.media = None
            self.media_spans = []
            self.pos_spans = []
            self.prompt_tokens = [int(t) for t in prompt_tokens]
            sampler.vocab.check_tokens(self.prompt_tokens)
        if not self.prompt_tokens:
            raise ValueError("the prompt is empty: it needs at least one token")
        sampler._check_selects()
        if max_tokens < -1:
            raise ValueError(f"max_tokens must be >= -1 (-1 = until end of generation), got {max_tokens}")
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop or ())
        for s in stop:
            if not isinstance(s, str):
                raise TypeError(f"stop strings must be str, got {type(s).__name__}")
            if not s:
                raise ValueError("stop strings must not be empty")
        if sampler.has_grammar:
            raise ValueError("pass the grammar as GenerationRequest(grammar=...), not inside the sampler chain")
        if grammar is not None:
            if grammar.ptr == NULL:
                raise ValueError("the grammar chain is not initialised")
            if not grammar.has_grammar or len(grammar) != len(grammar._grammar_stages):
                raise ValueError("grammar= must be a SamplerChain holding only grammar stages")
            if grammar.vocab is not sampler.vocab:
                raise ValueError("the grammar and the sampler were built for different models")
            if ignore_eos:
                raise ValueError("ignore_eos cannot be combined with a grammar: the grammar decides when the "
                                 "output is complete")
        if logprobs is None or logprobs is False:
            self.n_logprobs = -1
        elif logprobs is True:
            self.n_logprobs = 0
        else:
            if not isinstance(logprobs, int) or not 0 <= logprobs <= _MAX_TOP_LOGPROBS:
                raise ValueError(f"logprobs (top alternatives per token) must be in 0..{_MAX_TOP_LOGPROBS}, "
                                 f"got {logprobs!r}")
            self.n_logprobs = logprobs
        self.post_sampling_probs = post_sampling_probs and self.n_logprobs >= 0
        self.logits_processors = _check_hooks(logits_processors, "logits_processors")
        self.stopping_criteria = _check_hooks(stopping_criteria, "stopping_criteria")
        self.has_hooks = bool(self.logits_processors or self.stopping_criteria)
        if not 0 <= draft_max <= _MAX_DRAFT:
            raise ValueError(f"draft_max must be in 0..{_MAX_DRAFT} (0: no speculation), got {draft_max}")
        if not 0 <= draft_min <= max(draft_max, 0):
            raise ValueError(f"draft_min must be in 0..draft_max ({draft_max}), got {draft_min}")
        if not 1 <= ngram_n <= 64:
            raise ValueError(f"ngram_n (the looked-up n-gram's length) must be in 1..64, got {ngram_n}")
        # Media positions hold negative keys that cannot be drafted: such prompts decode plainly.
        self.draft_max = draft_max if self.media is None else 0
        self.draft_min = draft_min
        self.ngram_n = ngram_n
        if drafter is not None and not callable(drafter):
            raise TypeError(f"drafter must be callable as drafter(token_ids, limit), got {type(drafter).__name__}")
        self.drafter = drafter
        self.spec_cap = min(4, draft_max) if draft_max > 0 else 0
        self.forced_token = -1
        if n_keep < -1 or n_discard < 0:
            raise ValueError(f"n_keep must be >= -1 and n_discard >= 0, got {n_keep} and {n_discard}")
        self.n_keep = n_keep
        self.n_discard = n_discard
        if synth_probs is not None:
            # llama-server's --spec-synth-*: drafts are accepted at random, whatever the model
            # says (to benchmark the drafting path at a chosen acceptance; the text is not valid).
            self.synth_probs = tuple(float(x) for x in synth_probs)
            if not self.synth_probs or not all(0.0 <= x <= 1.0 for x in self.synth_probs):
                raise ValueError("synth_probs must be probabilities in [0, 1], one per drafted position")
            self.synth_rng = _random.Random(synth_seed)
        self.sampler = sampler
        self.grammar = grammar
        self.max_tokens = max_tokens
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        sampler.vocab.check_tokens(list(self.stop_tokens))
        self.ignore_eos = ignore_eos
        self.render_special = render_special
        self.tag = tag
        self._wants_prompt_lp = prompt_logprobs
        self.cache_prompt = cache_prompt and not prompt_logprobs   # cached tokens have no logits
        self.slot = -1
        self.batch_idx = -1
        self.out_tokens = []
        self.pending_bytes = b""
        self.held = ""
        self.parts = []
        self._logprobs = []
        self.n_lp_released = 0
        self.lp_spans = []
        self.lp_keep_last = False
        self.chars_pushed = self.chars_released = 0
        self._prompt_logprobs = []
        self._followers = []
        self.finish_reason = None
        self._initialized = True

    cdef int _check_init(self) except -1:
        if not self._initialized:
            raise ValueError("this GenerationRequest was not initialised (GenerationRequest.__init__ was not run)")
        return 0

    # ---- hooks ------------------------------------------------------------------

    cdef object _input_ids(self):
        """The tokens so far as the hooks see them: a read-only view of a NumPy intc buffer
        that is built once and appended to (never rebuilt from the token lists)."""
        cdef Py_ssize_t n
        if self._n_ids == 0:
            np = _np()
            n = len(self.prompt_tokens)
            ids = np.empty(n + 256, dtype=np.intc)
            ids[:n] = self.prompt_tokens
            self._set_ids(ids, n)
        return self._ids[:self._n_ids]

    cdef int _set_ids(self, object ids, Py_ssize_t n) except -1:
        ids.flags.writeable = False   # for the hooks; _append_id writes through the pointer
        self._ids = ids
        self._ids_ptr = <int *><size_t>ids.ctypes.data
        self._n_ids = n
        return 0

    cdef int _append_id(self, llama_token tok) except -1:
        if self._n_ids == 0:
            self._input_ids()
        if self._n_ids == len(self._ids):
            # Grow into a new buffer: views the hooks kept of the old one stay valid.
            np = _np()
            bigger = np.empty(2 * self._n_ids, dtype=np.intc)
            bigger[:self._n_ids] = self._ids[:self._n_ids]
            self._set_ids(bigger, self._n_ids)
        self._ids_ptr[self._n_ids] = tok
        self._n_ids += 1
        return 0

    cdef int _run_processors(self, object scores) except -1:
        """Each logits processor in turn edits `scores` (in place, or by returning new scores,
        copied in)."""
        ids = self._input_ids()
        for proc in self.logits_processors:
            result = proc(ids, scores)
            if result is scores:
                continue
            if result is None:
                raise TypeError(f"the logits processor {proc!r} returned None: it must return the scores "
                                f"(edited in place, or a new array of the same shape)")
            new = _np().asarray(result)
            if new.shape != scores.shape:
                raise ValueError(f"the logits processor {proc!r} returned an array of shape {new.shape}; "
                                 f"the scores have shape {scores.shape} (one per vocabulary token)")
            scores[...] = new
        return 0

    cdef bint _run_criteria(self, object scores) except -1:
        """Does a stopping criterion end the request now?  (All of them run, as
        llama-cpp-python's StoppingCriteriaList does.)"""
        ids = self._input_ids()
        cdef bint stop = False
        for crit in self.stopping_criteria:
            if crit(ids, scores):
                stop = True
        return stop

    # Media spans, in positions of our sequence (prompt positions; a preempted request's
    # kv_tokens share them, since media only occur in the prompt).
    cdef int _media_at(self, Py_ssize_t pos):
        """Index in media_spans of the medium starting at `pos`, or -1."""
        cdef int i
        for i in range(len(self.media_spans)):
            if self.media_spans[i][0] == pos:
                return i
        return -1

    cdef Py_ssize_t _next_media(self, Py_ssize_t pos):
        """Where the first medium at or after `pos` starts (a huge number when none does)."""
        for span in self.media_spans:
            if span[0] >= pos:
                return span[0]
        return 1 << 40

    cdef inline llama_pos _pos(self, Py_ssize_t i):
        """The KV position of our token i (i outside media): i, except after M-RoPE images."""
        return <llama_pos>i if not self.pos_spans else _pos_of(self.pos_spans, i)

    cdef Py_ssize_t _snap(self, Py_ssize_t k):
        """A reusable prefix length never ends inside a medium: move it back to its start."""
        for span in self.media_spans:
            if span[0] < k < span[0] + span[1]:
                return span[0]
        return k

    cdef list _history(self, Py_ssize_t a, Py_ssize_t b):
        """Tokens [a, b) of the prompt followed by the output."""
        cdef Py_ssize_t n_p = len(self.prompt_tokens)
        if b <= n_p:
            return self.prompt_tokens[a:b]
        if a >= n_p:
            return self.out_tokens[a - n_p:b - n_p]
        return self.prompt_tokens[a:] + self.out_tokens[:b - n_p]

    cdef list _draft_ngram(self, int limit):
        """Up to `limit` tokens that followed the latest earlier occurrence of the last
        `ngram_n` tokens (prompt + output, the just-sampled token last): llama.cpp's
        ngram-simple drafting, with an index kept up to date as tokens arrive (a dict
        insert per token instead of a scan of the whole history per step)."""
        cdef Py_ssize_t n = self.ngram_n
        cdef Py_ssize_t length = len(self.prompt_tokens) + len(self.out_tokens)
        cdef Py_ssize_t j
        if length <= n or limit <= 0:
            return None
        if self.ngram_pos is None:
            self.ngram_pos = {}
            self.n_indexed = n
        # Index every position that has a successor (the n-gram before it -> it), up to the
        # newest: only the tail n-gram itself, the one looked up, has none yet.
        if self.n_indexed < length:
            hist = self._history(self.n_indexed - n, length - 1)
            pos = self.ngram_pos
            for j in range(length - self.n_indexed):
                pos[tuple(hist[j:j + n])] = self.n_indexed + j
            self.n_indexed = length
        found = self.ngram_pos.get(tuple(self._history(length - n, length)))
        if found is None:
            return None
        j = found
        return self._history(j, min(j + limit, length))

    def add_follower(self, GenerationRequest other not None) -> None:
        """Let `other` (same prompt) share this request's prompt evaluation: when the prompt
        is evaluated, its KV cells are copied to other's sequence (llama_memory_seq_cp) and
        both sample from the same logits.  Both must be new; submit only this one."""
        self._check_init()
        other._check_init()
        if self.submitted or other.submitted:
            raise ValueError("add followers before submitting the request")
        if other is self or other.leader is not None or other._followers:
            raise ValueError("a request can follow one leader, and a leader cannot follow")
        if other.prompt_tokens != self.prompt_tokens:
            raise ValueError("a follower must have the same prompt tokens as its leader")
        if other.sampler.vocab is not self.sampler.vocab:
            raise ValueError("the follower's sampler was built for another model")
        if other._wants_prompt_lp:
            raise ValueError("prompt logprobs are computed once, by the leader")
        other.leader = self
        self._followers.append(other)

    @property
    def followers(self) -> list:
        return list(self._followers)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def tokens(self) -> list:
        """Every generated token, as llama-server's `tokens` reports them: the tokens of a stop
        string that was cut from the text (and a stop token) included.  The end-of-generation
        token is not.  `logprobs` differs: see there."""
        return list(self.out_tokens)

    @property
    def n_tokens(self) -> int:
        return len(self.out_tokens)

    def parts_since(self, Py_ssize_t start) -> list:
        """The text pieces produced since piece `start` (a cursor for O(1) streaming)."""
        return self.parts[start:]

    @property
    def n_parts(self) -> int:
        return len(self.parts)

    @property
    def logprobs(self) -> list:
        """One (token, logprob, ((id, logprob), ...)) tuple per generated token whose text is
        released.  An entry goes with its token's text: while that text is held back (it may
        start a stop string) so is the entry; when the text is cut as part of a stop string,
        the entry is dropped (a token with any released text keeps its entry; a stop token
        keeps its own).  So once finished, these are the output's tokens as in llama-server's
        non-streamed answer, and `tokens` can be longer by the stop string's tokens."""
        return self._logprobs[:self.n_lp_released]

    def logprobs_since(self, Py_ssize_t start) -> list:
        """The released entries from entry `start` on (a cursor, as parts_since)."""
        return self._logprobs[start:self.n_lp_released]

    def tokens_since(self, Py_ssize_t start) -> list:
        return self.out_tokens[start:]

    @property
    def prompt_logprobs(self) -> bool:
        """Are the prompt's log-probabilities scored (prompt_logprobs=True)?  A follower shares
        its leader's prompt, and so its leader's answer."""
        return self._wants_prompt_lp if self.leader is None else self.leader._wants_prompt_lp

    @property
    def prompt_logprobs_list(self) -> list:
        """One (token, logprob, top) tuple per prompt token after the first (a follower's are
        its leader's: the prompt is evaluated once, for the whole group)."""
        return list(self._prompt_logprobs if self.leader is None else self.leader._prompt_logprobs)

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_tokens)

    @property
    def n_prompt_evaluated(self) -> int:
        return len(self.prompt_tokens) - self.n_cached if self.leader is None else 0

    @property
    def n_cached_tokens(self) -> int:
        return self.n_cached

    @property
    def prompt_progress(self) -> tuple:
        """(total, cached, processed) prompt tokens as llama-server reports a prompt's progress:
        processed counts the cached ones, so it starts at `cached` and ends at `total` (a
        follower reports its leader's, which evaluates the group's prompt)."""
        cdef GenerationRequest r = self if self.leader is None else self.leader
        return len(r.prompt_tokens), r.n_cached, r.n_prompt_done

    @property
    def t_prompt_ms(self) -> float:
        return self.t_prompt

    @property
    def t_gen_ms(self) -> float:
        return self.t_gen

    @property
    def t_sample_ms(self) -> float:
        return self.t_sample

    @property
    def t_first_token_ms(self) -> float:
        return self.t_first - self.t_submit if self.t_first > 0 else 0.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def running(self) -> bool:
        return self.slot >= 0

    def __repr__(self):
        state = self.finish_reason or ("running" if self.slot >= 0 else "waiting")
        return f"<GenerationRequest {len(self.prompt_tokens)} prompt tokens, {len(self.out_tokens)} generated, {state}>"

    # ---- text handling ----------------------------------------------------------

    cdef str _push_text(self, str new_text):
        """Add decoded text; return what can be shown now (stop strings never leak)."""
        cdef str out
        self.chars_pushed += PyUnicode_GET_LENGTH(new_text)
        out = self._cut_text(new_text)
        self.chars_released += PyUnicode_GET_LENGTH(out)
        return out

    cdef str _cut_text(self, str new_text):
        cdef str buf = self.held + new_text if self.held else new_text
        cdef Py_ssize_t cut, k, best
        if self.max_stop_len == 0:
            self.held = ""
            return buf
        # A stop string anywhere in the unreleased text ends the generation there.
        best = -1
        for s in self.stop:
            cut = buf.find(s)
            if cut >= 0 and (best < 0 or cut < best):
                best = cut
        if best >= 0:
            self.held = ""
            self.finish_reason = "stop"
            return buf[:best]
        # Hold back the longest tail that could still grow into a stop string.
        k = min(self.max_stop_len - 1, PyUnicode_GET_LENGTH(buf))
        while k > 0:
            tail = buf[PyUnicode_GET_LENGTH(buf) - k:]
            for s in self.stop:
                if s.startswith(tail):
                    self.held = tail
                    return buf[:PyUnicode_GET_LENGTH(buf) - k]
            k -= 1
        self.held = ""
        return buf

    cdef str _flush(self):
        """At the end: release held text and any unfinished bytes (as U+FFFD)."""
        cdef str tail = self.held
        cdef str rest
        self.held = ""
        if self.pending_bytes:
            rest = self.pending_bytes.decode("utf-8", "replace")
            self.chars_pushed += PyUnicode_GET_LENGTH(rest)
            tail += rest
            self.pending_bytes = b""
        if self.finish_reason == "stop":
            return ""
        self.chars_released += PyUnicode_GET_LENGTH(tail)
        return tail

    cdef void _settle_logprobs(self):
        """Release the logprob entries whose text is released.  Once finished: also those with
        some released text (and a stop token's), and drop the rest (wholly inside a cut stop
        string, or held and never released)."""
        cdef Py_ssize_t i = 0, n = len(self.lp_spans), start, end
        cdef list kept
        if n == 0:
            return
        if not self.pending_bytes:
            for span in self.lp_spans:       # the text of every entry so far is pushed now
                if span[1] < 0:
                    span[1] = self.chars_pushed
        if self.finish_reason is None:
            while i < n and 0 <= self.lp_spans[i][1] <= self.chars_released:
                i += 1
            self.n_lp_released += i
            del self.lp_spans[:i]
            return
        kept = []
        for i in range(n):
            start, end = self.lp_spans[i]
            if (0 <= end <= self.chars_released or start < self.chars_released
                    or (i == n - 1 and self.lp_keep_last)):
                kept.append(self._logprobs[self.n_lp_released + i])
        del self._logprobs[self.n_lp_released:]
        self._logprobs.extend(kept)
        self.n_lp_released = len(self._logprobs)
        del self.lp_spans[:]
