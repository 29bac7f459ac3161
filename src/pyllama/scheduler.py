"""One Engine, many callers: who steps it, and how everyone else hears about their requests.

An :class:`~pyllama._core.Engine` must be stepped by one thread at a time.  Threads,
coroutines and the server all share one LLM's engine, so the :class:`Scheduler` elects
a *stepper*: any caller that waits for its request becomes the stepper when nobody else
is stepping, and each step advances every runnable request of every caller in one
``llama_decode``.  The others wait on a condition variable and are woken after each step.
Async callers (and the server) have no thread of their own that could step, so a
*driver* thread steps for them; it is started on first use and sleeps when idle.

Nothing here runs per token except: one step call, and for requests with a listener
(async streams, the server) one listener call.  Callbacks of synchronous callers run
in the caller's own thread, never in whoever happens to be the stepper.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

from pyllama import _core
from pyllama.errors import ClosedError


class Scheduler:
    """Elects one stepper at a time for an Engine shared by threads and coroutines."""

    def __init__(self, engine: "_core.Engine") -> None:
        self.engine = engine
        # Re-entrant: a __del__ run by the garbage collector inside a critical section may cancel.
        self._cond = threading.Condition(threading.RLock())
        self._closed = False
        self._driver: Optional[threading.Thread] = None
        self._n_driven = 0            # requests whose owners rely on the driver thread
        self._cancel_pending = False  # a cancel arrived while a step was running
        # The thread that holds the stepper role (steps, or works exclusively); None: free.
        self._stepper_ident: Optional[int] = None
        self._local = threading.local()     # .dispatching: this thread runs listeners now

    # ---- submitting and signalling ------------------------------------------------

    def submit(self, request: "_core.GenerationRequest", *, driven: bool = False) -> None:
        """Hand a request to the engine (it joins at the next step).  `driven`: its owner
        cannot step (async, server), so the driver thread will."""
        with self._cond:
            if self._closed:
                raise ClosedError("this LLM is closed")
            self.engine.submit(request)
            if driven:
                self._n_driven += 1 + len(request.followers)
                self._ensure_driver()
            self._cond.notify_all()

    def driven_done(self, n: int = 1) -> None:
        with self._cond:
            self._n_driven = max(0, self._n_driven - n)

    def cancel(self, requests: Iterable["_core.GenerationRequest"]) -> None:
        """Cancel from any thread.  Their slots are freed now when no step is running,
        else by the running step (within one decode)."""
        with self._cond:
            for r in requests:
                if not r.done:
                    r.cancel_requested = True
            events = []
            if self._stepping:
                self._cancel_pending = True      # the stepper frees them right after its step
            elif not self._closed:
                events = self.engine.collect_cancelled()
            self._cond.notify_all()
        self._dispatch(events)

    def cancel_soon(self, requests: Iterable["_core.GenerationRequest"]) -> None:
        """Cancel without taking any lock (for __del__, which the garbage collector may run
        inside this very scheduler's critical sections): the next step frees the slots."""
        for r in requests:
            if not r.done:
                r.cancel_requested = True
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

    # ---- stepping -----------------------------------------------------------------

    @property
    def _stepping(self) -> bool:
        return self._stepper_ident is not None

    def _take_stepper(self) -> None:
        """Become the stepper (call with the condition held, after checking _stepping)."""
        self._stepper_ident = threading.get_ident()

    def _release_stepper(self) -> None:
        """Give the stepper role up and wake the waiters (call with the condition held)."""
        self._stepper_ident = None
        self._cond.notify_all()

    def in_step(self) -> bool:
        """Is the calling thread the stepper right now (e.g. inside a listener)?"""
        return self._stepper_ident == threading.get_ident() or getattr(self._local, "dispatching", False)

    def _dispatch(self, events: list) -> None:
        """Run the listeners of the requests in `events` (this thread, no lock held)."""
        if not events:
            return
        self._local.dispatching = True
        try:
            for request, _text, _reason in events:
                listener = request.listener
                if listener is not None:
                    listener(request)
        finally:
            self._local.dispatching = False

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
                if until():
                    return
                if self._closed:
                    raise ClosedError("this LLM was closed while the call was running")
                if self._stepping or not self.engine.runnable:
                    # Someone else steps (we are woken after their step), or nothing can run
                    # yet (woken by a submit, an unpause or a cancel); the timeout is a backstop.
                    cond.wait(0.25)
                    continue
                self._take_stepper()
            self._step_once()

    def _step_once(self) -> None:
        engine = self.engine
        events: list = []
        decoded_before = engine.n_decode_total
        try:
            events = engine.step()
        except _core.DecodeAborted as exc:
            if self._closed:   # close() stopped the decode in progress
                raise ClosedError("this LLM was closed while the call was running") from exc
            raise
        finally:
            with self._cond:
                if self._cancel_pending:
                    self._cancel_pending = False
                    events = list(events) + engine.collect_cancelled()
                self._release_stepper()
        self._dispatch(events)
        if not events and engine.n_decode_total == decoded_before:
            # Nothing could run (every slot held by a request that cannot be preempted yet):
            # do not spin.
            with self._cond:
                self._cond.wait(0.005)

    @contextmanager
    def exclusive(self, timeout: Optional[float] = None) -> Iterator[None]:
        """Hold the stepper role (no step runs) for work that must not interleave with one:
        re-creating the context, sharing a prefix, resetting, closing."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._stepping, timeout):
                raise TimeoutError("the engine stayed busy")
            self._take_stepper()
        try:
            yield
        finally:
            with self._cond:
                self._release_stepper()

    # ---- the driver thread (async callers, the server) -------------------------------

    def _ensure_driver(self) -> None:
        if self._driver is None or not self._driver.is_alive():
            self._driver = threading.Thread(target=self._drive_forever, name="pyllama-scheduler", daemon=True)
            self._driver.start()

    def _drive_forever(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._closed and (self._n_driven == 0 or self._stepping or not self.engine.runnable):
                    cond.wait(0.5 if self._n_driven else None)
                if self._closed:
                    return
                self._take_stepper()
            try:
                self._step_once()
            except BaseException as exc:   # noqa: BLE001 - the owners of the requests hear about it
                self._fail_driven(exc)

    def _fail_driven(self, exc: BaseException) -> None:
        """A step failed in the driver thread (an abort by close(), an error of the
        context): end the requests that were running, so their owners raise."""
        with self._cond:
            for r in self.engine.requests():
                if not r.done and r.listener is not None:
                    r.error = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
                    r.cancel_requested = True
            self._cond.notify_all()

    def begin_close(self) -> None:
        """Refuse new work from now on (before the decode in progress is aborted, so that
        its caller reads the abort as "closed")."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the driver and refuse new work.  Returns False if a step did not finish
        within `timeout` (the caller then must not free the context)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            ok = self._cond.wait_for(lambda: not self._stepping, timeout)
            if ok:
                self._stepper_ident = -1   # nobody steps a closed scheduler again
        driver = self._driver
        if driver is not None and driver is not threading.current_thread():
            driver.join(timeout)
        return ok
