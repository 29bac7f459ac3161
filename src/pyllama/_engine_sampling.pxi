# Choosing a request's next token after a decode: the sampler chain on the context's logits
# row (greedy and grammar fast paths), Python logits processors on a NumPy view of the row,
# log-probabilities, prompt scoring, and the token's text piece.


cdef int _score_prompt(Engine engine, GenerationRequest r, int take) except -1:
    """Log-probabilities of the prompt tokens predicted by this step's prompt outputs."""
    cdef int j
    cdef Py_ssize_t p
    cdef float * logits
    cdef int k = max(r.n_logprobs, 0)
    for j in range(take):
        p = r.n_prompt_done + j            # the output at p predicts token p + 1
        if p + 1 >= len(r.prompt_tokens):
            break
        logits = llama_get_logits_ith(engine.context.ptr, r.prompt_idx0 + j)
        if logits == NULL:
            raise DecodeError("no logits for a prompt token that should have them")
        r._prompt_logprobs.append(_logprob_entry(logits, engine.context.n_vocab,
                                                 r.prompt_tokens[p + 1], k))
    return 0


cdef int _sample_one(Engine engine, GenerationRequest r, list events, object callback) except -1:
    cdef llama_token tok
    cdef double t0 = pyllama_now_ms(), t1
    cdef int32_t n
    cdef size_t ok
    cdef const llama_vocab * vocab = engine.context.vocab
    cdef str text = ""
    cdef bytes data
    cdef float * row
    if r.has_hooks:
        tok = _sample_hooked(engine, r)
    elif r.post_sampling_probs:
        tok = _sample_with_grammar(engine, r)    # through the candidate array, kept for the report
    elif r.grammar is None and r.sampler._plain_greedy:
        tok = _sample_greedy(engine, r)
    elif r.grammar is None:
        with nogil:
            tok = llama_sampler_sample(r.sampler.ptr, engine.context.ptr, r.batch_idx)
    else:
        tok = _sample_with_grammar(engine, r)
    if r.forced_token >= 0:
        tok = r.forced_token             # a synthetically accepted draft (see _spec_verify)
        r.forced_token = -1
    if r.post_sampling_probs:
        r._logprobs.append(_post_sampling_entry(engine, r, tok))
        r.lp_spans.append([r.chars_pushed, -1])
    elif r.n_logprobs >= 0:
        # The model's own distribution at this position (before the sampler chain).
        row = llama_get_logits_ith(engine.context.ptr, r.batch_idx)
        if row == NULL:
            raise DecodeError("no logits for a sequence that should have them")
        r._logprobs.append(_logprob_entry(row, engine.context.n_vocab, tok, r.n_logprobs))
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
        n = llama_token_to_piece(vocab, tok, engine.piece_buf, sizeof(engine.piece_buf), 0, r.render_special)
        if n > 0:
            data = r.pending_bytes + engine.piece_buf[:n] if r.pending_bytes else engine.piece_buf[:n]
            ok = pyllama_utf8_complete_len(data, len(data))
            r.pending_bytes = data[ok:]
            if ok:
                text = r._push_text(PyUnicode_DecodeUTF8(data, ok, "replace"))
        elif n < 0:
            data = _long_piece(engine, tok, r.render_special)
            data = r.pending_bytes + data
            ok = pyllama_utf8_complete_len(data, len(data))
            r.pending_bytes = data[ok:]
            if ok:
                text = r._push_text(PyUnicode_DecodeUTF8(data, ok, "replace"))
        if r.finish_reason is None:
            if r.max_tokens >= 0 and <int>len(r.out_tokens) >= r.max_tokens:
                r.finish_reason = "length"
            elif r.n_past + 1 >= engine.n_ctx_seq and not _engine_shift(engine, r):
                r.finish_reason = "length"   # the context window is full (and cannot shift)
            else:
                r.next_token = tok
                r.has_next = True

    if r.finish_reason is not None:
        text += r._flush()
        engine._release(r, r.finish_reason)
    if r.n_logprobs >= 0:
        r._settle_logprobs()
    if text or r.finish_reason is not None or r.n_logprobs >= 0:
        engine._emit(r, text, events, callback)
    return 0


cdef llama_token _sample_hooked(Engine engine, GenerationRequest r) except -1:
    """Sampling for a request with Python hooks: its logits processors edit its logits row,
    the usual sampling picks from that row, then, for a token the request keeps, its
    stopping criteria run (setting r.stopped_by_criterion).  A hook's exception, or its
    misuse, comes out as _HookFailure: the step ends this request only."""
    cdef int32_t n_vocab = engine.context.n_vocab
    cdef float * row = llama_get_logits_ith(engine.context.ptr, r.batch_idx)
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
        tok = _sample_from(engine, r, logits)
    except DecodeError as e:
        if not r.logits_processors:
            raise
        raise _HookFailure(ValueError(f"no token could be sampled from the scores the logits processors "
                                      f"left ({e}): are they all -inf or NaN?"))
    if (llama_vocab_is_eog(engine.context.vocab, tok) and not r.ignore_eos) or tok in r.stop_tokens:
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


