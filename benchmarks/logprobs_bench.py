#!/usr/bin/env python3
"""logprobs overhead: per-token generation time of pyllama's `LLM.complete` with logprobs off,
``logprobs=True`` (top_logprobs=0) and ``top_logprobs=5`` / ``20`` (issue 14).

    python benchmarks/logprobs_bench.py                       # SmolLM2 and Gemma 3, 5 reps
    python benchmarks/logprobs_bench.py --models smollm2 --reps 3 --json out.json

For each model one process loads one `LLM` (n_ctx 2048, --threads threads, greedy) and, after a
warm-up, runs --reps rounds; a round runs every mode once, in an order rotated round by round
(so a slow drift of the machine hits all modes alike).  One measurement of a mode is

    per-token ms = (wall time of complete(max_tokens=N) - wall time of complete(max_tokens=1)) / (N - 1)

with ``ignore_eos=True`` so every call generates exactly N tokens (default 128, tg128).  The
difference cancels prompt evaluation and per-call fixed costs; what is left is the cost of one
more generated token as the caller sees it: decode + sampling + (with logprobs) the log-softmax
over the vocabulary in the Cython loop + building the `TokenLogprob` objects of the result.
Reported: medians (min-max) over the rounds, overhead vs off in ms/token and as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct Q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": ("Gemma 3 270M Q4_K_M", "gemma-3-270m-q4_k_m.gguf"),
}
# (label, complete() kwargs)
MODES = [
    ("off", {}),
    ("logprobs", {"logprobs": True, "top_logprobs": 0}),
    ("top5", {"logprobs": True, "top_logprobs": 5}),
    ("top20", {"logprobs": True, "top_logprobs": 20}),
]
PROMPT = "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz"


def model_path(name: str) -> str:
    base = os.environ.get("PYLLAMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyllama")
    return os.path.join(base, "models", MODELS[name][1])


def timed(llm, n: int, kw: dict) -> float:
    t0 = time.perf_counter()
    c = llm.complete(PROMPT, max_tokens=n, temperature=0, ignore_eos=True, **kw)
    dt = time.perf_counter() - t0
    if len(c.tokens) != n:
        raise RuntimeError(f"expected {n} tokens, got {len(c.tokens)}")
    if kw and (c.logprobs is None or len(c.logprobs) != n):
        raise RuntimeError("logprobs missing")
    return dt


def bench_model(name: str, n: int, reps: int, threads: int) -> dict:
    from pyllama import LLM

    llm = LLM(model_path(name), n_ctx=2048, n_threads=threads, n_threads_batch=threads)
    try:
        for _, kw in MODES:                       # warm-up: pages, caches, first-call costs
            timed(llm, 16, kw)
        samples: dict = {label: [] for label, _ in MODES}
        for r in range(reps):
            order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
            for label, kw in order:
                t_n = timed(llm, n, kw)
                t_1 = timed(llm, 1, kw)
                samples[label].append(1000.0 * (t_n - t_1) / (n - 1))
    finally:
        llm.close()
    out = {"model": name, "n": n, "reps": reps, "threads": threads, "samples_ms_per_token": samples}
    base = statistics.median(samples["off"])
    out["rows"] = []
    for label, kw in MODES:
        med = statistics.median(samples[label])
        out["rows"].append({"mode": label, "kwargs": kw, "ms_per_token": med,
                            "min": min(samples[label]), "max": max(samples[label]),
                            "tokens_per_s": 1000.0 / med, "overhead_ms": med - base, "ratio": med / base})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per call (default 128)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    results = [bench_model(m, args.tokens, args.reps, args.threads) for m in args.models]
    print("\n| model | mode | ms/token (min-max) | tokens/s | overhead vs off [ms/token] | ratio vs off |\n"
          "|---|---|---|---|---|---|")
    for res in results:
        for row in res["rows"]:
            kw = ", ".join(f"{k}={v}" for k, v in row["kwargs"].items()) or "logprobs off"
            print(f"| {MODELS[res['model']][0]} | {kw} | {row['ms_per_token']:.3f} "
                  f"({row['min']:.3f}-{row['max']:.3f}) | {row['tokens_per_s']:.1f} | "
                  f"{row['overhead_ms']:+.3f} | {row['ratio']:.3f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
