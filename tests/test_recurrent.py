"""Recurrent and hybrid models in the batched engine (issue 28).

A recurrent state (Mamba) or a hybrid's (LFM2: short convolutions plus attention) cannot drop
the end of a sequence: llama_memory_seq_rm(seq, p0 > 0, -1) returns False and leaves the
state as it was.  The engine's prompt cache, preemption, n > 1 forks and speculation must
never continue from a state that still holds removed tokens: the prompt cache is reused only
where the new prompt extends all of it, or from a checkpoint (the state saved a few tokens
before an earlier prompt's end), else the prompt is evaluated from the start; speculation is
off (one warning).

Every test compares greedy tokens with a reference: the prompt decoded in a fresh context,
one token at a time, argmax of the logits (tests/tiny_recurrent.py's weights make the history
matter, so a stale state changes the text; before the fix most of these failed with llama.cpp's
"inconsistent sequence positions" DecodeError).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pyllama import LLM
from pyllama._core import Batch, Context, Engine, GenerationRequest, Model, SamplerChain
from pyllama.errors import DecodeAborted
from tiny_recurrent import make_tiny_lfm2, make_tiny_mamba

N_GEN = 12
PROMPT = "Once upon a time there was a little robot who lived in a"


@pytest.fixture(scope="module")
def model_paths(vocab_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("recurrent")
    return {"mamba": make_tiny_mamba(base / "mamba.gguf"), "lfm2": make_tiny_lfm2(base / "lfm2.gguf")}


@pytest.fixture(scope="module", params=["mamba", "lfm2"])
def path(request, model_paths):
    return model_paths[request.param]


@pytest.fixture(scope="module")
def model(path):
    with Model(path) as m:
        yield m


def _reference(model: Model, tokens: list, n: int = N_GEN) -> list:
    """Greedy tokens after `tokens`, decoded in a fresh context (one sequence, nothing cached)."""
    with Context(model, n_ctx=512, n_batch=512, n_seq_max=1, n_threads=2) as ctx:
        batch = Batch(512, 1)
        batch.add_sequence(tokens, 0, 0, True)
        ctx.decode(batch)
        out = []
        for pos in range(len(tokens), len(tokens) + n):
            t = int(np.argmax(np.asarray(ctx.logits(-1))))
            out.append(t)
            batch.clear()
            batch.add(t, pos, 0, True)
            ctx.decode(batch)
        return out


def _greedy(model: Model) -> SamplerChain:
    return SamplerChain(model.vocab).add_greedy()


def _tok(model: Model, text: str, add_special: bool = True) -> list:
    return model.vocab.tokenize(text, add_special=add_special)


# --------------------------------------------------------------------------- the premise


def test_memory_cannot_drop_a_suffix(model, tiny_model_path):
    """What the engine copes with: a partial kv_seq_rm fails (and says so) on these models,
    a whole-sequence one works; the engine knows it (truncatable False)."""
    assert model.is_recurrent or model.is_hybrid
    with Context(model, n_ctx=128, n_seq_max=2, n_threads=2) as ctx:
        assert not ctx.kv_can_truncate()
        assert not Engine(ctx).truncatable
        batch = Batch(8, 1)
        batch.add_sequence(_tok(model, "one two three"), 0, 0, True)
        ctx.decode(batch)
        n = ctx.kv_seq_pos_max(0) + 1
        assert ctx.kv_seq_rm(0, 2, -1) is False
        assert ctx.kv_seq_pos_max(0) == n - 1     # unchanged
        assert ctx.kv_seq_rm(0, -1, -1) is True
        assert ctx.kv_seq_pos_max(0) == -1
    with Model(tiny_model_path) as llama, Context(llama, n_ctx=128, n_threads=2) as ctx:
        assert not llama.is_recurrent and not llama.is_hybrid
        assert ctx.kv_can_truncate() and Engine(ctx).truncatable


# --------------------------------------------------------------------------- prompt cache


def _second_prompt(model: Model, first: list, first_out: list, case: str) -> list:
    if case == "extends":       # the cache (prompt + answer) is a prefix of it
        return first + first_out + _tok(model, " and then", add_special=False)
    if case == "same":          # the same prompt again (the cache has it all, and more)
        return list(first)
    if case == "tail":          # departs in the last tokens of the first prompt
        return first[:-2] + _tok(model, " big old house", add_special=False)
    if case == "middle":        # departs in the middle
        return first[:6] + _tok(model, " dog who liked to", add_special=False)
    assert case == "prefix"     # a prefix of the first prompt
    return first[:7]


# How much of the second prompt the cache gives: all of the cache when the prompt extends it,
# the checkpoint 4 tokens before the first prompt's end when it agrees up to there, else none.
@pytest.mark.parametrize("case", ["extends", "same", "tail", "middle", "prefix"])
def test_prompt_cache_greedy_equal(path, model, case):
    first = _tok(model, PROMPT)
    with LLM(path, n_ctx=512, n_parallel=1, n_threads=2, temperature=0, max_tokens=N_GEN) as llm:
        out1 = llm.complete(first)
        assert out1.tokens == _reference(llm.model, first)
        second = _second_prompt(model, first, out1.tokens, case)
        want = _reference(llm.model, second)
        got = llm.complete(second)
        assert got.tokens == want, case
        expected_cached = {"extends": len(first) + N_GEN - 1, "same": len(first) - 4, "tail": len(first) - 4,
                           "middle": 0, "prefix": 0}[case]
        assert got.timings.cached_n == expected_cached
        assert llm._engine.n_checkpoints_restored == (1 if case in ("same", "tail") else 0)
        # Without the prompt cache: the same text, everything evaluated.
        uncached = llm.complete(second, cache_prompt=False)
        assert uncached.tokens == want and uncached.timings.cached_n == 0


def test_many_turns_reuse_the_cache(path, model):
    """A conversation-like run: each prompt extends the last one's prompt and answer, or goes
    back to an earlier point; every answer is the fresh-context answer."""
    with LLM(path, n_ctx=512, n_parallel=1, n_threads=2, temperature=0, max_tokens=6) as llm:
        history = _tok(model, "Hello there, robot.")
        saved = []
        for turn in range(4):
            out = llm.complete(history)
            assert out.tokens == _reference(llm.model, history, 6), turn
            saved.append(list(history))
            history = history + out.tokens + _tok(model, f" Question {turn}:", add_special=False)
        for earlier in (saved[1], saved[0] + _tok(model, " Bye", add_special=False)):
            assert llm.complete(earlier).tokens == _reference(llm.model, earlier, 6)


def test_without_checkpoints(path, model):
    """n_checkpoints = 0: the same prompt again is evaluated from the start, same text."""
    first = _tok(model, PROMPT)
    with LLM(path, n_ctx=512, n_parallel=1, n_threads=2, temperature=0, max_tokens=N_GEN) as llm:
        llm._engine.n_checkpoints = 0
        want = _reference(llm.model, first)
        assert llm.complete(first).tokens == want
        again = llm.complete(first)
        assert again.tokens == want and again.timings.cached_n == 0
        assert llm._engine.n_checkpoints_saved == 0


# --------------------------------------------------------------------------- n > 1, batches


def test_n_choices_equal_separate_runs(path, model):
    """n > 1 forks the evaluated prompt (whole-sequence copies of the state): greedy choices
    are the reference; sampled choice i is the separate run with seed + i."""
    prompt = _tok(model, PROMPT)
    with LLM(path, n_ctx=512, n_parallel=4, n_threads=2, max_tokens=N_GEN) as llm:
        want = _reference(llm.model, prompt)
        assert [c.tokens for c in llm.complete(prompt, n=3, temperature=0)] == [want] * 3
        sampled = llm.complete(prompt, n=3, temperature=1.0, seed=1234)
        for i, choice in enumerate(sampled):
            llm.reset()
            assert llm.complete(prompt, temperature=1.0, seed=1234 + i).tokens == choice.tokens, i
        assert len({tuple(c.tokens) for c in sampled}) > 1


def test_batch_equals_each_alone(path, model):
    """Prompts sharing prefixes (evaluated once and copied), run together through fewer slots
    than prompts, each equal to the prompt alone."""
    texts = [PROMPT, PROMPT + " big", "Once upon a time the sea", "Once upon a time there was a cat",
             "The quick brown fox", PROMPT[:30]]
    with LLM(path, n_ctx=1024, n_parallel=4, n_threads=2, temperature=0, max_tokens=8) as llm:
        outs = llm.generate(texts)
        for text, out in zip(texts, outs):
            assert out.tokens == _reference(llm.model, _tok(model, text), 8), text
        # Again, now with every slot's cache holding something else.
        for text, out in zip(texts, llm.generate(texts[::-1])[::-1]):
            assert out.tokens == _reference(llm.model, _tok(model, text), 8), text


# --------------------------------------------------------------------------- preemption


def test_preempted_request_resumes_right(model):
    """A paused request gives its slot up to another whose prompt shares a prefix (the slot's
    state is then replaced); when it resumes it must re-evaluate what it held, not continue
    from the other's state."""
    p1 = _tok(model, PROMPT)
    p2 = p1[:8] + _tok(model, " cat who", add_special=False)
    with Context(model, n_ctx=512, n_seq_max=1, n_threads=2) as ctx:
        eng = Engine(ctx)
        a = GenerationRequest(p1, _greedy(model), max_tokens=N_GEN)
        eng.submit(a)
        for _ in range(50):
            if len(a.tokens) >= 4:
                break
            eng.step()
        assert len(a.tokens) >= 4
        a.paused = True
        b = GenerationRequest(p2, _greedy(model), max_tokens=N_GEN)
        eng.run([b])
        assert eng.n_preemptions == 1
        a.paused = False
        eng.run()
        assert a.finish_reason == "length"
        assert b.tokens == _reference(model, p2)
        assert a.tokens == _reference(model, p1)


