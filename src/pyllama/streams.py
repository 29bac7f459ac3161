"""Running prepared requests: to the end in the caller's thread (:func:`run`), as an iterator
that advances only while it is read (:class:`Stream`), or from asyncio without blocking the event
loop (:func:`arun`, :class:`AsyncStream`, with backpressure and one wake-up per loop and step).

What runs here was built by pyllama._requests (a :class:`~pyllama._requests.Prepared`); the
LLM's scheduler decides who steps the engine.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Optional

from pyllama._requests import Prepared
from pyllama.results import Chunk, Completion, token_logprob
from pyllama.scheduler import Scheduler, defer_until_dispatched

if TYPE_CHECKING:
    from pyllama.llm import LLM


def run(llm: "LLM", reqs: list, callback: Optional[Callable[[Any, str], Any]] = None) -> None:
    """Submit the request groups `reqs` (leaders) and return when they and their
    followers are finished; other callers' requests advance in the same steps."""
    sched = llm._sched
    watched = [r for lead in reqs for r in [lead, *lead.followers]]
    cursors = [0] * len(watched)

    def deliver() -> None:
        for i, r in enumerate(watched):
            # One read of the pieces (another thread may be stepping): each piece once.
            pieces = r.parts_since(cursors[i])
            cursors[i] += len(pieces)
            for piece in pieces:
                callback(r, piece)

    if sched.in_step():
        raise RuntimeError("an LLM listener cannot start another generation on the same LLM")
    try:
        for lead in reqs:
            sched.submit(lead)
        sched.drive(lambda: all(r.done for r in watched), deliver if callback is not None else None)
        if callback is not None:
            deliver()
    except BaseException:
        sched.cancel(watched)
        raise


async def arun(llm: "LLM", prep: Prepared) -> Any:
    """Run prepared requests without blocking the event loop: the scheduler's driver
    thread steps the engine (batching them with every other caller's requests) and the
    last finishing request wakes this coroutine."""
    import asyncio

    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    watched = prep.requests
    remaining = set(watched)

    def resolve() -> None:
        if not fut.done():
            fut.set_result(None)

    def listener(r: Any) -> None:   # runs in the thread that holds the stepper role
        if not r.done or not remaining:
            return
        remaining.discard(r)
        for f in r.followers:        # a group that ended together may report only its leader
            if f.done:
                remaining.discard(f)
        if not remaining:
            try:
                loop.call_soon_threadsafe(resolve)
            except RuntimeError:   # the event loop is gone: nobody waits any more
                pass

    for r in watched:
        r.listener = listener
    sched = llm._sched
    try:
        for lead in prep.leaders:
            sched.submit(lead, driven=True)
        if not all(r.done for r in watched):
            await fut
    except BaseException:
        sched.cancel(watched)   # a submit that failed, or the task was cancelled
        raise
    return await finish_off_loop(prep)


async def finish_off_loop(prep: Prepared) -> Any:
    """The call's result; built in a worker thread when it has log-probabilities (thousands of
    objects for a long answer), so the event loop never stalls on it."""
    if any(r.n_logprobs >= 0 or r.prompt_logprobs for r in prep.requests):
        import asyncio

        return await asyncio.to_thread(prep.finish)
    return prep.finish()


