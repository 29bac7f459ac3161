"""Speculative decoding in the engine (issue 25): drafted tokens verified by the same decode.

The tiny random model has no near ties in its logits, so verification (which scores several
positions in one batch) must reproduce plain decoding exactly.  An *oracle* drafter, which
knows the plain answer and is wrong on purpose now and then, drives every path: accepted
runs, a rejection at any position (its KV cells must go, or every later token changes), a
draft cut by max_tokens, a stop string or a grammar.
"""

from __future__ import annotations

import math
import threading

import pytest

import pyllama
from pyllama import LLM
from pyllama._core import Context, Engine, GenerationRequest, Model, SamplerChain
from pyllama.errors import InvalidTokenError


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    with Model(tiny_model_path) as m:
        yield m


@pytest.fixture(scope="module")
def ctx(tiny):
    with Context(tiny, n_ctx=1024, n_seq_max=4, n_threads=1) as c:
        yield c


def _run(ctx, *reqs) -> None:
    ctx.kv_clear()
    _engine(ctx, cache_prompt=False).run(list(reqs))


def _engine(ctx, cache_prompt: bool) -> Engine:
    """An engine whose draft lengths follow acceptance alone (spec_cost_model=False): what a
    test drafts must not depend on how fast this machine decodes.  The cost model has its own
    tests below."""
    return Engine(ctx, cache_prompt=cache_prompt, spec_cost_model=False)


def _greedy(v):
    return SamplerChain(v).add_greedy()


def _sampled(v, seed):
    return SamplerChain(v).add_top_k(40).add_temp(1.0).add_dist(seed)


def _in_threads(fn, n: int) -> list:
    """Run fn(0) .. fn(n - 1) in n threads at once; returns the exceptions they raised."""
    errors: list = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:   # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


class Oracle:
    """Drafts the known answer, spoiling one drafted token every `spoil_every` calls (at
    a varying position), so both acceptance and rejection happen."""

    def __init__(self, answer: list, n_prompt: int, n_vocab: int, spoil_every: int = 3) -> None:
        self.answer, self.n_prompt, self.n_vocab, self.spoil_every = answer, n_prompt, n_vocab, spoil_every
        self.calls = 0
        self.limits: list = []

    def __call__(self, ids: list, limit: int) -> list:
        self.calls += 1
        self.limits.append(limit)
        done = len(ids) - self.n_prompt            # generated so far (the last one is being fed)
        draft = list(self.answer[done:done + limit])
        if draft and self.spoil_every and self.calls % self.spoil_every == 0:
            k = self.calls % len(draft)
            draft[k] = (draft[k] + 7) % self.n_vocab
        return draft


def test_oracle_drafts_reproduce_greedy_decoding(tiny, ctx):
    v = tiny.vocab
    prompt = v.tokenize("Once upon a time")
    plain = GenerationRequest(prompt, _greedy(v), max_tokens=60)
    _run(ctx, plain)
    oracle = Oracle(plain.tokens, len(prompt), v.n_tokens)
    spec = GenerationRequest(prompt, _greedy(v), max_tokens=60, draft_max=8, drafter=oracle)
    _run(ctx, spec)
    assert spec.tokens == plain.tokens and spec.text == plain.text
    assert spec.finish_reason == plain.finish_reason == "length"
    assert 0 < spec.n_draft_accepted < spec.n_drafted            # both paths were taken
    assert max(oracle.limits) <= 8
    # Fewer decodes than tokens: accepted drafts were tokens for free.
    assert spec.n_draft_accepted >= 20


def test_oracle_drafts_reproduce_sampling_with_the_same_seed(tiny, ctx):
    """llama.cpp's rule (sample every position with the full chain, stop at the first
    mismatch) consumes the random stream exactly as plain decoding does: same seed, same
    tokens, so the output distribution is the chain's own."""
    v = tiny.vocab
    prompt = v.tokenize("The weather today")
    for seed in (1, 2, 3, 4):
        plain = GenerationRequest(prompt, _sampled(v, seed), max_tokens=40)
        _run(ctx, plain)
        spec = GenerationRequest(prompt, _sampled(v, seed), max_tokens=40, draft_max=6,
                                 drafter=Oracle(plain.tokens, len(prompt), v.n_tokens))
        _run(ctx, spec)
        assert spec.tokens == plain.tokens, seed
        assert spec.n_draft_accepted > 0


