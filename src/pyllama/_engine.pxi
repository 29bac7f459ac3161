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
#
# Drafting and verification live in _speculation.pxi, sampling in _engine_sampling.pxi:
# functions of the Engine (`engine` as their first argument) rather than methods, so
# each file holds one part of the loop.

from collections import deque as _deque
import warnings as _warnings


DEF _COST_FIT_MAX_TOKENS = 64 # decodes this small or smaller fit the cost model of drafting
# Prompt tokens fed per step for a request that wants prompt log-probabilities: each
# needs an n_vocab row of logits in llama.cpp's output buffer.
DEF _PROMPT_LOGPROBS_CHUNK = 32
# On a memory that cannot drop a suffix (recurrent, hybrid), a prompt's state is saved this
# many tokens before its end (llama-server's last checkpoint offset): the same prompt again,
# or one that departs in its last few tokens (a chat template's closing tokens), starts there.
DEF _CKPT_TAIL = 4


cdef class Engine:
    """Runs GenerationRequests on a Context: all live sequences advance in one
    llama_decode per step; prompt prefill shares batches with generation; a
    finished slot takes the next waiting request at once (continuous batching).

    Each slot remembers the tokens in its KV memory, so a new prompt that shares
    a prefix with them evaluates only the rest (the prompt cache): a waiting request
    goes to the free slot with the longest common prefix.

    Recurrent and hybrid models (Mamba, RWKV, Jamba, Granite 4, LFM2, Qwen3-Next...): their
    memory cannot drop a sequence's end (`truncatable` is False), so a slot's cache is reused
    only where the new prompt extends all of it, or from a checkpoint (the sequence's state
    saved near the end of an earlier prompt, at most `n_checkpoints` per slot); otherwise
    the prompt is evaluated from the start.  Speculative decoding is off on them.
    """

    cdef readonly Context context
    cdef Batch batch
    cdef readonly int n_slots
    cdef list slots           # slot -> GenerationRequest or None
    cdef list slot_tokens     # slot -> tokens currently in that sequence's KV memory
    cdef list slot_pos_spans  # slot -> the M-RoPE media among them (see _pos_of): their positions
    cdef list slot_shared     # slot -> how many of its first tokens' cells other sequences may share
                              # (llama_memory_seq_cp on one memory): a context shift must not move them
    cdef list slot_used       # slot -> step counter when last used (LRU choice among free slots)
    cdef object queue
    cdef list parked          # preempted paused requests (no slot, not queued)
    cdef int n_batch
    cdef int n_ctx_seq
    cdef char piece_buf[256]
    cdef bint _initialized
    cdef public bint cache_prompt, context_shift   # context_shift: see _engine_shift (default off)
    cdef public PromptCache prompt_cache           # host-memory copies of slot prompts (None: none)
    cdef public double slot_similarity  # _engine_pick_slot: see there (-sps)
    # False on recurrent/hybrid memory: llama_memory_seq_rm(s, p0 > 0, -1) fails there.
    cdef readonly bint truncatable
    cdef list slot_ckpts      # slot -> [(n_tokens, state bytes)], oldest first (only when not truncatable)
    cdef list slot_ckpt_at    # slot -> prompt position whose state its request saves (-1: none)
    cdef public int n_checkpoints          # at most this many checkpoints per slot (0: none)
    cdef readonly long long n_checkpoints_saved, n_checkpoints_restored
    cdef bint _warned_spec
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
        self.slot_pos_spans = [[] for _ in range(self.n_slots)]
        self.slot_shared = [0] * self.n_slots
        self.slot_used = [0] * self.n_slots
        self.truncatable = context.kv_can_truncate()
        self.slot_ckpts = [[] for _ in range(self.n_slots)]
        self.slot_ckpt_at = [-1] * self.n_slots
        self.n_checkpoints = 2
        self.slot_similarity = 0.1
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

    def save_slot(self, int slot, path) -> int:
        """Save idle slot `slot`'s sequence (its KV cells and the tokens they hold) to the file
        `path`, as llama-server's slot save does; returns how many tokens it holds."""
        return _engine_save_slot(self, slot, path)

    def restore_slot(self, int slot, path) -> int:
        """Load a save_slot file into idle slot `slot`: its prompt cache becomes the file's."""
        return _engine_restore_slot(self, slot, path)

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
            self.slot_pos_spans[s] = []
            self.slot_shared[s] = 0
            self.slot_ckpts[s] = []
        self.context.kv_clear()
        if self.prompt_cache is not None:
            self.prompt_cache.clear()

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
        if not self.truncatable and (request.draft_max > 0 or any(
                (<GenerationRequest>f).draft_max > 0 for f in request._followers)):
            # Rejected drafts would have to leave the sequence, which this memory cannot do.
            if not self._warned_spec:
                self._warned_spec = True
                _warnings.warn("speculative decoding is off: this model's memory is recurrent (or hybrid) and "
                               "cannot drop rejected draft tokens; generating without drafts",
                               RuntimeWarning, stacklevel=2)
            request.draft_max = 0
            for f in request._followers:
                (<GenerationRequest>f).draft_max = 0
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
            if pmax != _last_pos_of(self.slot_pos_spans[s], len(cached)):
                _engine_clear_seq(self, s)
        return cached

    cdef Py_ssize_t _common_prefix(self, list cached, list want, Py_ssize_t limit):
        cdef Py_ssize_t n = min(len(cached), len(want), limit), k = 0
        while k < n and cached[k] == want[k]:
            k += 1
        return k

    cdef Py_ssize_t _prefix_for(self, int s, GenerationRequest r):
        """How much of slot s's cache request r could start from (before what the memory
        can keep: _engine_keepable / _engine_truncate)."""
        cdef list cached = self.slot_tokens[s]
        if r.preempted:
            # Resume: what our sequence held, minus what survived in this slot.
            return r._snap(self._common_prefix(cached, r.kv_tokens, len(r.kv_tokens)))
        if r.cache_prompt and self.cache_prompt:
            return r._snap(self._common_prefix(cached, r.prompt_tokens, len(r.prompt_tokens) - 1))   # evaluate >= 1
        return 0

    cdef int _assign(self, int s, GenerationRequest r) except -1:
        """Put a waiting request into slot s, reusing the slot's cached prefix."""
        cdef Py_ssize_t k, at
        self._valid_cache(s)
        if not r.preempted:
            _engine_cache_load(self, s, r)     # (a no-op without a prompt cache)
        k = _engine_truncate(self, s, self._prefix_for(s, r))
        self.slot_ckpt_at[s] = -1
        if r.preempted:
            r.refill = r.kv_tokens[k:]
            r.kv_tokens = None
            r.n_past = <int>k
            r.preempted = False
        else:
            at = len(r.prompt_tokens) - _CKPT_TAIL
            if (not self.truncatable and self.n_checkpoints > 0 and r.cache_prompt and self.cache_prompt
                    and r.media is None and at > k):
                self.slot_ckpt_at[s] = <int>at     # save the state there, on the way (step 2)
            r.n_past = <int>k
            r.n_prompt_done = <int>k
            r.n_cached = <int>k
            r.has_next = False
            r.t_start = pyllama_now_ms()
        r.slot = s
        r.room_needed = 0
        self.slots[s] = r
        return 0

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
            _engine_vacate(self, r)
            self.parked.append(r)
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
                have = _engine_keepable(self, s, self._common_prefix(self._valid_cache(s), prefix, k))
                if have > best:
                    s0, best = s, have
            cached = self._valid_cache(s0)
            have = _engine_truncate(self, s0, self._common_prefix(cached, prefix, k))
            mem = llama_get_memory(self.context.ptr)
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
                if s != s0 and _engine_keepable(self, s, self._common_prefix(self._valid_cache(s), prefix, k)) < k:
                    llama_memory_seq_rm(mem, s, -1, -1)
                    llama_memory_seq_cp(mem, s0, s, -1, -1)
                    self.slot_tokens[s] = list(prefix)
                    self.slot_pos_spans[s] = []    # (the prefix stops before any medium)
                    self.slot_shared[s] = max(self.slot_shared[s0], <Py_ssize_t>k)
                    self.slot_shared[s0] = max(self.slot_shared[s0], <Py_ssize_t>k)
                    self.slot_ckpts[s] = list(self.slot_ckpts[s0])
        return k

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
        cdef bint fresh, started = False
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
            if r is None or (r.room_needed > 0 and not _engine_has_room(self, r)):
                break      # (one preempted to make room waits for it, keeping its place)
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
            s = _engine_pick_slot(self, r, free)
            free.remove(s)
            self._assign(s, r)
            started = started or fresh
            if fresh:
                for f in r._followers:
                    if (<GenerationRequest>f).done or (<GenerationRequest>f).slot >= 0:
                        continue
                    s = free.pop(0)
                    self.slots[s] = f
                    (<GenerationRequest>f).slot = s
                    (<GenerationRequest>f).t_start = r.t_start
        if started:
            _engine_cache_idle_slots(self)   # (with a prompt cache that wants idle slots)
        return 0

    cdef int _step(self, list events, object callback) except -1:
        cdef GenerationRequest r
        cdef int s, i, room, take, first, at
        cdef llama_pos p0
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
                r.batch_idx = batch._add(r.next_token, r._pos(r.n_past), s, True)
                n_gen += 1
                if r.draft_max > 0:
                    n_spec += 1
        # 2b. Speculation: drafted continuations, verified by this same decode.
        if n_spec > 0 and n_gen < self.spec_max_sequences and self.n_steps >= self.spec_pause_until:
            _spec_add_drafts(self, batch, n_gen)
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
                p0 = r._pos(r.n_past)
                for i in range(take):
                    batch._add(r.refill[i], p0 + i, s, False)
                r.n_fed = take
                continue
            take = min(room, len(r.prompt_tokens) - r.n_prompt_done)
            if r.media is not None:
                take = min(take, r._next_media(r.n_past) - r.n_past)
            if take <= 0:
                continue
            at = self.slot_ckpt_at[s]
            if at >= 0:
                # A memory that cannot go back: the chunk stops where the prompt's state is
                # to be saved, and the next chunk saves it before it is fed.
                if r.n_prompt_done < at:
                    take = min(take, at - r.n_prompt_done)
                else:
                    self.slot_ckpt_at[s] = -1
                    if r.n_prompt_done == at and r.n_past == at:
                        _engine_save_ckpt(self, s)
            if r._wants_prompt_lp:
                take = min(take, _PROMPT_LOGPROBS_CHUNK)
            first = batch.batch.n_tokens
            p0 = r._pos(r.n_past)
            for i in range(take):
                want_logits = r._wants_prompt_lp or r.n_prompt_done + i == len(r.prompt_tokens) - 1
                batch._add(r.prompt_tokens[r.n_prompt_done + i], p0 + i, s, want_logits)
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
            _spec_fit_cost(self, batch.batch.n_tokens, dt)
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
                    _score_prompt(self, r, take)
                self.slot_tokens[s].extend(r.prompt_tokens[r.n_prompt_done:r.n_prompt_done + take])
                r.n_prompt_done += take
                r.n_past += take
                r.t_prompt += dt
                if r.report_progress:    # (its listener reads prompt_progress)
                    self._emit(r, "", events, callback)

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
                    _spec_verify(self, r, s, events, callback)
                else:
                    _sample_one(self, r, events, callback)
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
        if not _spec_cost_model(self, &a, &b):
            return None
        return (a, b)

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
                    _eval_media(self.context, r.media.multimodal, r.media, idx, r._pos(r.n_past), s)
                    break
                except DecodeAborted:
                    if not self.truncatable:
                        _engine_resync_after_abort(self)    # (see _decode_or_shed)
                    raise
                except KVCacheFullError:
                    if _engine_evict_idle_caches(self) > 0 or self._preempt_one():
                        if r.slot < 0:     # (never r itself: r is not paused)
                            return 0
                        continue
                    self._fail(r, _retryable(ContextLengthError(
                        f"no room in the KV memory for an image of {n} tokens while other sequences hold the "
                        f"rest of n_ctx={self.context.n_ctx}: retry later, lower n_parallel or use a larger n_ctx")))
                    _engine_clear_seq(self, s)
                    self._emit(r, "", events, callback)
                    return 0
                except ValueError as e:
                    # MediaError (the projector failed), a projector closed under us, a medium
                    # that does not fit: this request's failure, not the step's.
                    self._fail(r, e)
                    self._emit(r, "", events, callback)
                    return 0
            keys = r.prompt_tokens[start:start + n]
            for span in r.pos_spans:
                if span[0] == start:       # (our token index is the slot's: see _assign)
                    self.slot_pos_spans[s].append(span)
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
            # Whole sequences: a recurrent state is shared too (copied when it diverges).
            llama_memory_seq_rm(mem, f.slot, -1, -1)
            llama_memory_seq_cp(mem, r.slot, f.slot, -1, -1)
            self.slot_tokens[f.slot] = list(self.slot_tokens[r.slot])
            self.slot_pos_spans[f.slot] = list(self.slot_pos_spans[r.slot])
            self.slot_shared[f.slot] = self.slot_shared[r.slot] = len(self.slot_tokens[r.slot])
            self.slot_ckpts[f.slot] = list(self.slot_ckpts[r.slot])
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
                if _spec_drop_drafts(self):
                    # The drafts took the last cells: decode without them (next step), and draft
                    # again only a little later.
                    self.spec_pause_until = self.n_steps + 16
                    return False
                if _engine_evict_idle_caches(self) > 0:
                    continue
                if self._preempt_one():
                    # its tokens may be in this batch? No: paused requests are never batched.
                    _engine_evict_idle_caches(self)
                    continue
                if _engine_preempt_running(self):
                    return False      # its tokens were in the batch: the next step's holds the others'
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
                _engine_clear_seq(self, slot)
                text = victim._flush() if victim.finish_reason == "length" else ""
                victim._settle_logprobs()
                self._emit(victim, text, events, callback)
                return False
            except DecodeAborted:
                # The stepper's business (close(), Ctrl-C): the requests are intact, except on a
                # memory that cannot drop what the aborted decode left in it.
                if not self.truncatable:
                    _engine_resync_after_abort(self)
                raise
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
