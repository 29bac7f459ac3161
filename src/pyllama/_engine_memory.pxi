# A slot's memory on models whose memory cannot drop a sequence's end (recurrent and hybrid:
# Mamba, RWKV, Jamba, Granite 4, LFM2, Qwen3-Next ...): every removal the engine makes goes
# through _engine_truncate, which keeps the whole cache, goes back to a checkpoint (the
# sequence's recurrent state saved near the end of an earlier prompt), or empties the
# sequence; whatever it reports is exactly what the memory holds.  On ordinary KV memory it is
# llama_memory_seq_rm with its result checked.



cdef void _engine_clear_seq(Engine engine, int s):
    """Empty slot s's sequence: its KV memory, its cached tokens, its checkpoints."""
    llama_memory_seq_rm(llama_get_memory(engine.context.ptr), s, -1, -1)
    del engine.slot_tokens[s][:]    # (in place: callers may hold the list)
    engine.slot_pos_spans[s] = []
    engine.slot_shared[s] = 0
    engine.slot_ckpts[s] = []


cdef void _engine_cut_slot(Engine engine, int s, Py_ssize_t n):
    """Slot s now holds its first n tokens (never part of a medium): forget the media after
    (and the shared cells after: see slot_shared)."""
    if engine.slot_shared[s] > n:
        engine.slot_shared[s] = n
    if engine.slot_pos_spans[s]:
        engine.slot_pos_spans[s] = [span for span in engine.slot_pos_spans[s] if span[0] < n]


cdef Py_ssize_t _engine_keepable(Engine engine, int s, Py_ssize_t k):
    """How many of slot s's cached tokens _engine_truncate(engine, s, k) would keep."""
    cdef Py_ssize_t n = len(engine.slot_tokens[s]), best = 0
    if k >= n:
        return n
    if engine.truncatable or k <= 0:
        return max(k, 0)
    for c in engine.slot_ckpts[s]:
        if best < <Py_ssize_t>c[0] <= k:
            best = c[0]
    return best


cdef int _engine_pick_slot(Engine engine, GenerationRequest r, list free) except -2:
    """llama-server's choice: the free slot whose cache r reuses most, if that is more than
    slot_similarity of r's tokens (a resumed request: any of its own); else an empty slot,
    else the least recently used one (so a shared BOS alone never overwrites a prompt)."""
    cdef int best = -1, s
    cdef Py_ssize_t best_k = 0, k
    cdef double need = 0.0 if r.preempted else engine.slot_similarity * len(r.prompt_tokens)
    if r.preempted or engine.slot_similarity > 0:
        for s in free:
            k = _engine_keepable(engine, s, engine._prefix_for(s, r))
            if k > need and (k > best_k or (k == best_k and engine.slot_used[s] < engine.slot_used[best])):
                best, best_k = s, k
    if best < 0:
        for s in free:
            if best < 0 or (len(engine.slot_tokens[s]) > 0, engine.slot_used[s]) < \
                    (len(engine.slot_tokens[best]) > 0, engine.slot_used[best]):
                best = s
    return best


cdef Py_ssize_t _engine_truncate(Engine engine, int s, Py_ssize_t k) except -1:
    """Cut slot s's sequence to its first k tokens; returns how many it keeps.  A memory
    that cannot drop a suffix keeps all of them (k covers the cache), or goes back to the
    latest checkpoint at or before k, or starts empty.  Whatever is returned is exactly
    what the sequence holds: no removed token stays in a state."""
    cdef list cached = engine.slot_tokens[s]
    cdef llama_memory_t mem = llama_get_memory(engine.context.ptr)
    cdef Py_ssize_t n = _engine_keepable(engine, s, k)
    if n >= len(cached):
        return len(cached)
    if n > 0 and engine.truncatable:
        if llama_memory_seq_rm(mem, s, _pos_of(engine.slot_pos_spans[s], n), -1):
            del cached[n:]
            _engine_cut_slot(engine, s, n)
            engine.slot_ckpts[s] = [c for c in engine.slot_ckpts[s] if c[0] <= n]
            return n
    elif n > 0:
        for c in reversed(engine.slot_ckpts[s]):
            if c[0] == n:
                if _engine_restore_ckpt(engine, s, c):
                    return n
                break
    _engine_clear_seq(engine, s)
    return 0