def test_first_tokens_distribution_agrees_over_seeds(tiny, ctx):
    """Over many seeds, the first tokens with and without speculation: the same samples
    (hence a chi-squared statistic of 0 between the two histograms)."""
    v = tiny.vocab
    prompt = v.tokenize("a b a b a b a")
    hist_plain: dict = {}
    hist_spec: dict = {}
    drafted = 0
    for seed in range(40):
        plain = GenerationRequest(prompt, _sampled(v, seed), max_tokens=3)
        _run(ctx, plain)
        # Drafts that are right for some seeds and wrong for others: another seed's answer.
        other = GenerationRequest(prompt, _sampled(v, seed + 1000), max_tokens=3)
        _run(ctx, other)
        spec = GenerationRequest(prompt, _sampled(v, seed), max_tokens=3, draft_max=4,
                                 drafter=Oracle(other.tokens, len(prompt), v.n_tokens, spoil_every=0))
        _run(ctx, spec)
        drafted += spec.n_drafted
        hist_plain[tuple(plain.tokens)] = hist_plain.get(tuple(plain.tokens), 0) + 1
        hist_spec[tuple(spec.tokens)] = hist_spec.get(tuple(spec.tokens), 0) + 1
    keys = set(hist_plain) | set(hist_spec)
    chi2 = sum((hist_plain.get(k, 0) - hist_spec.get(k, 0)) ** 2 / (hist_plain.get(k, 0) + hist_spec.get(k, 0))
               for k in keys)
    assert len(hist_plain) > 1           # the sampler really sampled
    assert drafted > 0
    assert chi2 == 0.0


def test_ngram_self_speculation_on_a_repeating_prompt(tiny, ctx):
    v = tiny.vocab
    head = v.tokenize("Once upon a time")
    first = GenerationRequest(head, _greedy(v), max_tokens=50)
    _run(ctx, first)
    # The prompt repeats its own beginning: the n-gram lookup finds it and drafts what followed.
    prompt = head + first.tokens + head[1:]
    plain = GenerationRequest(prompt, _greedy(v), max_tokens=50)
    _run(ctx, plain)
    spec = GenerationRequest(prompt, _greedy(v), max_tokens=50, draft_max=16)
    _run(ctx, spec)
    assert spec.tokens == plain.tokens
    assert spec.n_drafted > 0


def test_stop_string_inside_a_drafted_run_cuts_exactly(tiny, ctx):
    v = tiny.vocab
    prompt = v.tokenize("Once")
    free = GenerationRequest(prompt, _greedy(v), max_tokens=40)
    _run(ctx, free)
    text = free.text
    stop = text[20:23]
    assert stop and stop not in text[:20]
    plain = GenerationRequest(prompt, _greedy(v), max_tokens=40, stop=[stop])
    _run(ctx, plain)
    spec = GenerationRequest(prompt, _greedy(v), max_tokens=40, stop=[stop], draft_max=16,
                             drafter=Oracle(free.tokens, len(prompt), v.n_tokens, spoil_every=0))
    _run(ctx, spec)
    assert spec.finish_reason == plain.finish_reason == "stop"
    assert spec.text == plain.text == text[:text.find(stop)]
    assert spec.n_draft_accepted > 0             # the stop fell inside accepted drafts


def test_grammar_refuses_drafted_tokens(tiny, ctx):
    """A drafted token the grammar forbids is never emitted."""
    v = tiny.vocab
    grammar = 'root ::= ("yes" | "no" | "maybe") (", " ("yes" | "no" | "maybe"))* "."'
    prompt = v.tokenize("Answer:")
    plain = GenerationRequest(prompt, _greedy(v), grammar=SamplerChain(v).add_grammar(grammar), max_tokens=30)
    _run(ctx, plain)
    junk = v.tokenize(" banana split", add_special=False)

    def drafter(ids, limit):
        return (junk * limit)[:limit]

    spec = GenerationRequest(prompt, _greedy(v), grammar=SamplerChain(v).add_grammar(grammar), max_tokens=30,
                             draft_max=4, drafter=drafter)
    _run(ctx, spec)
    assert spec.text == plain.text
    assert "banana" not in spec.text
    assert spec.n_drafted > 0 and spec.n_draft_accepted == 0


def test_mixed_batch_of_speculative_and_plain_requests(tiny, ctx):
    v = tiny.vocab
    prompts = [v.tokenize(p) for p in ("Once upon a time", "The weather today", "In the beginning")]
    solo = []
    for p in prompts:
        r = GenerationRequest(p, _greedy(v), max_tokens=40)
        _run(ctx, r)
        solo.append(r.tokens)
    together = [
        GenerationRequest(prompts[0], _greedy(v), max_tokens=40, draft_max=8,
                          drafter=Oracle(solo[0], len(prompts[0]), v.n_tokens)),
        GenerationRequest(prompts[1], _greedy(v), max_tokens=40),
        GenerationRequest(prompts[2], _greedy(v), max_tokens=40, draft_max=8,
                          drafter=Oracle(solo[2], len(prompts[2]), v.n_tokens, spoil_every=2)),
    ]
    _run(ctx, *together)
    assert [r.tokens for r in together] == solo
    assert together[0].n_draft_accepted > 0 and together[2].n_draft_accepted > 0
    assert together[1].n_drafted == 0


