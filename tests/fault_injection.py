"""Randomized stateful schedules for the shared engine, with injected faults (issue 29).

One *schedule* is drawn from a seed: an LLM on the tiny random-weight model (n_parallel
2-4, a small n_ctx so that the KV memory runs full) and a handful of callers that share
it at once -- threads calling complete()/generate(), coroutines calling acomplete()/
agenerate() on an event loop in its own thread, synchronous and asynchronous streams
(read to the end, read partly and closed, left open, or dropped), n=2 groups -- plus up
to two faults: a submit that raises, a step that raises (before the real step, or after
it so that the events it produced are at stake), a listener that raises (after doing its
work), a prompt longer than the context,
task cancellation, and reset() or close() racing all of it.

The checks are the scheduler's contract (docs: "Exactly once" in DESIGN.md):

* after every step (in the stepping thread, while it still holds the stepper role): no
  slot is held by a finished request, and the number of busy slots is the number of
  running requests; no request produces text after its terminal event;
* at the end: every caller returned or raised within a bound (a caller still waiting
  after CALLER_BOUND_S while no token was generated for NO_PROGRESS_S, or after
  HARD_BOUND_S, is "stuck"; its report has every thread's stack); the next request (a
  thread and a coroutine) is answered; every accepted request is finished and every slot
  idle; the pieces a stream delivered, joined, are the final text (in order, none lost or
  repeated), or a prefix of it for a stream that was stopped early; a completion's text
  is its request's text; an injected listener failure reaches no other caller; nobody
  sees a cancellation nobody asked for; no caller gets a programming error (TypeError,
  AttributeError, ...).

Thread timing is not reproducible, the plan is: a failure prints its seed and the plan,
``python tests/fault_injection.py --model PATH --seed N`` replays it, and ``--plan JSON``
replays a plan (edit it to narrow a failure down); scripts/soak_scheduler.py is the long
run.  Schedules run in child processes, a batch per process
(:func:`run_schedules`), so that a hang or a crash is reported with its seed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

TESTS_DIR = Path(__file__).resolve().parent

# How long a caller may take before it counts as stuck.  A schedule normally ends in well
# under a second on the tiny model; the bound is generous for a loaded 2-core machine.
CALLER_BOUND_S = 10.0
PROBE_BOUND_S = 10.0
NO_PROGRESS_S = 3.0     # ... and still waiting with no token generated for this long
HARD_BOUND_S = 90.0     # ... or still waiting after this long, progress or not

WORDS = ("the cat sat on a mat while dogs ran over hills and rivers under one bright sky "
         "then rain fell softly across quiet towns near old stone bridges").split()

SYNC_KINDS = ("complete", "complete_n2", "generate", "stream", "stream_n2")
ASYNC_KINDS = ("acomplete", "acomplete_n2", "agenerate", "astream", "astream_n2")
STREAM_ENDINGS = ("finish", "close", "abandon", "leave_open")
FAULT_CHOICES = ("submit_raises", "step_raises", "listener_raises", "too_long", "reset", "close", "cancel_task")
# Drawn with a second generator, so that adding it left the older seeds' schedules as they were.
EXTRA_FAULTS = ("step_raises_when_async_finishes",)
FAULTS = FAULT_CHOICES + EXTRA_FAULTS
STEP_EXCEPTIONS = ("InjectedFault", "DecodeError", "KeyboardInterrupt")

# Programming errors: a caller must never see one of these, whatever was injected.
PROGRAMMING_ERRORS = (TypeError, AttributeError, LookupError, AssertionError, NameError, ZeroDivisionError,
                      SystemError, RecursionError)


class InjectedFault(RuntimeError):
    """An exception this harness raised on purpose; `label` says where ("submit",
    "step", "listener:<caller id>")."""

    def __init__(self, label: str) -> None:
        super().__init__(f"injected fault ({label})")
        self.label = label


# --------------------------------------------------------------------------- the plan


@dataclass
class Caller:
    cid: str
    kind: str
    prompt: str
    max_tokens: int
    start_ms: int
    n: int = 1
    use_callback: bool = False     # complete(): collect pieces through callback=
    read_pieces: int = -1          # streams: pieces to read before `ending` (-1: all)
    ending: str = "finish"         # streams: finish | close | abandon | leave_open
    cancel_ms: int = -1            # coroutines: task.cancel() after this many ms (-1: never)


@dataclass
class Plan:
    seed: int
    n_parallel: int
    n_ctx: int
    callers: list
    faults: list = field(default_factory=list)   # dicts: {"kind": ..., ...}
    switch_interval: float = 0.005   # sys.setswitchinterval: shorter shakes out more thread races
    cache_ram_mib: int = 0           # the host-memory prompt cache (LLM(cache_ram_mib=)) in half the plans

    def describe(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def plan_from_json(text: str) -> Plan:
    """A plan as printed in a failure report (edit it to narrow a failure down)."""
    d = json.loads(text)
    return Plan(seed=d.get("seed", -1), n_parallel=d["n_parallel"], n_ctx=d["n_ctx"],
                callers=[Caller(**c) for c in d["callers"]], faults=d.get("faults", []),
                switch_interval=d.get("switch_interval", 0.005), cache_ram_mib=d.get("cache_ram_mib", 0))


def make_plan(seed: int) -> Plan:
    """The schedule for `seed` (deterministic)."""
    rng = random.Random(seed)
    n_parallel = rng.choice((2, 3, 4))
    n_ctx = rng.choice((64, 96, 128, 192))
    callers = []
    for i in range(rng.randint(2, 6)):
        kind = rng.choice(SYNC_KINDS + ASYNC_KINDS)
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
        c = Caller(cid=f"c{i}", kind=kind, prompt=prompt, max_tokens=rng.choice((1, 2, 5, 12, 30, 60)),
                   start_ms=rng.choice((0, 0, 1, 5, 20)))
        if kind.endswith("_n2"):
            c.n = 2
        if kind == "complete":
            c.use_callback = rng.random() < 0.5
        if "stream" in kind:
            c.ending = rng.choice(STREAM_ENDINGS)
            c.read_pieces = -1 if c.ending == "finish" else rng.choice((0, 1, 2, 5))
            if kind.startswith("astream") and c.ending == "leave_open":
                c.ending = "abandon"   # an async stream is either read, closed or dropped
        callers.append(c)
    faults = []
    for _ in range(rng.choice((0, 1, 1, 2))):
        kind = rng.choice(FAULT_CHOICES)
        if kind == "submit_raises":
            faults.append({"kind": kind, "submit_index": rng.randrange(len(callers))})
        elif kind == "step_raises":
            faults.append({"kind": kind, "step": rng.randint(1, 20), "when": rng.choice(("before", "after")),
                           "exc": rng.choice(STEP_EXCEPTIONS)})
        elif kind == "listener_raises":
            faults.append({"kind": kind, "submit_index": rng.randrange(len(callers)), "call": rng.randint(1, 4)})
        elif kind == "too_long":
            c = rng.choice(callers)
            c.prompt = " ".join(rng.choice(WORDS) for _ in range(n_ctx + 8))
            faults.append({"kind": kind, "cid": c.cid})
        elif kind in ("reset", "close"):
            faults.append({"kind": kind, "at_step": rng.randint(0, 30)})
        elif kind == "cancel_task":
            async_callers = [c for c in callers if c.kind in ASYNC_KINDS]
            if async_callers:
                c = rng.choice(async_callers)
                c.cancel_ms = rng.choice((0, 1, 3, 10, 30))
                faults.append({"kind": kind, "cid": c.cid})
    switch_interval = rng.choice((0.005, 0.005, 0.0005, 0.00005))
    extra = random.Random(seed * 7919 + 1)
    if extra.random() < 0.12:
        faults.append({"kind": "step_raises_when_async_finishes", "exc": extra.choice(STEP_EXCEPTIONS)})
    # (its own stream of draws: the plans of the seeds above keep what they were)
    cache_ram_mib = random.Random(seed * 7919 + 2).choice((0, 16))
    return Plan(seed=seed, n_parallel=n_parallel, n_ctx=n_ctx, callers=callers, faults=faults,
                switch_interval=switch_interval, cache_ram_mib=cache_ram_mib)


# --------------------------------------------------------------------------- the engine proxy


def _owner_name() -> str:
    """Which caller is running here: the current asyncio task's name, else the thread's."""
    try:
        asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is not None:
            return task.get_name()
    except RuntimeError:
        pass
    return threading.current_thread().name


class EngineProxy:
    """Stands in for the scheduler's Engine: records every accepted request and every
    event, checks the slots after each step, and injects the plan's faults."""

    def __init__(self, engine: Any, plan: Plan, violations: list) -> None:
        self._engine = engine
        self._violations = violations
        self._lock = threading.Lock()
        self.accepted: list = []          # every accepted request (followers included)
        self.owner: dict = {}             # id(request) -> caller id
        self.by_owner: dict = {}          # caller id -> [requests in submit order]
        self.terminal: dict = {}          # id(request) -> finish_reason of its first terminal event
        self.n_submits = 0
        self.n_steps = 0
        self.step_events: dict = {}       # step number -> threading.Event (reset/close racers)
        self.fault_submit = {f["submit_index"] for f in plan.faults if f["kind"] == "submit_raises"}
        self.fault_listener = {f["submit_index"]: f["call"] for f in plan.faults if f["kind"] == "listener_raises"}
        self.fault_step = {f["step"]: f for f in plan.faults if f["kind"] == "step_raises"}
        # {"kind": "step_raises_when_async_finishes", "exc": ...}: the first step run by a
        # caller's thread (not the driver) in which a request with a listener finishes raises.
        self.fault_when_async_finishes = next(
            ({**f, "when": "after"} for f in plan.faults if f["kind"] == "step_raises_when_async_finishes"), None)
        self.injected: list = []          # what was actually injected (for the report)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def event_for_step(self, k: int) -> threading.Event:
        with self._lock:
            ev = self.step_events.setdefault(k, threading.Event())
            if self.n_steps >= k:
                ev.set()
            return ev

    # -- submit

    def submit(self, request: Any) -> None:
        with self._lock:
            index = self.n_submits
            self.n_submits += 1
        owner = _owner_name()
        if index in self.fault_submit:
            self.injected.append(f"submit #{index} by {owner} raised")
            raise InjectedFault("submit")
        if index in self.fault_listener and request.listener is not None:
            self._wrap_listener(request, owner, self.fault_listener[index])
        self._engine.submit(request)
        group = [request, *request.followers]
        with self._lock:
            for r in group:
                self.accepted.append(r)
                self.owner[id(r)] = owner
                self.by_owner.setdefault(owner, []).append(r)

    def _wrap_listener(self, request: Any, owner: str, fail_on_call: int) -> None:
        """Make the listener of `request`'s group raise (after doing its work) on its
        `fail_on_call`-th call; the failure belongs to `owner` alone."""
        calls = [0]
        injected = self.injected
        for r in [request, *request.followers]:
            original = r.listener

            def listener(req: Any, original: Any = original) -> None:
                original(req)
                calls[0] += 1
                if calls[0] == fail_on_call:
                    injected.append(f"listener of {owner} raised on call {fail_on_call}")
                    raise InjectedFault(f"listener:{owner}")

            r.listener = listener

    # -- stepping

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """The real step, with the plan's fault before or after it.  (Engine.step either
        returns its events or, given a list, appends them to it: both are handled.)"""
        with self._lock:
            self.n_steps += 1
            k = self.n_steps
            for at, ev in self.step_events.items():
                if k >= at:
                    ev.set()
        fault = self.fault_step.get(k)
        if fault is not None and fault["when"] == "before":
            self._raise_step_fault(fault, k)
        out = args[0] if args and isinstance(args[0], list) else kwargs.get("events")
        n_before = len(out) if isinstance(out, list) else 0
        result = self._engine.step(*args, **kwargs)
        events = out[n_before:] if isinstance(out, list) else result
        self._record(list(events or ()), f"step {k}")
        if fault is not None:
            self._raise_step_fault(fault, k)   # "after": the step's work is done, then it raises
        armed = self.fault_when_async_finishes
        if armed is not None and threading.current_thread().name != "pyllama-scheduler" and any(
                reason is not None and r.listener is not None for r, _text, reason in (events or ())):
            # A caller's thread stepped and an async request finished in this step: raise now,
            # so that the step's events (that request's end among them) are at stake.
            self.fault_when_async_finishes = None
            self._raise_step_fault(armed, k)
        return result

    def _raise_step_fault(self, fault: dict, k: int) -> None:
        self.injected.append(f"step {k} raised {fault['exc']} {fault['when']} the real step "
                             f"in {threading.current_thread().name}")
        if fault["exc"] == "KeyboardInterrupt":
            raise KeyboardInterrupt
        if fault["exc"] == "DecodeError":
            from pyllama.errors import DecodeError
            raise DecodeError("injected fault (step)")
        raise InjectedFault("step")

    def collect_cancelled(self, *args: Any, **kwargs: Any) -> Any:
        out = args[0] if args and isinstance(args[0], list) else kwargs.get("events")
        n_before = len(out) if isinstance(out, list) else 0
        result = self._engine.collect_cancelled(*args, **kwargs)
        events = out[n_before:] if isinstance(out, list) else result
        self._record(list(events or ()), "collect_cancelled")
        return result

    def _record(self, events: list, where: str) -> None:
        """Check the events and the slots (this thread holds the stepper role)."""
        for r, text, reason in events:
            if id(r) in self.terminal and text:
                self._violations.append(f"piece after finish: request of {self.owner.get(id(r))} got "
                                        f"{text!r} after finishing ({self.terminal[id(r)]}) at {where}")
            if reason is not None and id(r) not in self.terminal:
                self.terminal[id(r)] = reason
        with self._lock:
            reqs = list(self.accepted)
        running = 0
        for r in reqs:
            if r.done and r.running:
                self._violations.append(f"finished request holds a slot: {self.owner.get(id(r))} "
                                        f"({r.finish_reason}) after {where}")
            running += bool(r.running)
        busy = sum(1 for s in self._engine.slot_info() if s["busy"])
        if busy != running:
            self._violations.append(f"slots: {busy} busy but {running} running requests after {where}")