# --------------------------------------------------------------------------- speculation


def test_speculation_is_warned_off(path, model):
    prompt = _tok(model, "one two three one two three one two three one two")
    with pytest.warns(RuntimeWarning, match="speculative decoding"):
        llm = LLM(path, n_ctx=512, n_parallel=1, n_threads=2, temperature=0, spec_type="ngram-simple", draft_max=4)
    with llm:
        for extra in ("", " three", " three one"):
            tokens = prompt + (_tok(model, extra, add_special=False) if extra else [])
            got = llm.complete(tokens, max_tokens=N_GEN)
            assert got.tokens == _reference(llm.model, tokens)
            assert got.timings.draft_n == 0


def test_recurrent_draft_model_is_warned_off(model_paths, tiny_model_path):
    """A recurrent draft model (same vocabulary as the tiny llama target) cannot drop its
    rejected drafts either: LLM says so and generates plainly."""
    with pytest.warns(RuntimeWarning, match="draft_model is ignored"):
        llm = LLM(tiny_model_path, draft_model=model_paths["mamba"], n_ctx=256, n_threads=2, temperature=0)
    with llm, LLM(tiny_model_path, n_ctx=256, n_threads=2, temperature=0) as plain:
        got = llm.complete(PROMPT, max_tokens=8)
        assert got.timings.draft_n == 0
        assert got.tokens == plain.complete(PROMPT, max_tokens=8).tokens


