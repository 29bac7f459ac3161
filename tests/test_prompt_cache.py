"""The host-memory prompt cache (LLM(cache_ram_mib=...), pyllama serve --cache-ram: llama-server's
server_prompt_cache): a slot's prompt is copied to RAM before its KV cells go to another prompt,
and loaded back into the slot a later prompt takes when it starts with it.

The measure of "loaded back right" is the slot's own cache: a prompt re-run after another one
in between must give the tokens it gives when re-run straight after itself (the same cached
prefix, the same single token evaluated), and on recurrent models the fresh-context tokens.
Without the cache, the prompt in between overwrites the slot and everything is re-evaluated
(cached_n 0), which every test here checks as well."""

from __future__ import annotations

import logging
import threading

import pytest

from pyllama import LLM
from test_recurrent import _reference, _tok
from tiny_recurrent import make_tiny_lfm2, make_tiny_mamba

A = "Once upon a time in a land far away, there lived a brave knight who crossed the mountains. " * 2
B = "The quick brown fox jumps over the lazy dog while the cat watches from the window. " * 2
C = "In the beginning the universe was created, which made a lot of people very angry. " * 2


def _run(llm: LLM, prompts, **kw) -> list:
    return [llm.complete(p, max_tokens=6, **kw) for p in prompts]


@pytest.mark.parametrize("kv_unified", [True, False])
def test_a_prompt_comes_back_from_ram(tiny_model_path, kv_unified):
    """One slot, A then B then A: with the cache the second A starts from A's state (all of
    its prompt but the last token), as A straight after A does; without it, from nothing."""
    kw = dict(n_ctx=512, n_parallel=1, temperature=0, kv_unified=kv_unified)
    with LLM(str(tiny_model_path), **kw) as plain:
        a1, a_again = _run(plain, [A, A])
        assert a_again.timings.cached_n > 0          # (the slot's own cache)
        _, _, a_after_b = _run(plain, [A, B, A])
        assert a_after_b.timings.cached_n <= 1 and plain.prompt_cache_info() is None    # (BOS)
    with LLM(str(tiny_model_path), cache_ram_mib=16, **kw) as llm:
        first, b, again = _run(llm, [A, B, A])
        assert first.tokens == a1.tokens
        assert again.timings.cached_n == a_again.timings.cached_n
        assert again.tokens == a_again.tokens
        # B went to RAM when A came back (the slot was about to lose it): B is cached too.
        b_again = llm.complete(B, max_tokens=6)
        assert b_again.timings.cached_n > 0 and b_again.tokens == _run(llm, [B])[0].tokens
        info = llm.prompt_cache_info()
        assert info["saved"] >= 2 and info["restored"] == 2
        assert info["limit_bytes"] == 16 * 1024 * 1024 and info["limit_tokens"] == llm.n_ctx


def test_idle_slots_are_saved_and_freed_on_a_unified_cache(tiny_model_path):
    """cache_idle_slots (the default): when a request starts, every idle slot is copied to RAM
    and, on a unified KV cache, emptied; the prompt it held still comes back."""
    with LLM(str(tiny_model_path), n_ctx=512, n_parallel=2, temperature=0, cache_ram_mib=16) as llm:
        a1 = llm.complete(A, max_tokens=6)
        llm.complete(B, max_tokens=6)                 # starts in the other slot: A's slot is idle
        assert sorted(s["n_cached"] for s in llm.slots())[0] == 0     # A's slot was emptied
        assert llm.prompt_cache_info()["entries"] >= 1
        again = llm.complete(A, max_tokens=6)
        assert again.timings.cached_n == len(llm.tokenize(A)) - 1
        assert again.tokens == llm.complete(A, max_tokens=6).tokens
        assert a1.text  # (the first answer ran normally)
    with LLM(str(tiny_model_path), n_ctx=512, n_parallel=2, temperature=0, cache_ram_mib=16,
             cache_idle_slots=False) as llm:
        llm.complete(A, max_tokens=6)
        llm.complete(B, max_tokens=6)                 # (the empty slot: nothing is overwritten...)
        assert llm.prompt_cache_info()["saved"] == 0
        llm.complete(C, max_tokens=6)                 # (...A's slot is the least recently used)
        assert llm.prompt_cache_info()["saved"] == 1   # only what was about to be overwritten
        assert llm.complete(A, max_tokens=6).timings.cached_n == len(llm.tokenize(A)) - 1


