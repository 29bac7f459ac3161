"""Engine hardening, round three (issue 29): every request ends exactly once.

* A request group's leader that ends before its prompt is shared (the KV-full victim, a media
  failure, a DecodeError) ends its not-yet-forked followers too: same outcome, an event each,
  slots freed.  Engine.reset() (and so LLM.close()) ends the followers of queued leaders.
* Engine.step(events) appends into the caller's list: what a step produced before it raised
  is not lost.
* LLM.embed splits its inputs into rounds that fit the batch and the KV memory.
* echo with n > 1: every choice scores the prompt.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyllama import LLM, Context, Engine, GenerationRequest, Model, SamplerChain
from pyllama.errors import ContextLengthError


@pytest.fixture(scope="module")
def model(tiny_model_path):
    m = Model(str(tiny_model_path))
    yield m
    m.close()


def _greedy(model):
    return SamplerChain(model.vocab).add_greedy()


def _prompt(n, start=100):
    return [start + (7 * i) % 900 for i in range(n)]


def _assert_all_over(engine, reqs):
    """Nothing left: every request has its outcome, no slot is held, nothing is queued."""
    assert all(r.done for r in reqs), [(r, r.finish_reason) for r in reqs]
    assert engine.requests() == []
    slots = engine.slot_info()
    assert slots and not any(s["busy"] for s in slots), slots
    assert not engine.busy


def test_kv_full_victim_leader_ends_its_unforked_followers(model):
    """The KV memory fills while a leader is still evaluating its prompt: it is the victim
    (ContextLengthError), and its follower, which never got the prompt, ends with the same
    error and an event, instead of keeping its slot forever."""
    ctx = Context(model, n_ctx=256, n_batch=32, n_seq_max=3, n_threads=1)
    eng = Engine(ctx)
    gen = GenerationRequest(_prompt(10), _greedy(model), max_tokens=120, ignore_eos=True)
    eng.submit(gen)
    for _ in range(50):
        eng.step()
    assert gen.running and gen.n_tokens > 40
    leader = GenerationRequest(_prompt(240, 200), _greedy(model), max_tokens=4)
    follower = GenerationRequest(_prompt(240, 200), _greedy(model), max_tokens=4)
    leader.add_follower(follower)
    eng.submit(leader)
    events = []
    for _ in range(40):
        events += eng.step()
        if leader.done:
            break
    assert leader.finish_reason == "error" and isinstance(leader.error, ContextLengthError), leader.error
    assert leader.error.retryable          # other sequences hold the cells: a retry may succeed
    assert follower.finish_reason == "error"
    assert follower.error is leader.error
    ended = [(r, reason) for r, _, reason in events if reason is not None]
    assert (leader, "error") in ended and (follower, "error") in ended
    assert ended.count((follower, "error")) == 1          # exactly once
    assert not follower.running
    while eng.busy:
        events += eng.step()
    assert gen.finish_reason == "length"
    _assert_all_over(eng, [gen, leader, follower])
    ctx.close()


def test_reset_ends_the_followers_of_queued_leaders(model):
    """A leader waiting for slots is queued with its followers nowhere else: reset() (what
    LLM.close() and Scheduler.reset() run) must end them too."""
    ctx = Context(model, n_ctx=256, n_batch=32, n_seq_max=2, n_threads=1)
    eng = Engine(ctx)
    running = GenerationRequest(_prompt(8), _greedy(model), max_tokens=50, ignore_eos=True)
    eng.submit(running)
    eng.step()
    leader = GenerationRequest(_prompt(12, 300), _greedy(model), max_tokens=5)
    follower = GenerationRequest(_prompt(12, 300), _greedy(model), max_tokens=5)
    leader.add_follower(follower)
    eng.submit(leader)
    eng.step()
    assert running.running and not leader.running and eng.n_waiting == 1   # needs 2 free slots
    eng.reset()
    assert leader.finish_reason == follower.finish_reason == running.finish_reason == "cancelled"
    _assert_all_over(eng, [running, leader, follower])
    ctx.close()


def test_step_appends_into_the_callers_list_before_raising(model):
    """A step that raises keeps the events it produced before the exception in the list the
    caller passed (here: a cancellation collected at the start of the step, then the decode
    refuses because a zero-copy logits view is alive)."""
    ctx = Context(model, n_ctx=256, n_batch=32, n_seq_max=2, n_threads=1)
    eng = Engine(ctx)
    a = GenerationRequest(_prompt(8), _greedy(model), max_tokens=20, ignore_eos=True)
    b = GenerationRequest(_prompt(8, 400), _greedy(model), max_tokens=20, ignore_eos=True)
    eng.submit(a)
    eng.submit(b)
    first = eng.step()                          # the no-argument form still works
    assert isinstance(first, list) and {r for r, _, _ in first} <= {a, b}
    mine = []
    assert eng.step(mine) is mine               # returns the list it filled
    a.cancel_requested = True
    view = ctx.logits(-1, copy=False)           # decode() refuses while this is alive
    events = []
    with pytest.raises(BufferError):
        eng.step(events)
    assert events == [(a, "", "cancelled")]
    del view
    while eng.busy:
        eng.step(events)
    assert b.finish_reason == "length"
    _assert_all_over(eng, [a, b])
    with pytest.raises(TypeError):
        eng.step(())
    ctx.close()


@pytest.mark.parametrize("kv_unified", [False, True])
def test_embed_splits_inputs_that_do_not_fit_one_round(tiny_model_path, kv_unified):
    """4 inputs with n_batch=300: each fits, together they do not (before: KVCacheFullError
    with kv_unified=False, the server's 500).  The rows match each input embedded alone, and a
    text over the limit is a ValueError naming it."""
    texts = ["word " * 250, "short text", "several words " * 60, "another " * 280]
    with LLM(str(tiny_model_path), embedding=True, n_ctx=512, n_batch=300, n_threads=1,
             kv_unified=kv_unified) as llm:
        lengths = [len(llm.vocab.tokenize(t)) for t in texts]
        assert max(lengths) <= 300 < sum(lengths)
        vecs = llm.embed(texts)
        alone = np.stack([llm.embed(t) for t in texts])
        with pytest.raises(ContextLengthError, match="300"):
            llm.embed(["word " * 400])
    assert vecs.shape == (4, 64) and np.isfinite(vecs).all()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    # Batch composition changes rounding only (see test_embed_native.py); distinct texts
    # are far apart.
    assert np.abs(vecs - alone).max() < 0.05


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_with_n_gives_every_choice_the_prompt_logprobs(tiny_model_path, max_tokens):
    with LLM(str(tiny_model_path), n_ctx=256, n_parallel=2, n_threads=1, temperature=0) as llm:
        choices = llm.complete("The quick brown fox", echo=True, logprobs=True, max_tokens=max_tokens, n=2)
        alone = llm.complete("The quick brown fox", echo=True, logprobs=True, max_tokens=max_tokens)
    assert len(choices) == 2
    assert alone.prompt_logprobs
    for c in choices:
        assert c.prompt_logprobs is not None
        assert [(e.token, e.logprob) for e in c.prompt_logprobs] == \
               [(e.token, e.logprob) for e in alone.prompt_logprobs]


def _stop_case(llm, prompt):
    """A stop string made of two whole tokens in the middle of the greedy output (and not
    earlier in it): returns (stop, k) with the stop string starting at generated token k."""
    full = llm.complete(prompt, max_tokens=24, temperature=0, ignore_eos=True, logprobs=True)
    pieces = [e.token for e in full.logprobs]
    assert "".join(pieces) == full.text
    for k in range(4, len(pieces) - 3):
        stop = pieces[k] + pieces[k + 1]
        before = "".join(pieces[:k])
        if stop.strip() and stop not in before + pieces[k] and (before + stop).find(stop) == len(before):
            return stop, k
    pytest.skip("no usable stop string in this output")


def test_logprobs_leave_out_a_cut_stop_string(tiny_model_path):
    """Log-probability entries go with their text: the tokens of a stop string that was cut
    have none (before: they were listed, streamed and not); `tokens` keeps them, as
    llama-server's `tokens` does."""
    with LLM(str(tiny_model_path), n_ctx=256, n_threads=1, temperature=0) as llm:
        prompt = "Once upon a time"
        stop, k = _stop_case(llm, prompt)
        c = llm.complete(prompt, max_tokens=24, temperature=0, ignore_eos=True, logprobs=True, stop=[stop])
        assert c.finish_reason == "stop"
        assert "".join(e.token for e in c.logprobs) == c.text
        assert len(c.logprobs) == k
        assert len(c.tokens) == k + 2            # the stop string's two tokens included
        chunks = list(llm.stream(prompt, max_tokens=24, temperature=0, ignore_eos=True, logprobs=True,
                                 stop=[stop], chunks=True))
        streamed = [e for ch in chunks for e in (ch.logprobs or [])]
        assert "".join(ch.text for ch in chunks) == c.text
        assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in c.logprobs]
        # every streamed entry arrives with (or after) its text, never before it
        seen_text, seen_lp = "", ""
        for ch in chunks:
            seen_text += ch.text
            seen_lp += "".join(e.token for e in (ch.logprobs or []))
            assert seen_text.startswith(seen_lp)