# --------------------------------------------------------------------------- running one schedule


@dataclass
class Record:
    """What one caller did and got."""
    caller: Caller
    outcome: Optional[str] = None       # "ok" | "raised" | None (still waiting)
    value: Any = None                   # the result, or the exception
    pieces: dict = field(default_factory=dict)   # choice index -> [text pieces]
    stream: Any = None                  # a stream left open (closed at the end)
    full: bool = False                  # a stream read to its end
    t_end: float = 0.0                  # when it returned or raised (time.monotonic())


def _add_piece(rec: Record, item: Any) -> None:
    if isinstance(item, str):
        rec.pieces.setdefault(0, []).append(item)
    else:   # a Chunk
        rec.pieces.setdefault(item.index, []).append(item.text)


def _sync_body(llm: Any, c: Caller, rec: Record) -> Any:
    kw = dict(max_tokens=c.max_tokens, temperature=0.0)
    if c.kind == "complete":
        cb = (lambda piece: rec.pieces.setdefault(0, []).append(piece)) if c.use_callback else None
        return llm.complete(c.prompt, callback=cb, **kw)
    if c.kind == "complete_n2":
        return llm.complete(c.prompt, n=2, **kw)
    if c.kind == "generate":
        return llm.generate([c.prompt, c.prompt + " and more"], **kw)
    stream = llm.stream(c.prompt, n=c.n, **kw)
    if c.read_pieces < 0:
        for item in stream:
            _add_piece(rec, item)
        rec.full = True
        return stream.completions
    if c.read_pieces > 0:
        for item in stream:
            _add_piece(rec, item)
            if sum(len(p) for p in rec.pieces.values()) >= c.read_pieces:
                break
    if c.ending == "close":
        stream.close()
    elif c.ending == "leave_open":
        rec.stream = stream
    else:   # abandon: drop the only reference
        del stream
        gc.collect()
    return None