cdef int _engine_save_ckpt(Engine engine, int s) except -1:
    """Save slot s's recurrent state (the part of its memory that cannot go back), as it
    is now: after the slot's cached tokens, all of them."""
    cdef llama_context * ctx = engine.context.ptr
    cdef size_t size
    cdef Py_ssize_t n = len(engine.slot_tokens[s])
    cdef list ckpts
    if engine.n_checkpoints <= 0 or n <= 0:
        return 0
    size = llama_state_seq_get_size_ext(ctx, s, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)
    data = _seq_state_bytes(ctx, s, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY, size) if size > 0 else None
    if data is None:
        return 0
    ckpts = [c for c in engine.slot_ckpts[s] if c[0] != n]
    ckpts.append((n, data))
    del ckpts[:max(0, len(ckpts) - engine.n_checkpoints)]      # the oldest go first
    engine.slot_ckpts[s] = ckpts
    engine.n_checkpoints_saved += 1
    return 0


cdef bint _engine_restore_ckpt(Engine engine, int s, tuple ckpt) except -1:
    """Bring slot s's sequence back to checkpoint `ckpt` (n_tokens, state): its recurrent
    state is restored, the attention cells after it (a hybrid's) removed.  False if that
    failed (the caller then empties the sequence)."""
    cdef Py_ssize_t n = ckpt[0]
    cdef bytes data = ckpt[1]
    cdef size_t got, size = PyBytes_GET_SIZE(data)
    cdef const uint8_t * src = <const uint8_t *>PyBytes_AS_STRING(data)
    cdef llama_context * ctx = engine.context.ptr
    cdef llama_memory_t mem = llama_get_memory(ctx)
    cdef list spans = engine.slot_pos_spans[s]
    try:
        with nogil:
            got = llama_state_seq_set_data_ext(ctx, src, size, s, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)
    except RuntimeError:
        return False
    if (got == 0 or not llama_memory_seq_rm(mem, s, _pos_of(spans, n), -1)
            or llama_memory_seq_pos_max(mem, s) != _last_pos_of(spans, n)):
        return False
    del engine.slot_tokens[s][n:]
    _engine_cut_slot(engine, s, n)
    engine.slot_ckpts[s] = [c for c in engine.slot_ckpts[s] if c[0] <= n]
    engine.n_checkpoints_restored += 1
    return True


cdef int _engine_rewind(Engine engine, int s, GenerationRequest r) except -1:
    """r's sequence holds a state the engine cannot account for (a decode aborted halfway,
    a removal that failed): empty it, and have r re-evaluate what it held."""
    cdef list held = list(engine.slot_tokens[s])
    _engine_clear_seq(engine, s)
    r.refill = held + (r.refill or [])
    r.n_past = 0
    return 0


cdef int _engine_resync_after_abort(Engine engine) except -1:
    """After an aborted decode on a recurrent/hybrid memory: llama.cpp could not remove
    the batch's tokens (the ubatches computed before the abort stay, the aborted one may
    have half-updated its states), so every sequence that moved is emptied and its
    request re-evaluates what it held (as after preemption)."""
    cdef int s
    cdef llama_memory_t mem = llama_get_memory(engine.context.ptr)
    for s in range(engine.n_slots):
        if llama_memory_seq_pos_max(mem, s) == _last_pos_of(engine.slot_pos_spans[s], len(engine.slot_tokens[s])):
            continue
        x = engine.slots[s]
        if x is not None and not ((<GenerationRequest>x).leader is not None and not (<GenerationRequest>x).forked):
            _engine_rewind(engine, s, <GenerationRequest>x)
        else:
            _engine_clear_seq(engine, s)
    return 0


