#!/usr/bin/env python3
"""Ray Data throughput (issue 16): rows per second for the same prompts through

* ``single``   -- one process, ``LLM.generate`` over all rows, ``--cpus`` threads;
* ``ray-1x``    -- Ray Data, ``map_batches(LLMPredictor)`` with 1 actor of ``--cpus`` CPUs
  (``n_threads=--cpus``): the cost of Ray itself, target >= 0.9x single;
* ``ray-Nx1``   -- Ray Data with ``--cpus`` actors of 1 CPU each (``n_threads=1``): how the
  work spreads over actors; on one machine it cannot beat the cores it has, and the per-node
  figure is what a cluster multiplies by its node count.

    python benchmarks/ray_bench.py -m smollm2 --rows 200 --max-tokens 32 --reps 3

Every mode is timed end to end -- model load included (the single process loads its LLM,
each Ray run starts its actors, which load theirs) -- because that is what a batch job pays.
Each actor also stamps its rows with the wall-clock times of its start, its model load and its
batch call, so every mode reports a generate-only rate as well, and Ray modes the actors'
start-up and what follows their last call; from these the report derives the job size at
which the 1-actor mode reaches 0.9x end to end.  Every row generates exactly
--max-tokens tokens (greedy, ``ignore_eos``), so all modes do the same work.  All modes use the
same context: ``--n-parallel`` sequences of ``--ctx-per-seq`` cells each.  The batch size per
Ray mode defaults to rows / actors (each actor gets one ``generate`` call, as the single
process does); ``--batch-size`` sets it (a multiple of --n-parallel keeps every slot busy).

The single process runs before Ray starts.  Ray runs locally (``ray.init(num_cpus=--cpus)``,
its own temp dir, no dashboard, no usage stats) and is shut down at the end, also on errors.
Medians over --reps (min-max), the machine and the ratios are printed; ``--json PATH`` writes
them too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from machine import machine_info

HERE = Path(__file__).resolve().parent


def prompts(n: int) -> List[str]:
    topics = ["the sea", "a city at night", "bread", "mountains", "a library", "rain", "trains", "gardens"]
    return [f"Write a short paragraph about {topics[i % len(topics)]} (note {i}):" for i in range(n)]


def llm_args(args: argparse.Namespace, threads: int) -> Dict[str, Any]:
    return {"n_ctx": args.n_parallel * args.ctx_per_seq, "n_parallel": args.n_parallel, "kv_unified": False,
            "n_threads": threads, "temperature": 0.0, "max_tokens": args.max_tokens, "ignore_eos": True}


def run_single(model: str, rows: List[str], args: argparse.Namespace) -> Dict[str, float]:
    from pyllama import LLM

    t0 = time.perf_counter()
    with LLM(model, **llm_args(args, args.cpus)) as llm:
        t1 = time.perf_counter()
        comps = llm.generate(rows)
        t2 = time.perf_counter()
    check(len(comps), sum(len(c.tokens) for c in comps), rows, args)
    return {"wall_s": t2 - t0, "generate_s": t2 - t1}


def timed_predictor():
    """LLMPredictor that stamps every output row with wall-clock times (``time.time()``: one
    machine, so comparable across processes) of its actor's start, the end of its model load and
    its batch call.  That splits a Ray run into actor start-up (process, imports, model load),
    generation inside the actor, and what Ray adds around the calls."""
    from pyllama.integrations.ray import LLMPredictor

    class TimedPredictor(LLMPredictor):
        def __init__(self, *a: Any, **kw: Any) -> None:
            self._t_start = time.time()
            super().__init__(*a, **kw)
            self._t_loaded = time.time()

        def __call__(self, batch: Any) -> Any:
            t_call = time.time()
            out = super().__call__(batch)
            n = len(out["prompt"])
            out["t_start"] = [self._t_start] * n
            out["t_loaded"] = [self._t_loaded] * n
            out["t_call"] = [t_call] * n
            out["t_done"] = [time.time()] * n
            return out

    return TimedPredictor


def run_ray(model: str, rows: List[str], args: argparse.Namespace, actors: int, cpus_per_actor: int) -> Dict[str, float]:
    import ray.data

    batch = args.batch_size or math.ceil(len(rows) / actors)
    ds = ray.data.from_items([{"prompt": p} for p in rows])
    t0 = time.time()
    out = ds.map_batches(timed_predictor(), fn_constructor_kwargs={"model_path": model, **llm_args(args, cpus_per_actor)},
                         concurrency=actors, num_cpus=cpus_per_actor, batch_size=batch).take_all()
    t1 = time.time()
    errors = [r["error"] for r in out if r["error"] is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed, e.g. {errors[0]}")
    check(len(out), sum(r["completion_tokens"] for r in out), rows, args)
    # Per actor (keyed by its start stamp): start-up is t0 -> model loaded; generation is the sum
    # of its calls.  The run's generate_s is the busiest actor's generation time.
    actor_gen: Dict[float, float] = {}
    for call in {(r["t_start"], r["t_call"], r["t_done"]) for r in out}:
        actor_gen[call[0]] = actor_gen.get(call[0], 0.0) + call[2] - call[1]
    startup_s = max(r["t_loaded"] for r in out) - t0
    return {"wall_s": t1 - t0, "batch_size": batch, "startup_s": startup_s, "generate_s": max(actor_gen.values()),
            "tail_s": t1 - max(r["t_done"] for r in out)}


def check(n_rows: int, n_tokens: int, rows: List[str], args: argparse.Namespace) -> None:
    if n_rows != len(rows) or n_tokens != len(rows) * args.max_tokens:
        raise RuntimeError(f"got {n_rows} rows and {n_tokens} tokens, expected {len(rows)} and "
                           f"{len(rows) * args.max_tokens}")


def start_ray(cpus: int) -> str:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.data import DataContext

    temp_dir = tempfile.mkdtemp(prefix="pyllama-raybench-", dir="/tmp")   # short: socket paths
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             configure_logging=False)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    return temp_dir


def summary(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(name: str, reps: int, fn: Callable[[], Dict[str, float]], n_rows: int, results: Dict[str, Any]) -> None:
    runs = []
    for rep in range(reps):
        r = fn()
        runs.append(r)
        print(f"  {name} rep {rep + 1}/{reps}: {n_rows / r['wall_s']:.2f} rows/s ({r['wall_s']:.1f} s)", flush=True)
    entry: Dict[str, Any] = {"rows_per_s": summary([n_rows / r["wall_s"] for r in runs]), "runs": runs}
    if "generate_s" in runs[0]:
        entry["generate_rows_per_s"] = summary([n_rows / r["generate_s"] for r in runs])
    for key in ("startup_s", "tail_s"):
        if key in runs[0]:
            entry[key] = summary([r[key] for r in runs])
    results[name] = entry


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2", help="a known model name or a .gguf path (default smollm2)")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs for each mode (Ray's num_cpus; threads of the single "
                                                        "process and of the 1-actor mode; actors of the N-actor mode)")
    ap.add_argument("--n-parallel", type=int, default=16, help="sequences per context (each process)")
    ap.add_argument("--ctx-per-seq", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=0, help="Ray Data batch size (default rows / actors)")
    ap.add_argument("--modes", nargs="+", default=["single", "ray-1x", "ray-Nx1"],
                    choices=["single", "ray-1x", "ray-Nx1"])
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    from pyllama.models import resolve_model

    model = str(resolve_model(args.model, progress=True))
    rows = prompts(args.rows)
    info = {"machine": machine_info(), "model": model, "rows": args.rows, "max_tokens": args.max_tokens,
            "reps": args.reps, "cpus": args.cpus, "n_parallel": args.n_parallel, "ctx_per_seq": args.ctx_per_seq}
    print(json.dumps(info, indent=1), flush=True)
    results: Dict[str, Any] = {}

    if "single" in args.modes:
        measure("single", args.reps, lambda: run_single(model, rows, args), len(rows), results)
    if any(m.startswith("ray") for m in args.modes):
        import ray

        temp_dir = start_ray(args.cpus)
        try:
            if "ray-1x" in args.modes:
                measure("ray-1x", args.reps, lambda: run_ray(model, rows, args, 1, args.cpus), len(rows), results)
            if "ray-Nx1" in args.modes:
                measure("ray-Nx1", args.reps, lambda: run_ray(model, rows, args, args.cpus, 1), len(rows), results)
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)

    print(f"\nrows/s, median over {args.reps} reps (min-max), {args.rows} rows x {args.max_tokens} tokens, "
          f"{args.cpus} CPUs:")
    labels = {"single": "one process, LLM.generate", "ray-1x": f"Ray Data, 1 actor x {args.cpus} CPUs",
              "ray-Nx1": f"Ray Data, {args.cpus} actors x 1 CPU"}
    for name, entry in results.items():
        s = entry["rows_per_s"]
        line = f"  {labels[name]:<32} {s['median']:8.2f}  ({s['min']:.2f}-{s['max']:.2f})"
        if "generate_rows_per_s" in entry:
            line += f"   generate only: {entry['generate_rows_per_s']['median']:.2f}"
        if "startup_s" in entry:
            line += (f"   (actor start-up {entry['startup_s']['median']:.1f} s, "
                     f"after the last call {entry['tail_s']['median']:.1f} s)")
        print(line)
    if "single" in results:
        base = results["single"]["rows_per_s"]["median"]
        ratios = {name: results[name]["rows_per_s"]["median"] / base for name in results if name != "single"}
        for name, ratio in ratios.items():
            target = "  (target >= 0.90)" if name == "ray-1x" else ""
            print(f"  ratio {name} / single: {ratio:.3f}{target}")
        info["ratios_vs_single"] = ratios
        # Generation alone (no start-up on either side): what a long job converges to.
        gen_base = results["single"]["generate_rows_per_s"]["median"]
        gen_ratios = {name: results[name]["generate_rows_per_s"]["median"] / gen_base
                      for name in results if name != "single"}
        for name, ratio in gen_ratios.items():
            print(f"  ratio {name} / single, generation only: {ratio:.3f}")
        info["generate_ratios_vs_single"] = gen_ratios
        if "ray-1x" in results:
            # Rows at which the 1-actor job reaches 0.9x end to end: the fixed start-up difference
            # amortised over rows generated at the measured rates.
            single, ray1 = results["single"], results["ray-1x"]
            def not_generating(entry: Dict[str, Any]) -> float:
                return args.rows / entry["rows_per_s"]["median"] - args.rows / entry["generate_rows_per_s"]["median"]

            fixed = not_generating(ray1) - not_generating(single)
            per_row_single = 1 / single["generate_rows_per_s"]["median"]
            per_row_ray = 1 / ray1["generate_rows_per_s"]["median"]
            # 0.9 * (fixed + n * per_row_ray) <= n * per_row_single  <=>  n >= 0.9 fixed / (per_row_single - 0.9 per_row_ray)
            gap = per_row_single - 0.9 * per_row_ray
            if gap > 0:
                n09 = math.ceil(0.9 * fixed / gap)
                print(f"  ray-1x reaches 0.9x end to end from about {n09} rows "
                      f"(fixed extra cost {fixed:.1f} s at these rates)")
                info["ray_1x_rows_for_0_9"] = n09
            else:
                print("  ray-1x generation alone is below 0.9x: no job size reaches the target")
                info["ray_1x_rows_for_0_9"] = None
    info["results"] = results
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
