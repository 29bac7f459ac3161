#!/usr/bin/env python3
"""Python time per streamed token, at many concurrent streams (issue 29's per-token benchmark).

    python benchmarks/stream_overhead_bench.py                       # SmolLM2, 8 and 32 streams
    python benchmarks/stream_overhead_bench.py --streams 8 32 --tokens 64 --rounds 5
    PYTHONPATH=/path/to/other/build python benchmarks/stream_overhead_bench.py --label before

N async streams (``LLM.astream(..., chunks=True)``) share one LLM with N slots, as the server's
clients do; each consumer turns every chunk into the bytes of an OpenAI SSE event (``json.dumps``
of a ``chat.completion.chunk``), the server's own per-token work.  Every answer is exactly
``--tokens`` greedy tokens (``ignore_eos``).  Measured per round:

* **decode**: the wall time of the ``llama_decode`` calls (and the wait for their outputs), as the
  engine times them (``Engine.t_decode_ms_total``).  Until 2026-12-06 this was ``Context.perf()``'s
  t_p_eval + t_eval, which leaves out llama.cpp's own work inside ``llama_decode`` around the graph
  compute (graph building, KV bookkeeping, copying the logits out: ~0.3 ms a step at 8 streams,
  shown as *llama.cpp outside compute*) and so counted it as pyllama's;
* **stepper**: the wall time of every ``Scheduler._step_once`` (one engine step plus the listeners
  it dispatches) — the work on the critical path of every stream;
* **Python per step** = (stepper - decode) / steps, and as a share of the decode time: the
  engine's own Python work (batch building, sampling bookkeeping, detokenizing, stop checks,
  listeners);
* **Python per token per stream** = (stepper - decode) / tokens generated;
* **consumer per token**: the event loop's time per chunk (queue hand-off, SSE encoding), which
  runs while the next decode is in flight on the other core;
* **tokens/s**: all streams' tokens / wall time.

Reported: medians (min–max) over rounds.  The machine and its load are printed first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "List some facts about the moon.",
    "Describe a walk through a forest in autumn.",
]


def _instrument(llm) -> list:
    """Time every step of the LLM's scheduler (step + listener dispatch): returns the list the
    durations (s) are appended to."""
    sched = llm._sched
    inner = sched._step_once
    durations: list = []

    def timed() -> None:
        t = time.perf_counter()
        try:
            inner()
        finally:
            durations.append(time.perf_counter() - t)

    sched._step_once = timed
    return durations


async def _consume(llm, prompt: str, n_tokens: int, consumer_s: list) -> int:
    n = 0
    created = int(time.time())
    async for chunk in llm.astream(prompt, chunks=True, max_tokens=n_tokens, temperature=0, ignore_eos=True):
        t = time.perf_counter()
        event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created, "model": "m",
                 "choices": [{"index": chunk.index, "delta": {"content": chunk.text},
                              "finish_reason": chunk.finish_reason}]}
        data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
        n += len(chunk.token_ids)
        consumer_s.append(time.perf_counter() - t)
        assert data
    return n


def one_round(llm, durations: list, streams: int, n_tokens: int) -> dict:
    ctx = llm.context
    llm.reset()                     # every round evaluates its prompts afresh
    ctx.perf_reset()
    del durations[:]
    consumer_s: list = []
    steps0 = llm._engine.n_decode_total
    t_decode0 = llm._engine.t_decode_ms_total

    async def main() -> list:
        return await asyncio.gather(*(_consume(llm, PROMPTS[i % len(PROMPTS)], n_tokens, consumer_s)
                                      for i in range(streams)))

    t0 = time.perf_counter()
    counts = asyncio.run(main())
    wall = time.perf_counter() - t0
    perf = ctx.perf()
    # llama_decode's own wall time (the engine times the call): llama.cpp's graph building, KV
    # bookkeeping and logits copies happen inside it, outside perf()'s t_eval, and llama-server
    # pays them the same; what is left of the stepper time is pyllama's own work.
    decode_s = (llm._engine.t_decode_ms_total - t_decode0) / 1000.0
    compute_s = (perf["t_p_eval_ms"] + perf["t_eval_ms"]) / 1000.0
    steps = llm._engine.n_decode_total - steps0
    tokens = sum(counts)
    assert tokens == streams * n_tokens, (tokens, streams, n_tokens)
    stepper = sum(durations)
    python = max(stepper - decode_s, 0.0)
    return {"wall_s": wall, "decode_s": decode_s, "stepper_s": stepper, "steps": steps, "tokens": tokens,
            "tps": tokens / wall, "python_ms_per_step": 1000 * python / max(steps, 1),
            "python_share_of_decode": python / decode_s if decode_s else float("nan"),
            "python_us_per_token": 1e6 * python / tokens,
            "decode_outside_compute_ms_per_step": 1000 * max(decode_s - compute_s, 0.0) / max(steps, 1),
            "consumer_us_per_token": 1e6 * sum(consumer_s) / max(len(consumer_s), 1)}


def measure(model: str, streams: int, n_tokens: int, rounds: int, threads: int) -> dict:
    from pyllama import LLM

    prompt_room = 64
    llm = LLM(model, n_parallel=streams, n_ctx=streams * (n_tokens + prompt_room), n_batch=max(512, streams),
              n_threads=threads, kv_unified=False)
    durations = _instrument(llm)
    try:
        one_round(llm, durations, streams, min(n_tokens, 8))     # warm-up
        runs = [one_round(llm, durations, streams, n_tokens) for _ in range(rounds)]
    finally:
        llm.close()

    def stat(key: str) -> tuple:
        vals = [r[key] for r in runs]
        return statistics.median(vals), min(vals), max(vals)

    return {"model": model, "streams": streams, "tokens": n_tokens, "rounds": rounds,
            **{k: stat(k) for k in ("tps", "python_ms_per_step", "python_share_of_decode", "python_us_per_token",
                                    "consumer_us_per_token", "steps", "decode_outside_compute_ms_per_step")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--streams", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="", help="a name for this build in the table (e.g. before/after)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--wake-per-stream", action="store_true",
                    help="hand each stream's pieces to the event loop with its own call_soon_threadsafe "
                         "(the behaviour before the per-loop mailbox), to measure what the mailbox saves")
    args = ap.parse_args()
    import pyllama

    if args.wake_per_stream:
        import pyllama.streams as streams_mod

        def post(self, queue, items, on_lost=None) -> bool:   # one wake-up per stream and step, as before
            loop = self.loop_ref()
            if loop is None or loop.is_closed():
                return False
            try:
                loop.call_soon_threadsafe(_put_all, queue, items)
            except RuntimeError:
                return False
            return True

        def _put_all(queue, items) -> None:
            for item in items:
                queue.put_nowait(item)

        streams_mod._Mailbox.post = post

    print(f"machine: {describe()}")
    print(f"pyllama from {Path(pyllama.__file__).parent}; {args.tokens} greedy tokens per stream, "
          f"{args.rounds} rounds, {args.threads} threads")
    print("| build | streams | tokens/s | Python ms/step | Python / decode | Python µs/token | consumer µs/token "
          "| llama.cpp outside compute, ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for n in args.streams:
        r = measure(args.model, n, args.tokens, args.rounds, args.threads)
        results.append(r)

        def f(key: str, fmt: str) -> str:
            m, lo, hi = r[key]
            return f"{m:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"

        share = r["python_share_of_decode"]
        print(f"| {args.label or '-'} | {n} | {f('tps', '.1f')} | {f('python_ms_per_step', '.3f')} | "
              f"{100 * share[0]:.2f}% ({100 * share[1]:.2f}–{100 * share[2]:.2f}%) | "
              f"{f('python_us_per_token', '.1f')} | {f('consumer_us_per_token', '.1f')} | "
              f"{f('decode_outside_compute_ms_per_step', '.3f')} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": describe(), "label": args.label, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
