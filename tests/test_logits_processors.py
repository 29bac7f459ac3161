"""Python hooks inside continuous batching (issue 24), at the engine level: a GenerationRequest's
logits processors (called between decode and sample, before its sampler chain and grammar) and
stopping criteria (called after each token it keeps).  Requests with hooks batch with the
others; a hook's exception ends its own request only; followers run their own hooks.

The tiny random model with one KV stream per sequence (kv_unified=False): a sequence's logits
do not depend on what the other sequences of the batch hold, so "unaffected" is asserted
exactly, against the same requests run without hooks in batches of the same shape.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyllama import Context, Engine, GenerationRequest, Model, SamplerChain
from pyllama.errors import GrammarError

MAX = 12


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    with Model(tiny_model_path) as m:
        yield m


@pytest.fixture()
def engine(tiny):
    with Context(tiny, n_ctx=512, n_seq_max=3, n_threads=1, kv_unified=False) as ctx:
        yield Engine(ctx)


def _request(tiny, prompt, **kw) -> GenerationRequest:
    kw.setdefault("max_tokens", MAX)
    kw.setdefault("ignore_eos", True)   # every run samples exactly max_tokens tokens
    return GenerationRequest(prompt, SamplerChain(tiny.vocab).add_greedy(), **kw)


def _step_together(engine: Engine, requests) -> list:
    """Submit `requests` and step until all are done; returns each step's set of requests
    that produced an event."""
    for r in requests:
        engine.submit(r)
    steps = []
    for _ in range(10 * MAX):
        if all(r.done for r in requests):
            return steps
        steps.append({id(r) for r, _, _ in engine.step()})
    raise AssertionError("the requests did not finish")


def _assert_idle(engine: Engine) -> None:
    assert not engine.busy
    slots = engine.slot_info()
    assert slots and not any(s["busy"] for s in slots), slots


def _banner(token: int, calls: list | None = None):
    def ban(input_ids, scores):
        if calls is not None:
            calls.append(input_ids.copy())
        scores[token] = -np.inf
        return scores
    return ban


@pytest.fixture()
def prompts(tiny):
    return tiny.vocab.tokenize("Once upon a time"), tiny.vocab.tokenize("The cat sat on")


@pytest.fixture()
def plain_pair(tiny, engine, prompts):
    """Both prompts without hooks, batched together: the reference outputs."""
    a = _request(tiny, prompts[0], logprobs=2)
    b = _request(tiny, prompts[1])
    _step_together(engine, [a, b])
    assert a.finish_reason == b.finish_reason == "length" and len(a.tokens) == MAX
    return a, b


def _ban_position(tokens: list) -> int:
    """A position whose token does not occur earlier (banning it changes the output there first)."""
    return next(k for k in range(2, len(tokens)) if tokens[k] not in tokens[:k])


def test_a_banned_token_is_obeyed_and_the_rest_of_the_batch_is_not_affected(tiny, engine, prompts, plain_pair):
    plain_a, plain_b = plain_pair
    k = _ban_position(plain_a.tokens)
    banned = plain_a.tokens[k]
    calls = []
    a = _request(tiny, prompts[0], logprobs=2, logits_processors=[_banner(banned, calls)])
    b = _request(tiny, prompts[1])
    steps = _step_together(engine, [a, b])
    # Same steps: every step that sampled one of them sampled the other too.
    sampled = [s for s in steps if s]
    assert len(sampled) == MAX and all(s == {id(a), id(b)} for s in sampled), steps
    assert b.tokens == plain_b.tokens and b.text == plain_b.text and b.finish_reason == "length"
    assert a.finish_reason == "length" and a.error is None
    assert a.tokens[:k] == plain_a.tokens[:k]
    assert a.tokens[k] != banned and banned not in a.tokens
    # Logprobs report the model's raw distribution: the banned token is still the favourite
    # there, and the processed greedy choice is the runner-up.
    top = a.logprobs[k][2]
    assert top[0][0] == banned and a.tokens[k] == top[1][0]
    assert len(calls) == MAX    # once per sampled token
    _assert_idle(engine)


def test_a_processor_may_return_a_new_array(tiny, engine, prompts, plain_pair):
    plain_a, _ = plain_pair
    k = _ban_position(plain_a.tokens)
    banned = plain_a.tokens[k]

    def ban_new(input_ids, scores):
        out = scores.astype(np.float64)    # another array, another dtype: copied in
        out[banned] = -np.inf
        return out

    in_place = _request(tiny, prompts[0], logits_processors=[_banner(banned)])
    new = _request(tiny, prompts[0], logits_processors=[ban_new])
    _step_together(engine, [in_place, new])
    assert new.error is None and banned not in new.tokens
    assert new.tokens == in_place.tokens and new.tokens[:k] == plain_a.tokens[:k]


def test_processors_see_the_tokens_so_far_and_a_view_of_the_logits(tiny, engine, prompts):
    prompt = prompts[0]
    seen = []

    def look(input_ids, scores):
        seen.append((input_ids.copy(), input_ids.dtype, input_ids.flags.writeable,
                     scores.dtype, scores.shape, scores.flags.writeable, scores.flags.owndata))
        return scores

    calls = []
    r = _request(tiny, prompt, logits_processors=[look, _banner(len(tiny.vocab) - 1, calls)])
    engine.run([r])
    assert len(seen) == len(calls) == MAX
    for i, (ids, dtype, ids_writable, sdtype, shape, writable, owndata) in enumerate(seen):
        assert ids.tolist() == prompt + r.tokens[:i]
        assert dtype == np.intc and not ids_writable
        assert sdtype == np.float32 and shape == (len(tiny.vocab),) and writable
        assert not owndata     # a view of the engine's row, not a copy
    # The processors run in order: the second one sees what the first saw.
    assert [c.tolist() for c in calls] == [s[0].tolist() for s in seen]


def test_a_stopping_criterion_ends_the_request_at_the_right_token(tiny, engine, prompts):
    prompt = prompts[0]
    plain = _request(tiny, prompt)
    four = _request(tiny, prompt, max_tokens=4)
    engine.run([plain, four])
    lengths = []

    def after_five(input_ids, scores):
        lengths.append(len(input_ids) - len(prompt))
        assert scores.shape == (len(tiny.vocab),) and not scores.flags.writeable
        # The scores the token was sampled from: greedy picked their argmax.
        assert int(np.argmax(scores)) == input_ids[-1]
        return len(input_ids) - len(prompt) >= 5

    r = _request(tiny, prompt, logprobs=1, stopping_criteria=[after_five])
    other = _request(tiny, prompts[1])
    _step_together(engine, [r, other])
    assert r.error is None, r.error
    assert r.finish_reason == "stop" and r.stopped_by_criterion
    assert lengths == [1, 2, 3, 4, 5]      # after each token, that token included
    assert r.tokens == plain.tokens[:5]    # the stopping token is kept in `tokens` ...
    assert r.text == four.text             # ... but its text is not output (llama-cpp-python)
    assert len(r.logprobs) == 4            # nor its logprobs entry
    assert other.finish_reason == "length" and not other.stopped_by_criterion
    _assert_idle(engine)


class Boom(Exception):
    pass


@pytest.mark.parametrize("where", ["processor", "criterion"])
def test_an_exception_in_a_hook_ends_that_request_only(tiny, engine, prompts, plain_pair, where):
    _, plain_b = plain_pair
    error = Boom("hook failed")
    n = []

    def hook(input_ids, scores):
        n.append(1)
        if len(n) == 3:
            raise error
        return scores if where == "processor" else False

    kw = {"logits_processors": [hook]} if where == "processor" else {"stopping_criteria": [hook]}
    a = _request(tiny, prompts[0], **kw)
    b = _request(tiny, prompts[1])
    engine.submit(a)
    engine.submit(b)
    events = []
    for _ in range(10 * MAX):     # the steps themselves never raise
        if a.done and b.done:
            break
        events += engine.step()
    assert a.finish_reason == "error" and a.error is error
    assert (a, "", "error") in events
    assert b.tokens == plain_b.tokens and b.finish_reason == "length"
    _assert_idle(engine)
    # The engine goes on as usual.
    again = _request(tiny, prompts[1])
    engine.run([again])
    assert again.tokens == plain_b.tokens


def test_keyboard_interrupt_in_a_hook_propagates_after_the_step(tiny, engine, prompts, plain_pair):
    _, plain_b = plain_pair

    def interrupt(input_ids, scores):
        raise KeyboardInterrupt

    a = _request(tiny, prompts[0], logits_processors=[interrupt])
    b = _request(tiny, prompts[1])
    engine.submit(a)
    engine.submit(b)
    events = []
    with pytest.raises(KeyboardInterrupt):
        engine.step(events)
    assert a.finish_reason == "error" and isinstance(a.error, KeyboardInterrupt)
    # The other request was sampled in that step, and goes on to its usual output.
    assert any(r is b for r, _, _ in events) and len(b.tokens) == 1
    engine.run()
    assert b.tokens == plain_b.tokens
    _assert_idle(engine)


def test_wrong_results_are_clear_errors_for_that_request(tiny, engine, prompts, plain_pair):
    _, plain_b = plain_pair
    kept = []
    bad = [
        (lambda ids, scores: scores[:10], ValueError, "shape"),
        (lambda ids, scores: None, TypeError, "returned None"),
        (lambda ids, scores: kept.append(scores) or scores, BufferError, "scores.copy()"),
    ]
    for proc, exc_type, words in bad:
        a = _request(tiny, prompts[0], logits_processors=[proc])
        b = _request(tiny, prompts[1])
        _step_together(engine, [a, b])
        assert a.finish_reason == "error" and isinstance(a.error, exc_type) and words in str(a.error)
        assert b.tokens == plain_b.tokens
        _assert_idle(engine)
    kept.clear()
    crit = _request(tiny, prompts[0], stopping_criteria=[lambda ids, scores: kept.append(scores)])
    engine.run([crit])
    assert crit.finish_reason == "error" and isinstance(crit.error, BufferError)


def test_processors_run_before_the_grammar_and_the_grammar_still_holds(tiny, engine):
    v = tiny.vocab
    prompt = v.tokenize("Answer:")
    grammar = 'root ::= ("yes" | "no") "."'

    def req(**kw):
        return GenerationRequest(prompt, SamplerChain(v).add_greedy(), max_tokens=16,
                                 grammar=SamplerChain(v).add_grammar(grammar), **kw)

    plain = req()
    engine.run([plain])
    assert plain.text in ("yes.", "no.")
    first = plain.tokens[0]
    hooked = req(logits_processors=[_banner(first)])
    engine.run([hooked])
    assert hooked.error is None and hooked.finish_reason == "eog"
    assert hooked.text in ("yes.", "no.") and first not in hooked.tokens
    # A processor that leaves the grammar nothing: a clear error for that request.
    allowed = set(v.tokenize("yes", add_special=False) + v.tokenize("no", add_special=False))

    def ban_all(input_ids, scores):
        scores[:] = -np.inf
        return scores

    dead = req(logits_processors=[ban_all])
    engine.run([dead])
    assert dead.finish_reason == "error" and isinstance(dead.error, (GrammarError, ValueError))
    assert allowed and not dead.tokens
    _assert_idle(engine)


def test_followers_run_their_own_hooks_on_their_own_rows(tiny, engine, prompts):
    prompt = prompts[0]
    plain = _request(tiny, prompt)
    engine.run([plain])
    # The leader bans the token every one of them would pick first: its processor must not edit
    # the row the group shares at that token.
    x = plain.tokens[0]
    y = plain.tokens[_ban_position(plain.tokens)]
    alone_x = _request(tiny, prompt, logits_processors=[_banner(x)])
    alone_y = _request(tiny, prompt, logits_processors=[_banner(y)])
    engine.run([alone_x])
    engine.run([alone_y])
    calls_x, calls_y = [], []
    leader = _request(tiny, prompt, logits_processors=[_banner(x, calls_x)])
    free = _request(tiny, prompt)
    other = _request(tiny, prompt, logits_processors=[_banner(y, calls_y)])
    leader.add_follower(free)
    leader.add_follower(other)
    engine.run([leader])
    assert free.tokens == plain.tokens
    assert leader.tokens == alone_x.tokens and x not in leader.tokens
    assert other.tokens == alone_y.tokens and y not in other.tokens
    assert [c.tolist() for c in calls_x] == [prompt + leader.tokens[:i] for i in range(MAX)]
    assert [c.tolist() for c in calls_y] == [prompt + other.tokens[:i] for i in range(MAX)]
    _assert_idle(engine)


def test_hooks_are_validated(tiny, prompts):
    def ok(ids, scores):
        return scores

    r = _request(tiny, prompts[0], logits_processors=(ok,), stopping_criteria=[ok])
    assert r.logits_processors == (ok,) and r.stopping_criteria == (ok,)
    plain = _request(tiny, prompts[0])
    assert plain.logits_processors == () and plain.stopping_criteria == ()
    for bad in ([1], ["x"], ok, 3):
        with pytest.raises(TypeError):
            _request(tiny, prompts[0], logits_processors=bad)
        with pytest.raises(TypeError):
            _request(tiny, prompts[0], stopping_criteria=bad)


# ---- the same hooks through LLM: complete, stream, chat, async, shared use ----------------------


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    from pyllama import LLM

    with LLM(tiny_model_path, n_ctx=1024, n_parallel=2, n_threads=1, temperature=0, ignore_eos=True,
             kv_unified=False, chat_template="chatml") as m:
        yield m


def test_llm_calls_take_hooks_and_other_callers_are_not_affected(llm):
    import asyncio
    import threading

    prompt, other = "Once upon a time", "The number 7 is"
    plain = llm.complete(prompt, max_tokens=MAX)
    banned = plain.tokens[3]
    expected_other = llm.complete(other, max_tokens=MAX).tokens

    got = llm.complete(prompt, max_tokens=MAX, logits_processors=[_banner(banned)])
    assert banned not in got.tokens and got.tokens[:3] == plain.tokens[:3]
    streamed = llm.stream(prompt, max_tokens=MAX, logits_processors=[_banner(banned)])
    assert "".join(streamed) == got.text
    stopped = llm.complete(prompt, max_tokens=MAX,
                           stopping_criteria=[lambda ids, scores: len(ids) >= len(llm.tokenize(prompt)) + 4])
    assert stopped.finish_reason == "stop" and stopped.tokens == plain.tokens[:4]
    chat = llm.chat([{"role": "user", "content": "hi"}], max_tokens=MAX, logits_processors=[_banner(banned)])
    assert banned not in chat.tokens
    a = asyncio.run(llm.acomplete(prompt, max_tokens=MAX, logits_processors=[_banner(banned)]))
    assert a.tokens == got.tokens

    # A hooked call and a plain one from two threads at once: each gets its own answer.
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("other", llm.complete(other, max_tokens=MAX).tokens))
    t.start()
    hooked = llm.complete(prompt, max_tokens=MAX, logits_processors=[_banner(banned)])
    t.join(60)
    assert out["other"] == expected_other and hooked.tokens == got.tokens


def test_llm_hook_exception_is_the_callers_only(llm):
    def boom(input_ids, scores):
        raise LookupError("processor bug")

    with pytest.raises(LookupError, match="processor bug"):
        llm.complete("Once upon a time", max_tokens=MAX, logits_processors=[boom])
    assert llm.slots() and not any(s["busy"] for s in llm.slots())
    assert len(llm.complete("Once upon a time", max_tokens=3).tokens) == 3