def test_no_drafting_once_the_batch_is_full(tiny, ctx):
    v = tiny.vocab
    prompt = v.tokenize("Once upon a time")
    ref = GenerationRequest(prompt, _greedy(v), max_tokens=20)
    _run(ctx, ref)
    ctx.kv_clear()
    eng = _engine(ctx, cache_prompt=False)
    eng.spec_max_sequences = 2          # two sequences generating: nobody drafts
    reqs = [GenerationRequest(prompt, _greedy(v), max_tokens=20, draft_max=8,
                              drafter=Oracle(ref.tokens, len(prompt), v.n_tokens)) for _ in range(2)]
    eng.run(reqs)
    assert [r.tokens for r in reqs] == [ref.tokens] * 2
    assert all(r.n_drafted == 0 for r in reqs)
    assert eng.n_drafted_total == 0


def test_a_failing_drafter_ends_only_its_request(tiny, ctx):
    v = tiny.vocab
    prompt = v.tokenize("Once upon a time")
    ref = GenerationRequest(prompt, _greedy(v), max_tokens=30)
    _run(ctx, ref)

    def broken(ids, limit):
        raise KeyError("no draft today")

    def out_of_vocab(ids, limit):
        return [v.n_tokens + 5]

    bad = GenerationRequest(prompt, _greedy(v), max_tokens=30, draft_max=4, drafter=broken)
    wild = GenerationRequest(prompt, _greedy(v), max_tokens=30, draft_max=4, drafter=out_of_vocab)
    good = GenerationRequest(prompt, _greedy(v), max_tokens=30, draft_max=4,
                             drafter=Oracle(ref.tokens, len(prompt), v.n_tokens))
    _run(ctx, bad, wild, good)
    assert isinstance(bad.error, KeyError)
    assert isinstance(wild.error, InvalidTokenError)
    assert good.error is None and good.tokens == ref.tokens


def test_a_hook_failing_mid_verification_leaves_a_clean_slot(tiny, ctx):
    """A logits processor raising at a drafted position ends its request; the slot's KV is
    cut back to what was accepted, so the next request reusing that cache is exact."""
    v = tiny.vocab
    prompt = v.tokenize("Once upon a time")
    ref = GenerationRequest(prompt, _greedy(v), max_tokens=30)
    _run(ctx, ref)
    calls = [0]

    def processor(ids, scores):
        calls[0] += 1
        if calls[0] == 6:
            raise ValueError("processor failed")
        return scores

    ctx.kv_clear()
    eng = _engine(ctx, cache_prompt=True)
    failing = GenerationRequest(prompt, _greedy(v), max_tokens=30, draft_max=8, logits_processors=[processor],
                                drafter=Oracle(ref.tokens, len(prompt), v.n_tokens, spoil_every=0))
    eng.run([failing])
    assert isinstance(failing.error, ValueError)
    assert 0 < len(failing.tokens) < 30
    # The same prompt again: it reuses the slot's cached prefix, drafts and all.
    again = GenerationRequest(prompt, _greedy(v), max_tokens=30, draft_max=8,
                              drafter=Oracle(ref.tokens, len(prompt), v.n_tokens))
    eng.run([again])
    assert again.n_cached_tokens > 0
    assert again.tokens == ref.tokens


def test_cancel_while_speculating(tiny, ctx):
    v = tiny.vocab
    prompt = v.tokenize("Once upon a time")
    ref = GenerationRequest(prompt, _greedy(v), max_tokens=40)
    _run(ctx, ref)
    ctx.kv_clear()
    eng = _engine(ctx, cache_prompt=True)
    victim = GenerationRequest(prompt, _greedy(v), max_tokens=40, draft_max=8,
                               drafter=Oracle(ref.tokens, len(prompt), v.n_tokens))

    def callback(r, text):
        if len(r.tokens) >= 10:
            r.cancel_requested = True

    eng.run([victim], callback=callback)
    assert victim.finish_reason == "cancelled"
    again = GenerationRequest(prompt, _greedy(v), max_tokens=40)
    eng.run([again])
    assert again.tokens == ref.tokens


def test_request_argument_errors(tiny):
    v = tiny.vocab
    p = v.tokenize("x")
    with pytest.raises(ValueError, match="draft_max"):
        GenerationRequest(p, _greedy(v), draft_max=-1)
    with pytest.raises(ValueError, match="draft_max"):
        GenerationRequest(p, _greedy(v), draft_max=100000)
    with pytest.raises(ValueError, match="draft_min"):
        GenerationRequest(p, _greedy(v), draft_max=2, draft_min=3)
    with pytest.raises(ValueError, match="ngram_n"):
        GenerationRequest(p, _greedy(v), draft_max=2, ngram_n=0)
    with pytest.raises(TypeError, match="drafter"):
        GenerationRequest(p, _greedy(v), draft_max=2, drafter=42)