async def _async_body(llm: Any, c: Caller, rec: Record) -> Any:
    kw = dict(max_tokens=c.max_tokens, temperature=0.0)
    if c.kind == "acomplete":
        return await llm.acomplete(c.prompt, **kw)
    if c.kind == "acomplete_n2":
        return await llm.acomplete(c.prompt, n=2, **kw)
    if c.kind == "agenerate":
        return await llm.agenerate([c.prompt, c.prompt + " and more"], **kw)
    stream = llm.astream(c.prompt, n=c.n, **kw)
    if c.read_pieces < 0:
        async for item in stream:
            _add_piece(rec, item)
        rec.full = True
        return stream.completions
    if c.read_pieces > 0:
        async for item in stream:
            _add_piece(rec, item)
            if sum(len(p) for p in rec.pieces.values()) >= c.read_pieces:
                break
    if c.ending == "close":
        await stream.aclose()
    else:   # abandon: drop it without aclose()
        del stream
        gc.collect()
    return None


def _finish(rec: Record, fn: Any) -> None:
    try:
        rec.value = fn()
        rec.outcome = "ok"
    except BaseException as exc:   # noqa: BLE001 - every outcome is recorded and judged
        rec.value = exc
        rec.outcome = "raised"
    rec.t_end = time.monotonic()


