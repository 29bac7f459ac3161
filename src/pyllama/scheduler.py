"""One Engine, many callers: who steps it, and how everyone else hears about their requests.

An :class:`~pyllama._core.Engine` must be stepped by one thread at a time.  Threads,
coroutines and the server all share one LLM's engine, so the :class:`Scheduler` elects
a *stepper*: any caller that waits for its request becomes the stepper when nobody else
is stepping, and each step advances every runnable request of every caller in one
``llama_decode``.  The others wait on a condition variable and are woken after each step.
Async callers (and the server) have no thread of their own that could step, so a
*driver* thread steps for them; it is started on first use and sleeps when idle.

Exactly once: the scheduler keeps the requests it accepted (a submit that raises accepted
nothing) and forgets each when it is done, so the driver steps exactly while a driven request
is alive, with no count for callers to keep right.  Listeners run only in the thread that
holds the stepper role, before it gives the role up (a step's events, cancellations collected
between steps, reset and close alike), so each request hears of its pieces once and in order
whichever thread steps; a listener that raises ends its own request with the exception.

Nothing here runs per token except: one step call, and for requests with a listener
(async streams, the server) one listener call.  Callbacks of synchronous callers run
in the caller's own thread, never in whoever happens to be the stepper.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

from pyllama import _core
from pyllama.errors import ClosedError, detach_traceback

logger = logging.getLogger("pyllama")

# Work that listeners hand to "after this dispatch" (per thread): see defer_until_dispatched.
_dispatch_local = threading.local()


def defer_until_dispatched(fn: Callable[[], None]) -> bool:
    """Run `fn()` after the listeners of the dispatch running in this thread, at the moment
    the stepper next lets the GIL go for a decode (or stops stepping).  Returns False, and
    does nothing, outside a dispatch.  An async stream's listener wakes its event loop this
    way: woken at once, the loop thread takes the GIL while the stepper still works and
    the stepper waits for the loop to finish its turn (measured: 0.3-0.4 ms a step at 8
    streams, more than the engine's own 0.3 ms); woken as the decode starts, its work
    overlaps the decode."""
    pending = getattr(_dispatch_local, "deferred", None)
    if pending is None:
        return False
    pending.append(fn)
    return True


@contextmanager
def _deferring(sink: Callable[[list], None]) -> Iterator[None]:
    """Collect the deferred work of the listeners run inside and hand it to `sink` at the
    end (the outermost dispatch of this thread does)."""
    if getattr(_dispatch_local, "deferred", None) is not None:
        yield                      # nested: the outer dispatch collects everything
        return
    _dispatch_local.deferred = []
    try:
        yield
    finally:
        deferred, _dispatch_local.deferred = _dispatch_local.deferred, None
        if deferred:
            sink(deferred)


def _run_all(fns: list) -> None:
    for fn in fns:
        try:
            fn()
        except Exception:   # noqa: BLE001 - one waker's failure must not stop the others
            logger.exception("deferred work of a listener failed")


class Scheduler:
    """Elects one stepper at a time for an Engine shared by threads and coroutines.

    The contract (docs: DESIGN.md "Exactly once"): every request accepted by :meth:`submit`
    gets exactly one terminal outcome (its result, or an exception) within one step of its
    cancellation, its group's failure, ``reset()`` or ``close()``; listeners run only in the
    thread that holds the stepper role, before it gives the role up, so the pieces of a
    request reach its listener once and in order whichever thread steps; a listener that
    raises ends only its own request (with that exception).
    """

    def __init__(self, engine: "_core.Engine") -> None:
        self.engine = engine
        # Re-entrant: a __del__ run by the garbage collector inside a critical section may cancel.
        self._cond = threading.Condition(threading.RLock())
        self._closed = False
        self._driver: Optional[threading.Thread] = None
        # Accepted requests (leaders and followers) not yet seen finished, and the subset whose
        # owners cannot step (async callers, the server) so that the driver thread steps for
        # them.  The scheduler adds them when the engine accepted them and drops them when they
        # are done: no caller keeps a count.
        self._live: set = set()
        self._driven: set = set()
        self._cancel_pending = False  # a cancel arrived while the role was held
        self._cancel_soon = False     # cancel_soon() flagged requests without taking the lock
        self._exclusive_waiters = 0   # threads waiting in exclusive(): steppers let them go first
        # The thread that holds the stepper role (steps, or works exclusively); None: free.
        self._stepper_ident: Optional[int] = None
        self._local = threading.local()     # .dispatching: this thread runs listeners now
        # Listeners' deferred work (event-loop wake-ups): run as the next decode lets the GIL
        # go, or when the stepping thread stops stepping (see defer_until_dispatched).
        self._wakes: list = []

    # ---- submitting and signalling ------------------------------------------------

    def submit(self, request: "_core.GenerationRequest", *, driven: bool = False) -> None:
        """Hand a request to the engine (it joins at the next step).  `driven`: its owner
        cannot step (async, server), so the driver thread will.  A submit that raises
        accepted nothing."""
        with self._cond:
            if self._closed:
                raise ClosedError("this LLM is closed")
            self.engine.submit(request)
            group = [r for r in (request, *request.followers) if not r.done]
            self._live.update(group)
            if driven and group:
                self._driven.update(group)
                self._ensure_driver()
            self._cond.notify_all()

    def cancel(self, requests: Iterable["_core.GenerationRequest"]) -> None:
        """Cancel from any thread.  Their slots are freed and their listeners told now when
        no step is running, else by the running step's thread right after it (one decode)."""
        with self._cond:
            for r in requests:
                if not r.done:
                    r.cancel_requested = True
            self._cond.notify_all()
            if self._stepping:
                # The role holder (perhaps this very thread, inside a listener) collects them
                # before it gives the role up.
                self._cancel_pending = True
                return
            self._take_stepper()
        try:
            self._collect_and_dispatch()
        finally:
            self._release_role()
            self._flush_wakes()

    def cancel_soon(self, requests: Iterable["_core.GenerationRequest"]) -> None:
        """Cancel without taking any lock (for __del__, which the garbage collector may run
        inside this very scheduler's critical sections): the next step, or the driver thread
        within half a second, frees the slots."""
        for r in requests:
            if not r.done:
                r.cancel_requested = True
        self._cancel_soon = True
        if self._cond.acquire(blocking=False):
            try:
                self._cond.notify_all()
            finally:
                self._cond.release()

    def set_paused(self, requests: Iterable["_core.GenerationRequest"], paused: bool) -> None:
        with self._cond:
            for r in requests:
                r.paused = paused
            if not paused:
                self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def n_live(self) -> int:
        """Accepted requests not yet seen finished (for tests and metrics)."""
        with self._cond:
            self._forget_done(self._live)
            return len(self._live)

    # ---- the stepper role -----------------------------------------------------------

    @property
    def _stepping(self) -> bool:
        return self._stepper_ident is not None

    def _take_stepper(self) -> None:
        """Become the stepper (call with the condition held, after checking _stepping)."""
        self._stepper_ident = threading.get_ident()

    def _release_role(self) -> None:
        """Give the stepper role up: first collect (and dispatch) the cancellations that
        arrived while it was held, then wake the waiters."""
        try:
            while True:
                with self._cond:
                    if not self._cancel_pending or self._closed:
                        self._cancel_pending = False
                        break
                    self._cancel_pending = False
                self._collect_and_dispatch()
        finally:
            with self._cond:
                if self._stepper_ident != -1:   # -1: closed for good
                    self._stepper_ident = None
                self._cond.notify_all()

    def in_step(self) -> bool:
        """Is the calling thread the stepper right now (e.g. inside a listener)?"""
        return self._stepper_ident == threading.get_ident() or getattr(self._local, "dispatching", False)

    def _collect_and_dispatch(self) -> None:
        """Finish the requests flagged for cancellation and tell their listeners (role held)."""
        self._cancel_soon = False
        if not self._closed:
            self._dispatch(self.engine.collect_cancelled())

    def _dispatch(self, events: list) -> None:
        """Run the listeners of the requests in `events`, in order (called by the role holder,
        no lock held), and forget the requests that are done.  A listener that raises ends its
        own request with the exception; the others are still told."""
        if not events:
            return
        failed = []
        with _deferring(self._wakes.extend):
            self._local.dispatching = True
            try:
                for request, _text, _reason in events:
                    listener = request.listener
                    if listener is not None:
                        try:
                            listener(request)
                        except Exception as exc:   # noqa: BLE001 - it belongs to that request alone
                            failed.append((request, exc))
            finally:
                self._local.dispatching = False
            if failed:
                self._fail_listeners(failed)
        with self._cond:
            for request, _text, _reason in events:
                if request.done:
                    self._forget(request)

    def _fail_listeners(self, failed: list) -> None:
        """End each request whose listener raised with that exception, and tell the listener
        once more (its owner may learn the outcome only that way); a second failure is logged."""
        for request, exc in failed:
            if request.error is None:
                request.error = detach_traceback(exc)
            request.cancel_requested = True
        events = [] if self._closed else self.engine.collect_cancelled()
        told = {id(r) for r, _e in failed}
        again = [(r, "", r.finish_reason) for r, _e in failed]
        again += [e for e in events if id(e[0]) not in told]
        self._local.dispatching = True
        try:
            for request, _text, _reason in again:
                listener = request.listener
                if listener is not None:
                    try:
                        listener(request)
                    except Exception:   # noqa: BLE001
                        logger.exception("a listener of %r failed again after its request ended", request)
        finally:
            self._local.dispatching = False
        with self._cond:
            for request, _text, _reason in again:
                if request.done:
                    self._forget(request)

    def _flush_wakes(self) -> None:
        """Run the listeners' deferred wake-ups now (any thread; each runs once)."""
        if self._wakes:
            wakes, self._wakes = self._wakes, []
            _run_all(wakes)

    def _forget(self, request: "_core.GenerationRequest") -> None:
        self._live.discard(request)
        self._driven.discard(request)
        for f in request.followers:      # a group that ended together may report only its leader
            if f.done:
                self._live.discard(f)
                self._driven.discard(f)

    @staticmethod
    def _forget_done(requests: set) -> None:
        done = [r for r in requests if r.done]
        requests.difference_update(done)

    # ---- stepping -----------------------------------------------------------------

    def drive(self, until: Callable[[], bool], on_progress: Optional[Callable[[], None]] = None) -> None:
        """Step the engine (or wait while another caller steps it) until ``until()``.

        ``on_progress()`` runs in this thread, outside every lock, after each step or
        wake-up: the place to hand new text to a caller's callback.  An exception from a
        step (Ctrl-C, an abort) propagates to the caller that was stepping; the others
        carry on with the next stepper.
        """
        cond = self._cond
        while True:
            if on_progress is not None:
                on_progress()
            with cond:
                done = until()
                closed = self._closed
                step = not (done or closed or self._stepping or self._exclusive_waiters
                            or not self.engine.runnable)
                if step:
                    self._take_stepper()
            if not step:
                self._flush_wakes()        # this thread stops stepping: nothing to overlap with
                if done:
                    return
                if closed:
                    raise ClosedError("this LLM was closed while the call was running")
                with cond:
                    if not until() and not self._closed and (
                            self._stepping or self._exclusive_waiters or not self.engine.runnable):
                        # Someone else steps (we are woken after their step), or nothing can run
                        # yet (woken by a submit, an unpause or a cancel); the timeout is a backstop.
                        cond.wait(0.25)
                continue
            self._step_once()

    def _step_once(self) -> None:
        """One step by the role holder; its events are dispatched before the role is given
        up, so that no other thread's step can overtake them."""
        engine = self.engine
        events: list = []
        decoded_before = engine.n_decode_total
        try:
            try:
                # the events produced before an exception stay in the list; the wake-ups of the
                # last dispatch run as this decode lets the GIL go
                engine.step(events, self._flush_wakes)
            except _core.DecodeAborted as exc:
                if self._closed:   # close() stopped the decode in progress
                    raise ClosedError("this LLM was closed while the call was running") from exc
                raise
            finally:
                self._dispatch(events)
        except BaseException:
            self._release_role()
            self._flush_wakes()
            raise
        self._release_role()
        if engine.n_decode_total == decoded_before:
            self._flush_wakes()     # no decode to overlap with
        if not events and engine.n_decode_total == decoded_before:
            # Nothing could run (every slot held by a request that cannot be preempted yet):
            # do not spin.
            with self._cond:
                self._cond.wait(0.005)

    @contextmanager
    def exclusive(self, timeout: Optional[float] = None) -> Iterator[None]:
        """Hold the stepper role (no step runs) for work that must not interleave with one:
        re-creating the context, sharing a prefix, resetting.  Raises ClosedError once the
        scheduler is closed."""
        with self._cond:
            # Steppers stand back while someone waits here: a driver that re-takes the role
            # right after each step would otherwise starve reset() until every request ended.
            self._exclusive_waiters += 1
            try:
                if not self._cond.wait_for(lambda: self._closed or not self._stepping, timeout):
                    raise TimeoutError("the engine stayed busy")
            finally:
                self._exclusive_waiters -= 1
            if self._closed:
                raise ClosedError("this LLM is closed")
            self._take_stepper()
        try:
            yield
        finally:
            self._release_role()
            self._flush_wakes()

    def end_all(self, error: Optional[BaseException] = None) -> list:
        """End every accepted request now (``reset()``, ``close()``; call holding the role or
        after :meth:`close`): the engine forgets them, each that has no error yet gets `error`
        (None: it ends "cancelled"), and every listener is told.  Returns the requests."""
        engine = self.engine
        with self._cond:
            pending = list(self._live)
            self._live.clear()
            self._driven.clear()
            self._cancel_pending = False
        seen = {id(r) for r in pending}
        for r in engine.requests():
            if id(r) not in seen:
                pending.append(r)
        engine.reset()
        for r in pending:
            if not r.done:      # one the engine no longer listed (a follower of a queued leader)
                engine.cancel(r)
        if error is not None:
            for r in pending:
                if r.error is None:
                    r.error = error
        self._dispatch([(r, "", r.finish_reason) for r in pending])
        self._flush_wakes()
        return pending

    # ---- the driver thread (async callers, the server) -------------------------------

    def _ensure_driver(self) -> None:
        if self._driver is None or not self._driver.is_alive():
            self._driver = threading.Thread(target=self._drive_forever, name="pyllama-scheduler", daemon=True)
            self._driver.start()

    def _driver_work(self) -> Optional[str]:
        """What the driver should do now ("step", "collect") or None (condition held)."""
        if self._stepping or self._exclusive_waiters:
            return None
        if self._driven and self.engine.runnable:
            return "step"
        if self._cancel_soon:
            return "collect"
        if self._driven and not self.engine.runnable:
            self._forget_done(self._driven)   # idle: drop any that ended without an event
        return None

    def _drive_forever(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while True:
                    if self._closed:
                        return
                    work = self._driver_work()
                    if work is not None or self._wakes:
                        break
                    # With requests alive, poll now and then: a __del__ may have flagged a
                    # cancellation without being able to take the lock to wake us.
                    cond.wait(0.5 if (self._driven or self._live) else None)
                if work is not None:
                    self._take_stepper()
                    in_step = list(self._driven)   # the requests a failing step takes down
            if work is None:
                self._flush_wakes()        # about to wait: hand the pieces over now
                continue
            try:
                if work == "step":
                    self._step_once()
                else:
                    try:
                        self._collect_and_dispatch()
                    finally:
                        self._release_role()
            except BaseException as exc:   # noqa: BLE001 - the owners of the requests hear about it
                if self._closed:
                    return
                self._fail_driven(exc, in_step)

    def _fail_driven(self, exc: BaseException, requests: list) -> None:
        """A step failed in the driver thread (an error of the context): end the driven
        `requests` that were in it (not those submitted since), so that their owners raise."""
        err = detach_traceback(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
        logger.error("a step of the engine failed in the driver thread: %r", exc)
        with self._cond:
            requests = [r for r in requests if not r.done]
            for r in requests:
                if r.error is None:
                    r.error = err
            if not requests:
                return
        self.cancel(requests)

    def begin_close(self) -> None:
        """Refuse new work from now on (before the decode in progress is aborted, so that
        its caller reads the abort as "closed")."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the driver and refuse new work.  Returns False if a step did not finish
        within `timeout` (the caller then must not free the context); else nobody steps
        again and the caller ends the remaining requests with :meth:`end_all`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            ok = self._cond.wait_for(lambda: not self._stepping or self._stepper_ident == -1, timeout)
            if ok:
                self._stepper_ident = -1   # nobody steps a closed scheduler again
        driver = self._driver
        if driver is not None and driver is not threading.current_thread():
            driver.join(timeout)
        return ok
