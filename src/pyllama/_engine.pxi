# The generation loop: decode -> sample -> accept -> detokenize -> stop check,
# for one sequence or many sharing a context (continuous batching).
#
# Per generated token the work is: one slot in a shared llama_decode, one
# llama_sampler_sample, one token_to_piece into a small byte buffer, and a
# stop-string check on the held-back tail only.  Nothing re-detokenizes the
# completion, nothing copies logits.

from collections import deque
from cpython.unicode cimport PyUnicode_GET_LENGTH

cdef extern from *:
    """
    #include <time.h>
    static double pyllama_now_ms(void) {
    #ifdef _WIN32
        return (double) clock() * 1000.0 / CLOCKS_PER_SEC;
    #else
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
    #endif
    }
    """
    double pyllama_now_ms() nogil


cdef class GenerationRequest:
    """One prompt to run through an Engine, with its own sampler and stop conditions."""

    # inputs
    cdef readonly list prompt_tokens
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
    # scheduling state
    cdef int slot
    cdef int n_past              # tokens of this request in its sequence's KV memory
    cdef int n_prompt_done       # prompt tokens fed so far (cached ones included)
    cdef int n_cached            # prompt tokens that came from the cache / shared prefix
    cdef llama_token next_token  # sampled, not yet fed
    cdef bint has_next
    cdef int batch_idx
    cdef int n_fed               # prompt tokens of this request in the current batch
    # results
    cdef list out_tokens
    cdef bytes pending_bytes     # an unfinished UTF-8 sequence
    cdef str held                # text held back: it might start a stop string
    cdef list parts
    cdef readonly object finish_reason
    # timings (ms)
    cdef double t_submit, t_first, t_prompt, t_gen, t_sample, t_start

    def __cinit__(self):
        self.candidates = NULL

    def __dealloc__(self):
        free(self.candidates)
        self.candidates = NULL

    def __init__(self, prompt_tokens, SamplerChain sampler not None, *, SamplerChain grammar=None,
                 int max_tokens=-1, stop=(), stop_tokens=(), bint ignore_eos=False, bint render_special=False,
                 tag=None):
        self.prompt_tokens = [int(t) for t in prompt_tokens]
        if not self.prompt_tokens:
            raise ValueError("the prompt is empty: it needs at least one token")
        sampler.vocab.check_tokens(self.prompt_tokens)
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
            if not grammar.has_grammar or len(grammar) != len(grammar._grammar_stages):
                raise ValueError("grammar= must be a SamplerChain holding only grammar stages")
            if grammar.vocab is not sampler.vocab:
                raise ValueError("the grammar and the sampler were built for different models")
            if ignore_eos:
                raise ValueError("ignore_eos cannot be combined with a grammar: the grammar decides when the "
                                 "output is complete")
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
        self.slot = -1
        self.batch_idx = -1
        self.out_tokens = []
        self.pending_bytes = b""
        self.held = ""
        self.parts = []
        self.finish_reason = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def tokens(self) -> list:
        return list(self.out_tokens)

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_tokens)

    @property
    def n_prompt_evaluated(self) -> int:
        return len(self.prompt_tokens) - self.n_cached

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

    def __repr__(self):
        state = self.finish_reason or ("running" if self.slot >= 0 else "waiting")
        return f"<GenerationRequest {len(self.prompt_tokens)} prompt tokens, {len(self.out_tokens)} generated, {state}>"

    # ---- text handling ----------------------------------------------------------

    cdef str _push_text(self, str new_text):
        """Add decoded text; return what can be shown now (stop strings never leak)."""
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
        self.held = ""
        if self.pending_bytes:
            tail += self.pending_bytes.decode("utf-8", "replace")
            self.pending_bytes = b""
        return tail if self.finish_reason != "stop" else ""