def test_engine_logprobs_since_returns_only_released_entries(model):
    """The cursor API (what streams read): the entry of a token whose text is held back (it
    may start a stop string) appears only when that text is released."""
    ctx = Context(model, n_ctx=256, n_batch=32, n_seq_max=1, n_threads=1)
    eng = Engine(ctx)
    probe = GenerationRequest(_prompt(6), _greedy(model), max_tokens=16, ignore_eos=True, logprobs=0)
    eng.run([probe])
    piece = lambda t: model.vocab.token_to_piece(t).decode("utf-8", "replace")   # noqa: E731
    pieces = [piece(t) for t in probe.tokens]
    j = next(j for j in range(2, 12) if pieces[j].strip() and pieces[j] not in "".join(pieces[:j]))
    stop = pieces[j] + "\x00"      # starts like token j's text, never completes: held one step
    r = GenerationRequest(_prompt(6), _greedy(model), max_tokens=16, ignore_eos=True, logprobs=0, stop=[stop])
    eng.submit(r)
    held_seen = False
    while not r.done:
        eng.step()
        released = "".join(r.parts_since(0))
        entries = r.logprobs_since(0)
        lp_text = "".join(piece(e[0]) for e in entries)
        assert released.startswith(lp_text) and lp_text.startswith(released[:len(lp_text)])
        if len(entries) < len(r.tokens):
            held_seen = True
            assert len(r.tokens) == j + 1 and len(entries) == j      # token j's entry waits
            assert r.logprobs == entries and r.logprobs_since(j) == []
    assert held_seen
    assert r.finish_reason == "length" and len(r.logprobs) == len(r.tokens) == 16
    assert [e[0] for e in r.logprobs] == probe.tokens and r.text == probe.text
    # (the prompt came from the cache this time: the same numbers up to rounding)
    np.testing.assert_allclose([e[1] for e in r.logprobs], [e[1] for e in probe.logprobs], atol=1e-5)
    ctx.close()


