# The generation loop: decode -> sample -> accept -> detokenize -> stop check,
# for one sequence or many sharing a context (continuous batching).
#
# Per generated token the work is: one slot in a shared llama_decode, one
# llama_sampler_sample, one token_to_piece into a small byte buffer, and a
# stop-string check on the held-back tail only.  Nothing re-detokenizes the
# completion, nothing copies logits.
#
# Sharing: the Engine is stepped by one thread at a time (pyllama.llm's scheduler
# elects the stepper); any thread may set a request's `paused` or `cancel_requested`
# flag between steps.  A paused request keeps its slot until another request needs
# it; then it is preempted (its KV cells stay as the slot's prompt cache) and, when
# it resumes, it re-evaluates only what another request overwrote.

from collections import deque as _deque
from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.ref cimport Py_REFCNT
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.math cimport expf, log


DEF _MAX_TOP_LOGPROBS = 20
DEF _MAX_DRAFT = 256          # drafted tokens per request per step, at most
DEF _COST_FIT_MAX_TOKENS = 64 # decodes this small or smaller fit the cost model of drafting
DEF _COST_FIT_DECAY = 0.98    # weight of the previous decodes in that fit, per decode
DEF _SPEC_PROBE_EVERY = 32    # a request the cost model stopped drafting for tries one token this often
# Prompt tokens fed per step for a request that wants prompt log-probabilities: each
# needs an n_vocab row of logits in llama.cpp's output buffer.
DEF _PROMPT_LOGPROBS_CHUNK = 32


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
    chain); `prompt_logprobs=True` does the same for every prompt token after the first.
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
    cdef readonly SamplerChain sampler
    cdef readonly SamplerChain grammar   # a chain holding only grammar stage(s), or None
    cdef llama_token_data * candidates   # n_vocab scratch entries for grammar re-sampling
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
    # scheduling state
    cdef bint submitted
    cdef int slot
    cdef int n_past              # tokens of this request in its sequence's KV memory
    cdef int n_prompt_done       # prompt tokens fed so far (cached ones included)
    cdef int n_cached            # prompt tokens that came from the cache / shared prefix
    cdef llama_token next_token  # sampled, not yet fed
    cdef bint has_next
    cdef int batch_idx
    cdef int prompt_idx0         # batch index of the first prompt token fed this step (prompt logprobs)
    cdef int n_fed               # prompt (or refill) tokens of this request in the current batch
    cdef bint preempted
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
    cdef readonly long long n_drafted, n_draft_accepted
    cdef long long spec_runs_ended       # verifications that ended at a rejected draft (for p)
    cdef int spec_skips                  # steps since the cost model last let this request draft
    cdef readonly object drafter         # drafter(token_ids, limit) -> tokens, instead of n-grams
    cdef readonly object finish_reason
    cdef public object error     # the exception that ended this request (finish_reason "error")
    # timings (ms)
    cdef double t_submit, t_first, t_prompt, t_gen, t_sample, t_start

    def __cinit__(self):
        self.candidates = NULL
        self._initialized = False

    def __dealloc__(self):
        free(self.candidates)
        self.candidates = NULL

    def __init__(self, prompt_tokens, SamplerChain sampler not None, *, SamplerChain grammar=None,
                 int max_tokens=-1, stop=(), stop_tokens=(), bint ignore_eos=False, bint render_special=False,
                 tag=None, logprobs=None, bint prompt_logprobs=False, bint cache_prompt=True,
                 logits_processors=None, stopping_criteria=None, int draft_max=0, int draft_min=0,
                 int ngram_n=3, drafter=None):
        if self._initialized:
            raise RuntimeError("GenerationRequest is already initialised")
        if sampler.ptr == NULL:
            raise ValueError("the sampler chain is not initialised")
        if isinstance(prompt_tokens, MediaPrompt):
            # Media positions hold negative keys (see _mtmd.pxi); the text is checked as usual.
            self.media = prompt_tokens
            self.media_spans = list(self.media.spans)
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


