"""One LLM, several callers (issue 18): streams left open, generate, complete, embed, close
and async tasks on one LLM from several threads.  Every valid call completes with the right
result within a bound; none waits on another caller's unread tokens; closing and
interpreter exit never crash.  Each scenario runs in a subprocess (a hang or a crash must
fail the test, not take pytest down), with a hard timeout."""

from __future__ import annotations

import os
import textwrap

import pytest

from conftest import run_python_subprocess

PRELUDE = r"""
import asyncio, os, sys, threading, time
from pyllama import LLM
TINY = os.environ["T_TINY"]
def elapsed(t0): return time.perf_counter() - t0
"""


def run(code: str, tiny: str, timeout: float = 120) -> str:
    proc = run_python_subprocess(PRELUDE + textwrap.dedent(code), timeout=timeout, env={"T_TINY": str(tiny)})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def mid(tiny_model_factory):
    """A few ms per token: an unread stream's 1,000 remaining tokens would take seconds."""
    return tiny_model_factory(n_embd=256, n_layer=4, n_ff=768, n_head=4, n_head_kv=2)


def test_open_stream_does_not_hold_up_other_calls(mid):
    out = run(r"""
    llm = LLM(TINY, n_ctx=2048, n_threads=1, temperature=0, ignore_eos=True)   # one slot
    expected = llm.complete("Story 1:", max_tokens=1000).text
    t0 = time.perf_counter(); llm.complete("warm", max_tokens=20); per20 = elapsed(t0)
    it = llm.stream("Story 1:", max_tokens=1000)
    first = next(it)
    t0 = time.perf_counter()
    c = llm.complete("The number 2 is", max_tokens=1)
    quick = elapsed(t0)
    assert len(c.tokens) == 1
    # the idle stream did not run on: it produced (at most) a token or two meanwhile
    assert it._reqs[0].n_tokens <= 2, it._reqs[0].n_tokens
    assert quick < 10 * per20, (quick, per20)
    # generate() with a shared prefix while the stream is open
    outs = llm.generate(["Shared prefix here: a", "Shared prefix here: b"], max_tokens=5)
    assert len(outs) == 2 and all(len(o.tokens) == 5 for o in outs)
    # the stream resumes where it was and gives the same text as an uninterrupted run
    rest = first + "".join(it)
    assert rest == expected, (rest[:80], expected[:80])
    llm.close()
    print("OK", round(quick, 3), round(per20, 3))
    """, mid)
    assert "OK" in out


def test_many_open_streams_more_than_slots(tiny_model_path):
    out = run(r"""
    llm = LLM(TINY, n_ctx=1024, n_parallel=2, n_threads=1, temperature=0, ignore_eos=True, max_tokens=12)
    prompts = [f"Prompt {i}:" for i in range(6)]
    expected = [llm.complete(p).text for p in prompts]
    streams = [llm.stream(p) for p in prompts]
    pieces = [[] for _ in prompts]
    # interleave: one piece from each stream in turn, 6 streams on 2 slots
    live = set(range(6))
    while live:
        for i in sorted(live):
            try:
                pieces[i].append(next(streams[i]))
            except StopIteration:
                live.discard(i)
    got = ["".join(p) for p in pieces]
    assert got == expected, (got, expected)
    # and a complete() in between never waits for them
    s = llm.stream("Prompt 0:"); next(s)
    assert llm.complete("Prompt 5:").text == expected[5]
    s.close()
    assert len(llm.slots()) == 2 and not any(x["busy"] for x in llm.slots())
    llm.close()
    print("OK")
    """, tiny_model_path)
    assert "OK" in out