cdef class Engine:
    """Runs GenerationRequests on a Context: all live sequences advance in one
    llama_decode per step; prompt prefill shares batches with generation; a
    finished slot takes the next waiting request at once (continuous batching).

    Each slot remembers the tokens in its KV memory, so a new prompt that shares
    a prefix with them evaluates only the rest (the prompt cache).
    """

    cdef readonly Context context
    cdef Batch batch
    cdef readonly int n_slots
    cdef list slots           # slot -> GenerationRequest or None
    cdef list slot_tokens     # slot -> tokens currently in that sequence's KV memory
    cdef object queue
    cdef int n_batch
    cdef int n_ctx_seq
    cdef char piece_buf[256]

    def __init__(self, Context context not None, n_slots=None):
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
        self.queue = deque()

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(r is not None for r in self.slots)

    @property
    def cached_tokens(self) -> list:
        return list(self.slot_tokens[0])

    def reset(self) -> None:
        """Cancel everything and forget the prompt cache."""
        for r in list(self.queue):
            (<GenerationRequest>r).finish_reason = "cancelled"
        self.queue.clear()
        for s in range(self.n_slots):
            if self.slots[s] is not None:
                (<GenerationRequest>self.slots[s]).finish_reason = "cancelled"
                self.slots[s] = None
            self.slot_tokens[s] = []
        self.context.kv_clear()

    def submit(self, GenerationRequest request not None) -> None:
        if request.sampler.vocab.model is not self.context.model:
            raise ValueError("the request's sampler was built for another model")
        if request.finish_reason is not None or request.slot >= 0:
            raise ValueError("this request has already run")
        if len(request.prompt_tokens) >= self.n_ctx_seq:
            raise ContextLengthError(
                f"the prompt has {len(request.prompt_tokens)} tokens but the context holds {self.n_ctx_seq} "
                f"per sequence; shorten the prompt or use a larger n_ctx")
        request.t_submit = pyllama_now_ms()
        self.queue.append(request)

    def cancel(self, GenerationRequest request not None) -> None:
        """Stop a request (queued or running); its slot is freed for the next one."""
        if request.finish_reason is not None:
            return
        if request.slot >= 0:
            self._release(request, "cancelled")
        else:
            try:
                self.queue.remove(request)
            except ValueError:
                pass
            request.finish_reason = "cancelled"

    # ---- scheduling -----------------------------------------------------------

    cdef void _assign(self, int s, GenerationRequest r):
        """Put a waiting request into slot s, reusing the slot's cached prefix."""
        cdef list cached = self.slot_tokens[s]
        cdef list prompt = r.prompt_tokens
        cdef Py_ssize_t n = min(len(cached), len(prompt) - 1), k = 0   # always evaluate >= 1 token
        while k < n and cached[k] == prompt[k]:
            k += 1
        if k < len(cached):
            llama_memory_seq_rm(llama_get_memory(self.context.ptr), s, k, -1)
            del cached[k:]
        r.slot = s
        r.n_past = <int>k
        r.n_prompt_done = <int>k
        r.n_cached = <int>k
        r.has_next = False
        r.t_start = pyllama_now_ms()
        self.slots[s] = r

    cdef void _release(self, GenerationRequest r, str reason):
        if r.finish_reason is None:
            r.finish_reason = reason
        if r.slot >= 0:
            self.slots[r.slot] = None
        r.slot = -1

    def share_prefix(self, prompts) -> int:
        """Evaluate the prefix common to all `prompts` (token lists) once, in slot 0,
        and copy it to the other slots (llama_memory_seq_cp shares the cells).
        Returns the prefix length.  Only when the engine is idle."""
        if self.busy:
            raise RuntimeError("share_prefix needs an idle engine")
        prompts = [list(p) for p in prompts]
        if len(prompts) < 2 or self.n_slots < 2:
            return 0
        cdef Py_ssize_t n = min(len(p) for p in prompts) - 1, k = 0
        first = prompts[0]
        while k < n and all(p[k] == first[k] for p in prompts):
            k += 1
        if k < 4:
            return 0
        prefix = first[:k]
        # Reuse what slot 0 already holds.
        cached = self.slot_tokens[0]
        cdef Py_ssize_t have = 0
        while have < min(len(cached), k) and cached[have] == prefix[have]:
            have += 1
        cdef llama_memory_t mem = llama_get_memory(self.context.ptr)
        llama_memory_seq_rm(mem, 0, have, -1)
        del cached[have:]
        cdef Py_ssize_t pos = have, chunk
        while pos < k:
            chunk = min(k - pos, self.n_batch)
            self.batch.clear()
            for i in range(chunk):
                self.batch._add(prefix[pos + i], pos + i, 0, False)
            self.context._eval(self.batch, False)
            cached.extend(prefix[pos:pos + chunk])
            pos += chunk
        for s in range(1, self.n_slots):
            llama_memory_seq_rm(mem, s, -1, -1)
            llama_memory_seq_cp(mem, 0, s, -1, -1)
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

    def step(self) -> list:
        """One decode step.  Returns (request, new_text, finish_reason) events."""
        events = []
        with self.context._lock:
            self._step(events, None)
        return events

    cdef int _step(self, list events, object callback) except -1:
        cdef GenerationRequest r
        cdef int s, i, room, take
        cdef Batch batch = self.batch
        cdef double t0, t1, dt
        cdef int n_gen = 0, n_prefill = 0

        if PyErr_CheckSignals() != 0:
            return -1
        self.context._get()
        # 1. Free slots take waiting requests.
        for s in range(self.n_slots):
            if self.slots[s] is None and self.queue:
                self._assign(s, <GenerationRequest>self.queue.popleft())

        # 2. One batch: the next token of every generating sequence first, then as much
        #    prompt as fits (prefill shares the batch with generation).
        batch.clear()
        for s in range(self.n_slots):
            r = self.slots[s]
            if r is not None and r.has_next:
                r.batch_idx = batch._add(r.next_token, r.n_past, s, True)
                n_gen += 1
            elif r is not None:
                r.batch_idx = -1
                r.n_fed = 0
        for s in range(self.n_slots):
            r = self.slots[s]
            if r is None or r.has_next:
                continue
            room = self.n_batch - batch.batch.n_tokens
            if room <= 0:
                break
            take = min(room, len(r.prompt_tokens) - r.n_prompt_done)
            for i in range(take):
                batch._add(r.prompt_tokens[r.n_prompt_done + i], r.n_past + i, s,
                           r.n_prompt_done + i == len(r.prompt_tokens) - 1)
            r.n_fed = take
            if r.n_prompt_done + take == len(r.prompt_tokens):
                r.batch_idx = batch.batch.n_tokens - 1
            n_prefill += take
        if batch.batch.n_tokens == 0:
            return 0

        # 3. Decode (GIL released inside; Ctrl-C aborts it and leaves the KV as before).
        t0 = pyllama_now_ms()
        try:
            self.context._eval(batch, False)
        except KVCacheFullError:
            if self._evict_idle_caches() == 0:
                raise
            self.context._eval(batch, False)
        # Wait for the outputs here (GPU backends decode asynchronously) so the decode's time
        # is counted as eval time, not as sampling time (llama.cpp's common sampler does the same).
        with nogil:
            llama_synchronize(self.context.ptr)
        t1 = pyllama_now_ms()
        dt = t1 - t0

        # 4. Account for what was fed.
        for s in range(self.n_slots):
            r = self.slots[s]
            if r is None:
                continue
            if r.has_next:
                self.slot_tokens[s].append(r.next_token)
                r.n_past += 1
                r.has_next = False
                r.t_gen += dt
            elif r.n_fed > 0:
                take = r.n_fed
                r.n_fed = 0
                self.slot_tokens[s].extend(r.prompt_tokens[r.n_prompt_done:r.n_prompt_done + take])
                r.n_prompt_done += take
                r.n_past += take
                r.t_prompt += dt

        # 5. Sample every sequence that has logits now.
        for s in range(self.n_slots):
            r = self.slots[s]
            if r is None or r.batch_idx < 0:
                continue
            self._sample_one(r, events, callback)
        return 0

    cdef int _sample_one(self, GenerationRequest r, list events, object callback) except -1:
        cdef llama_token tok
        cdef double t0 = pyllama_now_ms(), t1
        cdef int32_t n
        cdef size_t ok
        cdef const llama_vocab * vocab = self.context.vocab
        cdef str text = ""
        cdef bytes data
        if r.grammar is None and r.sampler._plain_greedy:
            tok = self._sample_greedy(r)
        elif r.grammar is None:
            with nogil:
                tok = llama_sampler_sample(r.sampler.ptr, self.context.ptr, r.batch_idx)
        else:
            tok = self._sample_with_grammar(r)
        t1 = pyllama_now_ms()
        r.t_sample += t1 - t0
        r.batch_idx = -1
        if r.t_first == 0:
            r.t_first = t1

        if llama_vocab_is_eog(vocab, tok) and not r.ignore_eos:
            r.finish_reason = "eog"
        elif tok in r.stop_tokens:
            r.out_tokens.append(tok)
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
        if text:
            r.parts.append(text)
        if r.finish_reason is not None:
            self._release(r, r.finish_reason)
        if text or r.finish_reason is not None:
            if events is not None:
                events.append((r, text, r.finish_reason))
            if callback is not None:
                callback(r, text)
        return 0

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
        """Sample as llama.cpp's common sampler does: run the chain without the grammar,
        keep the token if the grammar allows it (the usual case, and cheap), otherwise
        apply the grammar to all candidates and sample again."""
        cdef int32_t n_vocab = self.context.n_vocab, i
        cdef float * logits = llama_get_logits_ith(self.context.ptr, r.batch_idx)
        cdef llama_token_data_array cur
        cdef llama_token tok
        if logits == NULL:
            raise DecodeError("no logits for a sequence that should have them")
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
        try:
            n = llama_token_to_piece(self.context.vocab, tok, buf, -n + 1, 0, special)
            return buf[:max(n, 0)]
        finally:
            free(buf)

    def run(self, requests=(), callback=None) -> None:
        """Submit `requests` and step until every request is finished.

        Without a callback no Python code runs per token; with one it is called as
        callback(request, new_text) whenever a request produces text or finishes.
        If the run is interrupted (Ctrl-C, an exception in the callback) the
        unfinished requests are cancelled and the engine stays usable.
        """
        for r in requests:
            self.submit(r)
        with self.context._lock:
            try:
                while self.busy:
                    self._step(None, callback)
            except BaseException:
                self._cancel_all()
                raise

    cdef void _cancel_all(self):
        for r in list(self.queue):
            (<GenerationRequest>r).finish_reason = "cancelled"
        self.queue.clear()
        for s in range(self.n_slots):
            if self.slots[s] is not None:
                self._release(<GenerationRequest>self.slots[s], "cancelled")