cdef llama_token _sample_greedy(Engine engine, GenerationRequest r) except -1:
    """Greedy (with optional logit bias) straight from the logits: the same token as
    llama.cpp's greedy sampler (first maximum), without building its n_vocab-entry
    candidate array first (3 MB per token for a 262k vocabulary such as Gemma 3's)."""
    cdef float * logits = llama_get_logits_ith(engine.context.ptr, r.batch_idx)
    cdef llama_token tok
    if logits == NULL:
        raise DecodeError("no logits for a sequence that should have them")
    # With the GIL held: the vectorised scan takes microseconds, and letting the GIL go here
    # would let a waiting thread (an event loop) take it for its whole turn mid-step.
    tok = r.sampler._greedy_argmax(logits, engine.context.n_vocab)
    llama_sampler_accept(r.sampler.ptr, tok)
    return tok


cdef llama_token _sample_with_grammar(Engine engine, GenerationRequest r) except -1:
    cdef float * logits = llama_get_logits_ith(engine.context.ptr, r.batch_idx)
    if logits == NULL:
        raise DecodeError("no logits for a sequence that should have them")
    return _sample_from(engine, r, logits)


cdef llama_token _sample_from(Engine engine, GenerationRequest r, float * logits) except -1:
    """Sample r's next token from a logits row (the context's, or the one a request's
    logits processors edited) as llama.cpp's common sampler does: run the chain without
    the grammar, keep the token if the grammar allows it (the usual case, and cheap),
    otherwise apply the grammar to all candidates and sample again.  Without a grammar
    this is what llama_sampler_sample does, on our row."""
    cdef int32_t n_vocab = engine.context.n_vocab, i
    cdef llama_token_data_array cur
    cdef llama_token tok
    if r.candidates == NULL:
        r.candidates = <llama_token_data *>malloc(n_vocab * sizeof(llama_token_data))
        if r.candidates == NULL:
            raise MemoryError()
    if r.sampler._plain_greedy and not r.post_sampling_probs:
        # The usual case (greedy JSON, tool calls): the argmax of the logits, no candidate
        # array unless the grammar rejects it (GIL held: see _sample_greedy).
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
        r.cand_data, r.n_cand = cur.data, cur.size
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
        r.cand_data, r.n_cand = cur.data, cur.size
        if not r.grammar._grammar_allows(tok):
            # Nothing the grammar allows survived the chain (e.g. all its tokens were
            # biased away).  Accepting it would abort the process, so stop cleanly.
            raise GrammarError("no token allowed by the grammar is left to sample "
                               "(check logit_bias / the grammar)")
    llama_sampler_accept(r.grammar.ptr, tok)
    llama_sampler_accept(r.sampler.ptr, tok)
    return tok


cdef tuple _post_sampling_entry(Engine engine, GenerationRequest r, llama_token tok):
    """(token, logprob, top alternatives) under the distribution the sampler chain left
    (llama-server's post_sampling_probs): the softmax of the candidates that survived the
    chain, at its temperature (what its final dist stage draws from); alternatives of
    probability 0 are left out, as llama-server leaves them out."""
    cdef size_t n = r.n_cand, i
    cdef float m
    cdef double ls, lp = 0.0
    cdef int32_t top_ids[_MAX_TOP_LOGPROBS]
    cdef float top_vals[_MAX_TOP_LOGPROBS]
    cdef int cnt, j
    if n == 0 or r.cand_data == NULL:
        raise DecodeError("no sampler candidates to report probabilities from")
    if r.cand_logits == NULL:
        r.cand_logits = <float *>malloc(engine.context.n_vocab * sizeof(float))
        if r.cand_logits == NULL:
            raise MemoryError()
    with nogil:
        for i in range(n):
            r.cand_logits[i] = r.cand_data[i].logit
        cnt = _logprob_stats(r.cand_logits, <int32_t>n, r.n_logprobs, &m, &ls, top_ids, top_vals)
        for i in range(n):
            if r.cand_data[i].id == tok:
                lp = r.cand_data[i].logit - m - ls
                break
    top = tuple([(r.cand_data[top_ids[j]].id, <double>top_vals[j] - m - ls) for j in range(cnt)
                 if exp(<double>top_vals[j] - m - ls) > 0.0])
    return (tok, lp, top)


cdef bytes _long_piece(Engine engine, llama_token tok, bint special):
    cdef int32_t n = llama_token_to_piece(engine.context.vocab, tok, NULL, 0, 0, special)
    cdef char * buf = <char *>malloc(-n + 1)
    if buf == NULL:
        raise MemoryError()
    try:
        n = llama_token_to_piece(engine.context.vocab, tok, buf, -n + 1, 0, special)
        return buf[:max(n, 0)]
    finally:
        free(buf)
