#!/usr/bin/env python3
"""Is the portable wheel as fast as a native build?  tg128 in two interpreters, alternating.

    python scripts/compare_portable_native.py --native PY_A --portable PY_B [--reps 5]

PY_A has a native source build of pyllama (GGML_NATIVE=ON: compiled for this very CPU),
PY_B the portable wheel (GGML_NATIVE=OFF, CPU variant chosen at run time).  Each repetition
starts a fresh process in A, then one in B (A B A B ...); each process loads the model,
warms up with 16 tokens, then times greedy generation of 128 tokens with ignore_eos
(llama-bench's "tg128", through LLM.complete).  Reported: per-run tokens/s (decode only,
from pyllama's timings, and wall clock around the call), tokens per CPU-second of the
process (user + system time: far less sensitive to other processes than wall clock, and
exact with --threads 1), medians, the ratio B/A, the load average before and after, and
which CPU variant B loaded.

Run it on a quiet machine (the load average is printed so a noisy result can be told apart).
On a busy one, also run it with --threads 1 and compare the per-CPU-second ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent(
    """
    import json, os, resource, sys, time
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    import pyllama
    from pyllama import LLM
    spec = json.loads(sys.argv[1])
    llm = LLM(spec["model"], n_ctx=512, n_threads=spec["threads"], n_threads_batch=spec["threads"], seed=0)
    llm.complete(spec["prompt"], max_tokens=16, temperature=0.0, ignore_eos=True)  # warm-up
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    c = llm.complete(spec["prompt"], max_tokens=spec["tokens"], temperature=0.0, ignore_eos=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    assert len(c.tokens) == spec["tokens"], len(c.tokens)
    cpu_backend = next((b for b in pyllama.backends() if b["name"] == "CPU"), {})
    print("@@RESULT " + json.dumps({
        "decode_tps": c.timings.predicted_per_second,
        "wall_tps": spec["tokens"] / wall,
        "cpu_tps": spec["tokens"] / cpu,
        "variant": cpu_backend.get("variant") or "native (linked in)",
        "portable": pyllama.build_info()["portable"],
        "pyllama": os.path.dirname(pyllama.__file__),
    }))
    """
)


def run_one(python: str, spec: dict) -> dict:
    proc = subprocess.run([python, "-c", WORKER, json.dumps(spec)], capture_output=True, text=True,
                          cwd="/", env={**os.environ, "PYLLAMA_OFFLINE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):])
    raise SystemExit(f"{python} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--native", required=True, help="python with a native (GGML_NATIVE=ON) pyllama")
    parser.add_argument("--portable", required=True, help="python with the portable wheel installed")
    parser.add_argument("--model", default="smollm2", help="GGUF path or known model name (default smollm2)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)

    model = args.model
    if not os.path.exists(model):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
        from pyllama.models import fetch_model  # the stdlib-only model fetcher

        model = str(fetch_model(model))
    spec = {"model": model, "threads": args.threads, "tokens": args.tokens,
            "prompt": "The history of the printing press"}

    load_before = loadavg()
    print(f"model {os.path.basename(model)}, tg{args.tokens}, n_threads={args.threads}, "
          f"{args.reps} reps, load average before: {load_before}")
    results: dict[str, list[dict]] = {"native": [], "portable": []}
    for rep in range(args.reps):
        for label, python in (("native", args.native), ("portable", args.portable)):
            r = run_one(python, spec)
            results[label].append(r)
            print(f"  rep {rep + 1} {label:8s} decode {r['decode_tps']:7.2f} tok/s   wall {r['wall_tps']:7.2f} tok/s"
                  f"   per CPU-second {r['cpu_tps']:7.2f} tok"
                  f"   [{r['variant']}]  load {loadavg()}", flush=True)

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("decode_tps", "wall_tps", "cpu_tps")} for k, v in results.items()}
    ratio = {m: med["portable"][m] / med["native"][m] for m in ("decode_tps", "wall_tps", "cpu_tps")}
    for label in ("native", "portable"):
        m = med[label]
        print(f"{label:8s} median: decode {m['decode_tps']:.2f} tok/s, wall {m['wall_tps']:.2f} tok/s, "
              f"{m['cpu_tps']:.2f} tok per CPU-second  [{results[label][0]['variant']}]")
    print(f"ratio portable/native: decode {ratio['decode_tps']:.3f}, wall {ratio['wall_tps']:.3f}, "
          f"per CPU-second {ratio['cpu_tps']:.3f}")
    print(f"load average before {load_before}, after {loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "medians": med, "ratio": ratio,
                       "load_before": load_before, "load_after": loadavg(), "spec": spec}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
