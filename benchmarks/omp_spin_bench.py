#!/usr/bin/env python3
"""Decode speed by libgomp spin count, on a quiet machine and on a busy one.

    python benchmarks/omp_spin_bench.py                    # SmolLM2, 3 rounds
    python benchmarks/omp_spin_bench.py --spins default,10000,1000,0 --rounds 5

llama.cpp's CPU backend (an OpenMP build, as llama.cpp's own default) meets at a barrier after
every operation of the graph: several hundred barriers per token.  libgomp's threads wait there
by spinning GOMP_SPINCOUNT times (300,000 by default: milliseconds) before they sleep.  On a quiet
machine that is what makes a small model fast; on a machine where another process wants the same
cores, a thread that spins keeps the CPU from the thread it waits for, and each barrier can cost a
scheduler time slice.  This measures what each spin count costs in both cases:

* **quiet**: one process decoding, nothing else running;
* **two decoders**: two processes decoding at once with the same settings (a server beside a
  script, two test processes, two workers);
* **busy CPU**: one process decoding beside one process that spins on one core (nice 0);
* **two decoders + busy CPU**: both at once (on 2 cores: three processes want the CPUs).

Each case runs in fresh processes (libgomp reads its environment once, when it loads), the
settings interleaved round by round.  Reported: generation ms per token (llama.cpp's own eval
timing) as medians over the rounds (and over both processes for two decoders).  A case that does
not finish ``--tokens`` tokens within ``--timeout`` seconds is reported as at least that slow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PROMPT = "Write a short story about a lighthouse keeper."
MODEL = "smollm2"


def _child(tokens: int, threads: int) -> None:
    from pyllama import LLM

    llm = LLM(os.environ.get("SPIN_BENCH_MODEL", "smollm2"), n_ctx=512, n_threads=threads, temperature=0, ignore_eos=True)
    llm.complete(PROMPT, max_tokens=4)                      # warm-up: first-call costs
    out = llm.complete(PROMPT, max_tokens=tokens)
    print("@@MS " + json.dumps(1000.0 / out.timings.predicted_per_second), flush=True)


def _env(spin: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env["SPIN_BENCH_MODEL"] = MODEL
    if spin == "libgomp":
        env["PYLLAMA_GOMP_SPINCOUNT"] = "off"          # pyllama leaves libgomp's own default
    elif spin != "pyllama":
        env["GOMP_SPINCOUNT"] = spin
    return env


def _start(spin: str, threads: int, tokens: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", str(tokens), str(threads)], env=_env(spin),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _result(proc: subprocess.Popen, deadline: float, timeout: float, tokens: int) -> float:
    try:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return timeout * 1000.0 / tokens       # at least this slow
    for line in out.splitlines():
        if line.startswith("@@MS "):
            return float(json.loads(line[5:]))
    raise RuntimeError(f"child failed (rc {proc.returncode})")


def run_case(case: str, spin: str, threads: int, tokens: int, timeout: float) -> list:
    hog = None
    if case in ("busy CPU", "two decoders + busy CPU"):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        n = 2 if case.startswith("two decoders") else 1
        procs = [_start(spin, threads, tokens) for _ in range(n)]
        deadline = time.monotonic() + timeout
        return [_result(p, deadline, timeout, tokens) for p in procs]
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--spins", default="libgomp,pyllama,100000,10000,1000,0",
                    help="GOMP_SPINCOUNT values; 'libgomp': libgomp's default (300000), 'pyllama': "
                         "pyllama's default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    ap.add_argument("--cases", default="quiet,two decoders,busy CPU,two decoders + busy CPU")
    ap.add_argument("--model", default="smollm2", help="a GGUF path or a known name (default smollm2)")
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return 0

    from machine import describe

    global MODEL
    MODEL = args.model

    import pyllama._cpu

    print(describe())
    print(f"model {MODEL}, n_threads={args.threads}, {args.tokens} tokens, {args.rounds} rounds; "
          f"pyllama's default spin count: {pyllama._cpu.GOMP_SPINCOUNT_DEFAULT}")
    spins = [s for s in args.spins.split(",") if s]
    cases = [c for c in args.cases.split(",") if c]
    configs = [(s, args.threads) for s in spins] + [("libgomp", 1)]
    results: dict = {(c, s, t): [] for c in cases for s, t in configs}
    for rnd in range(args.rounds):
        for case in cases:
            for spin, threads in configs:
                ms = run_case(case, spin, threads, args.tokens, args.timeout)
                results[(case, spin, threads)].extend(ms)
                print(f"  round {rnd + 1} {case:<24} spin {spin:>8} threads {threads}: "
                      + ", ".join(f"{m:.1f}" for m in ms) + " ms/token", flush=True)
    print()
    print("| GOMP_SPINCOUNT | threads | " + " | ".join(f"{c}, ms/token" for c in cases) + " |")
    print("|---|---|" + "---|" * len(cases))
    for spin, threads in configs:
        label = {"libgomp": "libgomp default (300000)", "pyllama": "pyllama default"}.get(spin, spin)
        cells = []
        for c in cases:
            v = results[(c, spin, threads)]
            cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})")
        print(f"| {label} | {threads} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
