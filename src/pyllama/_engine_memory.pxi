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
    engine.slot_ckpts[s] = []


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
        if llama_memory_seq_rm(mem, s, n, -1):
            del cached[n:]
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
    cdef size_t size, got
    cdef bytes data
    cdef uint8_t * dst
    cdef Py_ssize_t n = len(engine.slot_tokens[s])
    cdef list ckpts
    if engine.n_checkpoints <= 0 or n <= 0:
        return 0
    size = llama_state_seq_get_size_ext(ctx, s, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)
    if size == 0:
        return 0
    data = PyBytes_FromStringAndSize(NULL, size)
    dst = <uint8_t *>PyBytes_AS_STRING(data)
    with nogil:
        got = llama_state_seq_get_data_ext(ctx, dst, size, s, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)
    if got == 0:
        return 0
    ckpts = [c for c in engine.slot_ckpts[s] if c[0] != n]
    ckpts.append((n, data[:got] if got < size else data))
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
    try:
        with nogil:
            got = llama_state_seq_set_data_ext(ctx, src, size, s, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)
    except RuntimeError:
        return False
    if got == 0 or not llama_memory_seq_rm(mem, s, n, -1) or llama_memory_seq_pos_max(mem, s) != n - 1:
        return False
    del engine.slot_tokens[s][n:]
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