# ---- the LLM surface ---------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_pair(tiny_model_path):
    plain = LLM(tiny_model_path, n_ctx=2048, n_parallel=2, n_threads=1, verbose=False)
    spec = LLM(tiny_model_path, n_ctx=2048, n_parallel=2, n_threads=1, verbose=False,
               spec_type="ngram-simple", draft_max=8, spec_ngram_size_n=2, spec_cost_model=False)
    yield plain, spec
    plain.close()
    spec.close()


def _repeating_prompt(llm) -> str:
    head = "Once upon a time"
    return head + llm.complete(head, max_tokens=40, temperature=0).text + head


def test_llm_spec_type_matches_plain_and_reports_drafts(llm_pair):
    plain, spec = llm_pair
    prompt = _repeating_prompt(plain)
    a = plain.complete(prompt, max_tokens=40, temperature=0, cache_prompt=False)
    b = spec.complete(prompt, max_tokens=40, temperature=0, cache_prompt=False)
    assert b.text == a.text
    assert b.timings.draft_n > 0 and 0 <= b.timings.draft_n_accepted <= b.timings.draft_n
    assert a.timings.draft_n == 0
    assert "draft acceptance rate" in b.timings.format()
    off = spec.complete(prompt, max_tokens=40, temperature=0, speculative=False, cache_prompt=False)
    assert off.text == a.text and off.timings.draft_n == 0


