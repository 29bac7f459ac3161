"""Issue 29, the scheduler's rule: every accepted request gets exactly one terminal outcome
(its result, or an exception) within one step of its cancellation, its group's failure,
reset() or close(); every piece of a stream is delivered once and in order whichever thread
steps; a listener's failure touches only its own request.  Tool calls run through the same
path (a plan), so they are batched and cancellable and hold no executor thread.

Each test here failed on the code before the fix.  Faults are injected by wrapping the
scheduler's engine (a submit or a step that raises) or by a listener that raises; every wait
is bounded (asyncio.wait_for, join timeouts, subprocesses with a timeout).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pyllama import LLM, ClosedError
from pyllama.errors import MediaError

PROMPTS = [f"Story {i}: once upon a time" if i % 2 else f"The number {i} is" for i in range(8)]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
BOUND_S = 10.0   # generous: a bound that only a hang exceeds


@pytest.fixture(scope="module")
def model_path(tiny_model_factory):
    # a few ms per token, so that generation spans many steps and loop turns
    return tiny_model_factory(n_embd=256, n_layer=4, n_ff=768, n_head=4, n_head_kv=2)


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, n_ctx=4096, n_parallel=8, n_threads=1, temperature=0, max_tokens=24, ignore_eos=True,
             chat_template="chatml") as m:
        yield m


def _idle(llm: LLM) -> bool:
    slots = llm.slots()
    return bool(slots) and not any(s["busy"] for s in slots)


async def _until(pred, timeout: float = BOUND_S) -> bool:
    """Poll `pred` (cheap, no lock waits) until it is true or `timeout` passes."""
    deadline = time.perf_counter() + timeout
    while not pred():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


class _FaultyEngine:
    """The real engine, with faults injected into submit/step (the scheduler's view of it)."""

    def __init__(self, engine, *, submit_fails=None, step_fails=None) -> None:
        self._engine = engine
        self._submit_fails = submit_fails
        self._step_fails = step_fails

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, request):
        if self._submit_fails is not None and self._submit_fails(request):
            raise MediaError("injected: the image does not fit in a batch")
        return self._engine.submit(request)

    def step(self, events=None, before_decode=None):
        produced = self._engine.step(None, before_decode)
        if events is not None:
            events.extend(produced)
        if self._step_fails is not None and self._step_fails(produced):
            raise RuntimeError("injected: the step failed after producing its events")
        return produced


# ---- 1. a submit that raises accepted nothing ------------------------------------------------


def test_failed_submit_does_not_stall_other_async_streams(llm):
    sched = llm._sched
    real = sched.engine
    expected = llm.complete(PROMPTS[0], max_tokens=40).text

    async def main():
        stream = llm.astream(PROMPTS[0], max_tokens=40)
        first = await asyncio.wait_for(stream.__anext__(), BOUND_S)
        sched.engine = _FaultyEngine(real, submit_fails=lambda r: r.tag == "boom")
        try:
            for _ in range(3):
                prep = await asyncio.to_thread(llm._prepare_complete, PROMPTS[1], max_tokens=4)
                prep.leaders[0].tag = "boom"
                with pytest.raises(MediaError):
                    await llm._arun(prep)
        finally:
            sched.engine = real

        async def rest():
            return [p async for p in stream]

        # The driver keeps stepping the stream in flight (it used to count the failed
        # submits as finished requests and go to sleep with the stream half done).
        return first + "".join(await asyncio.wait_for(rest(), BOUND_S))

    assert asyncio.run(main()) == expected
    assert llm._sched.n_live == 0


# ---- 2. listeners run in order, once, whichever thread steps ------------------------------


