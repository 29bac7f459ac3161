# Speculative decoding inside the Engine's step: each speculating request's draft is added
# after its next token in the same batch (_spec_add_drafts), sized by what a drafted token
# costs on this machine and the request's acceptance so far (_spec_draft_len, from the
# decode-cost fit of _spec_fit_cost / _spec_cost_model); after the decode the request's own
# sampler accepts the longest agreeing run and the rest leaves its KV sequence (_spec_verify).
# Draft sources: the request's n-gram lookup, a drafter callable, or a draft model that
# drafts for every slot at once (pyllama.speculative.DraftModel, via _spec_call_draft_batch).


DEF _COST_FIT_DECAY = 0.98    # weight of the previous decodes in that fit, per decode
DEF _SPEC_PROBE_EVERY = 32    # a request the cost model stopped drafting for tries one token this often


cdef bint _spec_cost_model(Engine engine, double * a_out, double * b_out):
    """The fit of t = a + b * n over the recent decodes (False before 8 of them, and while
    no decodes of differing sizes were ever seen: the acceptance rule then drafts, which
    makes the sizes differ)."""
    cdef double w = engine.cost_w, mean_n, mean_t, var_n, a, b
    if w < 8.0:
        return False
    mean_n = engine.cost_n / w
    mean_t = engine.cost_t / w
    var_n = engine.cost_nn / w - mean_n * mean_n
    if var_n < 0.25:
        # Every recent decode had the same size: no slope to fit.  What a token costs on
        # this machine has not changed, so keep the last slope fitted; with none yet, let
        # the acceptance rule draft (a warm engine that only plain-decoded would otherwise
        # never learn what a draft costs).
        if engine.cost_b_last <= 0.0:
            return False
        b = engine.cost_b_last
    else:
        b = (engine.cost_nt / w - mean_n * mean_t) / var_n
    # A noisy fit (tiny models, a busy machine) can say that tokens cost nothing, or less
    # than nothing: take a token as at least 1% of a decode, a decode as at least one token.
    if b < 0.01 * mean_t:
        b = 0.01 * mean_t
    engine.cost_b_last = b
    a = mean_t - b * mean_n
    if a < b:
        a = b
    a_out[0] = a
    b_out[0] = b
    return True


cdef void _spec_fit_cost(Engine engine, int n, double dt):
    cdef double d = _COST_FIT_DECAY
    engine.cost_w = engine.cost_w * d + 1.0
    engine.cost_n = engine.cost_n * d + n
    engine.cost_t = engine.cost_t * d + dt
    engine.cost_nn = engine.cost_nn * d + <double>n * n
    engine.cost_nt = engine.cost_nt * d + n * dt


cdef int _spec_draft_len(Engine engine, GenerationRequest r, int limit, int n_gen):
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
    if not engine.spec_cost_model or not _spec_cost_model(engine, &a, &b):
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
    if best_d < max(1, r.draft_min):
        # Not worth it on what r has shown so far (a draft shorter than draft_min is never
        # verified: a best length below it counts as none); but the text may change (an answer
        # that starts copying its input): probe now and then, and at once while r has shown
        # nothing (its acceptance is only the prior).  A probe is the shortest draft the
        # request verifies (draft_min), else it would never be drafted.
        r.spec_skips += 1
        if r.spec_skips >= _SPEC_PROBE_EVERY or r.n_drafted == 0:
            r.spec_skips = 0
            return min(limit, max(1, r.draft_min))
        return 0
    return best_d


cdef int _spec_add_drafts(Engine engine, Batch batch, int n_gen) except -1:
    """Add each speculating request's draft after its next token (positions n_past + 1 ...),
    every position with logits so that one decode scores them all."""
    cdef GenerationRequest r
    cdef int s, i, limit, room = engine.n_batch - batch.batch.n_tokens
    cdef list draft
    cdef list drafted = []          # (request, slot, draft) in slot order
    cdef dict batched = {}          # id(draft source) -> (source, [(request, slot, limit)])
    for s in range(engine.n_slots):
        x = engine.slots[s]
        if x is None:
            continue
        r = x
        if r.batch_idx < 0 or r.draft_max <= 0:
            continue
        # Never past the sequence's context, nor past max_tokens (the token after the last
        # accepted draft is sampled too: drafts beyond max_tokens - 1 could never count).
        limit = min(r.draft_max, room, engine.n_ctx_seq - r.n_past - 2)
        if r.max_tokens >= 0:
            limit = min(limit, r.max_tokens - <int>len(r.out_tokens) - 1)
        if r.synth_probs is not None:
            limit = min(limit, <int>len(r.synth_probs))    # benchmarks: always the full draft
        else:
            limit = _spec_draft_len(engine, r, limit, n_gen)
        if limit < max(r.draft_min, 1):
            continue
        if r.drafter is not None and hasattr(r.drafter, "draft_batch"):
            # A draft model drafts for every slot at once, one decode per drafted position
            # (pyllama.speculative.DraftModel): collect its requests, run it once below.
            batched.setdefault(id(r.drafter), (r.drafter, []))[1].append((r, s, limit))
            room -= limit
            continue
        if r.drafter is not None:
            draft = _spec_call_drafter(engine, r, limit)
        else:
            draft = r._draft_ngram(limit)
        if draft is None or <int>len(draft) < max(r.draft_min, 1):
            continue
        room -= len(draft)
        drafted.append((r, s, draft))
    for source, items in batched.values():
        drafted.extend(_spec_call_draft_batch(engine, source, items))
    for r, s, draft in drafted:
        r.draft_idx0 = batch.batch.n_tokens
        for i in range(len(draft)):
            batch._add(draft[i], r.n_past + 1 + i, s, True)
        r.draft = draft
    return 0