cdef class Engine:
    """Runs GenerationRequests on a Context: all live sequences advance in one
    llama_decode per step; prompt prefill shares batches with generation; a
    finished slot takes the next waiting request at once (continuous batching).

    Each slot remembers the tokens in its KV memory, so a new prompt that shares
    a prefix with them evaluates only the rest (the prompt cache): a waiting request
    goes to the free slot with the longest common prefix.
    """

    cdef readonly Context context
    cdef Batch batch
    cdef readonly int n_slots
    cdef list slots           # slot -> GenerationRequest or None
    cdef list slot_tokens     # slot -> tokens currently in that sequence's KV memory
    cdef list slot_used       # slot -> step counter when last used (LRU choice among free slots)
    cdef object queue
    cdef list parked          # preempted paused requests (no slot, not queued)
    cdef int n_batch
    cdef int n_ctx_seq
    cdef char piece_buf[256]
    cdef bint _initialized
    cdef public bint cache_prompt
    # counters for metrics (llama-server's names)
    cdef readonly long long n_decode_total
    cdef readonly long long n_busy_slots_total
    cdef readonly long long n_steps
    cdef readonly long long n_preemptions   # requests that gave their slot up (KV memory full)
    cdef readonly long long n_drafted_total, n_draft_accepted_total
    cdef readonly double t_decode_ms_total   # wall time inside llama_decode (+ synchronize), all steps
    # Speculation pays while decoding is bound by reading the weights (few sequences): a
    # drafted token then costs little.  With many sequences the decode is bound by compute
    # and drafts compete with other requests' tokens, so nobody drafts once this many
    # sequences generate (DESIGN: "it must never cost").
    cdef public int spec_max_sequences
    # False: draft lengths follow each request's acceptance alone (spec_cap), as llama.cpp's
    # fixed draft_max does up to that cap, whatever a drafted token costs on this machine.
    cdef public bint spec_cost_model
    cdef long long spec_pause_until        # no drafting before this step (after a KV-full retry)
    # The decode's cost by batch size, t = a + b * n_tokens, fitted (exponentially weighted least
    # squares) over the decodes of at most _COST_FIT_MAX_TOKENS tokens: what a drafted token
    # costs here (on a small CPU a 16-token batch costs ~7 single decodes, on a GPU ~1).
    cdef double cost_w, cost_n, cost_t, cost_nn, cost_nt
    cdef double cost_b_last                # the last slope fitted (0: none yet)
    cdef object _before_decode             # step(before_decode=): called once as the GIL is let go

    def __cinit__(self):
        self._initialized = False

    def __init__(self, Context context not None, n_slots=None, *, bint cache_prompt=True,
                 bint spec_cost_model=True):
        if self._initialized:
            raise RuntimeError("Engine is already initialised")
        cdef int n_seq = context.n_seq_max
        self.n_slots = n_seq if n_slots is None else int(n_slots)
        if self.n_slots < 1 or self.n_slots > n_seq:
            raise ValueError(f"n_slots must be in 1..{n_seq} (the context's n_seq_max), got {n_slots}")
        self.context = context
        self.n_batch = context.n_batch
        self.n_ctx_seq = context.n_ctx_seq
        self.batch = Batch(self.n_batch, n_seq)
        self.slots = [None] * self.n_slots
        self.slot_tokens = [[] for _ in range(self.n_slots)]
        self.slot_used = [0] * self.n_slots
        self.queue = _deque()
        self.parked = []
        self.cache_prompt = cache_prompt
        self.spec_max_sequences = 4
        self.spec_cost_model = spec_cost_model
        self._initialized = True

    cdef int _check_init(self) except -1:
        if not self._initialized:
            raise ValueError("this Engine was not initialised (Engine.__init__ was not run)")
        return 0

    @property
    def busy(self) -> bool:
        """Any request still to finish: running, waiting, paused or preempted."""
        return bool(self.queue) or bool(self.parked) or any(r is not None for r in self.slots)

    @property
    def runnable(self) -> bool:
        """Would a step do work: a request that is not paused, running or waiting."""
        cdef GenerationRequest r
        for r in self.queue:
            if not r.paused or r.cancel_requested:
                return True
        for r in self.parked:
            if not r.paused or r.cancel_requested:
                return True
        for x in self.slots:
            if x is not None:
                r = x
                if not r.paused or r.cancel_requested:
                    return True
        return False

    @property
    def cached_tokens(self) -> list:
        return list(self.slot_tokens[0])

    def slot_info(self) -> list:
        """Per slot: id, busy, paused, cached token count, the running request's tag."""
        out = []
        for s in range(self.n_slots):
            r = self.slots[s]
            out.append({"id": s, "busy": r is not None,
                        "paused": bool(r is not None and (<GenerationRequest>r).paused),
                        "n_cached": len(self.slot_tokens[s]),
                        "n_prompt": (<GenerationRequest>r).n_prompt if r is not None else 0,
                        "n_decoded": len((<GenerationRequest>r).out_tokens) if r is not None else 0,
                        "tag": (<GenerationRequest>r).tag if r is not None else None})
        return out

    def requests(self) -> list:
        """Every unfinished request: running, waiting, preempted, and followers not yet forked."""
        cdef GenerationRequest r
        seen = []
        for x in list(self.slots) + list(self.queue) + list(self.parked):
            if x is None:
                continue
            r = x
            if r.finish_reason is None and r not in seen:
                seen.append(r)
            for f in r._followers:
                if (<GenerationRequest>f).finish_reason is None and f not in seen:
                    seen.append(f)
        return seen

    @property
    def n_waiting(self) -> int:
        return len(self.queue)

    def reset(self) -> None:
        """Cancel everything and forget the prompt cache."""
        self._check_init()
        self._cancel_all()
        for s in range(self.n_slots):
            self.slot_tokens[s] = []
        self.context.kv_clear()

    def preempt_paused(self) -> int:
        """Free the slot of every paused request that can give it up (as under KV pressure: it
        resumes by re-evaluating what its sequence held).  Returns how many slots still hold one."""
        self._check_init()
        while self._preempt_one():
            pass
        return sum(1 for x in self.slots if x is not None)

    def adopt(self, Engine old not None) -> None:
        """Take over the unfinished requests of `old`, an engine whose context is being replaced
        (LLM re-creating its context with more sequences).  None may hold a slot there
        (preempt_paused first); preempted ones resume here by re-evaluating their tokens."""
        self._check_init()
        if any(x is not None for x in old.slots):
            raise ValueError("the old engine still runs requests in its slots")
        self.parked.extend(old.parked)
        self.queue.extend(old.queue)
        old.parked = []
        old.queue = _deque()

    def submit(self, GenerationRequest request not None) -> None:
        self._check_init()
        request._check_init()
        if request.sampler.vocab.model is not self.context.model:
            raise ValueError("the request's sampler was built for another model")
        if request.submitted or request.finish_reason is not None or request.slot >= 0:
            raise ValueError("this request has already been submitted")
        if request.leader is not None:
            raise ValueError("submit the leader of a request group, not a follower")
        if not self.context.has_memory:
            # The engine keeps each sequence in the KV memory between steps; an encoder
            # (BERT-style embedder) has none and predicts no next token.
            raise ValueError("this model is an encoder (embeddings only: use LLM.embed / Context.decode); "
                             "it cannot generate text")
        if request.media is not None:
            _check_media_fits(self.context, request.media)
        if len(request.prompt_tokens) >= self.n_ctx_seq:
            raise ContextLengthError(
                f"the prompt has {len(request.prompt_tokens)} tokens but the context holds {self.n_ctx_seq} "
                f"per sequence; shorten the prompt or use a larger n_ctx")
        if 1 + len(request._followers) > self.n_slots:
            raise ValueError(f"{1 + len(request._followers)} sequences sharing one prompt need as many slots; "
                             f"this engine has {self.n_slots}")
        request.submitted = True
        request.t_submit = pyllama_now_ms()
        for f in request._followers:
            (<GenerationRequest>f).submitted = True
            (<GenerationRequest>f).t_submit = request.t_submit
        if request.max_tokens == 0 and not request._wants_prompt_lp:
            # Nothing to generate and nothing to score: done without evaluating anything.
            self._finish_group_unstarted(request, "length")
            return
        self.queue.append(request)

    cdef void _finish_group_unstarted(self, GenerationRequest r, str reason):
        r.finish_reason = reason
        for f in r._followers:
            if (<GenerationRequest>f).finish_reason is None:
                (<GenerationRequest>f).finish_reason = reason

    def cancel(self, GenerationRequest request not None) -> None:
        """Stop a request (queued, running, paused or preempted); its slot is freed."""
        self._check_init()
        if request.finish_reason is not None:
            return
        if request.slot >= 0:
            self._release(request, "cancelled")
        else:
            try:
                self.queue.remove(request)
            except ValueError:
                pass
            try:
                self.parked.remove(request)
            except ValueError:
                pass
            request.finish_reason = "cancelled"
        if request.leader is None:
            for f in request._followers:
                if not (<GenerationRequest>f).forked:
                    if (<GenerationRequest>f).slot >= 0:
                        self._release(<GenerationRequest>f, "cancelled")
                    elif (<GenerationRequest>f).finish_reason is None:
                        (<GenerationRequest>f).finish_reason = "cancelled"

    # ---- scheduling -----------------------------------------------------------

    cdef list _valid_cache(self, int s):
        """The slot's cached tokens, after checking they are still what its sequence holds
        (Context.kv_clear()/kv_seq_rm by the user must not leave a stale prompt cache)."""
        cdef list cached = self.slot_tokens[s]
        cdef llama_pos pmax
        if cached:
            pmax = llama_memory_seq_pos_max(llama_get_memory(self.context.ptr), s)
            if pmax + 1 != <llama_pos>len(cached):
                llama_memory_seq_rm(llama_get_memory(self.context.ptr), s, -1, -1)
                del cached[:]
        return cached

    cdef Py_ssize_t _common_prefix(self, list cached, list want, Py_ssize_t limit):
        cdef Py_ssize_t n = min(len(cached), len(want), limit), k = 0
        while k < n and cached[k] == want[k]:
            k += 1
        return k

    cdef void _assign(self, int s, GenerationRequest r):
        """Put a waiting request into slot s, reusing the slot's cached prefix."""
        cdef list cached = self._valid_cache(s)
        cdef Py_ssize_t k
        cdef llama_memory_t mem = llama_get_memory(self.context.ptr)
        if r.preempted:
            # Resume: what our sequence held, minus what survived in this slot.
            k = r._snap(self._common_prefix(cached, r.kv_tokens, len(r.kv_tokens)))
            if k < len(cached):
                llama_memory_seq_rm(mem, s, k, -1)
                del cached[k:]
            r.refill = r.kv_tokens[k:]
            r.kv_tokens = None
            r.n_past = <int>k
            r.preempted = False
        else:
            k = 0
            if r.cache_prompt and self.cache_prompt:
                k = r._snap(self._common_prefix(cached, r.prompt_tokens, len(r.prompt_tokens) - 1))   # evaluate >= 1
            if k < len(cached):
                llama_memory_seq_rm(mem, s, k, -1)
                del cached[k:]
            r.n_past = <int>k
            r.n_prompt_done = <int>k
            r.n_cached = <int>k
            r.has_next = False
            r.t_start = pyllama_now_ms()
        r.slot = s
        self.slots[s] = r

    cdef int _pick_slot(self, GenerationRequest r, list free) except -2:
        """The free slot whose cache shares the longest prefix with r (ties: least recently used)."""
        cdef int best = -1, s
        cdef Py_ssize_t best_k = -1, k
        cdef list want = r.kv_tokens if r.preempted else r.prompt_tokens
        for s in free:
            if (r.preempted or (r.cache_prompt and self.cache_prompt)):
                k = self._common_prefix(self.slot_tokens[s], want, len(want))
            else:
                k = 0
            if k > best_k or (k == best_k and self.slot_used[s] < self.slot_used[best]):
                best, best_k = s, k
        return best

    cdef void _release(self, GenerationRequest r, str reason):
        if r.finish_reason is None:
            r.finish_reason = reason
        if r.slot >= 0:
            self.slots[r.slot] = None
            self.slot_used[r.slot] = self.n_steps
        r.slot = -1
        r.has_next = False

    cdef void _fail(self, GenerationRequest r, object exc):
        """End one request with an error its owner will raise (without the frames of this
        step's thread: see errors.detach_traceback)."""
        if r.finish_reason is None:
            try:
                r.error = _detach_traceback(exc)
            except BaseException:   # noqa: BLE001 - cannot fail short of memory; keep the error
                r.error = exc
        self._release(r, "error")

    cdef bint _preempt_one(self):
        """Free the slot of a paused request (its KV stays as the slot's cache)."""
        cdef GenerationRequest r
        cdef int s
        for s in range(self.n_slots):
            x = self.slots[s]
            if x is None:
                continue
            r = x
            if not r.paused or r.cancel_requested or r._followers and not all(
                    (<GenerationRequest>f).forked or (<GenerationRequest>f).done for f in r._followers):
                continue
            if r.leader is not None and not r.forked:
                continue
            if r.has_next or r.refill:
                r.kv_tokens = list(self.slot_tokens[s]) + (r.refill or [])
                # refill tokens were never evaluated: they are what must be, not what is
                r.refill = None
                r.preempted = True
            else:
                # Still evaluating its prompt: it starts over (from whatever cache survives).
                r.preempted = False
            self.slots[s] = None
            self.slot_used[s] = self.n_steps
            r.slot = -1
            self.parked.append(r)
            self.n_preemptions += 1
            return True
        return False

    def share_prefix(self, prompts) -> int:
        """Evaluate the prefix common to all `prompts` (token lists) once, in a free slot,
        and copy it to the other free slots (llama_memory_seq_cp shares the cells).
        Returns the prefix length (0 when fewer than two slots are free)."""
        self._check_init()
        cdef list free = [s for s in range(self.n_slots) if self.slots[s] is None]
        cdef llama_memory_t mem
        cdef Py_ssize_t have, pos, chunk, i
        cdef int s0, s
        cdef Py_ssize_t best
        cdef list cached
        prompts = [list(p) for p in prompts]
        if len(prompts) < 2 or len(free) < 2:
            return 0
        cdef Py_ssize_t n = min(len(p) for p in prompts) - 1, k = 0
        first = prompts[0]
        while k < n and first[k] >= 0 and all(p[k] == first[k] for p in prompts):
            k += 1   # (media positions hold negative keys: a shared prefix stops before them)
        if k < 4:
            return 0
        prefix = first[:k]
        with self.context._lock:
            self.context._get()
            # Reuse what the best free slot already holds.
            s0 = free[0]
            best = -1
            for s in free:
                have = self._common_prefix(self._valid_cache(s), prefix, k)
                if have > best:
                    s0, best = s, have
            cached = self._valid_cache(s0)
            have = self._common_prefix(cached, prefix, k)
            mem = llama_get_memory(self.context.ptr)
            llama_memory_seq_rm(mem, s0, have, -1)
            del cached[have:]
            pos = have
            while pos < k:
                chunk = min(k - pos, self.n_batch)
                self.batch.clear()
                for i in range(chunk):
                    self.batch._add(prefix[pos + i], pos + i, s0, False)
                self.context._eval(self.batch, False)
                cached.extend(prefix[pos:pos + chunk])
                pos += chunk
            for s in free:
                if s != s0 and self._common_prefix(self._valid_cache(s), prefix, k) < k:
                    llama_memory_seq_rm(mem, s, -1, -1)
                    llama_memory_seq_cp(mem, s0, s, -1, -1)
                    self.slot_tokens[s] = list(prefix)
        return k

    cdef int _evict_idle_caches(self) except -1:
        """Free the KV cells of idle slots (their prompt caches); returns how many slots."""
        cdef int s, n = 0
        cdef llama_memory_t mem = llama_get_memory(self.context.ptr)
        for s in range(self.n_slots):
            if self.slots[s] is None and self.slot_tokens[s]:
                llama_memory_seq_rm(mem, s, -1, -1)
                self.slot_tokens[s] = []
                n += 1
        return n

    # ---- one step ---------------------------------------------------------------

    def step(self, events=None, before_decode=None) -> list:
        """One decode step.  Returns (request, new_text, finish_reason) events, one per
        request that produced text or finished (a request group's followers included).

        `events`: a list to append the events to (returned); without one a new list is made.
        If the step raises, the events it produced before the exception are already in the
        given list: a caller that passes its own list can still deliver them.
        `before_decode()`: called once, right before llama_decode lets the GIL go (not at all
        when the step decodes nothing); the scheduler wakes event loops there, so that their
        work overlaps the decode instead of delaying it.  Its exceptions are ignored."""
        self._check_init()
        if events is None:
            events = []
        elif not isinstance(events, list):
            raise TypeError(f"events must be a list, got {type(events).__name__}")
        if before_decode is not None and not callable(before_decode):
            raise TypeError("before_decode must be callable")
        with self.context._lock:
            self._before_decode = before_decode
            try:
                self._step(events, None)
            finally:
                self._before_decode = None
        return events

    def collect_cancelled(self) -> list:
        """Finish the requests whose cancel_requested flag is set (freeing their slots) now,
        without a decode; returns their events.  For the scheduler, between steps."""
        self._check_init()
        events = []
        self._collect_cancelled(events, None)
        return events

    cdef bint _any_cancel_requested(self):
        """Cheap check, every step: is any running, waiting or preempted request flagged?"""
        for x in self.slots:
            if x is not None and (<GenerationRequest>x).cancel_requested:
                return True
        for x in self.queue:
            if (<GenerationRequest>x).cancel_requested:
                return True
        for x in self.parked:
            if (<GenerationRequest>x).cancel_requested:
                return True
        return False

    cdef int _collect_cancelled(self, list events, object callback) except -1:
        cdef GenerationRequest r
        if not self._any_cancel_requested():
            return 0
        for x in self.requests():
            r = x
            if r.cancel_requested and r.finish_reason is None:
                self.cancel(r)
                self._emit(r, "", events, callback)
                for f in r._followers:
                    if (<GenerationRequest>f).finish_reason == "cancelled" and not (<GenerationRequest>f).forked:
                        self._emit(<GenerationRequest>f, "", events, callback)
        return 0

    cdef int _take_waiting(self, list events, object callback) except -1:
        """Cancellations, resumptions, and free slots taking waiting requests."""
        cdef GenerationRequest r
        cdef int s, need
        cdef list free
        cdef bint fresh
        # Requests cancelled from another thread.
        self._collect_cancelled(events, callback)
        # Preempted requests whose owner wants them again go first.
        for x in list(self.parked):
            r = x
            if not r.paused:
                self.parked.remove(r)
                self.queue.appendleft(r)
        # Waiting requests take free slots in order; a paused request gives its slot up
        # when nothing else is free.
        while self.queue:
            r = None
            for x in self.queue:
                if not (<GenerationRequest>x).paused:
                    r = x
                    break
            if r is None:
                break
            fresh = not r.preempted and not r.forked and r.leader is None
            need = 1
            if fresh:
                need += sum(1 for f in r._followers if not (<GenerationRequest>f).done)
            free = [s for s in range(self.n_slots) if self.slots[s] is None]
            while len(free) < need and self._preempt_one():
                free = [s for s in range(self.n_slots) if self.slots[s] is None]
            if len(free) < need:
                break
            self.queue.remove(r)
            s = self._pick_slot(r, free)
            free.remove(s)
            self._assign(s, r)
            if fresh:
                for f in r._followers:
                    if (<GenerationRequest>f).done or (<GenerationRequest>f).slot >= 0:
                        continue
                    s = free.pop(0)
                    self.slots[s] = f
                    (<GenerationRequest>f).slot = s
                    (<GenerationRequest>f).t_start = r.t_start
        return 0

    cdef int _step(self, list events, object callback) except -1:
        cdef GenerationRequest r
        cdef int s, i, room, take, first
        cdef Batch batch = self.batch
        cdef double t0, t1, dt
        cdef int n_busy = 0, n_gen = 0, n_spec = 0
        cdef bint want_logits
        interrupt = None     # a KeyboardInterrupt (or the like) raised by a hook this step

        if PyErr_CheckSignals() != 0:
            return -1
        self.context._get()
        self.n_steps += 1
        # 1. Free slots take waiting requests.
        self._take_waiting(events, callback)

        # 1b. Images and audio: a request whose next position starts a medium has it evaluated
        #     now, on its own, into its sequence (a medium is decoded whole, from embeddings).
        for s in range(self.n_slots):
            x = self.slots[s]
            if x is None:
                continue
            r = x
            if r.media is None or r.paused or (r.leader is not None and not r.forked) or (r.has_next and not r.refill):
                continue
            self._feed_media(r, s, events, callback)

        # 2. One batch: the next token of every generating sequence first, then as much
        #    prompt (or re-evaluation after preemption) as fits.
        batch.clear()
        for s in range(self.n_slots):
            x = self.slots[s]
            if x is None:
                continue
            r = x
            r.batch_idx = -1
            r.n_fed = 0
            r.draft = None
            if r.paused or (r.leader is not None and not r.forked):
                continue
            n_busy += 1
            if r.has_next and not r.refill:
                r.batch_idx = batch._add(r.next_token, r.n_past, s, True)
                n_gen += 1
                if r.draft_max > 0:
                    n_spec += 1
        # 2b. Speculation: drafted continuations, verified by this same decode.
        if n_spec > 0 and n_gen < self.spec_max_sequences and self.n_steps >= self.spec_pause_until:
            self._add_drafts(batch, n_gen)
        for s in range(self.n_slots):
            x = self.slots[s]
            if x is None:
                continue
            r = x
            if r.paused or (r.leader is not None and not r.forked) or (r.has_next and not r.refill):
                continue
            room = self.n_batch - batch.batch.n_tokens
            if room <= 0:
                break
            if r.refill:
                take = min(room, len(r.refill))
                if r.media is not None:
                    take = min(take, r._next_media(r.n_past) - r.n_past)
                for i in range(take):
                    batch._add(r.refill[i], r.n_past + i, s, False)
                r.n_fed = take
                continue
            take = min(room, len(r.prompt_tokens) - r.n_prompt_done)
            if r.media is not None:
                take = min(take, r._next_media(r.n_past) - r.n_past)
            if take <= 0:
                continue
            if r._wants_prompt_lp:
                take = min(take, _PROMPT_LOGPROBS_CHUNK)
            first = batch.batch.n_tokens
            for i in range(take):
                want_logits = r._wants_prompt_lp or r.n_prompt_done + i == len(r.prompt_tokens) - 1
                batch._add(r.prompt_tokens[r.n_prompt_done + i], r.n_past + i, s, want_logits)
            r.prompt_idx0 = first
            r.n_fed = take
            if r.n_prompt_done + take == len(r.prompt_tokens):
                r.batch_idx = batch.batch.n_tokens - 1
        if batch.batch.n_tokens == 0:
            return 0

        # 3. Decode (GIL released inside; Ctrl-C aborts it and leaves the KV as before).
        if self._before_decode is not None:
            hook, self._before_decode = self._before_decode, None
            try:
                hook()
            except Exception:   # noqa: BLE001 - a waker's failure is not the step's
                pass
        t0 = pyllama_now_ms()
        if not self._decode_or_shed(batch, events, callback):
            return 0
        # Wait for the outputs here (GPU backends decode asynchronously) so the decode's time
        # is counted as eval time, not as sampling time (llama.cpp's common sampler does the same).
        with nogil:
            llama_synchronize(self.context.ptr)
        t1 = pyllama_now_ms()
        dt = t1 - t0
        self.t_decode_ms_total += dt
        self.n_decode_total += 1
        if batch.batch.n_tokens <= _COST_FIT_MAX_TOKENS:
            self._fit_cost(batch.batch.n_tokens, dt)
        self.n_busy_slots_total += n_busy

        # 4. Account for what was fed.
        for s in range(self.n_slots):
            x = self.slots[s]
            if x is None:
                continue
            r = x
            if r.n_fed > 0 and r.refill:
                take = r.n_fed
                r.n_fed = 0
                self.slot_tokens[s].extend(r.refill[:take])
                del r.refill[:take]
                r.n_past += take
                r.t_gen += dt
            elif r.has_next and r.batch_idx >= 0:
                self.slot_tokens[s].append(r.next_token)
                r.n_past += 1
                r.has_next = False
                r.t_gen += dt
            elif r.n_fed > 0:
                take = r.n_fed
                r.n_fed = 0
                if r._wants_prompt_lp:
                    self._score_prompt(r, take)
                self.slot_tokens[s].extend(r.prompt_tokens[r.n_prompt_done:r.n_prompt_done + take])
                r.n_prompt_done += take
                r.n_past += take
                r.t_prompt += dt

        # 5. Request groups whose shared prompt is now evaluated: copy it to the followers.
        for s in range(self.n_slots):
            x = self.slots[s]
            if x is not None and (<GenerationRequest>x)._followers and (<GenerationRequest>x).batch_idx >= 0:
                self._fork(<GenerationRequest>x)

        # 6. Sample every sequence that has logits now.
        for s in range(self.n_slots):
            x = self.slots[s]
            if x is None:
                continue
            r = x
            if r.batch_idx < 0:
                continue
            if r.max_tokens == 0:    # scoring only (echo): the prompt is done, nothing to sample
                r.batch_idx = -1
                self._release(r, "length")
                self._emit(r, "", events, callback)
                continue
            try:
                if r.draft is not None:
                    self._verify(r, s, events, callback)
                else:
                    self._sample_one(r, events, callback)
            except _HookFailure as e:
                # A logits processor or stopping criterion raised: its request ends with that
                # exception, the others are sampled as usual.  (Ctrl-C in a hook propagates
                # once they are: a step left halfway would strand them.)
                self._fail(r, e.error)
                self._emit(r, "", events, callback)
                if interrupt is None and not isinstance(e.error, Exception):
                    interrupt = e.error
            except GrammarError as e:
                self._fail(r, e)
                self._emit(r, "", events, callback)
            except RuntimeError as e:
                # A C++ exception from the sampler chain or grammar (e.g. a lazy grammar whose
                # trigger was rejected): this request ends, the others go on.
                self._fail(r, GrammarError(f"sampling failed: {e}"))
                self._emit(r, "", events, callback)
        if interrupt is not None:
            raise interrupt
        return 0

    @property
    def decode_cost_ms(self):
        """The decode's cost by batch size that speculation sizes its drafts by: (a, b) in
        t = a + b * n_tokens milliseconds (None before 8 decodes, or while every decode had
        the same size)."""
        cdef double a, b
        if not self._cost_model(&a, &b):
            return None
        return (a, b)

    cdef bint _cost_model(self, double * a_out, double * b_out):
        """The fit of t = a + b * n over the recent decodes (False before 8 of them, and while
        no decodes of differing sizes were ever seen: the acceptance rule then drafts, which
        makes the sizes differ)."""
        cdef double w = self.cost_w, mean_n, mean_t, var_n, a, b
        if w < 8.0:
            return False
        mean_n = self.cost_n / w
        mean_t = self.cost_t / w
        var_n = self.cost_nn / w - mean_n * mean_n
        if var_n < 0.25:
            # Every recent decode had the same size: no slope to fit.  What a token costs on
            # this machine has not changed, so keep the last slope fitted; with none yet, let
            # the acceptance rule draft (a warm engine that only plain-decoded would otherwise
            # never learn what a draft costs).
            if self.cost_b_last <= 0.0:
                return False
            b = self.cost_b_last
        else:
            b = (self.cost_nt / w - mean_n * mean_t) / var_n
        # A noisy fit (tiny models, a busy machine) can say that tokens cost nothing, or less
        # than nothing: take a token as at least 1% of a decode, a decode as at least one token.
        if b < 0.01 * mean_t:
            b = 0.01 * mean_t
        self.cost_b_last = b
        a = mean_t - b * mean_n
        if a < b:
            a = b
        a_out[0] = a
        b_out[0] = b
        return True

    cdef void _fit_cost(self, int n, double dt):
        cdef double d = _COST_FIT_DECAY
        self.cost_w = self.cost_w * d + 1.0
        self.cost_n = self.cost_n * d + n
        self.cost_t = self.cost_t * d + dt
        self.cost_nn = self.cost_nn * d + <double>n * n
        self.cost_nt = self.cost_nt * d + n * dt

    cdef int _draft_len(self, GenerationRequest r, int limit, int n_gen):
        """How many tokens to draft for `r` this step (at most `limit`): the length that
        maximises the batch's expected tokens per millisecond, from the decode's cost by batch
        size (the fit above) and r's acceptance so far (each drafted token taken as accepted
        with probability p, independently: p = (accepted + 1) / (accepted + rejections + 2)).
        n_gen sequences generate this step; the others gain nothing from r's draft but wait
        for its longer decode, so drafting fades as the batch fills.  Before the engine's 8th
        decode, or with spec_cost_model off, the acceptance rule alone: r.spec_cap (doubles while
        whole drafts are accepted, drops to just past the accepted run after a rejection)."""
        cdef double a, b, p, pk, expected, rate, best
        cdef int d, best_d = 0
        if limit <= 0:
            return 0
        if not self.spec_cost_model or not self._cost_model(&a, &b):
            return min(limit, r.spec_cap)
        p = (r.n_draft_accepted + 1.0) / (r.n_draft_accepted + r.spec_runs_ended + 2.0)
        best = n_gen / (a + b * n_gen) * 1.02   # plain decoding's rate, plus a margin for noise
        expected = 1.0
        pk = 1.0
        for d in range(1, limit + 1):
            pk *= p
            expected += pk
            rate = (n_gen - 1 + expected) / (a + b * (n_gen + d))
            if rate > best:
                best = rate
                best_d = d
        if best_d == 0:
            # Not worth it on what r has shown so far; but the text may change (an answer that
            # starts copying its input): probe with one token now and then.
            r.spec_skips += 1
            if r.spec_skips >= _SPEC_PROBE_EVERY:
                r.spec_skips = 0
                return 1
        return best_d

    cdef int _add_drafts(self, Batch batch, int n_gen) except -1:
        """Add each speculating request's draft after its next token (positions n_past + 1 ...),
        every position with logits so that one decode scores them all."""
        cdef GenerationRequest r
        cdef int s, i, limit, room = self.n_batch - batch.batch.n_tokens
        cdef list draft
        cdef list drafted = []          # (request, slot, draft) in slot order
        cdef dict batched = {}          # id(draft source) -> (source, [(request, slot, limit)])
        for s in range(self.n_slots):
            x = self.slots[s]
            if x is None:
                continue
            r = x
            if r.batch_idx < 0 or r.draft_max <= 0:
                continue
            # Never past the sequence's context, nor past max_tokens (the token after the last
            # accepted draft is sampled too: drafts beyond max_tokens - 1 could never count).
            limit = min(r.draft_max, room, self.n_ctx_seq - r.n_past - 2)
            if r.max_tokens >= 0:
                limit = min(limit, r.max_tokens - <int>len(r.out_tokens) - 1)
            limit = self._draft_len(r, limit, n_gen)
            if limit < max(r.draft_min, 1):
                continue
            if r.drafter is not None and hasattr(r.drafter, "draft_batch"):
                # A draft model drafts for every slot at once, one decode per drafted position
                # (pyllama.speculative.DraftModel): collect its requests, run it once below.
                batched.setdefault(id(r.drafter), (r.drafter, []))[1].append((r, s, limit))
                room -= limit
                continue
            if r.drafter is not None:
                draft = self._call_drafter(r, limit)
            else:
                draft = r._draft_ngram(limit)
            if draft is None or <int>len(draft) < max(r.draft_min, 1):
                continue
            room -= len(draft)
            drafted.append((r, s, draft))
        for source, items in batched.values():
            drafted.extend(self._call_draft_batch(source, items))
        for r, s, draft in drafted:
            r.draft_idx0 = batch.batch.n_tokens
            for i in range(len(draft)):
                batch._add(draft[i], r.n_past + 1 + i, s, True)
            r.draft = draft
        return 0

    cdef list _call_draft_batch(self, source, list items):
        """One batched draft source for several requests: [(request, slot, draft)] of the drafts
        long enough to verify.  Each draft is checked like _call_drafter's; if the source
        raises, its requests end with the error at the next step (the others go on)."""
        cdef GenerationRequest r
        cdef int limit
        cdef int32_t n_vocab = self.context.n_vocab
        cdef list asks = []
        out = []
        for item in items:
            r = item[0]
            asks.append((item[1], r._history(0, len(r.prompt_tokens) + len(r.out_tokens)), item[2]))
        try:
            drafts = source.draft_batch(asks)
            if len(drafts) != len(items):
                raise RuntimeError(f"the draft source returned {len(drafts)} drafts for {len(items)} requests")
            for item, d in zip(items, drafts):
                r = item[0]
                limit = item[2]
                draft = [] if d is None else [int(t) for t in d][:limit]
                for t in draft:
                    if not 0 <= t < n_vocab:
                        raise InvalidTokenError(f"the draft source returned token id {t}, outside the "
                                                f"vocabulary (0..{n_vocab - 1})")
                if <int>len(draft) >= max(r.draft_min, 1):
                    out.append((r, item[1], draft))
        except Exception as exc:   # noqa: BLE001 - it belongs to those requests (Ctrl-C propagates)
            for item in items:
                r = item[0]
                if r.error is None:
                    r.error = _detach_traceback(exc)
                r.cancel_requested = True
            return []
        return out

    cdef list _call_drafter(self, GenerationRequest r, int limit):
        """A request's own draft source (a Python callable: a draft model run by the caller,
        a lookup table...).  Its tokens are checked before they reach llama_decode; if it
        raises or returns nonsense, that request ends with the error at the next step."""
        cdef int32_t n_vocab = self.context.n_vocab
        try:
            out = r.drafter(r._history(0, len(r.prompt_tokens) + len(r.out_tokens)), limit)
            draft = [] if out is None else [int(t) for t in out][:limit]
            for t in draft:
                if not 0 <= t < n_vocab:
                    raise InvalidTokenError(f"the drafter returned token id {t}, outside the vocabulary "
                                            f"(0..{n_vocab - 1})")
        except Exception as exc:   # noqa: BLE001 - it belongs to that request (Ctrl-C propagates)
            if r.error is None:
                r.error = _detach_traceback(exc)
            r.cancel_requested = True
            return None
        return draft

    cdef int _verify(self, GenerationRequest r, int s, list events, object callback) except -1:
        """Sample the request at its next token's output, then at each drafted position while
        the chain picked exactly the drafted token: the first sample that differs (or the one
        after the last draft) becomes the next token, as plain decoding would have sampled it
        from the same logits.  Rejected drafts leave the KV memory."""
        cdef list draft = r.draft
        cdef int k = len(draft), j = 0
        r.draft = None
        r.n_drafted += k
        self.n_drafted_total += k
        try:
            self._sample_one(r, events, callback)
            while j < k and r.has_next and r.next_token == <llama_token>draft[j]:
                # The draft was right: its position is evaluated already (it is at n_past).
                self.slot_tokens[s].append(draft[j])
                r.n_past += 1
                r.has_next = False
                r.batch_idx = r.draft_idx0 + j
                j += 1
                self._sample_one(r, events, callback)
        finally:
            r.batch_idx = -1
            r.n_draft_accepted += j
            if j < k:
                r.spec_runs_ended += 1
            self.n_draft_accepted_total += j
            # Keep what the slot holds (the accepted drafts); the rest was never accepted.
            llama_memory_seq_rm(llama_get_memory(self.context.ptr), s, len(self.slot_tokens[s]), -1)
            # Draft length adapts: doubles while whole drafts are accepted, shrinks to just past
            # the accepted run after a rejection (a 1-token draft costs next to nothing).
            if j == k:
                r.spec_cap = min(r.draft_max, max(1, r.spec_cap) * 2)
            else:
                r.spec_cap = max(1, min(r.spec_cap, j + 1))
        return 0

    cdef bint _drop_drafts(self):
        cdef bint any_draft = False
        for x in self.slots:
            if x is not None and (<GenerationRequest>x).draft is not None:
                (<GenerationRequest>x).draft = None
                any_draft = True
        return any_draft

    cdef int _feed_media(self, GenerationRequest r, int s, list events, object callback) except -1:
        """Evaluate every medium that starts at r's next position (consecutive ones too).  A
        medium that does not fit ends r with ContextLengthError once idle caches and paused
        requests have made what room they can; a projector failure (MediaError) or a closed
        projector ends r with that error."""
        cdef int i, n, idx
        cdef double t0
        while True:
            i = r._media_at(r.n_past)
            if i < 0:
                return 0
            start, n, idx = r.media_spans[i]
            t0 = pyllama_now_ms()
            while True:
                try:
                    _eval_media(self.context, r.media.multimodal, r.media, idx, r.n_past, s)
                    break
                except KVCacheFullError:
                    if self._evict_idle_caches() > 0 or self._preempt_one():
                        if r.slot < 0:     # (never r itself: r is not paused)
                            return 0
                        continue
                    self._fail(r, _retryable(ContextLengthError(
                        f"no room in the KV memory for an image of {n} tokens while other sequences hold the "
                        f"rest of n_ctx={self.context.n_ctx}: retry later, lower n_parallel or use a larger n_ctx")))
                    llama_memory_seq_rm(llama_get_memory(self.context.ptr), s, -1, -1)
                    self.slot_tokens[s] = []
                    self._emit(r, "", events, callback)
                    return 0
                except ValueError as e:
                    # MediaError (the projector failed), a projector closed under us, a medium
                    # that does not fit: this request's failure, not the step's.
                    self._fail(r, e)
                    self._emit(r, "", events, callback)
                    return 0
            keys = r.prompt_tokens[start:start + n]
            self.slot_tokens[s].extend(keys)
            if r.refill:
                del r.refill[:n]
                r.t_gen += pyllama_now_ms() - t0
            else:
                r.n_prompt_done += n
                r.t_prompt += pyllama_now_ms() - t0
            r.n_past += n

    cdef void _fork(self, GenerationRequest r):
        cdef llama_memory_t mem = llama_get_memory(self.context.ptr)
        cdef GenerationRequest f
        for x in r._followers:
            f = x
            if f.forked or f.done or f.slot < 0:
                continue
            llama_memory_seq_rm(mem, f.slot, -1, -1)
            llama_memory_seq_cp(mem, r.slot, f.slot, -1, -1)
            self.slot_tokens[f.slot] = list(self.slot_tokens[r.slot])
            f.n_past = r.n_past
            f.n_prompt_done = r.n_prompt_done
            f.n_cached = r.n_cached
            f.t_prompt = r.t_prompt
            f.batch_idx = r.batch_idx
            f.forked = True
            f._row_shared = r._row_shared = True   # they sample from the same row this step

    cdef bint _decode_or_shed(self, Batch batch, list events, object callback) except -1:
        """Decode the batch.  When the KV memory is full: drop idle prompt caches, then
        preempt paused requests, then end the longest generation with finish_reason
        "length" (it returns what it produced) and retry at the next step.  Returns False
        when this step produced nothing."""
        cdef GenerationRequest r, victim
        cdef int slot
        while True:
            try:
                self.context._eval(batch, False)
                return True
            except KVCacheFullError as e:
                if self._drop_drafts():
                    # The drafts took the last cells: decode without them (next step), and draft
                    # again only a little later.
                    self.spec_pause_until = self.n_steps + 16
                    return False
                if self._evict_idle_caches() > 0:
                    continue
                if self._preempt_one():
                    # its tokens may be in this batch? No: paused requests are never batched.
                    self._evict_idle_caches()
                    continue
                victim = None
                for x in self.slots:
                    if x is not None and not (<GenerationRequest>x).paused:
                        r = x
                        if r.leader is not None and not r.forked:
                            continue   # waits for its leader's prompt: holds no KV cells yet
                        if victim is None or r.n_past > victim.n_past:
                            victim = r
                if victim is None:
                    raise
                slot = victim.slot
                if victim.has_next or victim.refill:
                    victim.refill = None
                    self._release(victim, "length")
                else:
                    self._fail(victim, _retryable(ContextLengthError(
                        f"no room in the KV memory for a prompt of {victim.n_prompt} tokens while other "
                        f"sequences hold the rest of n_ctx={self.context.n_ctx}: retry later, lower n_parallel "
                        f"or use a larger n_ctx")))
                llama_memory_seq_rm(llama_get_memory(self.context.ptr), slot, -1, -1)
                self.slot_tokens[slot] = []
                text = victim._flush() if victim.finish_reason == "length" else ""
                victim._settle_logprobs()
                self._emit(victim, text, events, callback)
                return False
            except DecodeAborted:
                raise   # the stepper's business (close(), Ctrl-C): the requests are intact
            except DecodeError as e:
                for x in self.slots:
                    if x is not None and (<GenerationRequest>x).n_fed + (1 if (<GenerationRequest>x).batch_idx >= 0 else 0) > 0:
                        self._fail(<GenerationRequest>x, e)
                        self._emit(<GenerationRequest>x, "", events, callback)
                return False

    cdef void _emit(self, GenerationRequest r, str text, list events, object callback):
        if text:
            r.parts.append(text)
        if events is not None:
            events.append((r, text, r.finish_reason))
        if callback is not None:
            callback(r, text)
        if r.finish_reason is not None and r._followers and r.leader is None:
            self._end_unforked_followers(r, events, callback)

    cdef void _end_unforked_followers(self, GenerationRequest r, list events, object callback):
        """A request group's leader ended before its prompt was shared (KV-full victim, media
        failure, DecodeError, ...): the followers waiting for that prompt never get it, so
        they end the same way (same error), their slots are freed and each gets its event."""
        cdef GenerationRequest f
        for x in r._followers:
            f = x
            if f.forked or f.finish_reason is not None:
                continue
            if r.finish_reason == "error":
                f.error = r.error
            self._release(f, r.finish_reason)
            self._emit(f, "", events, callback)

    cdef int _score_prompt(self, GenerationRequest r, int take) except -1:
        """Log-probabilities of the prompt tokens predicted by this step's prompt outputs."""
        cdef int j
        cdef Py_ssize_t p
        cdef float * logits
        cdef int k = max(r.n_logprobs, 0)
        for j in range(take):
            p = r.n_prompt_done + j            # the output at p predicts token p + 1
            if p + 1 >= len(r.prompt_tokens):
                break
            logits = llama_get_logits_ith(self.context.ptr, r.prompt_idx0 + j)
            if logits == NULL:
                raise DecodeError("no logits for a prompt token that should have them")
            r._prompt_logprobs.append(_logprob_entry(logits, self.context.n_vocab,
                                                     r.prompt_tokens[p + 1], k))
        return 0

    cdef int _sample_one(self, GenerationRequest r, list events, object callback) except -1:
        cdef llama_token tok
        cdef double t0 = pyllama_now_ms(), t1
        cdef int32_t n
        cdef size_t ok
        cdef const llama_vocab * vocab = self.context.vocab
        cdef str text = ""
        cdef bytes data
        cdef float * row
        if r.has_hooks:
            tok = self._sample_hooked(r)
        elif r.grammar is None and r.sampler._plain_greedy:
            tok = self._sample_greedy(r)
        elif r.grammar is None:
            with nogil:
                tok = llama_sampler_sample(r.sampler.ptr, self.context.ptr, r.batch_idx)
        else:
            tok = self._sample_with_grammar(r)
        if r.n_logprobs >= 0:
            # The model's own distribution at this position (before the sampler chain).
            row = llama_get_logits_ith(self.context.ptr, r.batch_idx)
            if row == NULL:
                raise DecodeError("no logits for a sequence that should have them")
            r._logprobs.append(_logprob_entry(row, self.context.n_vocab, tok, r.n_logprobs))
            r.lp_spans.append([r.chars_pushed, -1])
        t1 = pyllama_now_ms()
        r.t_sample += t1 - t0
        r.batch_idx = -1
        if r.t_first == 0:
            r.t_first = t1

        if llama_vocab_is_eog(vocab, tok) and not r.ignore_eos:
            r.finish_reason = "eog"
            if r.n_logprobs >= 0:
                r._logprobs.pop()   # the end-of-generation token is not part of the output
                r.lp_spans.pop()
        elif tok in r.stop_tokens:
            r.out_tokens.append(tok)
            r.finish_reason = "stop"
            r.lp_keep_last = r.n_logprobs >= 0
        elif r.stopped_by_criterion:
            # A stopping criterion (run in _sample_hooked) ended the request on this token: it
            # stays in `tokens`, but its text and logprobs entry are dropped, as llama-cpp-python
            # drops its stopping token; the text held back before it is released.
            r.out_tokens.append(tok)
            if r.n_logprobs >= 0:
                r._logprobs.pop()
                r.lp_spans.pop()
            text = r._flush()
            r.finish_reason = "stop"
        else:
            r.out_tokens.append(tok)
            n = llama_token_to_piece(vocab, tok, self.piece_buf, sizeof(self.piece_buf), 0, r.render_special)
            if n > 0:
                data = r.pending_bytes + self.piece_buf[:n] if r.pending_bytes else self.piece_buf[:n]
                ok = pyllama_utf8_complete_len(data, len(data))
                r.pending_bytes = data[ok:]
                if ok:
                    text = r._push_text(PyUnicode_DecodeUTF8(data, ok, "replace"))
            elif n < 0:
                data = self._long_piece(tok, r.render_special)
                data = r.pending_bytes + data
                ok = pyllama_utf8_complete_len(data, len(data))
                r.pending_bytes = data[ok:]
                if ok:
                    text = r._push_text(PyUnicode_DecodeUTF8(data, ok, "replace"))
            if r.finish_reason is None:
                if r.max_tokens >= 0 and <int>len(r.out_tokens) >= r.max_tokens:
                    r.finish_reason = "length"
                elif r.n_past + 1 >= self.n_ctx_seq:
                    r.finish_reason = "length"   # the context window is full
                else:
                    r.next_token = tok
                    r.has_next = True

        if r.finish_reason is not None:
            text += r._flush()
            self._release(r, r.finish_reason)
        if r.n_logprobs >= 0:
            r._settle_logprobs()
        if text or r.finish_reason is not None or r.n_logprobs >= 0:
            self._emit(r, text, events, callback)
        return 0

    cdef llama_token _sample_hooked(self, GenerationRequest r) except -1:
        """Sampling for a request with Python hooks: its logits processors edit its logits row,
        the usual sampling picks from that row, then, for a token the request keeps, its
        stopping criteria run (setting r.stopped_by_criterion).  A hook's exception, or its
        misuse, comes out as _HookFailure: the step ends this request only."""
        cdef int32_t n_vocab = self.context.n_vocab
        cdef float * row = llama_get_logits_ith(self.context.ptr, r.batch_idx)
        cdef float * logits = row
        cdef llama_token tok
        cdef Py_ssize_t n_refs
        if row == NULL:
            raise DecodeError("no logits for a sequence that should have them")
        if r.logits_processors:
            if r._row_shared or r.n_logprobs >= 0:
                # The context's row must stay as the model made it: the logprobs report the raw
                # distribution, and at a request group's first token its other requests sample
                # from this same row.  So the processors edit a copy.
                if r._scores_copy is None:
                    r._scores_copy = _np().empty(n_vocab, dtype=_np().float32)
                scores = r._scores_copy
                logits = <float *><size_t>scores.ctypes.data
                memcpy(logits, row, n_vocab * sizeof(float))
            else:
                scores = _float_row(row, n_vocab, True)
            n_refs = Py_REFCNT(scores)
            try:
                r._run_processors(scores)
            except BaseException as e:
                raise _HookFailure(_forget_row(e, logits == row))
            if logits == row:
                _check_not_kept(scores, n_refs, "logits processor")
        r._row_shared = False
        try:
            tok = self._sample_from(r, logits)
        except DecodeError as e:
            if not r.logits_processors:
                raise
            raise _HookFailure(ValueError(f"no token could be sampled from the scores the logits processors "
                                          f"left ({e}): are they all -inf or NaN?"))
        if (llama_vocab_is_eog(self.context.vocab, tok) and not r.ignore_eos) or tok in r.stop_tokens:
            return tok     # the request ends on this token anyway
        r._append_id(tok)
        if r.stopping_criteria:
            if logits == row:
                scores = _float_row(row, n_vocab, False)
            else:
                scores = r._scores_copy
            n_refs = Py_REFCNT(scores)
            try:
                r.stopped_by_criterion = r._run_criteria(scores)
            except BaseException as e:
                raise _HookFailure(_forget_row(e, logits == row))
            if logits == row:
                _check_not_kept(scores, n_refs, "stopping criterion")
        return tok

    cdef llama_token _sample_greedy(self, GenerationRequest r) except -1:
        """Greedy (with optional logit bias) straight from the logits: the same token as
        llama.cpp's greedy sampler (first maximum), without building its n_vocab-entry
        candidate array first (3 MB per token for a 262k vocabulary such as Gemma 3's)."""
        cdef float * logits = llama_get_logits_ith(self.context.ptr, r.batch_idx)
        cdef llama_token tok
        if logits == NULL:
            raise DecodeError("no logits for a sequence that should have them")
        with nogil:
            tok = r.sampler._greedy_argmax(logits, self.context.n_vocab)
            llama_sampler_accept(r.sampler.ptr, tok)
        return tok

    cdef llama_token _sample_with_grammar(self, GenerationRequest r) except -1:
        cdef float * logits = llama_get_logits_ith(self.context.ptr, r.batch_idx)
        if logits == NULL:
            raise DecodeError("no logits for a sequence that should have them")
        return self._sample_from(r, logits)

    cdef llama_token _sample_from(self, GenerationRequest r, float * logits) except -1:
        """Sample r's next token from a logits row (the context's, or the one a request's
        logits processors edited) as llama.cpp's common sampler does: run the chain without
        the grammar, keep the token if the grammar allows it (the usual case, and cheap),
        otherwise apply the grammar to all candidates and sample again.  Without a grammar
        this is what llama_sampler_sample does, on our row."""
        cdef int32_t n_vocab = self.context.n_vocab, i
        cdef llama_token_data_array cur
        cdef llama_token tok
        if r.candidates == NULL:
            r.candidates = <llama_token_data *>malloc(n_vocab * sizeof(llama_token_data))
            if r.candidates == NULL:
                raise MemoryError()
        if r.sampler._plain_greedy:
            # The usual case (greedy JSON, tool calls): the argmax of the logits, no candidate
            # array unless the grammar rejects it.
            with nogil:
                tok = r.sampler._greedy_argmax(logits, n_vocab)
        else:
            with nogil:
                for i in range(n_vocab):
                    r.candidates[i].id = i
                    r.candidates[i].logit = logits[i]
                    r.candidates[i].p = 0.0
                cur.data = r.candidates
                cur.size = n_vocab
                cur.selected = -1
                cur.sorted = False
                llama_sampler_apply(r.sampler.ptr, &cur)
            if cur.selected < 0 or cur.selected >= <int64_t>cur.size:
                raise DecodeError("the sampler chain selected no token")
            tok = cur.data[cur.selected].id
        if r.grammar is None:
            llama_sampler_accept(r.sampler.ptr, tok)
            return tok
        if not r.grammar._grammar_allows(tok):
            with nogil:
                for i in range(n_vocab):
                    r.candidates[i].id = i
                    r.candidates[i].logit = logits[i]
                    r.candidates[i].p = 0.0
                cur.data = r.candidates
                cur.size = n_vocab
                cur.selected = -1
                cur.sorted = False
                llama_sampler_apply(r.grammar.ptr, &cur)
                llama_sampler_apply(r.sampler.ptr, &cur)
            if cur.selected < 0 or cur.selected >= <int64_t>cur.size:
                raise DecodeError("the sampler chain selected no token")
            tok = cur.data[cur.selected].id
            if not r.grammar._grammar_allows(tok):
                # Nothing the grammar allows survived the chain (e.g. all its tokens were
                # biased away).  Accepting it would abort the process, so stop cleanly.
                raise GrammarError("no token allowed by the grammar is left to sample "
                                   "(check logit_bias / the grammar)")
        llama_sampler_accept(r.grammar.ptr, tok)
        llama_sampler_accept(r.sampler.ptr, tok)
        return tok

    cdef bytes _long_piece(self, llama_token tok, bint special):
        cdef int32_t n = llama_token_to_piece(self.context.vocab, tok, NULL, 0, 0, special)
        cdef char * buf = <char *>malloc(-n + 1)
        if buf == NULL:
            raise MemoryError()
        try:
            n = llama_token_to_piece(self.context.vocab, tok, buf, -n + 1, 0, special)
            return buf[:max(n, 0)]
        finally:
            free(buf)

    def run(self, requests=(), callback=None) -> None:
        """Submit `requests` and step until they (and their followers) are finished; other
        requests on this engine advance in the same steps.  With no requests, step until
        nothing is left to run.

        Without a callback no Python code runs per token (except the hooks of requests that
        have logits processors or stopping criteria); with one it is called as
        callback(request, new_text) whenever a request produces text or finishes.
        If the run is interrupted (Ctrl-C, an exception in the callback) the given
        requests are cancelled and the engine stays usable.
        """
        self._check_init()
        requests = list(requests)
        for r in requests:
            self.submit(r)
        watched = []
        for r in requests:
            watched.append(r)
            watched.extend((<GenerationRequest>r)._followers)
        with self.context._lock:
            try:
                if watched:
                    while not all((<GenerationRequest>r).finish_reason is not None for r in watched):
                        self._step(None, callback)
                else:
                    while self.runnable:
                        self._step(None, callback)
            except BaseException:
                if watched:
                    for r in watched:
                        self.cancel(r)
                else:
                    self._cancel_all()
                raise

    cdef void _cancel_all(self):
        cdef GenerationRequest r
        for x in list(self.queue) + list(self.parked):
            r = x
            if r.finish_reason is None:
                r.finish_reason = "cancelled"
            # The followers of a leader that never ran hold no slot and are in no list: only
            # their leader knows them.
            for f in r._followers:
                if not (<GenerationRequest>f).forked and (<GenerationRequest>f).finish_reason is None:
                    (<GenerationRequest>f).finish_reason = "cancelled"
        self.queue.clear()
        del self.parked[:]
        for s in range(self.n_slots):
            if self.slots[s] is not None:
                self._release(<GenerationRequest>self.slots[s], "cancelled")