def test_listeners_never_overlap_and_see_pieces_in_order_with_two_steppers(llm):
    """A thread calling complete() steps beside the async driver: each request's listener
    calls never overlap and see its pieces grow monotonically, and async streams equal
    their sequential texts."""
    expected = [llm.complete(p, max_tokens=60).text for p in PROMPTS[:4]]
    calls: dict = {}
    overlaps: list = []
    regressions: list = []
    active: set = set()
    lock = threading.Lock()

    def make_listener(inner):
        def listener(r):
            with lock:
                if id(r) in active:
                    overlaps.append(id(r))
                active.add(id(r))
                seen = calls.setdefault(id(r), [])
                if seen and r.n_parts < seen[-1]:
                    regressions.append(id(r))
                seen.append(r.n_parts)
            time.sleep(0.002)    # widen the window another stepper's dispatch could use
            try:
                inner(r)
            finally:
                with lock:
                    active.discard(id(r))
        return listener

    stop = threading.Event()

    def sync_stepper():
        while not stop.is_set():
            llm.complete(PROMPTS[5], max_tokens=8)

    async def one(p):
        stream = llm.astream(p, max_tokens=60)
        pieces = []
        first = await stream.__anext__()      # started: wrap its listener
        for r in stream._prep.requests:
            r.listener = make_listener(r.listener)
        pieces.append(first)
        async for piece in stream:
            pieces.append(piece)
        return "".join(pieces), stream.completion.text

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in PROMPTS[:4])), 60)

    t = threading.Thread(target=sync_stepper)
    t.start()
    try:
        got = asyncio.run(main())
    finally:
        stop.set()
        t.join(BOUND_S)
    assert not t.is_alive()
    assert not overlaps, "a request's listener ran in two threads at once"
    assert not regressions
    assert [g[0] for g in got] == expected
    assert [g[1] for g in got] == expected


def test_cursor_reads_each_count_once(llm):
    """_Cursor.take on a request that grows while it is read (another thread stepping)
    takes each piece exactly once."""
    from pyllama.streams import _Cursor

    class Growing:
        """A request to which a step adds a piece right after each read of its pieces."""

        def __init__(self):
            self.parts = ["a", "b"]
            self.done = False
            self.finish_reason = None
            self.n_logprobs = -1
            self.n_tokens = 0

        @property
        def n_parts(self):
            return len(self.parts)

        def parts_since(self, start):
            out = self.parts[start:]
            if not self.done:
                self.parts.append(chr(ord("a") + len(self.parts)))   # a step lands meanwhile
            return out

        def tokens_since(self, start):
            return []

    r = Growing()
    cur = _Cursor()
    taken = []
    for _ in range(5):
        text = cur.take(llm, r, 0, "text")
        if text:
            taken.append(text)
    r.done, r.finish_reason = True, "stop"
    taken.append(cur.take(llm, r, 0, "text") or "")
    assert "".join(taken) == "".join(r.parts)   # nothing skipped, nothing twice, in order


# ---- 3. exclusive() after close, events of a failed step, a failing listener ----------------


def test_exclusive_after_close_raises_closed_error(model_path):
    m = LLM(model_path, n_ctx=256, n_threads=1)
    sched = m._sched
    m.close()
    outcome: list = []

    def enter():
        try:
            with sched.exclusive():
                outcome.append("entered")
        except BaseException as exc:   # noqa: BLE001
            outcome.append(exc)

    t = threading.Thread(target=enter, daemon=True)
    t.start()
    t.join(BOUND_S)
    assert not t.is_alive(), "exclusive() waited forever after close()"
    assert len(outcome) == 1 and isinstance(outcome[0], ClosedError)


def test_events_of_a_failing_step_are_delivered(llm):
    sched = llm._sched
    real = sched.engine
    expected = llm.complete(PROMPTS[2], max_tokens=6).text

    def fails_when_done(events):
        return any(r.tag == "victim" and r.done for r, _t, _f in events)

    async def main():
        prep = await asyncio.to_thread(llm._prepare_complete, PROMPTS[2], max_tokens=6)
        prep.leaders[0].tag = "victim"
        sched.engine = _FaultyEngine(real, step_fails=fails_when_done)
        try:
            return await asyncio.wait_for(llm._arun(prep), BOUND_S)
        finally:
            sched.engine = real

    comp = asyncio.run(main())   # used to wait forever: the finishing event was dropped
    assert comp.text == expected
    assert llm._sched.n_live == 0


def test_a_failing_listener_ends_only_its_own_request(llm):
    sched = llm._sched
    good = llm._prepare_complete(PROMPTS[3], max_tokens=12)
    bad = llm._prepare_complete(PROMPTS[4], max_tokens=12)
    finished = threading.Event()
    bad_calls = []

    def good_listener(r):
        if r.done:
            finished.set()

    def bad_listener(r):
        bad_calls.append(r.done)
        raise KeyError("listener bug")

    good.leaders[0].listener = good_listener
    bad.leaders[0].listener = bad_listener
    sched.submit(bad.leaders[0], driven=True)
    sched.submit(good.leaders[0], driven=True)
    assert finished.wait(BOUND_S)
    comp = good.finish()
    assert comp.text == llm.complete(PROMPTS[3], max_tokens=12).text
    deadline = time.perf_counter() + BOUND_S
    while not bad.leaders[0].done and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert bad.leaders[0].done
    with pytest.raises(KeyError, match="listener bug"):
        bad.finish()
    assert bad_calls[-1] is True      # told of the end once more
    assert _idle(llm)