def test_engine_turns_a_drafting_request_off(model):
    """A request that asks for drafts (here from a drafter that proposes the reference with a
    mistake, so that drafts would be partly rejected) generates plainly, with one warning."""
    prompt = _tok(model, PROMPT)
    want = _reference(model, prompt)

    def drafter(history, limit):
        done = len(history) - len(prompt)
        draft = want[done:done + limit]
        return draft[:-1] + [(draft[-1] + 1) % 100] if draft else []

    with Context(model, n_ctx=512, n_seq_max=1, n_threads=2) as ctx:
        eng = Engine(ctx, spec_cost_model=False)
        reqs = [GenerationRequest(prompt, _greedy(model), max_tokens=N_GEN, draft_max=4, drafter=drafter)
                for _ in range(2)]
        with pytest.warns(RuntimeWarning, match="speculative decoding is off") as record:
            eng.run(reqs)
        assert len(record) == 1          # once per engine
        for r in reqs:
            assert r.tokens == want
        assert eng.n_drafted_total == 0


# --------------------------------------------------------------------------- state, abort


def test_sequence_state_save_and_load(model, tmp_path):
    """A sequence's state (bytes or file) restored into another context continues exactly
    as the original would."""
    prompt = _tok(model, PROMPT)
    want = _reference(model, prompt, 6)
    with Context(model, n_ctx=256, n_seq_max=2, n_threads=2) as ctx:
        batch = Batch(64, 2)
        batch.add_sequence(prompt[:-1], 0, 1, False)
        ctx.decode(batch)
        data = ctx.seq_state_get(1)
        ctx.seq_state_save_file(tmp_path / "seq.bin", 1, prompt[:-1])
    for how in ("bytes", "file"):
        with Context(model, n_ctx=256, n_seq_max=2, n_threads=2) as ctx:
            if how == "bytes":
                ctx.seq_state_set(data, 0)
            else:
                assert ctx.seq_state_load_file(tmp_path / "seq.bin", 0) == prompt[:-1]
            assert ctx.kv_seq_pos_max(0) == len(prompt) - 2
            # The engine takes the restored sequence as what slot 0 holds only when told;
            # decoding by hand: the last prompt token, then greedy.
            out, pos, tok = [], len(prompt) - 1, prompt[-1]
            batch = Batch(8, 1)
            for _ in range(6):
                batch.clear()
                batch.add(tok, pos, 0, True)
                ctx.decode(batch)
                tok = int(np.argmax(np.asarray(ctx.logits(-1))))
                out.append(tok)
                pos += 1
            assert out == want, how