def test_mixed_workload_threads_and_async(mid, tiny_model_path):
    out = run(r"""
    llm = LLM(TINY, n_ctx=4096, n_parallel=4, n_threads=1, temperature=0, ignore_eos=True, max_tokens=10,
              embedding=True)
    prompts = [f"Mixed {i}:" for i in range(8)]
    expected = {p: llm.complete(p).text for p in prompts}
    emb_expected = llm.embed(["alpha", "beta"])
    errors, done = [], []
    open_streams = []

    def streamer(k):
        it = llm.stream(prompts[k]); next(it); open_streams.append(it)      # left open
        s = "".join(llm.stream(prompts[(k + 1) % 8]))
        assert s == expected[prompts[(k + 1) % 8]], ("stream", k)

    def completer(k):
        for i in range(3):
            p = prompts[(k + i) % 8]
            assert llm.complete(p).text == expected[p], ("complete", k)

    def generator(k):
        outs = llm.generate(prompts[k:k + 3])
        assert [o.text for o in outs] == [expected[p] for p in prompts[k:k + 3]], ("generate", k)

    def embedder(k):
        import numpy as np
        assert np.allclose(llm.embed(["alpha", "beta"]), emb_expected, atol=1e-5), ("embed", k)

    def asyncer(k):
        async def main():
            got = await asyncio.gather(*(llm.acomplete(p) for p in prompts[k:k + 2]))
            pieces = [x async for x in llm.astream(prompts[k + 2])]
            return [g.text for g in got] + ["".join(pieces)]
        got = asyncio.run(main())
        assert got == [expected[p] for p in prompts[k:k + 3]], ("async", k)

    def wrap(fn, k):
        try:
            fn(k); done.append(fn.__name__)
        except BaseException as e:
            errors.append(repr(e))

    jobs = [streamer, completer, generator, embedder, asyncer] * 2
    threads = [threading.Thread(target=wrap, args=(fn, i % 5)) for i, fn in enumerate(jobs)]
    t0 = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join(90)
    assert not any(t.is_alive() for t in threads), "a call did not complete within the bound"
    assert not errors, errors
    assert len(done) == len(jobs)
    # the left-open streams still finish correctly afterwards
    for it in open_streams:
        list(it)
    llm.close()
    print("OK", round(elapsed(t0), 2))
    """, mid, timeout=240)
    assert "OK" in out


def test_close_from_another_thread_stops_a_running_stream(mid):
    out = run(r"""
    llm = LLM(TINY, n_ctx=4096, n_threads=1, temperature=0, ignore_eos=True)
    result = {}
    started = threading.Event()
    def consume():
        try:
            for i, _ in enumerate(llm.stream("Story:", max_tokens=3000)):
                started.set()
            result["end"] = "finished"
        except ValueError as e:
            result["end"] = "closed: " + str(e)
        except BaseException as e:
            result["end"] = "other: " + repr(e)
    t = threading.Thread(target=consume); t.start()
    started.wait(30)
    t0 = time.perf_counter()
    llm.close()
    t.join(10)
    assert not t.is_alive(), "the stream did not stop"
    assert result["end"].startswith("closed"), result
    assert elapsed(t0) < 5, elapsed(t0)
    # and a complete() running in another thread stops the same way
    llm = LLM(TINY, n_ctx=4096, n_threads=1, temperature=0, ignore_eos=True)
    def comp():
        try:
            llm.complete("Story:", max_tokens=3000); result["c"] = "finished"
        except ValueError as e:
            result["c"] = "closed"
    t = threading.Thread(target=comp); t.start(); time.sleep(0.5)
    llm.close(); t.join(10)
    assert not t.is_alive() and result["c"] == "closed", result
    print("OK")
    """, mid)
    assert "OK" in out