cdef int _engine_vacate(Engine engine, GenerationRequest r) except -1:
    """Preemption: r gives its slot up (the caller parks or queues it).  A generating request
    resumes by re-evaluating what its sequence held (kv_tokens); one still evaluating its prompt
    starts over, from whatever cache survives."""
    if r.has_next or r.refill:
        # refill tokens were never evaluated: they are what must be, not what is
        r.kv_tokens = list(engine.slot_tokens[r.slot]) + (r.refill or [])
        r.refill = None
        r.preempted = True
    else:
        r.preempted = False
    engine.slots[r.slot] = None
    engine.slot_used[r.slot] = engine.n_steps
    r.slot = -1
    engine.n_preemptions += 1
    return 0


cdef bint _engine_preempt_running(Engine engine) except -1:
    """The KV memory is full and no paused request can give cells up.  When several running
    requests share it (one memory for all sequences), the one submitted last leaves its slot
    and waits at the head of the queue, to resume by re-evaluating what it held once there is
    room for it (room_needed, see _engine_has_room): every answer completes in full instead
    of the longest ending early, and the earlier requests keep going meanwhile.  False when
    this cannot help (one request alone fills the memory; one KV stream per sequence), or when
    the last one is a group's leader still evaluating the prompt its followers wait for: the
    caller ends the longest answer early then (or fails a prompt that finds no room)."""
    cdef GenerationRequest r, victim = None
    cdef int s, holders = 0
    if engine.n_ctx_seq != engine.context.n_ctx:
        return False     # one KV stream per sequence: a full stream is its sequence's own limit
    for s in range(engine.n_slots):
        x = engine.slots[s]
        if x is None:
            continue
        r = x
        if r.leader is not None and not r.forked:
            continue     # waits for its leader's prompt: holds no cells yet
        holders += 1
        if victim is None or r.t_submit > victim.t_submit:
            victim = r
    if victim is None or holders < 2 or victim.cancel_requested or victim._followers and not all(
            (<GenerationRequest>f).forked or (<GenerationRequest>f).done for f in victim._followers):
        return False     # (a leader whose followers still need its prompt cannot leave: see above)
    s = victim.slot
    _engine_vacate(engine, victim)
    victim.room_needed = len(victim.kv_tokens if victim.preempted else victim.prompt_tokens) + 1
    victim.n_fed = 0                   # (its tokens were in the batch that did not fit)
    victim.batch_idx = -1
    victim.draft = None
    _engine_clear_seq(engine, s)
    engine.queue.appendleft(victim)
    return True


cdef bint _engine_has_room(Engine engine, GenerationRequest r) except -1:
    """May r, preempted to make room (_engine_preempt_running), take a slot again?  When what
    the running requests hold and will still feed before they generate (the rest of a prompt,
    a re-evaluation) leaves room for what r needs plus 16 more tokens of each of them (else r
    would be the one preempted again at once), or when nothing else runs.  Counting only
    what they hold would let r back in beside a prompt still being evaluated, to be preempted
    again at every step, and no step would ever decode."""
    cdef GenerationRequest q
    cdef Py_ssize_t need = 0
    cdef int s, running = 0
    for s in range(engine.n_slots):
        x = engine.slots[s]
        if x is None:
            continue
        q = x
        running += 1
        need += len(engine.slot_tokens[s])
        if q.refill:
            need += len(q.refill)
        elif q.leader is None or q.forked:
            need += max(0, len(q.prompt_tokens) - q.n_prompt_done)
    return running == 0 or engine.context.n_ctx - need >= r.room_needed + 16 * running