def test_aborted_decode_is_re_evaluated(model):
    """An aborted decode leaves llama.cpp unable to remove what it wrote into a recurrent state
    (it can only empty a whole sequence): the engine empties the sequence and re-evaluates, so
    the text is still the reference.  The aborted prompt starts after a cached prefix, so the
    abort always leaves tokens behind."""
    head = _tok(model, PROMPT)
    prompt = head + _tok(model, " " + " ".join([PROMPT] * 5), add_special=False)
    want = _reference(model, prompt, 4)
    with Context(model, n_ctx=512, n_batch=512, n_ubatch=16, n_seq_max=1, n_threads=1) as ctx:
        for attempt in range(20):
            eng = Engine(ctx)
            eng.run([GenerationRequest(head, _greedy(model), max_tokens=1)])
            r = GenerationRequest(prompt, _greedy(model), max_tokens=4)
            eng.submit(r)
            stop = threading.Event()

            def spam() -> None:
                while not stop.is_set():
                    ctx.abort()
                    time.sleep(0.0005)

            aborted = 0
            t = threading.Thread(target=spam)
            t.start()
            try:
                for _ in range(100):
                    if r.done:
                        break
                    try:
                        eng.step()
                    except DecodeAborted:
                        aborted += 1
                        stop.set()      # one abort is enough: let the rest run
            finally:
                stop.set()
                t.join(5)
            eng.run()
            assert r.finish_reason == "length" and r.tokens == want, attempt
            if aborted:
                return
            eng.reset()
    pytest.skip("no abort landed inside a decode in 20 tries")