# ---- 4. n > 1 callers and reset() / close() ------------------------------------------------------


def test_reset_resolves_queued_n2_async_callers(model_path):
    with LLM(model_path, n_ctx=8192, n_parallel=2, n_threads=1, temperature=0, ignore_eos=True) as m:
        async def main():
            hog = asyncio.create_task(m.acomplete(PROMPTS[0], n=2, max_tokens=100000))
            assert await _until(lambda: all(s["busy"] for s in m.slots()))
            queued = asyncio.create_task(m.acomplete(PROMPTS[1], n=2, max_tokens=8))
            assert await _until(lambda: m.metrics()["requests_deferred"] == 1)
            await asyncio.to_thread(m.reset)
            done, pending = await asyncio.wait([hog, queued], timeout=BOUND_S)
            assert not pending, "reset() left an n=2 caller waiting"
            for t in (hog, queued):
                with pytest.raises(RuntimeError, match="cancelled"):
                    t.result()
            return await asyncio.wait_for(m.acomplete(PROMPTS[2], n=2, max_tokens=3), BOUND_S)

        comps = asyncio.run(main())
        assert [len(c.tokens) for c in comps] == [3, 3]
        assert m._sched.n_live == 0


def test_n4_waits_for_running_calls_instead_of_failing(model_path):
    with LLM(model_path, n_ctx=4096, n_parallel=1, n_threads=1, temperature=0, ignore_eos=True) as m:
        other: list = []
        t = threading.Thread(target=lambda: other.append(m.complete(PROMPTS[0], max_tokens=300)))
        t.start()
        deadline = time.perf_counter() + BOUND_S
        while not any(s["busy"] for s in m.slots()) and time.perf_counter() < deadline:
            time.sleep(0.005)
        comps = m.complete(PROMPTS[1], n=4, max_tokens=4)   # used to raise "busy with other calls"
        t.join(BOUND_S)
        assert len(comps) == 4 and all(len(c.tokens) == 4 for c in comps)
        assert len(other) == 1 and len(other[0].tokens) == 300
        assert m.n_parallel >= 4 and m._sched.n_live == 0


def test_n4_takes_the_slot_of_an_unread_stream(model_path):
    with LLM(model_path, n_ctx=4096, n_parallel=1, n_threads=1, temperature=0, ignore_eos=True) as m:
        expected = m.complete(PROMPTS[2], max_tokens=40).text
        stream = m.stream(PROMPTS[2], max_tokens=40)
        first = next(stream)
        comps = m.complete(PROMPTS[1], n=4, max_tokens=4)   # used to raise: the paused stream held the slot
        assert len(comps) == 4 and all(len(c.tokens) == 4 for c in comps)
        assert first + "".join(stream) == expected          # the stream moved to the new context and resumed
        assert m.n_parallel >= 4 and m._sched.n_live == 0


# ---- 5. async streams: backpressure, break, drop ------------------------------------------------


def test_unread_astream_pauses_then_resumes(llm):
    expected = llm.complete(PROMPTS[6], max_tokens=400).text

    async def main():
        stream = llm.astream(PROMPTS[6], max_tokens=400)
        pieces = [await stream.__anext__()]
        # The reader stops: after a bounded number of queued pieces the request leaves the batch.
        paused = await _until(lambda: any(s["paused"] for s in llm.slots() if s["busy"])
                              or llm.metrics()["requests_deferred"] > 0)
        decoded = stream._flow.n_put
        assert paused, "an unread async stream kept generating"
        assert decoded <= 2 * stream.max_queued
        # Reading resumes it, and the text is whole.

        async def rest():
            return [p async for p in stream]

        pieces += await asyncio.wait_for(rest(), BOUND_S)
        return "".join(pieces)

    assert asyncio.run(main()) == expected
    assert _idle(llm)


def test_breaking_out_of_an_astream_cancels_it(llm):
    async def main():
        async for _ in llm.astream(PROMPTS[7], max_tokens=100000):
            break
        # no aclose(): dropping the iterator must cancel, within a bound
        return await _until(lambda: _idle(llm))

    assert asyncio.run(main()), "a stream left with break kept its slot"
    assert llm._sched.n_live == 0