def run_schedule(model_path: str, seed: int, plan: Optional[Plan] = None) -> dict:
    """Run the schedule of `seed` (or `plan`); returns {"seed", "plan", "violations", "stuck",
    "injected"}."""
    import pyllama

    plan = plan or make_plan(seed)
    violations: list = []
    # One compute thread: ggml's worker threads spin-wait, and on a loaded machine (CI, the
    # soak beside other work) a multi-threaded decode of this tiny model can take 100x longer.
    llm = pyllama.LLM(model_path, n_ctx=plan.n_ctx, n_parallel=plan.n_parallel, n_threads=1, n_threads_batch=1,
                      cache_ram_mib=plan.cache_ram_mib, verbose=False)
    proxy = EngineProxy(llm._sched.engine, plan, violations)
    llm._sched.engine = proxy
    records = {c.cid: Record(c) for c in plan.callers}
    sys.setswitchinterval(plan.switch_interval)
    t0 = time.monotonic()
    deadline = t0 + CALLER_BOUND_S

    # The event loop, in its own thread.
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="loop", daemon=True)
    loop_thread.start()

    async def run_async_callers() -> None:
        async def one(c: Caller) -> None:
            await asyncio.sleep(c.start_ms / 1000)
            rec = records[c.cid]
            try:
                rec.value = await _async_body(llm, c, rec)
                rec.outcome = "ok"
            except BaseException as exc:   # noqa: BLE001
                rec.value = exc
                rec.outcome = "raised"
            rec.t_end = time.monotonic()

        tasks = []
        for c in plan.callers:
            if c.kind in ASYNC_KINDS:
                task = asyncio.get_running_loop().create_task(one(c), name=c.cid)
                task.add_done_callback(lambda t, rec=records[c.cid]: _cancelled_before_start(t, rec))
                if c.cancel_ms >= 0:
                    asyncio.get_running_loop().call_later(c.cancel_ms / 1000, task.cancel)
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks)

    async_done = asyncio.run_coroutine_threadsafe(run_async_callers(), loop)

    threads = []
    for c in plan.callers:
        if c.kind in SYNC_KINDS:
            def body(c: Caller = c) -> None:
                time.sleep(c.start_ms / 1000)
                _finish(records[c.cid], lambda: _sync_body(llm, c, records[c.cid]))
            threads.append(threading.Thread(target=body, name=c.cid, daemon=True))

    racers = {}
    for f in plan.faults:
        if f["kind"] in ("reset", "close"):
            ev = proxy.event_for_step(f["at_step"])

            def race(f: dict = f, ev: threading.Event = ev) -> None:
                ev.wait(0.5)
                try:
                    (llm.reset if f["kind"] == "reset" else llm.close)()
                    racers[f["kind"]] = "ok"
                except BaseException as exc:   # noqa: BLE001
                    racers[f["kind"]] = exc
            threads.append(threading.Thread(target=race, name=f"racer-{f['kind']}", daemon=True))

    def wait_all(until: float) -> None:
        for t in threads:
            t.join(max(0.0, until - time.monotonic()))
        try:
            async_done.result(max(0.0, until - time.monotonic()))
        except Exception:   # noqa: BLE001 - a timeout: judged below by who is still waiting
            pass

    def progress() -> tuple:
        reqs = list(proxy.accepted)
        return sum(r.n_tokens for r in reqs), sum(r.done for r in reqs), len(reqs)

    def waiting() -> bool:
        return any(r.outcome is None for r in records.values()) or any(t.is_alive() for t in threads)

    for t in threads:
        t.start()
    wait_all(deadline)
    # Slow is not stuck (a loaded machine): wait on while the engine still makes progress.
    seen = progress()
    while waiting() and time.monotonic() < t0 + HARD_BOUND_S:
        wait_all(time.monotonic() + NO_PROGRESS_S)
        now = progress()
        if now == seen:
            break
        seen = now

    timings = {"callers": round(time.monotonic() - t0, 3)}
    timings.update({r.caller.cid: round(r.t_end - t0, 3) for r in records.values() if r.t_end})
    stuck = [f"{r.caller.cid} ({r.caller.kind})" for r in records.values() if r.outcome is None]
    stuck += [t.name for t in threads if t.is_alive() and t.name.startswith("racer")]
    if stuck:
        violations.append(f"stuck: {', '.join(stuck)} still waiting after {time.monotonic() - t0:.0f}s, "
                          + (f"the last {NO_PROGRESS_S:.0f}s without a token or a finished request "
                             if progress() == seen else "still generating (too slow) ")
                          + f"(generated, finished, accepted: {seen}) "
                          f"(engine requests: {_safe(lambda: llm._engine.requests())}, "
                          f"slots: {_safe(lambda: [s['busy'] for s in llm._engine.slot_info()])})")
        violations.append("thread stacks:\n" + _thread_stacks())
        return _result(plan, violations, proxy, stuck=True)

    closed = llm._closed
    # Streams left open are closed by their owner now; dropped ones are collected.
    for rec in records.values():
        if rec.stream is not None:
            rec.stream.close()
            rec.stream = None
    gc.collect()

    if not closed:
        # The faults were for the schedule: the probe must run clean.
        proxy.fault_step.clear()
        proxy.fault_when_async_finishes = None
        proxy.fault_submit.clear()
        proxy.fault_listener.clear()
        _probe(llm, loop, violations)
        timings["probe"] = round(time.monotonic() - t0, 3)
        if _safe(lambda: llm._engine.requests()):
            violations.append(f"unfinished requests after the probe: {_safe(lambda: llm._engine.requests())}")
        busy = [s["id"] for s in llm.slots() if s["busy"]]
        if busy:
            violations.append(f"slots {busy} busy after every caller ended and the probe ran")
    for r in proxy.accepted:
        if not r.done:
            violations.append(f"request of {proxy.owner.get(id(r))} never finished ({r!r})")
        elif proxy.terminal.get(id(r), r.finish_reason) != r.finish_reason:
            violations.append(f"request of {proxy.owner.get(id(r))} changed its finish_reason from "
                              f"{proxy.terminal[id(r)]} to {r.finish_reason}")

    _check_callers(plan, records, proxy, racers, violations)

    loop.call_soon_threadsafe(loop.stop)
    loop_thread.join(5)
    if loop_thread.is_alive():
        violations.append("the event loop thread did not stop")
    closed_at_end: dict = {}
    closer = threading.Thread(target=lambda: _finish_into(closed_at_end, "close", llm.close), daemon=True)
    closer.start()
    closer.join(PROBE_BOUND_S)
    if isinstance(closed_at_end.get("close"), BaseException):
        violations.append(f"llm.close() at the end raised {_format_exc(closed_at_end['close'])}")
    if closer.is_alive():
        violations.append("llm.close() did not return at the end")
        return _result(plan, violations, proxy, stuck=True)
    if not loop_thread.is_alive():
        loop.close()
    timings["end"] = round(time.monotonic() - t0, 3)
    result = _result(plan, violations, proxy, stuck=False)
    result["timings"] = timings
    return result


