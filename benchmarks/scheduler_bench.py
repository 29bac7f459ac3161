#!/usr/bin/env python3
"""What the shared-engine scheduler costs a single caller, per generated token.

    python benchmarks/scheduler_bench.py                 # SmolLM2 and Gemma 3, tg128, 7 rounds
    python benchmarks/scheduler_bench.py --models smollm2 --tokens 128 --rounds 5

Since the engine rewrite, `LLM.complete` does not run one Cython loop for the whole call:
each step goes through `pyllama.scheduler.Scheduler.drive` (stepper election under a
Condition, cancellation checks, progress hand-off), so threads, streams and the server can
share one engine.  This measures what that costs a lone caller, against `Engine.run` — the
Cython loop with no scheduler — on the same LLM, the same context and the same request:

    scheduler ms/token = (wall(complete, N) - wall(Engine.run, N)) / N

Both generate exactly N greedy tokens (ignore_eos) from the same prompt with the prompt cache
off, so both evaluate the prompt and generate alike; `complete` additionally tokenizes the
prompt and builds its sampler and Completion (a per-call cost, reported per token here, so an
upper bound on the per-step cost).  Rounds alternate the two paths (a slow drift of a shared
machine hits both alike).  Reported: medians (min–max) over rounds and the ratio of tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from machine import describe  # noqa: E402


def measure(model: str, n: int, rounds: int, threads: int) -> dict:
    from pyllama import LLM, SamplerChain, GenerationRequest

    llm = LLM(model, n_ctx=512, n_threads=threads, cache_prompt=False)
    prompt = "The history of the Roman empire begins"
    tokens = llm.tokenize(prompt)

    def via_complete() -> float:
        t = time.perf_counter()
        r = llm.complete(prompt, max_tokens=n, temperature=0, ignore_eos=True)
        dt = time.perf_counter() - t
        assert len(r.tokens) == n
        return dt

    def via_engine() -> float:
        llm.context.kv_clear()
        req = GenerationRequest(list(tokens), SamplerChain(llm.model.vocab).add_greedy(), max_tokens=n,
                                ignore_eos=True)
        t = time.perf_counter()
        llm._engine.run([req])   # the engine's own loop, bypassing the scheduler
        dt = time.perf_counter() - t
        assert len(req.tokens) == n
        return dt

    via_complete(), via_engine()   # warm-up
    sched, engine = [], []
    for i in range(rounds):
        pair = (via_complete, via_engine) if i % 2 == 0 else (via_engine, via_complete)
        got = {f: f() for f in pair}
        sched.append(got[via_complete])
        engine.append(got[via_engine])
    llm.close()
    ms = [1000 * (a - b) / n for a, b in zip(sched, engine)]
    return {
        "model": model, "tokens": n, "rounds": rounds, "threads": threads,
        "complete_tps": statistics.median(n / s for s in sched),
        "complete_tps_range": (min(n / s for s in sched), max(n / s for s in sched)),
        "engine_tps": statistics.median(n / s for s in engine),
        "engine_tps_range": (min(n / s for s in engine), max(n / s for s in engine)),
        "overhead_ms_per_token": statistics.median(ms),
        "overhead_ms_range": (min(ms), max(ms)),
        "ratio": statistics.median(engine) / statistics.median(sched),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(f"machine: {describe()}; {args.tokens} greedy tokens, {args.rounds} rounds, {args.threads} threads")
    print("| model | LLM.complete (scheduler) t/s | Engine.run (no scheduler) t/s | ratio | scheduler cost ms/token |")
    print("|---|---|---|---|---|")
    results = []
    for model in args.models.split(","):
        r = measure(model.strip(), args.tokens, args.rounds, args.threads)
        results.append(r)
        print(f"| {r['model']} | {r['complete_tps']:.1f} ({r['complete_tps_range'][0]:.1f}–{r['complete_tps_range'][1]:.1f})"
              f" | {r['engine_tps']:.1f} ({r['engine_tps_range'][0]:.1f}–{r['engine_tps_range'][1]:.1f})"
              f" | {r['ratio']:.3f}x | {r['overhead_ms_per_token']:.3f} ({r['overhead_ms_range'][0]:.3f}–"
              f"{r['overhead_ms_range'][1]:.3f}) |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": describe(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