class _Cursor:
    """How much of one request a consumer has seen: pieces, tokens, logprob entries.
    Reading from a cursor is O(new items), never O(everything so far)."""

    __slots__ = ("parts", "tokens", "logprobs", "finished", "processed")

    def __init__(self) -> None:
        self.parts = self.tokens = self.logprobs = 0
        self.finished = False
        self.processed = -1         # prompt tokens reported processed (-1: no report yet)

    def progress(self, r: Any, index: int, items: list) -> None:
        """Prompt progress chunks of `r` (a group's leader: it evaluates the prompt) for
        llama-server's return_progress: the first says where the evaluation starts (the cached
        tokens: nothing evaluated, no time spent), then one per prompt chunk the engine
        evaluated since, the last one at processed == total."""
        total, cache, processed = r.prompt_progress
        if processed == 0 and cache == 0:
            return                  # not admitted yet (or refused: its error is the stream's start)
        if self.processed < 0:
            self.processed = cache
            items.append(Chunk(index=index, text="", token_ids=[], prompt_progress={
                "total": total, "cache": cache, "processed": cache, "time_ms": 0.0}))
        if processed > self.processed:
            self.processed = processed
            items.append(Chunk(index=index, text="", token_ids=[], prompt_progress={
                "total": total, "cache": cache, "processed": processed,
                "time_ms": float(r.t_prompt_ms)}))

    def take(self, llm: "LLM", r: Any, index: int, mode: str) -> Optional[Any]:
        """The next item for a consumer in `mode` ("text", "events", "chunks"), or None."""
        # `done` first: once it is seen, every piece is already there.  Each count is read
        # once (another thread may be stepping), so no piece is skipped or taken twice.
        done = r.done
        pieces = r.parts_since(self.parts)
        self.parts += len(pieces)
        text = "".join(pieces)
        finish = r.finish_reason if done and not self.finished else None
        if finish is not None:
            self.finished = True
        if mode == "text":
            return text or None
        if mode == "events":
            return (index, text) if text else None
        token_ids = r.tokens_since(self.tokens)
        self.tokens += len(token_ids)
        logprobs = None
        if r.n_logprobs >= 0:
            entries = r.logprobs_since(self.logprobs)
            self.logprobs += len(entries)
            logprobs = [token_logprob(llm.vocab, e) for e in entries]
        if not text and not token_ids and not logprobs and finish is None:
            return None
        if finish == "cancelled":   # the consumer cancelled it: no finish to report
            finish = None
        return Chunk(index=index, text=text, token_ids=token_ids, logprobs=logprobs, finish_reason=finish)


class Stream:
    """Iterator over a running generation (LLM.stream / chat(stream=True) / generate_stream).

    It advances only while it is iterated: between next() calls its requests are paused,
    so a stream left open costs other callers nothing (its slot is lent out if needed and
    its KV cells re-used when it resumes)."""

    def __init__(self, llm: "LLM", prep: Prepared, mode: str, prompt_progress: bool = False) -> None:
        self._llm = llm
        self._prep = prep
        self._reqs = prep.requests
        self._mode = mode
        self._progress = prompt_progress and mode == "chunks"
        self._cursors = [_Cursor() for _ in self._reqs]
        self._events: deque = deque()
        self._started = False
        self._finished = False
        self._reported = False
        self.completion: Optional[Completion] = None
        self.completions: Optional[list] = None

    def __iter__(self) -> "Stream":
        return self

    def _collect(self) -> bool:
        for i, r in enumerate(self._reqs):
            if self._progress and r.leader is None:
                self._cursors[i].progress(r, i, self._events)
            item = self._cursors[i].take(self._llm, r, i if self._mode != "events" else r.tag, self._mode)
            if item is not None:
                self._events.append(item)
        return bool(self._events)

    def __next__(self) -> Any:
        llm = self._llm
        while not self._events:
            if self._finished:
                if not self._reported:   # verbose timings after the last piece, not before it
                    self._reported = True
                    if llm.verbose:
                        for c in self.completions or ():
                            print(c.timings.format(), file=sys.stderr, flush=True)
                raise StopIteration
            llm._check_open()
            sched = llm._sched
            if sched.in_step():
                raise RuntimeError("a stream cannot be advanced from inside an LLM listener")
            reqs = self._reqs
            try:
                if not self._started:
                    self._started = True
                    for lead in self._prep.leaders:
                        sched.submit(lead)
                else:
                    sched.set_paused(reqs, False)
                sched.drive(lambda: self._collect() or all(r.done for r in reqs))
            except BaseException:
                self._finished = True
                sched.cancel(reqs)
                raise
            if all(r.done for r in reqs):
                self._collect()
                self._finished = True
                comps = self._prep.finish(report=False)   # timings are printed after the last piece
                self.completions = comps if isinstance(comps, list) else [comps]
                self.completion = self.completions[0] if len(self.completions) == 1 or self._mode != "events" \
                    else None
                if self._mode == "events":
                    self.completion = None
            else:
                sched.set_paused([r for r in reqs if not r.done], True)
        return self._events.popleft()

    def close(self) -> None:
        """Stop generating (the unfinished requests are cancelled, their slots freed)."""
        if not self._finished and self._started:
            sched = self._llm._sched
            if sched is not None:
                sched.cancel(self._reqs)
        self._finished = True
        self._reported = True

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._started and not self._finished:
            try:
                self._llm._sched.cancel_soon(self._reqs)
            except Exception:   # noqa: BLE001 - interpreter teardown
                pass