def _cancelled_before_start(task: Any, rec: Record) -> None:
    """A task cancelled before its first step never runs its body: record its outcome here."""
    if rec.outcome is None and task.cancelled():
        rec.value = asyncio.CancelledError()
        rec.outcome = "raised"


def _thread_stacks() -> str:
    """Where every thread is (the innermost frames), for a stuck schedule's report."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        frames = traceback.extract_stack(frame)[-6:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        out.append(f"    [{names.get(ident, ident)}] {where}")
    return "\n".join(out)


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:   # noqa: BLE001
        return repr(exc)


def _probe(llm: Any, loop: Any, violations: list) -> None:
    """The next request, from a thread and from a coroutine, must be answered."""
    out: dict = {}

    def sync_probe() -> None:
        _finish_into(out, "sync", lambda: llm.complete("probe", max_tokens=2, temperature=0.0))

    t = threading.Thread(target=sync_probe, name="probe", daemon=True)
    t.start()
    t.join(PROBE_BOUND_S)
    if t.is_alive():
        violations.append("stuck: the next complete() after the schedule did not return")
    elif isinstance(out.get("sync"), BaseException):
        violations.append(f"the next complete() after the schedule raised {out['sync']!r}")
    fut = asyncio.run_coroutine_threadsafe(llm.acomplete("probe", max_tokens=2, temperature=0.0), loop)
    try:
        fut.result(PROBE_BOUND_S)
    except TimeoutError:
        fut.cancel()
        violations.append("stuck: the next acomplete() after the schedule did not resolve")
    except BaseException as exc:   # noqa: BLE001
        violations.append(f"the next acomplete() after the schedule raised {exc!r}")


def _finish_into(out: dict, key: str, fn: Any) -> None:
    try:
        out[key] = fn()
    except BaseException as exc:   # noqa: BLE001
        out[key] = exc


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _check_callers(plan: Plan, records: dict, proxy: EngineProxy, racers: dict, violations: list) -> None:
    resets_or_closes = any(f["kind"] in ("reset", "close") for f in plan.faults)
    for kind, outcome in racers.items():
        if isinstance(outcome, BaseException) and not _is_closed_error(outcome):
            violations.append(f"llm.{kind}() raised {outcome!r}")
    for rec in records.values():
        c = rec.caller
        who = f"{c.cid} ({c.kind})"
        reqs = proxy.by_owner.get(c.cid, [])
        if rec.outcome == "raised":
            exc = rec.value
            if isinstance(exc, PROGRAMMING_ERRORS) and not _is_pyllama_error(exc):
                violations.append(f"{who} got a programming error: {_format_exc(exc)}")
            leaked = _injected_label(exc)
            if leaked is not None and leaked.startswith("listener:") and leaked != f"listener:{c.cid}":
                violations.append(f"{who} got another request's listener failure: {exc!r}")
            if (isinstance(exc, RuntimeError) and "was cancelled" in str(exc) and not resets_or_closes):
                violations.append(f"{who} was cancelled though nobody cancelled it: {exc!r}")
            continue
        # It returned: the results must be its requests' texts, and a stream's pieces, joined,
        # its final text (or a prefix of it, for a stream stopped early).
        for r in reqs:
            if not r.done:
                violations.append(f"{who} returned but its request is unfinished: {r!r}")
        if c.kind in ("complete", "complete_n2", "generate", "acomplete", "acomplete_n2", "agenerate") \
                or rec.full:
            comps = _as_list(rec.value)
            if len(comps) != len(reqs):
                violations.append(f"{who}: {len(comps)} results for {len(reqs)} requests")
            elif sorted(x.text for x in comps) != sorted(r.text for r in reqs):
                violations.append(f"{who}: result texts {[x.text for x in comps]!r} differ from the requests' "
                                  f"texts {[r.text for r in reqs]!r}")
            if c.use_callback or rec.full:
                for i, comp in enumerate(comps):
                    got = "".join(rec.pieces.get(i, []))
                    if got != comp.text:
                        violations.append(f"{who}: pieces {rec.pieces.get(i, [])!r} joined differ from the final "
                                          f"text {comp.text!r} of choice {i}")
        else:
            for i, r in enumerate(reqs):
                got = "".join(rec.pieces.get(i, []))
                if not r.text.startswith(got):
                    violations.append(f"{who}: pieces {rec.pieces.get(i, [])!r} joined are not a prefix of "
                                      f"the request's text {r.text!r} (choice {i})")


def _is_pyllama_error(exc: BaseException) -> bool:
    from pyllama.errors import PyllamaError
    return isinstance(exc, PyllamaError)


def _is_closed_error(exc: BaseException) -> bool:
    from pyllama.errors import ClosedError
    return isinstance(exc, ClosedError)


def _injected_label(exc: BaseException) -> Optional[str]:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, InjectedFault):
            return exc.label
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _format_exc(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-1500:]


def _result(plan: Plan, violations: list, proxy: EngineProxy, stuck: bool) -> dict:
    return {"seed": plan.seed, "plan": plan.describe(), "violations": violations, "stuck": stuck,
            "injected": list(proxy.injected)}


# --------------------------------------------------------------------------- batches in child processes


def _child_main(model_path: str, items: list) -> None:
    """Run `items` (seeds, or plans as JSON) in this process, one JSON line per schedule.
    After a stuck schedule the process is abandoned (its stuck threads would disturb the
    next schedules)."""
    for item in items:
        plan = plan_from_json(item) if item.startswith("{") else make_plan(int(item))
        seed = plan.seed
        print(f"START {seed}", flush=True)
        try:
            result = run_schedule(model_path, seed, plan)
        except BaseException as exc:   # noqa: BLE001 - the harness itself failed: report it
            result = {"seed": seed, "plan": plan.describe(), "stuck": False, "injected": [],
                      "violations": [f"the schedule itself raised: {_format_exc(exc)}"]}
        print("RESULT " + json.dumps(result, default=repr), flush=True)
        if result["stuck"]:
            os._exit(0)
    os._exit(0)   # do not wait for daemon threads or atexit handlers of a damaged LLM


def run_batch(model_path: str, seeds: list, timeout: float) -> list:
    """Run `seeds` (ints, or Plans with distinct seeds) in one child process; returns a
    result per schedule that ran (a crash or a hang of the child is the result of the
    schedule it was running)."""
    plans = {s.seed: s for s in seeds if isinstance(s, Plan)}
    seeds = [s.seed if isinstance(s, Plan) else s for s in seeds]
    env = dict(os.environ)
    env["PYTHONFAULTHANDLER"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(model_path),
                             *[plans[s].describe() if s in plans else str(s) for s in seeds]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, encoding="utf-8", errors="replace", env=env, start_new_session=True)
    killed = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        killed = True
    results, started = [], None
    for line in out.splitlines():
        if line.startswith("START "):
            started = int(line.split()[1])
        elif line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT "):]))
            started = None
    if started is not None:
        why = (f"the batch was killed after {timeout:.0f}s (a hang)" if killed
               else f"the process died with exit status {proc.returncode}")
        plan = plans.get(started) or make_plan(started)
        results.append({"seed": started, "plan": plan.describe(), "stuck": True, "injected": [],
                        "violations": [f"crash or hang: {why}; stderr tail:\n{err[-3000:]}"]})
    elif proc.returncode != 0 and not killed:
        results.append({"seed": seeds[-1], "plan": "", "stuck": True, "injected": [],
                        "violations": [f"the batch process exited {proc.returncode}:\n{err[-3000:]}"]})
    return results


def run_schedules(model_path: str, seeds: list, *, batch_size: int = 25, batch_timeout: float = 120.0,
                  max_failures: Optional[int] = None, progress: Any = None) -> list:
    """Run every seed (in child processes, `batch_size` per process); returns the results
    of the failing schedules.  Stops after `max_failures` failures when given."""
    failures: list = []
    pending = [s.seed if isinstance(s, Plan) else s for s in seeds]
    plans = {s.seed: s for s in seeds if isinstance(s, Plan)}
    done = 0
    while pending:
        batch = pending[:batch_size]
        results = run_batch(model_path, [plans.get(s, s) for s in batch], batch_timeout)
        ran = {r["seed"] for r in results}
        # Seeds after a stuck or crashed one did not run: put them back.
        last = max((batch.index(s) for s in ran if s in batch), default=-1)
        pending = batch[last + 1:] + pending[len(batch):]
        if not results:   # the child did not even start a schedule
            failures.append({"seed": batch[0], "plan": "", "stuck": True, "injected": [],
                             "violations": ["the batch process started no schedule"]})
            pending = pending[1:]
        done += len(results)
        failures += [r for r in results if r["violations"]]
        if progress is not None:
            progress(done, failures)
        if max_failures is not None and len(failures) >= max_failures:
            break
    return failures


def format_failure(result: dict) -> str:
    lines = [f"seed {result['seed']}: " + ("STUCK/CRASH " if result["stuck"] else "") + "violations:"]
    lines += [f"  - {v}" for v in result["violations"]]
    if result.get("injected"):
        lines.append(f"  injected: {result['injected']}")
    lines.append(f"  plan: {result['plan']}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="run scheduler fault-injection schedules")
    parser.add_argument("--model", required=True, help="path of the tiny model GGUF")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, action="append", default=[], help="replay this seed in-process")
    parser.add_argument("--plan", default=None, help="replay this plan (JSON, as a failure report prints it)")
    parser.add_argument("seeds", nargs="*")
    args = parser.parse_args()
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    if args.child:
        _child_main(args.model, args.seeds)
    if args.plan:
        res = run_schedule(args.model, -1, plan_from_json(args.plan))
        print(format_failure(res) if res["violations"] else f"plan: ok (injected: {res['injected']})", flush=True)
    for seed in args.seed + [int(x) for x in args.seeds]:
        print(make_plan(seed).describe())
        res = run_schedule(args.model, seed)
        print(format_failure(res) if res["violations"] else f"seed {seed}: ok (injected: {res['injected']})",
              flush=True)
    os._exit(0)
