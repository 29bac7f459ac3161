"""logprobs, prompt scoring (echo) and n completions (issue 14), on both real models.

The reference is NumPy: a log-softmax over the raw logits that llama.cpp returns for the
same tokens at the same positions, evaluated with the same batch shapes the engine uses
(the prompt in one batch, then one token per decode), so the numbers are comparable to
1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_fixtures import either_llm, module_llm
from pyllama import LLM, Batch, Context

pytestmark = pytest.mark.model

THREADS = 2
PROMPT = "The three primary colors are"


smol = module_llm("smollm2_path", n_ctx=512, n_threads=THREADS, temperature=0)
gemma = module_llm("gemma_path", n_ctx=512, n_threads=THREADS, temperature=0)
any_llm = either_llm("smol", "gemma")


def _log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    m = row.max()
    return row - m - math.log(np.exp(row - m).sum())


def _reference_rows(llm: LLM, prompt_tokens: list, generated: list) -> list:
    """Log-softmax rows predicting generated[i], from a fresh context that evaluates the
    prompt in one batch and then one token per decode (the engine's shapes)."""
    with Context(llm.model, n_ctx=512, n_batch=512, n_threads=THREADS) as ctx:
        b = Batch(512)
        b.add_sequence(prompt_tokens, 0, 0, True)
        ctx.decode(b)
        rows = [_log_softmax(ctx.logits(-1))]
        pos = len(prompt_tokens)
        for t in generated[:-1]:
            b = Batch(1)
            b.add(t, pos, 0, True)
            ctx.decode(b)
            rows.append(_log_softmax(ctx.logits(-1)))
            pos += 1
        return rows


def test_logprobs_match_numpy_log_softmax(any_llm):
    c = any_llm.complete(PROMPT, max_tokens=8, logprobs=True, top_logprobs=5)
    assert c.logprobs is not None and len(c.logprobs) == len(c.tokens) == 8
    rows = _reference_rows(any_llm, any_llm.tokenize(PROMPT), c.tokens)
    assert len(rows) == 8
    for entry, tok, row in zip(c.logprobs, c.tokens, rows):
        assert entry.id == tok
        assert entry.logprob == pytest.approx(row[tok], abs=1e-4)
        top = [t.id for t in entry.top_logprobs]
        assert len(top) == 5
        # the K most likely tokens, most likely first, with their log-probabilities
        expected = list(np.argsort(-row, kind="stable")[:5])
        assert sorted(top) == sorted(int(x) for x in expected)
        lps = [t.logprob for t in entry.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        for t in entry.top_logprobs:
            assert t.logprob == pytest.approx(row[t.id], abs=1e-4)
        # greedy picks the top alternative
        assert entry.top_logprobs[0].id == tok
        assert entry.bytes == list(any_llm.vocab.token_to_piece(tok, True))


def test_logprobs_openai_shape(smol):
    c = smol.complete(PROMPT, max_tokens=3, logprobs=True, top_logprobs=2)
    shaped = c.logprobs_openai()
    assert set(shaped) == {"content"} and len(shaped["content"]) == 3
    first = shaped["content"][0]
    assert set(first) == {"token", "logprob", "bytes", "top_logprobs"}
    assert set(first["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    assert "".join(e["token"] for e in shaped["content"]) == c.text


def test_no_logprobs_by_default_and_top_zero(smol):
    assert smol.complete(PROMPT, max_tokens=2).logprobs is None
    c = smol.complete(PROMPT, max_tokens=2, logprobs=True)
    assert len(c.logprobs) == 2 and all(e.top_logprobs == [] for e in c.logprobs)
    with pytest.raises(ValueError, match="top_logprobs"):
        smol.complete(PROMPT, max_tokens=2, logprobs=True, top_logprobs=21)
    with pytest.raises(ValueError, match="top_logprobs"):
        smol.complete(PROMPT, max_tokens=2, top_logprobs=3)


def test_logprobs_with_sampling_are_of_the_raw_distribution(smol):
    """At temperature 0.8 with top_k=1... the reported logprob is still the model's own,
    not the truncated distribution's (which would be 0 for the only candidate)."""
    c = smol.complete(PROMPT, max_tokens=4, temperature=0.8, top_k=1, seed=3, logprobs=True)
    assert len(c.logprobs) == 4 and all(e.logprob < 0 for e in c.logprobs)
    greedy = smol.complete(PROMPT, max_tokens=4, logprobs=True)
    assert [e.logprob for e in c.logprobs] == pytest.approx([e.logprob for e in greedy.logprobs], abs=1e-5)


def test_post_sampling_probs_are_of_the_chains_distribution(smol):
    """post_sampling_probs=True: the logprobs of the distribution the chain left: with top_k=5
    at most five alternatives (those of probability > 0), whose probabilities sum to 1, the
    softmax of the model's top five logits at the temperature; the same tokens are sampled."""
    kw = dict(max_tokens=4, temperature=0.7, top_k=5, top_p=1.0, min_p=0.0, seed=3, logprobs=True, top_logprobs=8)
    post = smol.complete(PROMPT, post_sampling_probs=True, **kw)
    raw = smol.complete(PROMPT, **kw)
    assert post.tokens == raw.tokens
    for e, r in zip(post.logprobs, raw.logprobs):
        assert len(e.top_logprobs) == 5 and len(r.top_logprobs) == 8
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) == pytest.approx(1.0, abs=1e-5)
        # the model's five best, renormalised at temperature 0.7
        best = np.array([t.logprob for t in r.top_logprobs[:5]]) / 0.7
        expected = np.exp(best - best.max()) / np.exp(best - best.max()).sum()
        assert [t.id for t in e.top_logprobs] == [t.id for t in r.top_logprobs[:5]]
        assert [math.exp(t.logprob) for t in e.top_logprobs] == pytest.approx(list(expected), abs=1e-4)
        assert e.logprob == pytest.approx(next(t.logprob for t in e.top_logprobs if t.id == e.id))
    with pytest.raises(TypeError, match="post_sampling_probs"):
        smol.complete(PROMPT, max_tokens=1, post_sampling_probs=1)


def test_stream_chunks_carry_logprobs(smol):
    chunks = list(smol.stream(PROMPT, max_tokens=6, chunks=True, logprobs=True, top_logprobs=1))
    whole = smol.complete(PROMPT, max_tokens=6, logprobs=True, top_logprobs=1)
    assert "".join(ch.text for ch in chunks) == whole.text
    assert [t for ch in chunks for t in ch.token_ids] == whole.tokens
    got = [e.logprob for ch in chunks for e in (ch.logprobs or [])]
    assert got == pytest.approx([e.logprob for e in whole.logprobs], abs=1e-6)
    assert chunks[-1].finish_reason == "length"
    assert all(ch.finish_reason is None for ch in chunks[:-1])


def _prompt_reference(llm: LLM, tokens: list, chunk: int = 32) -> list:
    """log P(token[i+1] | tokens[:i+1]) for every prompt token after the first, the
    prompt evaluated in chunks of 32 (as the engine does when scoring)."""
    out = []
    with Context(llm.model, n_ctx=512, n_batch=512, n_threads=THREADS) as ctx:
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk]
            b = Batch(len(part))
            for j, t in enumerate(part):
                b.add(t, start + j, 0, True)
            ctx.decode(b)
            for j in range(len(part)):
                p = start + j
                if p + 1 < len(tokens):
                    out.append(_log_softmax(ctx.logits(j))[tokens[p + 1]])
    return out


def test_prompt_scoring_echo(any_llm):
    text = "The quick brown fox jumps over the lazy dog. " * 5   # > 32 tokens: several chunks
    tokens = any_llm.tokenize(text)
    c = any_llm.complete(text, echo=True, logprobs=True, max_tokens=0)
    assert c.tokens == [] and c.finish_reason == "length"
    assert c.text == text
    assert [e.id for e in c.prompt_logprobs] == tokens[1:]
    ref = _prompt_reference(any_llm, tokens)
    got = [e.logprob for e in c.prompt_logprobs]
    assert got == pytest.approx(ref, abs=1e-4)
    assert sum(got) == pytest.approx(sum(ref), abs=1e-3)
    # a sensible text scores higher than a shuffled one
    shuffled = " ".join(reversed(text.split()))
    worse = any_llm.complete(shuffled, echo=True, logprobs=True, max_tokens=0)
    assert sum(e.logprob for e in worse.prompt_logprobs) < sum(got)


def test_max_tokens_zero_generates_nothing(smol):
    c = smol.complete(PROMPT, max_tokens=0)
    assert c.text == "" and c.tokens == [] and c.finish_reason == "length"
    assert list(smol.stream(PROMPT, max_tokens=0)) == []


# --------------------------------------------------------------------------- n completions


def test_n_greedy_all_equal_the_single_answer(any_llm):
    # Both from an empty cache: a prompt-cache hit evaluates the prompt in another batch shape,
    # and on Gemma float rounding then moves a greedy token now and then (docs/batching.md).
    any_llm.reset()
    single = any_llm.complete(PROMPT, max_tokens=12)
    any_llm.reset()
    many = any_llm.complete(PROMPT, max_tokens=12, n=3)
    assert isinstance(many, list) and len(many) == 3
    assert [c.index for c in many] == [0, 1, 2]
    assert all(c.text == single.text and c.tokens == single.tokens for c in many)


def test_n_sampled_differ_and_are_reproducible(smol):
    kw = dict(max_tokens=16, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=1234, n=3)
    # Same seed and same KV state (a prompt-cache hit evaluates the prompt in another batch
    # shape, and float rounding then moves a sampled token now and then: docs/batching.md).
    smol.reset()
    a = smol.complete("Write a word:", **kw)
    smol.reset()
    b = smol.complete("Write a word:", **kw)
    assert [c.text for c in a] == [c.text for c in b]          # reproducible with a seed
    assert len({c.text for c in a}) > 1                          # the answers differ


def test_n_evaluates_the_prompt_once(smol):
    smol.reset()
    before = smol.metrics()["prompt_tokens_total"]
    many = smol.complete(PROMPT + " red,", max_tokens=4, n=4)
    n_prompt = len(smol.tokenize(PROMPT + " red,"))
    assert many[0].timings.prompt_n == n_prompt
    assert all(c.timings.prompt_n == 0 and c.timings.cached_n == n_prompt for c in many[1:])
    assert smol.metrics()["prompt_tokens_total"] - before == n_prompt


def test_n_in_chat_and_stream(smol):
    msgs = [{"role": "user", "content": "Say hi."}]
    # Both calls from an empty cache, so both take the same path: after a prompt-cache hit the
    # copies' KV cells lie elsewhere and float rounding can move a near-tie greedy token in one
    # copy (" there," vs " there!" here on an AMD EPYC; docs/batching.md).
    smol.reset()
    answers = smol.chat(msgs, max_tokens=6, n=2)
    assert len(answers) == 2 and answers[0].text == answers[1].text
    smol.reset()
    chunks = list(smol.chat(msgs, max_tokens=6, n=2, stream=True))
    texts = ["".join(ch.text for ch in chunks if ch.index == i) for i in range(2)]
    assert texts == [answers[0].text, answers[1].text]


def test_n_bad_values(smol):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n must be"):
            smol.complete(PROMPT, n=bad)