_END = object()


class AsyncStream:
    """Async iterator over a running generation (LLM.astream / astream_chat).  The driver
    thread steps the engine; each step's new text reaches this iterator through the event
    loop, so the loop never waits on llama.cpp.

    Backpressure: once `max_queued` pieces wait unread, the stream's requests are paused
    (they leave the batch and may lend their slot out, as a synchronous Stream between
    next() calls); reading resumes them.  Leaving the loop early (``break``), dropping the
    stream, or cancelling the task that reads it cancels the requests."""

    #: Unread pieces after which the requests pause (reading them down to a quarter resumes).
    max_queued = 64

    def __init__(self, llm: "LLM", prepare: Callable[[], Prepared], mode: str, prompt_progress: bool = False) -> None:
        self._llm = llm
        self._prepare = prepare
        self._mode = mode
        self._progress = prompt_progress and mode == "chunks"
        self._prep: Optional[Prepared] = None
        self._queue: Any = None
        self._flow: Optional[_Flow] = None
        self._done = False
        self._submitted = False
        self.completion: Optional[Completion] = None
        self.completions: Optional[list] = None

    def __aiter__(self) -> "AsyncStream":
        return self

    async def _start(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        self._prep = prep = await asyncio.to_thread(self._prepare)
        self._queue = queue = asyncio.Queue()
        reqs = prep.requests
        cursors = [_Cursor() for _ in reqs]
        index = {id(r): i for i, r in enumerate(reqs)}
        llm = self._llm
        mode = self._mode
        counted = [False] * len(reqs)
        n_done = [0]
        # What the listener needs lives here, not on self: the stream can then be collected
        # (and cancelled by __del__) as soon as its reader drops it.
        self._flow = flow = _Flow(llm._sched, reqs, self.max_queued)
        mailbox = _Mailbox.of(loop)
        progress = self._progress
        if progress:
            for r in reqs:
                r.report_progress = True

        def pump(i: int, items: list) -> None:
            r = reqs[i]
            if progress and (r.leader is None):
                cursors[i].progress(r, i, items)
            item = cursors[i].take(llm, r, i, mode)
            if item is not None:
                items.append(item)
            if r.done and not counted[i]:
                counted[i] = True
                n_done[0] += 1
                if n_done[0] == len(reqs):
                    items.append(_END)

        def listener(r: Any) -> None:   # runs in the thread that holds the stepper role
            items: list = []
            pump(index[id(r)], items)
            if r.done:
                for f in r.followers:    # a group that ended together may report only its leader
                    i = index.get(id(f))
                    if i is not None and f.done and not counted[i]:
                        pump(i, items)
            if items:
                flow.queued(len(items))   # may pause the requests: before the reader can see them
                if not mailbox.post(queue, items, lambda: llm._sched.cancel(reqs)):
                    llm._sched.cancel(reqs)          # the event loop is closed: nobody reads any more

        for r in reqs:
            r.listener = listener
        self._submitted = True
        for lead in prep.leaders:
            llm._sched.submit(lead, driven=True)
        if all(r.done for r in reqs):      # finished at submit (max_tokens=0)
            for r in reqs:
                listener(r)

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._prep is None:
                await self._start()
            item = await self._queue.get()
        except BaseException:
            self._cancel()
            raise
        self._flow.read(1)
        if item is _END:
            await self._finish()
            raise StopAsyncIteration
        return item

    async def _finish(self) -> None:
        self._done = True
        comps = await finish_off_loop(self._prep)
        self.completions = comps if isinstance(comps, list) else [comps]
        self.completion = self.completions[0]

    def _cancel(self) -> None:
        if not self._done:
            self._done = True
            if self._prep is not None and self._submitted:
                self._llm._sched.cancel(self._prep.requests)

    async def aclose(self) -> None:
        """Stop generating (cancels the unfinished requests)."""
        self._cancel()

    def __del__(self) -> None:
        if not getattr(self, "_done", True) and self._prep is not None and self._submitted:
            try:
                self._llm._sched.cancel_soon(self._prep.requests)
            except Exception:   # noqa: BLE001 - interpreter teardown
                pass


class _Flow:
    """Backpressure of one AsyncStream: pieces put by the stepping thread, pieces read by
    the event loop; the requests pause while `limit` wait unread.  Each counter has one
    writer; the pause decision and its undoing share a small lock, so a paused request is
    always resumed once its reader has caught up."""

    __slots__ = ("sched", "reqs", "limit", "n_put", "n_read", "paused", "lock")

    def __init__(self, sched: Scheduler, reqs: list, limit: int) -> None:
        self.sched = sched
        self.reqs = reqs
        self.limit = max(1, int(limit))
        self.n_put = 0
        self.n_read = 0
        self.paused = False
        self.lock = threading.Lock()

    def queued(self, n: int) -> None:
        """`n` items are about to be queued (the stepping thread, between steps)."""
        # Both counters are read under the lock on both sides: a pause decided on a stale
        # n_read after the reader had caught up would never be undone (the reader then waits
        # for pieces that a paused request never makes).
        with self.lock:
            self.n_put += n
            if not self.paused and self.n_put - self.n_read >= self.limit:
                self.paused = True
                for r in self.reqs:
                    if not r.done:
                        r.paused = True

    def read(self, n: int) -> None:
        """The reader took `n` items (the event loop)."""
        with self.lock:
            self.n_read += n
            if self.paused and self.n_put - self.n_read <= self.limit // 4:
                self.paused = False
                self.sched.set_paused(self.reqs, False)


class _Mailbox:
    """Hands pieces from the stepping thread to one event loop, waking the loop once per
    dispatch, after the last listener (scheduler.defer_until_dispatched): a step that feeds 32
    streams of one loop costs one ``call_soon_threadsafe``, not 32, and the loop thread does
    not wake up to compete for the GIL while the other listeners still run.  Order is kept:
    the posts of every stream are drained first in, first out."""

    __slots__ = ("loop_ref", "lock", "pending", "scheduled", "__weakref__")
    _by_loop: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _by_loop_lock = threading.Lock()

    def __init__(self, loop: Any) -> None:
        self.loop_ref = weakref.ref(loop)   # the table's value must not keep its key alive
        self.lock = threading.Lock()
        self.pending: list = []
        self.scheduled = False

    @classmethod
    def of(cls, loop: Any) -> "_Mailbox":
        with cls._by_loop_lock:
            box = cls._by_loop.get(loop)
            if box is None:
                box = cls._by_loop[loop] = cls(loop)
            return box

    def post(self, queue: Any, items: list, on_lost: Callable[[], Any]) -> bool:
        """Queue `items` into the asyncio `queue` (any thread).  False: the loop is closed.
        `on_lost()` runs if the loop closes before the wake-up reaches it."""
        loop = self.loop_ref()
        with self.lock:
            if loop is None or loop.is_closed():
                return False
            self.pending.append((queue, items, on_lost))
            if self.scheduled:      # a wake-up is on its way and will take these too
                return True
            self.scheduled = True
        if not defer_until_dispatched(self._wake):
            self._wake()
        return True

    def _wake(self) -> None:
        loop = self.loop_ref()
        try:
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:        # closed meanwhile: nobody will drain what was posted
            with self.lock:
                lost, self.pending = self.pending, []
                self.scheduled = False
            for _queue, _items, on_lost in lost:
                on_lost()

    def _drain(self) -> None:       # in the event loop
        with self.lock:
            batch, self.pending = self.pending, []
            self.scheduled = False
        for queue, items, _on_lost in batch:
            for item in items:
                queue.put_nowait(item)