def test_callback_may_use_the_llm(tiny_model_path):
    """A callback runs in the caller's thread, outside every lock: it may call the same LLM
    (the outer call goes on and stays correct)."""
    out = run(r"""
    llm = LLM(TINY, n_ctx=1024, n_threads=1, temperature=0, ignore_eos=True, max_tokens=6)
    expected_outer = llm.complete("Outer:").text
    expected_inner = llm.complete("Inner:", max_tokens=2).text
    inner = []
    outer = llm.complete("Outer:", callback=lambda piece: inner.append(llm.complete("Inner:", max_tokens=2).text))
    assert outer.text == expected_outer
    assert inner and all(t == expected_inner for t in inner), inner
    # a callback that raises ends only its own call, and the LLM stays usable
    def bad(piece): raise KeyError("from the callback")
    try:
        llm.complete("Outer:", callback=bad); raise SystemExit("no error")
    except KeyError:
        pass
    assert llm.complete("Outer:").text == expected_outer
    llm.close()
    print("OK")
    """, tiny_model_path)
    assert "OK" in out


def test_listener_reentry_is_refused(tiny_model_path):
    out = run(r"""
    from pyllama import _core
    llm = LLM(TINY, n_ctx=1024, n_threads=1, temperature=0, ignore_eos=True, max_tokens=4)
    errs = []
    async def main():
        stream = llm.astream("x")
        async for piece in stream:
            pass
        return stream.completion
    # a listener is the scheduler's hook; starting a generation from one must be refused
    r = llm._request("hello", llm.defaults)
    def listener(req):
        try:
            llm.complete("again", max_tokens=1)
        except RuntimeError as e:
            errs.append(str(e))
    r.listener = listener
    llm._sched.submit(r)
    llm._sched.drive(lambda: r.done)
    assert errs and "listener" in errs[0], errs
    assert asyncio.run(main()).finish_reason == "length"
    llm.close()
    print("OK")
    """, tiny_model_path)
    assert "OK" in out


def test_engine_refuses_the_same_request_twice(tiny_model_path):
    out = run(r"""
    from pyllama import _core
    m = _core.Model(TINY); c = _core.Context(m, n_ctx=256, n_seq_max=2); e = _core.Engine(c)
    s = _core.SamplerChain(m.vocab).add_greedy()
    r = _core.GenerationRequest([1, 2, 3], s, max_tokens=2)
    e.submit(r)
    try:
        e.submit(r); raise SystemExit("accepted twice")
    except ValueError as err:
        assert "already" in str(err)
    e.run()
    assert len(r.tokens) == 2
    for cls in (_core.Engine, _core.GenerationRequest):
        obj = cls.__new__(cls)
        try:
            e.submit(obj) if cls is _core.GenerationRequest else obj.step()
            raise SystemExit(f"{cls.__name__} without __init__ was accepted")
        except (ValueError, TypeError) as err:
            assert "initialised" in str(err), err
    print("OK")
    """, tiny_model_path)
    assert "OK" in out


@pytest.mark.parametrize("attempt", range(3))
def test_interpreter_exit_with_work_in_flight(mid, attempt):
    """Unclosed LLM, half-read streams, a daemon thread mid-decode, an async task pending:
    the interpreter exits cleanly (it used to segfault about one run in three)."""
    proc = run_python_subprocess(PRELUDE + textwrap.dedent(r"""
    llm = LLM(TINY, n_ctx=4096, n_parallel=2, n_threads=1, temperature=0, ignore_eos=True)
    it = llm.stream("half read", max_tokens=2000); next(it)
    def forever():
        while True:
            llm.complete("daemon", max_tokens=2000)
    threading.Thread(target=forever, daemon=True).start()
    time.sleep(0.3 + 0.1 * int(os.environ.get("ATTEMPT", "0")))
    print("exiting", flush=True)
    """), timeout=60, env={"T_TINY": str(mid), "ATTEMPT": str(attempt)})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "exiting" in proc.stdout


def test_kv_clear_invalidates_the_prompt_cache(tiny_model_path):
    from pyllama import LLM

    with LLM(tiny_model_path, n_ctx=512, n_threads=1, temperature=0, ignore_eos=True, max_tokens=8) as llm:
        prompt = "A prompt that will be cached, with some length to it:"
        first = llm.complete(prompt)
        again = llm.complete(prompt)
        assert again.timings.cached_n > 0 and again.text == first.text
        llm.context.kv_clear()                   # behind the engine's back
        after = llm.complete(prompt)
        assert after.text == first.text
        assert after.timings.cached_n == 0