@pytest.mark.parametrize("kind", ["mamba", "lfm2"])
def test_recurrent_models_come_back_exactly(vocab_dir, tmp_path, kind):
    """A recurrent (Mamba) or hybrid (LFM2) state cannot drop a suffix: an entry is used only
    when the new prompt extends all of it, or from one of its checkpoints; the tokens are the
    fresh-context ones either way."""
    path = (make_tiny_mamba if kind == "mamba" else make_tiny_lfm2)(tmp_path / f"{kind}.gguf")
    with LLM(str(path), n_ctx=512, n_parallel=1, temperature=0, max_tokens=8, cache_ram_mib=16) as llm:
        model = llm.model
        first = _tok(model, "Once upon a time there was a little robot who lived in a")
        other = _tok(model, "The quick brown fox jumps over the lazy dog")
        out1 = llm.complete(first)
        assert out1.tokens == _reference(model, first, 8)
        llm.complete(other)
        extended = first + out1.tokens + _tok(model, " and then", add_special=False)
        got = llm.complete(extended)
        assert got.tokens == _reference(model, extended, 8)
        assert got.timings.cached_n == len(first) + 8 - 1     # the whole entry
        llm.complete(other)
        same = llm.complete(first)                            # from the entry's checkpoint
        assert same.tokens == out1.tokens
        assert 0 < same.timings.cached_n < len(first)
        departs = first[:6] + _tok(model, " dog who liked to", add_special=False)
        assert llm.complete(departs).tokens == _reference(model, departs, 8)


def test_size_limit_drops_the_oldest(smollm2_path):
    """SmolLM2 keeps ~23 KB per token: a 3 MiB cache holds one of these ~2 MB prompts, not two."""
    a, b, c = A * 2, B * 2, C * 2
    with LLM(str(smollm2_path), n_ctx=1024, n_parallel=1, temperature=0, cache_ram_mib=3) as llm:
        _run(llm, [a, b, c])          # a saved, then b (a dropped to make room)
        info = llm.prompt_cache_info()
        assert info["saved"] == 2 and info["entries"] == 1 and 1_500_000 < info["bytes"] <= 3 * 1024 * 1024
        assert llm.complete(a, max_tokens=6).timings.cached_n == 0       # gone
        assert llm.complete(c, max_tokens=6).timings.cached_n > 0        # saved as a came in


def test_reset_forgets_it(tiny_model_path):
    with LLM(str(tiny_model_path), n_ctx=512, n_parallel=1, temperature=0, cache_ram_mib=16) as llm:
        _run(llm, [A, B])
        assert llm.prompt_cache_info()["entries"] == 1
        llm.reset()
        assert llm.prompt_cache_info()["entries"] == 0
        assert llm.complete(A, max_tokens=6).timings.cached_n == 0


def test_threads_share_it(tiny_model_path):
    """Four threads, three prompts, two slots: every answer is the one its prompt gives alone."""
    with LLM(str(tiny_model_path), n_ctx=1024, n_parallel=2, temperature=0, cache_ram_mib=16) as llm:
        want = {p: llm.complete(p, max_tokens=6, cache_prompt=False).tokens for p in (A, B, C)}
        errors: list = []

        def worker(k: int) -> None:
            try:
                for i in range(6):
                    p = (A, B, C)[(k + i) % 3]
                    assert llm.complete(p, max_tokens=6, cache_prompt=False).tokens == want[p]
                    llm.complete(p, max_tokens=6)       # (cached paths: must finish, any slot)
            except BaseException as e:   # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        assert llm.prompt_cache_info()["restored"] > 0


def test_events_are_logged(tiny_model_path, caplog):
    with caplog.at_level(logging.INFO, logger="pyllama"):
        with LLM(str(tiny_model_path), n_ctx=512, n_parallel=1, temperature=0, cache_ram_mib=16) as llm:
            _run(llm, [A, B, A])
    text = caplog.text
    assert "updating prompt cache: saving its" in text and "loaded a" in text