def test_dropped_astream_frees_its_slot(model_path):
    with LLM(model_path, n_ctx=512, n_threads=1, ignore_eos=True) as m:
        async def main():
            stream = m.astream(PROMPTS[5], max_tokens=100000)
            await stream.__anext__()
            del stream     # never closed, never read again
            return await _until(lambda: _idle(m))

        assert asyncio.run(main()), "a dropped stream showed its slot busy"
        assert m._sched.n_live == 0


# ---- 6. tool calls are a plan, run like any other request -------------------------------------


def test_async_tool_call_cancelled_frees_its_slot(llm):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]

    async def main():
        task = asyncio.create_task(llm.achat(msgs, tools=TOOLS, max_tokens=100000))
        assert await _until(lambda: not _idle(llm))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await _until(lambda: _idle(llm), timeout=2.0)

    assert asyncio.run(main()), "a cancelled tool call kept generating"


def test_tool_calls_do_not_hold_executor_threads(llm):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]

    async def main():
        from concurrent.futures import ThreadPoolExecutor

        # The default executor of a 2-core machine (min(32, cpus + 4) threads), made explicit:
        # as many tool calls as it has threads, and slots to spare for one more request.
        n_tools = 6
        executor = ThreadPoolExecutor(max_workers=n_tools)
        asyncio.get_running_loop().set_default_executor(executor)
        tool_tasks = [asyncio.create_task(llm.achat(msgs, tools=TOOLS, max_tokens=600)) for _ in range(n_tools)]
        plain = await asyncio.wait_for(llm.acomplete(PROMPTS[0], max_tokens=2), 60)
        running = [not t.done() for t in tool_tasks]
        for t in tool_tasks:
            t.cancel()
        await asyncio.gather(*tool_tasks, return_exceptions=True)
        return plain, running, await _until(lambda: _idle(llm))

    plain, running, idle = asyncio.run(main())
    assert len(plain.tokens) == 2
    # the plain request finished while every tool call was still generating
    assert all(running)
    assert idle, "cancelled tool calls kept their slots"


def test_tool_chat_async_matches_sync(llm):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    # An enum argument: the random model's call ends well within max_tokens (a free string may not).
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "required": ["city"],
                                              "properties": {"city": {"enum": ["Paris", "Tokyo"]}}}}}]
    sync = llm.chat(msgs, tools=tools, tool_choice="required", max_tokens=48, ignore_eos=False)
    got = asyncio.run(llm.achat(msgs, tools=tools, tool_choice="required", max_tokens=48, ignore_eos=False))
    assert got.text == sync.text
    assert got.content == sync.content
    assert sync.tool_calls, sync.text               # tool_choice="required": there is a call
    assert [c["function"] for c in got.tool_calls or ()] == [c["function"] for c in sync.tool_calls]
    assert got.finish_reason == sync.finish_reason


def test_a_stored_listener_failure_does_not_keep_the_stepping_callers_stream_alive(llm):
    """A listener's exception is kept on its request for the owner to raise: it must not keep
    the frames of the thread that was stepping (found by the soak: a sync stream that was
    stepping when another request's listener raised, then dropped by its owner, was never
    collected, so its requests were never cancelled and held their slots)."""
    import gc
    import weakref

    stream = llm.stream("a stream that will be dropped", max_tokens=50, temperature=0.0)
    assert next(stream)                       # started: its requests hold a slot
    stream_reqs = list(stream._reqs)
    assert stream_reqs

    calls = []

    def bad_listener(r):
        calls.append(r)
        if len(calls) == 1:     # told once more after it failed: that call succeeds
            raise KeyError("listener failed")

    prep = llm._prepare_complete("the other request", max_tokens=4, temperature=0.0)
    for r in prep.requests:
        r.listener = bad_listener
    for lead in prep.leaders:
        llm._sched.submit(lead)
    # The stream's own thread steps (and dispatches the failing listener) in next().
    while not all(r.done for r in prep.requests):
        next(stream)
    assert isinstance(prep.requests[0].error, KeyError)
    assert prep.requests[0].error.__traceback__ is None          # kept as text, in a note
    if hasattr(BaseException, "add_note"):                       # notes: Python 3.11+
        assert any("bad_listener" in n for n in prep.requests[0].error.__notes__)

    ref = weakref.ref(stream)
    del stream
    gc.collect()
    assert ref() is None
    llm.complete("next", max_tokens=2, temperature=0.0)   # its step collects the cancellation
    assert all(r.done for r in stream_reqs)
    assert _idle(llm)