_CLOSE_RACE = r"""
import random, sys, threading, time
from pyllama import Context, Model
counts = {{"during": 0, "refused": 0, "created": 0}}
for i in range({n}):
    m = Model({path!r})
    started = threading.Event()
    def create():
        started.set()
        while True:
            try:
                Context(m, n_ctx=256, n_batch=64, n_threads=1).close()
                counts["created"] += 1
            except ValueError as e:   # closed before, or while, this context was created
                counts["during" if "being created" in str(e) else "refused"] += 1
                return
    t = threading.Thread(target=create)
    t.start()
    started.wait(10)
    time.sleep(random.uniform(0, 0.004))   # close at a random moment (GIL released meanwhile)
    m.close()
    t.join(30)
    assert not t.is_alive(), "Context creation hangs after Model.close()"
    assert m.closed
print("DONE", counts)
"""


def test_model_close_races_context_creation(tiny_model_path, run_python):
    """Model.close() from one thread while another creates Contexts on it, many times: the
    creation either completes (the weights are freed when that context closes) or raises
    ValueError; never a use-after-free in llama_init_from_model (before: SIGSEGV)."""
    proc = run_python(_CLOSE_RACE.format(n=100, path=str(tiny_model_path)), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DONE" in proc.stdout


# ---- multimodal limits (tests/tiny_mmproj.py) ----------------------------------------------


def _png(width, height, *, depth=8, color=2, rows=None):
    """A PNG with an all-zero image of the declared size, compressed row by row (a 255 KB
    file for 88M RGB pixels: a decompression bomb), or with `rows` raw bytes when given."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    z = zlib.compressobj(9)
    if rows is None:
        row = bytes(1 + (width * channels * depth + 7) // 8)
        idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    else:
        idat = z.compress(rows) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def mm_pair(tmp_path_factory, tiny_model_path):
    from pyllama import _core
    from tiny_mmproj import make_tiny_mmproj

    if not _core.mtmd_available():
        pytest.skip("built without mtmd")
    proj = make_tiny_mmproj(tmp_path_factory.mktemp("mmproj") / "mmproj.gguf")
    m = Model(str(tiny_model_path))
    yield m, proj
    m.close()


def test_png_bomb_is_refused_before_decoding(mm_pair):
    """A ~255 KB PNG that inflates to 250 MiB of RGB (within max_pixels) is refused from its
    header, with the numbers; so is a 16-bit RGBA header; ordinary images still load."""
    from pyllama import _core
    from pyllama.errors import MediaError

    m, proj = mm_pair
    mm = _core.Multimodal(m, str(proj), n_threads=1)
    try:
        bomb = _png(9400, 9400)
        assert len(bomb) < 300_000 and 9400 * 9400 <= mm.max_pixels
        with pytest.raises(MediaError, match=r"9400x9400.*max_image_bytes=268435456") as e:
            mm.load(bomb)
        assert str(len(bomb)) in str(e.value)
        with pytest.raises(MediaError, match="16-bit, 4 channel"):   # 8 bytes a pixel
            mm.load(_png(6000, 6000, depth=16, color=6))
        small = mm.load(_png(32, 16))
        assert (small.width, small.height) == (32, 16)
        # The limit is a parameter: a tighter one refuses the small image too, None lifts it.
        tight = _core.Multimodal(m, str(proj), n_threads=1, max_image_bytes=1000)
        with pytest.raises(MediaError, match="max_image_bytes=1000"):
            tight.load(_png(32, 16))
        tight.close()
        with pytest.raises(ValueError):
            _core.Multimodal(m, str(proj), max_image_bytes=0)
    finally:
        mm.close()


def test_encode_cache_is_bounded_by_bytes(mm_pair):
    """Entries of embeddings leave the cache (least recently used first) once their bytes
    pass cache_bytes, whatever cache_size allows."""
    from pyllama import _core

    m, proj = mm_pair
    probe = _core.Multimodal(m, str(proj), n_threads=1)
    img = probe.load(_png(24, 24))
    p = probe.tokenize(probe.marker + " what?", [img])
    one = probe.encode(p, p.spans[0][2]).nbytes
    probe.close()
    mm = _core.Multimodal(m, str(proj), n_threads=1, cache_size=100, cache_bytes=2 * one + one // 2)
    try:
        prompts = []
        for i in range(4):
            rows = bytes([0] + [i * 40 + 7] * (24 * 3)) * 24
            b = mm.load(_png(24, 24, rows=rows))
            prompts.append(mm.tokenize(mm.marker + " what?", [b]))
        for q in prompts:
            mm.encode(q, q.spans[0][2])
        info = mm.cache_info()
        assert info["misses"] == 4 and info["size"] == 2 and info["bytes"] == 2 * one
        assert info["capacity_bytes"] == 2 * one + one // 2
        mm.encode(prompts[3], prompts[3].spans[0][2])    # the most recent: still cached
        mm.encode(prompts[0], prompts[0].spans[0][2])    # the oldest: evicted, encoded again
        info = mm.cache_info()
        assert info["hits"] == 1 and info["misses"] == 5 and info["bytes"] <= info["capacity_bytes"]
        mm.clear_cache()
        assert mm.cache_info()["bytes"] == 0
        # An entry larger than the whole cache is not cached at all.
        small = _core.Multimodal(m, str(proj), n_threads=1, cache_bytes=one - 1)
        q = small.tokenize(small.marker + " what?", [small.load(_png(24, 24))])
        small.encode(q, q.spans[0][2])
        assert small.cache_info()["size"] == 0 and small.cache_info()["bytes"] == 0
        small.close()
    finally:
        mm.close()


def test_media_failure_of_a_leader_ends_its_followers(mm_pair):
    """A leader whose image cannot be evaluated (here: its projector was closed) fails alone
    in its step, and its unforked followers end with the same error, each with an event; the
    other request goes on.  (Before: the closed projector's ValueError escaped the step, and a
    failed leader left its followers holding their slots.)"""
    from pyllama import _core

    m, proj = mm_pair
    mm = _core.Multimodal(m, str(proj), n_threads=1)
    prompt = mm.tokenize("look: " + mm.marker + " what is it?", [mm.load(_png(24, 24))])
    ctx = Context(m, n_ctx=512, n_batch=64, n_ubatch=64, n_seq_max=3, n_threads=1)
    eng = Engine(ctx)
    other = GenerationRequest(_prompt(8), _greedy(m), max_tokens=6, ignore_eos=True)
    leader = GenerationRequest(prompt, _greedy(m), max_tokens=4)
    follower = GenerationRequest(prompt, _greedy(m), max_tokens=4)
    leader.add_follower(follower)
    eng.submit(other)
    eng.submit(leader)
    mm.close()
    events = []
    while eng.busy:
        events += eng.step()
    assert leader.finish_reason == follower.finish_reason == "error"
    assert isinstance(leader.error, ValueError) and follower.error is leader.error
    assert [r for r, _, reason in events if reason == "error"] == [leader, follower]
    assert other.finish_reason == "length"
    _assert_all_over(eng, [other, leader, follower])
    ctx.close()