def test_a_shared_first_token_does_not_take_a_cached_slot(tiny_model_path):
    """llama-server's slot choice (--slot-prompt-similarity 0.1): a new prompt that shares only
    its BOS with a slot's cached prompt goes to an empty slot, or else to the least recently
    used one, so a prompt coming back still finds itself in its slot (no RAM cache here)."""
    with LLM(str(tiny_model_path), n_ctx=768, n_parallel=3, temperature=0) as llm:
        def cached(prompt: str) -> int:
            return llm.complete(prompt, max_tokens=4).timings.cached_n

        whole = {p: len(llm.tokenize(p)) - 1 for p in (A, B, C)}
        assert [cached(p) for p in (A, B, C)] == [0, 0, 0]       # each to an empty slot
        assert cached(A) == whole[A]                              # B and C left A's slot alone
        d = "Tell me about the lighthouse keeper and the message in the bottle. " * 2
        assert cached(d) <= 1                # every slot holds a prompt: B's is the least recently used
        assert cached(C) == whole[C] and cached(A) == whole[A]
        assert cached(B) <= 1                                      # (B's slot went to d)
        # A prompt that extends a cached one by less than 90% of itself goes to that slot.
        assert cached(A + "And then what happened?") >= whole[A] - 2     # (the last token may merge)


def test_slot_prompt_similarity_zero_is_always_the_least_recently_used(tiny_model_path):
    """slot_prompt_similarity=0 (llama-server's "disabled"): never by prefix, always LRU; the
    default finds the cached prompt."""
    kw = dict(n_ctx=512, n_parallel=2, temperature=0)
    with LLM(str(tiny_model_path), **kw) as default, LLM(str(tiny_model_path), slot_prompt_similarity=0, **kw) as lru:
        for llm in (default, lru):
            llm.complete(A, max_tokens=4)
            llm.complete(B, max_tokens=4)
        assert default.complete(A, max_tokens=4).timings.cached_n == len(default.tokenize(A)) - 1
        assert lru.complete(A, max_tokens=4).timings.cached_n == len(lru.tokenize(A)) - 1   # (A's is the LRU)
        assert lru.complete(A, max_tokens=4).timings.cached_n <= 1    # B's slot is now the LRU one


@pytest.mark.parametrize("kw, error", [
    ({"cache_ram_mib": -2}, ValueError), ({"cache_ram_mib": "8"}, ValueError),
    ({"cache_ram_mib": True}, ValueError), ({"cache_ram_mib": 8, "cache_idle_slots": "yes"}, TypeError),
    ({"slot_prompt_similarity": 1.5}, ValueError), ({"slot_prompt_similarity": "0.1"}, ValueError),
    ({"slot_prompt_similarity": -0.1}, ValueError), ({"slot_prompt_similarity": float("nan")}, ValueError),
])
def test_bad_settings(tiny_model_path, kw, error):
    with pytest.raises(error, match="cache_|slot_prompt_similarity"):
        LLM(str(tiny_model_path), **kw)


@pytest.mark.parametrize("cache_ram", [None, "0"])
def test_server_cache_ram(tiny_model_path, cache_ram):
    """pyllama serve has llama-server's --cache-ram 8192 by default: with one slot, a prompt
    that comes back after another one is mostly cached (/completion's timings.cache_n)."""
    import httpx

    from server_process import ServerProcess

    extra = [] if cache_ram is None else ["--cache-ram", cache_ram]
    server = ServerProcess("-m", str(tiny_model_path), "-np", "1", "-c", "512", "--temp", "0", "--verbose", *extra)
    try:
        url = server.wait_ready()
        with httpx.Client(base_url=url, timeout=60) as client:
            answers = [client.post("/completion", json={"prompt": p, "n_predict": 4}).json() for p in (A, B, A)]
        cache_n = answers[2]["timings"]["cache_n"]
        if cache_ram is None:
            assert cache_n > 20
            assert "prompt cache is enabled, size limit: 8192 MiB" in server.stderr
            assert "loaded a" in server.stderr
        else:
            assert cache_n <= 1
            assert "prompt cache is disabled" in server.stderr
    finally:
        server.stop()