cdef list _spec_call_draft_batch(Engine engine, source, list items):
    """One batched draft source for several requests: [(request, slot, draft)] of the drafts
    long enough to verify.  Each draft is checked like _call_drafter's; if the source
    raises, its requests end with the error at the next step (the others go on)."""
    cdef GenerationRequest r
    cdef int limit
    cdef int32_t n_vocab = engine.context.n_vocab
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


cdef list _spec_call_drafter(Engine engine, GenerationRequest r, int limit):
    """A request's own draft source (a Python callable: a draft model run by the caller,
    a lookup table...).  Its tokens are checked before they reach llama_decode; if it
    raises or returns nonsense, that request ends with the error at the next step."""
    cdef int32_t n_vocab = engine.context.n_vocab
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


cdef int _spec_verify(Engine engine, GenerationRequest r, int s, list events, object callback) except -1:
    """Sample the request at its next token's output, then at each drafted position while
    the chain picked exactly the drafted token: the first sample that differs (or the one
    after the last draft) becomes the next token, as plain decoding would have sampled it
    from the same logits.  Rejected drafts leave the KV memory."""
    cdef list draft = r.draft
    cdef int k = len(draft), j = 0
    r.draft = None
    r.n_drafted += k
    r.n_draft_steps += 1
    engine.n_drafted_total += k
    try:
        if r.synth_probs is not None:
            j = _spec_verify_synth(engine, r, s, draft, events, callback)
            return 0
        _sample_one(engine, r, events, callback)
        while j < k and r.has_next and r.next_token == <llama_token>draft[j]:
            # The draft was right: its position is evaluated already (it is at n_past).
            engine.slot_tokens[s].append(draft[j])
            r.n_past += 1
            r.has_next = False
            r.batch_idx = r.draft_idx0 + j
            j += 1
            _sample_one(engine, r, events, callback)
    finally:
        r.batch_idx = -1
        r.n_draft_accepted += j
        if j < k:
            r.spec_runs_ended += 1
        engine.n_draft_accepted_total += j
        # Keep what the slot holds (the accepted drafts); the rest was never accepted.  (The
        # engine drafts only on a memory that can drop them; should the removal still fail,
        # the sequence is re-evaluated rather than continued with the rejected tokens in it.)
        if not llama_memory_seq_rm(llama_get_memory(engine.context.ptr), s, len(engine.slot_tokens[s]), -1):
            if engine.slots[s] is r:
                _engine_rewind(engine, s, r)
            else:
                _engine_clear_seq(engine, s)
        # Draft length adapts: doubles while whole drafts are accepted, shrinks to just past
        # the accepted run after a rejection (a 1-token draft costs next to nothing).
        if j == k:
            r.spec_cap = min(r.draft_max, max(1, r.spec_cap) * 2)
        else:
            r.spec_cap = max(1, min(r.spec_cap, j + 1))
    return 0


cdef int _spec_verify_synth(Engine engine, GenerationRequest r, int s, list draft, list events,
                            object callback) except -1:
    """llama-server's synthetic acceptance (--spec-synth-rates, for benchmarks): drafted
    token j is kept with probability synth_probs[j] (given that the ones before it were),
    whatever the model sampled there, except an end-of-generation token; the first one not
    kept is replaced by the model's sample.  Every position is still sampled, so the sampler
    chain (grammar included) advances on the tokens it chose.  Returns how many were kept."""
    cdef int j = 0, k = len(draft)
    cdef const llama_vocab * vocab = engine.context.vocab
    while True:
        keep = (j < k and r.synth_rng.random() < r.synth_probs[j]
                and not llama_vocab_is_eog(vocab, <llama_token>draft[j]))
        if keep:
            r.forced_token = <llama_token>draft[j]
        _sample_one(engine, r, events, callback)
        if not keep or not r.has_next:
            return j
        # The kept draft's position is evaluated already (it is at n_past).
        engine.slot_tokens[s].append(draft[j])
        r.n_past += 1
        r.has_next = False
        r.batch_idx = r.draft_idx0 + j
        j += 1


cdef bint _spec_drop_drafts(Engine engine):
    cdef bint any_draft = False
    for x in engine.slots:
        if x is not None and (<GenerationRequest>x).draft is not None:
            (<GenerationRequest>x).draft = None
            any_draft = True
    return any_draft
