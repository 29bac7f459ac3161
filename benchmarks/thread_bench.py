#!/usr/bin/env python3
"""Decode speed by calling thread: the main thread, a fresh thread per call, a thread pool.

    python benchmarks/thread_bench.py                      # SmolLM2, 128 tokens, 5 rounds
    python benchmarks/thread_bench.py --tokens 256 --rounds 7 --threads 2

llama.cpp's CPU backend is built with OpenMP, and libgomp gives every thread that starts a
parallel region its own team of worker threads.  Once a process has more OpenMP threads than CPUs
(a second calling thread is enough when n_threads is the CPU count), libgomp stops spinning at its
barriers and every barrier in the graph becomes a futex sleep: decode from any thread got ~3x
slower on a 2-core machine.  pyllama runs every multi-threaded graph computation on one long-lived
compute thread (src/cxx/pyllama_compute.h) so that the caller's thread does not matter; this
benchmark checks that it does not.

Per mode, one greedy ``LLM.complete`` of exactly ``--tokens`` tokens (``ignore_eos``), repeated
``--rounds`` times, interleaved across the modes; reported: generation tokens/s (llama.cpp's own
eval timing, and wall clock) as medians, and each mode's ratio to the main thread.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="n_threads (default: pyllama's)")
    args = ap.parse_args()

    from pyllama import LLM

    path = args.model or "smollm2"
    print(describe())
    llm = LLM(path, n_ctx=1024, temperature=0, ignore_eos=True,
              **({"n_threads": args.threads} if args.threads else {}))
    print(f"model {Path(path).name}, n_threads={args.threads or 'default'}, {args.tokens} tokens/call, "
          f"{args.rounds} rounds")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)

    def call() -> tuple[float, float]:
        out = llm.complete(PROMPT, max_tokens=args.tokens)
        t = out.timings
        return t.predicted_per_second, out.usage["completion_tokens"] / (t.total_ms / 1000.0)

    def in_new_thread() -> tuple[float, float]:
        box = []
        th = threading.Thread(target=lambda: box.append(call()))
        th.start()
        th.join()
        return box[0]

    modes = {
        "main thread": call,
        "new thread per call": in_new_thread,
        "thread pool (4 workers)": lambda: pool.submit(call).result(),
    }
    call()  # warm-up: page in the weights
    results: dict[str, list] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            results[name].append(fn())
    pool.shutdown()
    llm.close()

    base = statistics.median(r[0] for r in results["main thread"])
    print(f"{'mode':26} {'eval tok/s':>11} {'wall tok/s':>11} {'vs main':>8}")
    for name, rows in results.items():
        ev = statistics.median(r[0] for r in rows)
        wall = statistics.median(r[1] for r in rows)
        print(f"{name:26} {ev:11.1f} {wall:11.1f} {ev / base:7.2f}x")


if __name__ == "__main__":
    main()