def test_metrics_count_drafts_as_llama_server(llm_pair):
    """LLM.metrics()' spec_decode_* counters (llama-server's): the drafted and accepted tokens
    of each call, and the verification steps (each verifies 1..draft_max drafted tokens)."""
    plain, spec = llm_pair
    prompt = _repeating_prompt(plain)
    names = ("spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total",
             "spec_decode_num_drafts_total")
    before = [spec.metrics()[k] for k in names]
    b = spec.complete(prompt, max_tokens=40, temperature=0, cache_prompt=False)
    drafted, accepted, steps = (spec.metrics()[k] - v for k, v in zip(names, before))
    assert (drafted, accepted) == (b.timings.draft_n, b.timings.draft_n_accepted) and drafted > 0
    assert -(-drafted // 8) <= steps <= drafted                 # draft_max=8
    before_plain = [plain.metrics()[k] for k in names]
    plain.complete(prompt, max_tokens=40, temperature=0, cache_prompt=False)
    assert [plain.metrics()[k] for k in names] == before_plain


def test_llm_spec_with_n2_logprobs_and_streaming(llm_pair):
    plain, spec = llm_pair
    prompt = _repeating_prompt(plain)
    a = plain.complete(prompt, max_tokens=30, temperature=0, n=2, logprobs=True, cache_prompt=False)
    b = spec.complete(prompt, max_tokens=30, temperature=0, n=2, logprobs=True, cache_prompt=False)
    assert len(a) == len(b) == 2 and [c.text for c in b] == [c.text for c in a]
    for ca, cb in zip(a, b):
        assert len(ca.logprobs) == len(ca.tokens) > 0
        assert [t.token for t in cb.logprobs] == [t.token for t in ca.logprobs]
        assert all(math.isclose(x.logprob, y.logprob, abs_tol=1e-3) for x, y in zip(ca.logprobs, cb.logprobs))
    assert "".join(spec.stream(prompt, max_tokens=30, temperature=0)) == a[0].text


def test_llm_spec_from_threads(llm_pair):
    plain, spec = llm_pair
    prompt = _repeating_prompt(plain)
    want = plain.complete(prompt, max_tokens=30, temperature=0).text
    out: list = [None] * 4

    def call(i: int) -> None:
        out[i] = spec.complete(prompt, max_tokens=30, temperature=0).text

    errors = _in_threads(call, 4)
    assert not errors and out == [want] * 4


def test_drafting_fades_for_a_request_whose_drafts_are_always_wrong(tiny, ctx):
    """The engine sizes drafts by the decode's measured cost per batch size and the request's
    acceptance so far: a drafter that is always wrong soon gets no drafts at all (the old rule
    drafted one token every step), and the text is plain greedy decoding."""
    v = tiny.vocab
    prompt = v.tokenize("Once upon a time")
    plain = GenerationRequest(prompt, _greedy(v), max_tokens=80)
    _run(ctx, plain)
    calls = []

    def wrong(ids, limit):
        calls.append(limit)
        done = len(ids) - len(prompt)
        return [(t + 5) % v.n_tokens for t in plain.tokens[done:done + limit]]

    spec = GenerationRequest(prompt, _greedy(v), max_tokens=80, draft_max=8, drafter=wrong)
    ctx.kv_clear()
    engine = Engine(ctx, cache_prompt=False)
    engine.run([spec])
    assert spec.tokens == plain.tokens
    assert spec.n_draft_accepted == 0
    a, b = engine.decode_cost_ms
    assert a > 0 and b > 0
    # However cheap the fit says a drafted token is (at least 1% of a decode), one token pays
    # only while p > ~0.03, i.e. for the first ~32 rejections; then a probe every 32 steps.
    assert len(calls) <= 45 and spec.n_drafted <= 50, (len(calls), spec.n_drafted)
    fading = len(calls)

    # spec_cost_model=False: acceptance alone sizes the drafts, as llama.cpp's fixed draft_max
    # does; a rejected draft shrinks to one token, and that token is drafted every step.
    calls.clear()
    spec = GenerationRequest(prompt, _greedy(v), max_tokens=80, draft_max=8, drafter=wrong)
    _run(ctx, spec)
    assert spec.tokens == plain.tokens
    assert len(calls) >= 70 and spec.n_drafted >= 70, (len(calls), spec.n_drafted)
    assert len(calls) >= fading + 25


def test_a_warm_engine_that_never_drafted_still_lets_a_request_draft(tiny, ctx):
    """An engine that has only decoded one token at a time (no slope to fit: what a drafted
    token costs is unknown) lets a new request draft by its acceptance, which then gives the
    fit decodes of several sizes.  (It once assumed the worst and never drafted.)"""
    v = tiny.vocab
    prompt = v.tokenize("Once upon a time")[:1]       # one-token prompts: every decode has 1 token
    ref = GenerationRequest(prompt, _greedy(v), max_tokens=30)
    ctx.kv_clear()
    engine = Engine(ctx, cache_prompt=False)
    engine.run([ref])
    assert engine.n_steps >= 20 and engine.decode_cost_ms is None
    spec = GenerationRequest(prompt, _greedy(v), max_tokens=30, draft_max=8,
                             drafter=Oracle(ref.tokens, len(prompt), v.n_tokens, spoil_every=0))
    engine.run([spec])
    assert spec.tokens == ref.tokens
    assert spec.n_drafted > 0 and engine.decode_cost_ms is not None


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"spec_type": "eagle-9"}, ValueError, "unknown spec_type"),
    ({"spec_type": "ngram-simple", "spec_cost_model": "no"}, TypeError, "spec_cost_model"),
    ({"spec_type": "ngram-simple", "draft_max": 0}, ValueError, "draft_max"),
    ({"spec_type": "ngram-simple", "draft_max": -3}, ValueError, "draft_max"),
    ({"spec_type": "ngram-simple", "draft_max": 4, "draft_min": 5}, ValueError, "draft_min"),
    ({"spec_type": "ngram-simple", "spec_ngram_size_n": 0}, ValueError, "spec_ngram_size_n"),
    ({"spec_type": "ngram-simple", "draft_model": "other.gguf"}, ValueError, "spec_type='draft'"),
    ({"spec_type": "draft"}, ValueError, "needs draft_model"),
    ({"spec_type": "none", "draft_model": "other.gguf"}, ValueError, "turns speculation off"),
    ({"draft_model": "other.gguf", "draft_p_min": 1.5}, ValueError, "draft_p_min"),
    ({"draft_model": 3}, TypeError, "draft_model"),
])
def test_llm_spec_argument_errors(tiny_model_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LLM(tiny_model_path, verbose=False, **kwargs)


def test_speculative_per_call_is_type_checked(llm_pair):
    _plain, spec = llm_pair
    with pytest.raises(TypeError, match="speculative"):
        spec.complete("x", max_tokens=2, speculative="yes")


# ---- draft models ------------------------------------------------------------------
# A draft model is a second GGUF with the target's vocabulary (pyllama.speculative.DraftModel);
# the engine asks it for every slot's draft at once.  Random tiny models have flat
# distributions, so these tests draft with draft_p_min=0 (always draft).

@pytest.fixture(scope="module")
def tiny_draft_path(tiny_model_factory):
    """Same vocabulary and shape as tiny_model_path, other random weights: a draft model that
    is sometimes right and sometimes wrong."""
    return tiny_model_factory(seed=7)


def test_target_as_its_own_draft_accepts_everything(tiny_model_path):
    kw = dict(n_ctx=512, n_threads=1, temperature=0, ignore_eos=True)
    with LLM(tiny_model_path, **kw) as plain, \
            LLM(tiny_model_path, draft_model=tiny_model_path, draft_p_min=0.0, draft_max=8, spec_cost_model=False,
                    **kw) as spec:
        want = plain.complete("Once upon a time", max_tokens=60)
        got = spec.complete("Once upon a time", max_tokens=60)
    assert got.text == want.text and got.tokens == want.tokens
    t = got.timings
    assert t.draft_n >= 40, t                    # nearly every token came from a draft
    assert t.draft_n_accepted == t.draft_n, t    # the same model agrees with itself


def test_other_draft_model_keeps_greedy_output(tiny_model_path, tiny_draft_path):
    """A draft model that is often wrong: the text is still exactly plain greedy decoding."""
    kw = dict(n_ctx=512, n_threads=1, temperature=0, ignore_eos=True)
    prompts = ["Once upon a time", "The weather today", "In a galaxy far away"]
    with LLM(tiny_model_path, **kw) as plain, \
            LLM(tiny_model_path, draft_model=tiny_draft_path, draft_p_min=0.0, draft_max=4, spec_cost_model=False,
                    **kw) as spec:
        for p in prompts:
            want = plain.complete(p, max_tokens=40)
            got = spec.complete(p, max_tokens=40)
            assert got.tokens == want.tokens, p
            assert got.timings.draft_n > 0, got.timings
            assert got.timings.draft_n_accepted < got.timings.draft_n, got.timings   # some were wrong


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_draft_model_keeps_sampled_output(tiny_model_path, tiny_draft_path, seed):
    """llama.cpp's rule (sample every position with the request's chain, stop at the first
    mismatch) consumes the random stream as plain decoding does: same seed, same tokens."""
    kw = dict(n_ctx=512, n_threads=1, temperature=0.9, top_k=40, seed=seed, ignore_eos=True)
    with LLM(tiny_model_path, **kw) as plain, \
            LLM(tiny_model_path, draft_model=tiny_model_path, draft_p_min=0.0, spec_cost_model=False, **kw) as spec:
        want = plain.complete("The weather today", max_tokens=30)
        got = spec.complete("The weather today", max_tokens=30)
    assert got.tokens == want.tokens
    assert got.timings.draft_n_accepted > 0


def test_draft_model_drafts_for_all_slots_at_once(tiny_model_path, tiny_draft_path):
    """Four threads, one LLM: every answer equals its solo greedy answer, and the draft model
    was asked for several requests' drafts in one call (one decode per drafted position)."""
    kw = dict(n_ctx=1024, n_threads=1, temperature=0, ignore_eos=True)
    prompts = ["Once upon a time", "The weather today", "In a galaxy far away", "A long time ago"]
    with LLM(tiny_model_path, **kw) as plain:
        want = [plain.complete(p, max_tokens=48).tokens for p in prompts]
    with LLM(tiny_model_path, draft_model=tiny_draft_path, draft_p_min=0.0, n_parallel=4, spec_cost_model=False,
             **kw) as spec:
        spec._engine.spec_max_sequences = 8       # draft with all four in the batch
        got: list = [None] * 4
        barrier = threading.Barrier(4)

        def call(i: int) -> None:
            barrier.wait(30)
            got[i] = spec.complete(prompts[i], max_tokens=48).tokens

        errors = _in_threads(call, 4)
        drafter = spec._drafter
        assert not errors and got == want
        assert drafter.n_draft_items > drafter.n_draft_calls   # some calls drafted for several slots


def test_draft_model_vocabulary_is_checked(tiny_model_path, tiny_model_factory, vocab_dir, tmp_path):
    from tiny_model import make_vocab_with_tokens

    other_type = tiny_model_factory(vocab_from=vocab_dir / "ggml-vocab-gpt-2.gguf")
    with pytest.raises(ValueError, match="vocabulary is of type"):
        LLM(tiny_model_path, draft_model=other_type, n_threads=1)
    big = make_vocab_with_tokens(tmp_path / "big-vocab.gguf", [f"<extra_{i}>" for i in range(200)])
    bigger = tiny_model_factory(vocab_from=big)
    with pytest.raises(ValueError, match="more than 128 apart"):
        LLM(tiny_model_path, draft_model=bigger, n_threads=1)
    with pytest.raises(Exception, match="no-such-draft"):
        LLM(tiny_model_path, draft_model=tmp_path / "no-such-draft.gguf", n_threads=1)


def test_check_draft_vocab_names_the_first_different_token():
    from pyllama.speculative import check_draft_vocab

    class V:
        type, add_bos, bos, add_eos, eos = "spm", True, 1, False, 2

        def __init__(self, texts):
            self.texts, self.n_tokens = texts, len(texts)

        def token_text(self, i):
            return self.texts[i]

    base = [f"t{i}" for i in range(50)]
    check_draft_vocab(V(base), V(base + ["extra"]))            # a few added tokens are fine
    changed = list(base)
    changed[2] = "different control token"                      # below id 5: not compared
    check_draft_vocab(V(base), V(changed))
    changed[17] = "t17-but-not"
    with pytest.raises(ValueError, match="token 17 is 't17-but-not' in the draft model and 't17' in the target"):
        check_draft_vocab(V(base), V(changed))
    other = V(base)
    other.eos = 3
    with pytest.raises(ValueError, match="EOS"):
        check_draft_vocab(V(base), other)


def test_draft_model_failure_does_not_fail_requests(tiny_model_path, tiny_draft_path):
    """The draft context full (two histories longer than it holds together): drafting starts
    over, and the requests' text is still plain greedy decoding."""
    from pyllama.speculative import DraftModel

    kw = dict(n_ctx=1024, n_threads=1, temperature=0, ignore_eos=True)
    prompts = ["Once upon a time " * 35, "The weather today is " * 30]     # ~140 tokens each
    with LLM(tiny_model_path, **kw) as plain:
        want = [plain.complete(p, max_tokens=40).tokens for p in prompts]
    with LLM(tiny_model_path, draft_model=tiny_draft_path, draft_p_min=0.0, n_parallel=2, spec_cost_model=False,
             **kw) as spec:
        spec._engine.spec_max_sequences = 8
        # Shrink the draft context under the LLM: 256 cells shared by two ~180-token histories.
        spec._drafter.close()
        spec._drafter = small = DraftModel(spec._draft_weights, n_seq=2, n_ctx=256, n_threads=1, p_min=0.0)
        got: list = [None, None]
        errors = _in_threads(lambda i: got.__setitem__(i, spec.complete(prompts[i], max_tokens=40)), 2)
    assert not errors and [g.tokens for g in got] == want
    assert small.failed is None and small.n_clears >= 1
    assert sum(g.timings.draft_n for g in got) > 0


# ---- the real models ----------------------------------------------------------------

GROUNDED = [
    ("Copy this list exactly:\n" + "\n".join(f"- item {i}: {w}" for i, w in enumerate(
        ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape"]))),
    "Repeat this sentence twice: The quick brown fox jumps over the lazy dog.",
    "Rewrite this code renaming `total` to `acc`:\n\ndef add_all(xs):\n    total = 0\n    for x in xs:\n"
    "        total += x\n    return total\n",
    "Copy this table and add a column 'ok' with the value yes:\n| name | age |\n|---|---|\n| Ann | 31 |\n"
    "| Bob | 42 |\n| Cid | 27 |\n",
    "Repeat exactly: red green blue red green blue red green blue",
    "Extract the email addresses from: contact ann@example.com or bob@example.org, or cid@example.net.",
    "Write the numbers from 1 to 20 separated by commas.",
    "Copy this JSON exactly: {\"name\": \"pyllama\", \"version\": 1, \"tags\": [\"fast\", \"local\"]}",
    "Reformat as a bulleted list: alpha, beta, gamma, delta, epsilon, zeta",
    "Fix the typo and repeat the sentence: The cat sat on teh mat and looked at teh door.",
    "Translate to upper case: hello world, this is a small test of copying text.",
    "Repeat the word 'echo' ten times.",
    "Quote this line back: To be, or not to be, that is the question.",
    "Convert to snake_case: getUserName, setUserName, getUserEmail, setUserEmail",
    "Write the alphabet in lower case, separated by spaces.",
    "Copy this Python exactly:\nfor i in range(10):\n    print(i * i)\n",
    "List the days of the week, one per line.",
    "Summarise in one line, reusing the words: the server accepts requests and answers them in order.",
    "Repeat this address: 221B Baker Street, London, NW1 6XE, United Kingdom.",
    "Write a SQL query that selects name and age from users where age > 30, then repeat it.",
]


@pytest.mark.parametrize("model_fixture", ["smollm2_path", "gemma_path"])
def test_real_models_speculation_keeps_the_answers(request, model_fixture):
    """On real models, verifying several positions in one batch shifts float rounding (as
    llama-server's own speculation does), so an answer may change at a near tie; at least
    16 of 20 input-grounded prompts must come out identical or diverge only late (second
    half) at a near tie (top-2 log-probability gap under 0.5)."""
    path = request.getfixturevalue(model_fixture)
    n = 32
    with LLM(path, n_ctx=1024, n_threads=2, verbose=False, spec_type="ngram-simple", draft_max=16,
             spec_cost_model=False) as llm:
        good, drafted, accepted, report = 0, 0, 0, []
        for text in GROUNDED:
            prompt = llm.chat_prompt([{"role": "user", "content": text}])
            plain = llm.complete(prompt, max_tokens=n, temperature=0, speculative=False, cache_prompt=False,
                                 logprobs=True, top_logprobs=2, parse_special=True)
            spec = llm.complete(prompt, max_tokens=n, temperature=0, cache_prompt=False, parse_special=True)
            drafted += spec.timings.draft_n
            accepted += spec.timings.draft_n_accepted
            if spec.tokens == plain.tokens:
                good += 1
                continue
            k = next(i for i, (a, b) in enumerate(zip(plain.tokens + [-1], spec.tokens + [-2])) if a != b)
            tops = plain.logprobs[k].top_logprobs if k < len(plain.logprobs) else []
            gap = tops[0].logprob - tops[1].logprob if len(tops) >= 2 else math.inf
            late_tie = k >= n // 2 and gap < 0.5
            good += late_tie
            report.append((text[:30], k, round(gap, 3)))
    print(f"{model_fixture}: {good}/20 identical or late near-tie; drafted {drafted}, accepted {accepted}; "
          f"diverged: {report}")
    assert drafted > 0 and accepted > 0
    assert good >= 16, report


# ---- synthetic acceptance (llama-server's --spec-synth-*, for benchmarks) ------------------


def test_synth_acceptance_rates_are_resolved_as_llama_cpp_does():
    from pyllama.speculative import synth_acceptance

    assert synth_acceptance(None, None, 4) is None
    # Unconditional rates become each position's probability given the one before was kept.
    assert synth_acceptance([0.8, 0.4, 0.2, 0.0], None, 4) == pytest.approx((0.8, 0.5, 0.5, 0.0))
    assert synth_acceptance(None, 5.0, 4) == (1.0, 1.0, 1.0, 1.0)       # every draft, always
    assert synth_acceptance(None, 1.0, 4) == (0.0, 0.0, 0.0, 0.0)       # never
    p = synth_acceptance(None, 2.0, 4)[0]                             # p + p^2 + p^3 + p^4 = 1
    assert p + p ** 2 + p ** 3 + p ** 4 == pytest.approx(1.0, abs=1e-6)
    for rates, length, match in (([0.5] * 3, None, "must contain 4 values"),
                                 ([0.5, 0.6, 0.1, 0.0], None, "non-increasing"),
                                 ([1.5, 0.5, 0.1, 0.0], None, "within"),
                                 ([0.5] * 4, 2.0, "mutually exclusive"),
                                 (None, 6.0, "within"), (None, float("nan"), "within")):
        with pytest.raises(ValueError, match=match):
            synth_acceptance(rates, length, 4)


def test_synth_acceptance_needs_speculation(tiny_model_path):
    with pytest.raises(ValueError, match="needs speculative decoding"):
        LLM(tiny_model_path, spec_synth_rates=[0.5] * 16)


def test_synth_acceptance_keeps_drafts_at_the_given_rates(tiny_model_path, tiny_draft_path):
    """Rates 0: every draft is verified and dropped, and the text is plain decoding's (each
    position sampled once, in order).  Rates 1: every draft is kept, even where the model
    disagrees (the other weights' drafts are often wrong), and a grammar or ignore_eos does not
    trip it.  In between: the same seed gives the same draws."""
    kw = dict(n_ctx=512, n_threads=1, temperature=0.9, top_k=40, seed=5, ignore_eos=True)
    spec = dict(draft_model=tiny_draft_path, draft_max=4, draft_min=2)
    with LLM(tiny_model_path, **kw) as plain:
        want = plain.complete("The weather today", max_tokens=30)
    with LLM(tiny_model_path, spec_synth_rates=[0.0] * 4, **spec, **kw) as never:
        got = never.complete("The weather today", max_tokens=30)
    assert got.tokens == want.tokens
    assert got.timings.draft_n > 0 and got.timings.draft_n_accepted == 0
    with LLM(tiny_model_path, spec_synth_rates=[1.0] * 4, **spec, **kw) as always:
        got = always.complete("The weather today", max_tokens=30)
        assert got.timings.draft_n >= 20 and got.timings.draft_n_accepted == got.timings.draft_n
        assert len(got.tokens) == 30 and got.tokens != want.tokens
        constrained = always.complete("Say a", max_tokens=6, grammar='root ::= "a"{5,5}', ignore_eos=False)
        assert len(constrained.tokens) <= 6
    with LLM(tiny_model_path, spec_synth_len=2.5, **spec, **kw) as half:
        runs = [half.complete("The weather today", max_tokens=30).timings for _ in range(2)]
        other = half.complete("The weather today", max_tokens=30, seed=6).timings
    assert (runs[0].draft_n, runs[0].draft_n_accepted) == (runs[1].draft_n, runs[1].draft_n_accepted)
    assert 0 < runs[0].draft_n_accepted < runs[0].draft_n
    assert other.draft_n > 0


def test_a_request_that_has_not_drafted_probes_at_once(tiny_model_path):
    """With the cost model on, a request's first steps draft draft_min tokens even where the
    prior acceptance says it does not pay: it measures its acceptance instead of assuming it
    (here the target drafts for itself, so the probe is accepted and drafting goes on)."""
    kw = dict(n_ctx=512, n_threads=1, temperature=0, ignore_eos=True)
    with LLM(tiny_model_path, draft_model=tiny_model_path, draft_max=8, draft_min=4, **kw) as spec:
        for _ in range(12):        # past the cost model's first 8 decodes
            spec.complete("Once upon a time", max_tokens=2, speculative=False)
        got = spec.complete("Once upon a time", max_tokens=12)
    assert got.timings.draft_n >= 4 and got.timings.draft_n_accepted == got.timings.draft_n