cdef bint _engine_shift(Engine engine, GenerationRequest r) except -1:
    """llama-server's context shift (--context-shift): r's sequence is about to outgrow its
    slot, so it keeps its first r.n_keep tokens (after BOS; -1: the whole prompt), drops the
    next r.n_discard (0: half of the rest) and slides the rest back to fill the gap: the answer
    goes on with a shorter memory of its start.  False (the answer ends, "length") when the
    engine has it off, or the sequence cannot shift: a recurrent/hybrid memory, images or
    audio in it (their positions are not one per token), a sequence the engine did not fill
    alone, or cells it shares with another sequence (n > 1, a shared prefix) in the part that
    would move: moving a shared cell moves it for both (llama-server refuses these too)."""
    cdef int s = r.slot, n_keep, n_discard, n_left
    cdef llama_memory_t mem = llama_get_memory(engine.context.ptr)
    cdef list held = engine.slot_tokens[s]
    if (not engine.context_shift or not engine.truncatable or r.media is not None
            or len(held) != r.n_past or not llama_memory_can_shift(mem)):
        return False
    n_keep = len(r.prompt_tokens) if r.n_keep < 0 else r.n_keep
    if llama_vocab_get_add_bos(engine.context.vocab) and held[0] == llama_vocab_bos(engine.context.vocab):
        n_keep += 1
    n_keep = min(n_keep, engine.n_ctx_seq - 4, r.n_past)
    n_left = r.n_past - n_keep
    n_discard = min(r.n_discard if r.n_discard > 0 else n_left // 2, n_left - 1)
    if n_discard <= 0 or engine.slot_shared[s] > n_keep + n_discard:
        return False
    if not llama_memory_seq_rm(mem, s, n_keep, n_keep + n_discard):
        return False
    llama_memory_seq_add(mem, s, n_keep + n_discard, r.n_past, -n_discard)
    del held[n_keep:n_keep + n_discard]
    if engine.slot_shared[s] > n_keep:
        engine.slot_shared[s] = n_keep      # (the shared cells after it left this sequence)
    r.n_past -= n_discard
    r.n_discarded += n_discard
    return True


# Slot files are llama-server's (server_tokens::serialize): the sequence state file's token
# list holds LLAMA_TOKEN_NULL, a format version, the tokens as a counted vector, then the
# media chunks' start indices as another (none: pyllama saves text slots only).  Older
# llama-server files hold a plain token list; both restore here and there.
_SLOT_FILE_MARK = [-1]
_SLOT_FILE_VERSION = 1


def _slot_file_tokens(list packed, int n_vocab) -> list:
    """The tokens of a slot file's token list (either format), checked against the vocabulary."""
    tokens = packed
    if packed and packed[0] == -1:
        if len(packed) < 3 or packed[1] != _SLOT_FILE_VERSION:
            raise ValueError("unsupported slot file: not a version-1 llama-server slot file")
        n = packed[2]
        if not 0 <= n <= len(packed) - 4 or packed[3 + n] != 0 or len(packed) != n + 4:
            raise ValueError("unsupported slot file: it holds images or audio, or its token list is damaged")
        tokens = packed[3:3 + n]
    for t in tokens:
        if not 0 <= t < n_vocab:
            raise ValueError(f"invalid token {t} in the slot file (this model's vocabulary is 0..{n_vocab - 1})")
    return tokens


cdef int _engine_idle_slot(Engine engine, int s) except -1:
    engine._check_init()
    if not 0 <= s < engine.n_slots:
        raise ValueError(f"slot must be in 0..{engine.n_slots - 1}, got {s}")
    if engine.slots[s] is not None:
        raise ValueError(f"slot {s} is busy: a request is running in it")
    return 0


cdef Py_ssize_t _engine_save_slot(Engine engine, int s, path) except -1:
    """Engine.save_slot: llama_state_seq_save_file with llama-server's packed token list."""
    cdef bytes p = _os.fsencode(path)
    cdef const char * pc = p
    cdef llama_token * arr = NULL
    cdef size_t n, i, got
    with engine.context.lock:       # no step runs meanwhile: the slot stays idle
        _engine_idle_slot(engine, s)
        tokens = list(engine._valid_cache(s))     # (the user may have removed its cells)
        if not tokens:
            raise ValueError(f"slot {s} holds no tokens: nothing to save")
        if any(t < 0 for t in tokens):
            raise ValueError(f"slot {s} holds an image or audio: only text slots can be saved")
        packed = _SLOT_FILE_MARK + [_SLOT_FILE_VERSION, len(tokens)] + tokens + [0]
        n = len(packed)
        arr = <llama_token *>malloc(n * sizeof(llama_token))
        if arr == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                arr[i] = <llama_token>packed[i]
            with nogil:
                got = llama_state_seq_save_file(engine.context.ptr, pc, s, arr, n)
        finally:
            free(arr)
        if got == 0:
            raise OSError(f"could not save slot {s} to {_os.fsdecode(p)!r}")
        return len(tokens)


cdef Py_ssize_t _engine_restore_slot(Engine engine, int s, path) except -1:
    """Engine.restore_slot: what the slot held is dropped first; if the file cannot be
    loaded (missing, another model's, too long for a slot) the slot is left empty, never
    with cells the engine does not know about."""
    with engine.context.lock:
        _engine_idle_slot(engine, s)
        _engine_clear_seq(engine, s)
        try:
            tokens = _slot_file_tokens(engine.context.seq_state_load_file(path, s), engine.context.n_vocab)
            if len(tokens) > engine.n_ctx_seq:
                raise ValueError(f"the slot file holds {len(tokens)} tokens, more than a slot's context "
                                 f"({engine.n_ctx_seq})")
        except BaseException:
            _engine_clear_seq(engine, s)
            raise
        engine.slot_tokens[s].extend(tokens)
        return len(tokens)


cdef int _engine_evict_idle_caches(Engine engine) except -1:
    """Free the KV cells of idle slots (their prompt caches, copied into the host-memory
    prompt cache first when there is one); returns how many slots."""
    cdef int s, n = 0
    for s in range(engine.n_slots):
        if engine.slots[s] is None and (engine.slot_tokens[s] or engine.slot_ckpts[s]):
            _engine_cache_save(engine, s)
            _engine_clear_seq(engine, s)
            n += 1
    return n


# ---- the prompt cache in host memory (PromptCache, _prompt_cache.pxi) ----------------------

cdef bint _engine_cache_save(Engine engine, int s) except -1:
    """Copy slot s's sequence into the engine's prompt cache; False when there is none, the
    slot holds nothing or a medium, its prompt is in the cache already, or it is too large."""
    cdef PromptCache pc = engine.prompt_cache
    cdef list tokens = engine.slot_tokens[s]
    cdef llama_context * ctx = engine.context.ptr
    cdef Py_ssize_t n = len(tokens)
    cdef size_t size
    if pc is None or n == 0 or engine.slot_pos_spans[s]:
        return False
    for t in tokens:
        if t < 0:
            return False     # (media keys)
    for e in pc.entries:
        if engine._common_prefix(e[0], tokens, n) == n:
            return False     # a prompt the cache holds already
    size = llama_state_seq_get_size_ext(ctx, s, 0)
    ckpts = list(engine.slot_ckpts[s])
    total = size + sum(PyBytes_GET_SIZE(c[1]) for c in ckpts)
    if size == 0 or (pc.limit_bytes > 0 and total > pc.limit_bytes):
        return False
    # Entries this prompt contains are obsolete; then the oldest go until the new one fits.
    pc.entries = [e for e in pc.entries if engine._common_prefix(e[0], tokens, len(e[0])) < len(e[0])]
    pc._make_room(total)
    data = _seq_state_bytes(ctx, s, 0, size)
    if data is None:
        return False
    pc.entries.append((list(tokens), data, ckpts))
    pc.n_saved += 1
    pc._update()
    return True


cdef Py_ssize_t _entry_usable(Engine engine, tuple e, list want, Py_ssize_t limit):
    """How many of `want`'s first tokens a slot holds after loading entry e: their common
    prefix, or on a memory that cannot drop a suffix, the whole entry or a checkpoint of it."""
    cdef list tokens = e[0]
    cdef Py_ssize_t k = engine._common_prefix(tokens, want, limit), best = 0
    if engine.truncatable or k >= len(tokens):
        return k
    for c in e[2]:
        if best < <Py_ssize_t>c[0] <= k:
            best = c[0]
    return best


cdef int _engine_cache_load(Engine engine, int s, GenerationRequest r) except -1:
    """Before slot s takes the fresh request r (Engine._assign): save what the slot is about
    to lose, and load the entry r's prompt starts from best (server_prompt_cache::load)."""
    cdef PromptCache pc = engine.prompt_cache
    cdef list cached = engine.slot_tokens[s], want = r.prompt_tokens
    cdef Py_ssize_t k, lcp, n_cached = len(cached), limit = len(want) - 1
    cdef double f_keep_best, f_sim_best, f_keep, f_sim
    cdef tuple best = None
    cdef bytes data
    cdef size_t got, size
    cdef const uint8_t * src
    if pc is None:
        return 0
    if not (r.cache_prompt and engine.cache_prompt) or limit <= 0:
        if n_cached:
            _engine_cache_save(engine, s)   # (the slot's prompt is overwritten: keep a copy)
        return 0
    k = _engine_keepable(engine, s, engine._prefix_for(s, r))
    f_keep_best = k / <double>n_cached if n_cached else -1.0    # an empty slot: any entry wins
    f_sim_best = k / <double>len(want)
    for x in pc.entries:
        lcp = _entry_usable(engine, x, want, limit)
        f_keep = lcp / <double>len(x[0])
        f_sim = lcp / <double>len(want)
        if f_keep >= 0.25 and f_keep_best < f_keep and f_sim_best < f_sim:   # (don't trash large prompts)
            best, f_keep_best, f_sim_best = x, f_keep, f_sim
    if n_cached and (best is not None or 2 * k < n_cached):
        _cache_log.info("slot %d: updating prompt cache: saving its %d tokens (the new prompt keeps %d)",
                        s, n_cached, k)
        _engine_cache_save(engine, s)
    if best is None:
        return 0
    pc.entries = [x for x in pc.entries if x is not best]
    data = best[1]
    size = PyBytes_GET_SIZE(data)
    src = <const uint8_t *>PyBytes_AS_STRING(data)
    try:
        with nogil:
            got = llama_state_seq_set_data_ext(engine.context.ptr, src, size, s, 0)
    except RuntimeError:
        got = 0
    # The sequence was emptied by the load, whatever its outcome: the slot holds the entry, or nothing.
    del cached[:]
    cached.extend(best[0])
    engine.slot_pos_spans[s] = []
    engine.slot_shared[s] = 0
    engine.slot_ckpts[s] = list(best[2])
    if got != size or llama_memory_seq_pos_max(llama_get_memory(engine.context.ptr), s) != len(cached) - 1:
        _cache_log.warning("slot %d: could not load a %d-token prompt from the prompt cache; evaluating "
                           "the prompt instead", s, len(cached))
        _engine_clear_seq(engine, s)
        return 0
    pc.n_restored += 1
    _cache_log.info("slot %d: updating prompt cache: loaded a %d-token prompt (%.3f MiB) from it",
                    s, len(cached), size / 1048576.0)
    return 0


cdef int _engine_cache_idle_slots(Engine engine) except -1:
    """With PromptCache.idle_slots, after requests started: copy every idle slot into the
    cache, and on a unified KV cache empty it (its cells go to the running requests)."""
    cdef PromptCache pc = engine.prompt_cache
    cdef int s
    if pc is None or not pc.idle_slots:
        return 0
    for s in range(engine.n_slots):
        if engine.slots[s] is None and engine.slot_tokens[s]:
            if _engine_cache_save(engine, s):
                # llama-server's own line for this event (its test suite and log readers look for it)
                _cache_log.info("slot %d: saved idle slot to prompt cache (%d tokens) __TEST_TAG_CACHE_IDLE_SLOT__",
                                s, len(engine.slot_tokens[s]))
            if engine.context.kv_unified:
                _engine_clear_seq(engine, s)
    return 0