def test_filling_the_context_ends_with_length_and_keeps_the_text(tiny_model_path):
    from pyllama import LLM

    with LLM(tiny_model_path, n_ctx=64, n_threads=1, temperature=0, ignore_eos=True) as llm:
        c = llm.complete("Fill it up:", max_tokens=None)
        assert c.finish_reason == "length"
        assert len(c.tokens) > 40 and c.text
        # two sequences sharing a too-small context: both end with "length", text kept
        outs = llm.generate(["One:", "Two:"], max_tokens=None, n_parallel=1)
        assert len(outs) == 2 and all(o.finish_reason == "length" and o.tokens for o in outs)


def test_llm_works_without_stderr(tiny_model_path):
    out = run(r"""
    sys.stderr = None
    llm = LLM(TINY, n_ctx=256, n_threads=1, temperature=0, max_tokens=3, ignore_eos=True, verbose=False)
    print(len(llm.complete("x").tokens))
    llm.close()
    """, tiny_model_path)
    assert out.strip().endswith("3")


def test_n_parallel_beyond_n_batch_is_refused(tiny_model_path):
    from pyllama import LLM

    with pytest.raises(ValueError, match="n_batch"):
        LLM(tiny_model_path, n_ctx=512, n_batch=4, n_parallel=8)
    with LLM(tiny_model_path, n_ctx=512, n_batch=4, n_threads=1, temperature=0, max_tokens=3,
             ignore_eos=True) as llm:
        outs = llm.generate([f"p{i}" for i in range(10)])       # more prompts than n_batch
        assert len(outs) == 10 and all(len(o.tokens) == 3 for o in outs)


def test_a_full_shared_kv_memory_preempts_instead_of_cutting_answers(mid):
    """Threads whose answers together need more cells than the shared KV memory holds (each
    fits alone): the request submitted last leaves its slot and resumes once there is room, so
    every answer is complete and equal to the call made alone (the engine used to end the
    longest answer early; llama-server aborts the whole pool with a 500).  An answer that
    alone needs more than the memory still ends at it.  Async streams see the same."""
    out = run(r"""
    llm = LLM(TINY, n_ctx=256, n_parallel=4, kv_unified=True, n_threads=1, temperature=0, ignore_eos=True)
    assert llm.context.n_ctx == llm.context.n_ctx_seq == 256          # one memory for the 4 slots
    for n in ([70, 70, 70, 70], [90, 90, 40, 90], [120, 120, 120, 20]):
        alone = {k: llm.complete("A", max_tokens=k).tokens for k in set(n)}
        before = llm._engine.n_preemptions
        got = [None] * len(n)
        start = threading.Barrier(len(n))
        def call(i):
            start.wait(30)            # all at once (a few ms per token: they overlap throughout)
            got[i] = llm.complete("A", max_tokens=n[i])
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(n))]
        for t in threads: t.start()
        for t in threads: t.join(60)
        assert not any(t.is_alive() for t in threads), "a call did not finish"
        for c, k in zip(got, n):
            assert len(c.tokens) == k and c.tokens == alone[k], (n, k, len(c.tokens))
        assert llm._engine.n_preemptions > before, n
    big = llm.complete("A", max_tokens=400)
    assert big.finish_reason == "length" and len(big.tokens) < 400
    async def streams():
        async def one(k):
            return "".join([p async for p in llm.astream("A", max_tokens=k)])
        return await asyncio.wait_for(asyncio.gather(*[one(90) for _ in range(4)]), 60)
    texts = asyncio.run(streams())
    assert texts == [llm.complete("A", max_tokens=90).text] * 4
    assert not any(s["busy"] for s in llm.slots())
    llm.close()
    print("OK")
    """, mid)
    assert "OK" in out
