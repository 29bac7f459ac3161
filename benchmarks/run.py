#!/usr/bin/env python3
"""pyllama side by side with native llama.cpp and llama-cpp-python, in one run.

    python benchmarks/run.py                      # everything, both models, 5 reps (long)
    python benchmarks/run.py --quick              # smoke test: tiny sizes, 1 rep, no BENCHMARKS.md
    python benchmarks/run.py --models smollm2 --only tg,e2e --reps 3
    python benchmarks/run.py --skip-lcp           # without llama-cpp-python (no 7-minute build)
    NATIVE_BUILD_DIR=benchmarks/.cache/native-cuda NATIVE_CMAKE_ARGS=-DGGML_CUDA=on \
        python benchmarks/run.py --ngl 99           # every layer on the GPU (a CUDA build of everything)

Contenders
  native    llama.cpp's own tools (llama-bench, llama-batched-bench, llama-completion) built by
            benchmarks/setup_native.sh from the same vendored tree with pyllama's default flags
  pyllama   this package (the interpreter running this script must import it)
  lcp       llama-cpp-python 0.3.36 built from source in benchmarks/.cache/venv-lcp
            (benchmarks/setup_llama_cpp_python.sh)

Every measurement runs in its own subprocess (clean load time and peak RSS) and the
contenders are interleaved run by run (A B C A B C ...), so slow drifts of a noisy machine
hit all of them alike.  Reported: median, min-max, and ratios of medians.

Outputs: a table on stdout, JSON in benchmarks/results/latest.json (quick runs:
benchmarks/results/quick.json) and, for full runs, a rewritten BENCHMARKS.md (the
"## Findings", "## Server" and "## logprobs overhead" sections of an existing BENCHMARKS.md
are kept).  See benchmarks/README.md.

This file is the command line, the setup and the runner; what each contender runs is in
workloads.py, the statistics, the table and BENCHMARKS.md in report.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import report
from machine import machine_info
from workloads import LCP_PY, NATIVE_BIN, WORKLOADS, Cell, Config, Workloads, run_proc, tail

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"

# --------------------------------------------------------------------------- running


def run_suite(cells: list[Cell], reps: int) -> None:
    """Every runner of every cell `reps` times, contenders interleaved run by run; a runner that
    fails is reported and not run again."""
    total = sum(len(c.runners) for c in cells) * reps
    done = 0
    t_start = time.perf_counter()
    for cell in cells:
        for c in cell.runners:
            cell.samples[c] = []
        for rep in range(reps):
            for c, fn in cell.runners.items():
                if c in cell.errors:
                    done += 1
                    continue
                t0 = time.perf_counter()
                try:
                    r = fn()
                except Exception as exc:  # noqa: BLE001 - report and go on with the others
                    cell.errors[c] = str(exc)
                    print(f"  ! {cell.model}/{cell.name} {c}: {str(exc).splitlines()[0]}", flush=True)
                    done += 1
                    continue
                cell.samples[c].append(r)
                if r.get("warning"):
                    cell.warnings.append(f"{c}: {r['warning']}")
                    print(f"  ! {cell.model}/{cell.name} {c}: {r['warning']}", flush=True)
                done += 1
                shown = ", ".join(f"{k}={report.fmt(r.get(k))}" for k, *_ in cell.metrics if r.get(k) is not None)
                elapsed = time.perf_counter() - t_start
                eta = elapsed / done * (total - done)
                print(f"  [{done}/{total} eta {eta / 60:.0f} min] {cell.model}/{cell.name} rep {rep + 1} "
                      f"{c}: {shown} ({time.perf_counter() - t0:.1f}s)", flush=True)



# --------------------------------------------------------------------------- setup, machine, versions


def versions(have: dict[str, bool]) -> dict:
    out: dict[str, Any] = {}
    try:
        out["llama_cpp_commit"] = (ROOT / "vendor" / "llama.cpp" / "COMMIT").read_text().strip()
    except OSError:
        pass
    p = run_proc(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    out["pyllama_commit"] = p.out.strip() if p.rc == 0 else "uncommitted"
    d = run_proc(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    out["pyllama_dirty"] = bool(d.out.strip()) if d.rc == 0 else None
    if have.get("pyllama"):
        p = run_proc([sys.executable, "-c", "import pyllama, pyllama._core as c; "
                      "print(getattr(pyllama, '__version__', '?')); print(c.system_info())"])
        if p.rc == 0:
            lines = p.out.strip().splitlines()
            out["pyllama_version"] = lines[0]
            out["pyllama_system_info"] = lines[-1]
    if have.get("lcp"):
        p = run_proc([str(LCP_PY), "-c", "import llama_cpp; print(llama_cpp.__version__); "
                      "print(llama_cpp.llama_print_system_info().decode())"])
        if p.rc == 0:
            lines = p.out.strip().splitlines()
            out["llama_cpp_python_version"] = lines[0]
            out["llama_cpp_python_system_info"] = lines[-1]
    return out


def gpu_info() -> str:
    """The GPU(s) nvidia-smi sees, one string ("" when there is none or no nvidia-smi)."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return "; ".join(line.strip() for line in p.stdout.splitlines() if line.strip()) if p.returncode == 0 else ""


def load_models_module():
    spec = importlib.util.spec_from_file_location("_pyllama_models", ROOT / "src" / "pyllama" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def resolve_models(names: list[str]) -> dict[str, str]:
    # Loaded by path (stdlib only): works before the extension is built, keeps this process light.
    fetch_model = load_models_module().fetch_model
    if not os.environ.get("PYLLAMA_WHEELHOUSE"):
        dl = Path.home() / ".cache" / "pyllama" / "dl"
        dirs = [str(d) for d in (dl / "smol", dl / "gemma") if d.is_dir()]
        if dirs:
            os.environ["PYLLAMA_WHEELHOUSE"] = os.pathsep.join(dirs)
    return {n: str(fetch_model(n)) for n in names}


def probe_pyllama() -> tuple[bool, bool, str]:
    """(core usable, LLM usable, why not)."""
    code = ("import pyllama, pyllama._core as c\n"
            "missing = [n for n in ('Model', 'Context', 'Batch') if not hasattr(c, n)]\n"
            "print('core-missing:' + ','.join(missing) if missing else 'core-ok')\n"
            "from pyllama import LLM\n"
            "print('llm-ok')\n")
    p = run_proc([sys.executable, "-c", code])
    out = p.out.split()
    core = "core-ok" in out
    llm = core and "llm-ok" in out
    why = "" if llm else (tail(p.err, 2) or " ".join(out))
    return core, llm, why


def setup(cfg: Config, no_setup: bool) -> dict[str, bool]:
    have = {"native": True, "pyllama": True, "lcp": not cfg.skip_lcp}
    if not no_setup:
        print("== native llama.cpp tools (benchmarks/setup_native.sh)", flush=True)
        r = subprocess.run(["bash", str(HERE / "setup_native.sh")])
        if r.returncode != 0:
            print("!! native build failed; native runs are skipped")
        if not cfg.skip_lcp:
            print("== llama-cpp-python (benchmarks/setup_llama_cpp_python.sh)", flush=True)
            r = subprocess.run(["bash", str(HERE / "setup_llama_cpp_python.sh")])
            if r.returncode != 0:
                print("!! llama-cpp-python build failed; its runs are skipped")
    tools = ("llama-bench", "llama-batched-bench", "llama-completion")
    missing = [t for t in tools if not (NATIVE_BIN / t).exists()]
    if missing:
        print(f"!! native tools missing in {NATIVE_BIN} ({', '.join(missing)}): native runs skipped")
        have["native"] = False
    elif not (NATIVE_BIN / "load_time").exists() and (cfg.only is None or "startup" in cfg.only):
        print(f"!! {NATIVE_BIN / 'load_time'} missing: native startup fails (the other native runs go on)")
    if have["lcp"] and not LCP_PY.exists():
        print(f"!! {LCP_PY} missing: llama-cpp-python runs skipped (run benchmarks/setup_llama_cpp_python.sh)")
        have["lcp"] = False
    core, llm, why = probe_pyllama()
    have["pyllama"], have["pyllama_llm"] = core, llm
    if not core:
        print(f"!! pyllama._core not usable from {sys.executable} ({why}): pyllama runs skipped")
    elif not llm:
        print(f"!! pyllama.LLM not usable ({why}): only pyllama._core workloads (import, pp, tg) run")
    return have


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Workloads: " + ", ".join(WORKLOADS))
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 1 rep, no BENCHMARKS.md")
    ap.add_argument("--models", default="smollm2,gemma3", help="comma list (smollm2, gemma3)")
    ap.add_argument("--reps", type=int, default=None, help="runs per contender and workload (default 5; quick 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ngl", type=int, default=0, metavar="N",
                    help="layers offloaded to the GPU (default 0: CPU only; 99 or -1: all): -ngl N for every "
                         "native tool, n_gpu_layers=N for pyllama and llama-cpp-python (needs GPU builds, "
                         "see NATIVE_CMAKE_ARGS / NATIVE_BUILD_DIR in benchmarks/README.md)")
    ap.add_argument("--only", default=None, help="comma list of workloads: " + ",".join(WORKLOADS))
    ap.add_argument("--skip-lcp", action="store_true", help="leave llama-cpp-python out (no venv build)")
    ap.add_argument("--no-setup", action="store_true", help="do not run the setup scripts (use what is built)")
    ap.add_argument("--no-kvu", action="store_true",
                    help="run llama-batched-bench without -kvu (pyllama's Context defaults to a unified KV cache)")
    ap.add_argument("--lcp-ignore-eos", choices=("logit_bias", "patch"), default="logit_bias",
                    help="how llama-cpp-python is made to ignore end-of-generation: logit_bias={eog: -inf} "
                         "(public API, adds a Python logits processor per token) or patch (no overhead)")
    ap.add_argument("--md", dest="md", action="store_true", default=None, help="write BENCHMARKS.md (default: full runs only)")
    ap.add_argument("--no-md", dest="md", action="store_false")
    ap.add_argument("--md-file", default=str(BENCHMARKS_MD), help="where --md writes (default: BENCHMARKS.md)")
    ap.add_argument("--json", default=None, help="results file (default benchmarks/results/latest.json; quick: quick.json)")
    args = ap.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    only = None
    if args.only:
        only = {w.strip() for w in args.only.split(",") if w.strip()}
        bad = only - set(WORKLOADS)
        if bad:
            ap.error(f"unknown workloads {sorted(bad)}; choose from {', '.join(WORKLOADS)}")
    reps = args.reps or (1 if args.quick else 5)
    kw = dict(models=models, reps=reps, threads=args.threads, quick=args.quick,
              skip_lcp=args.skip_lcp, only=only)
    cfg = Config.quick_sizes(**kw) if args.quick else Config(**kw)
    cfg.native_kvu = not args.no_kvu
    cfg.lcp_ignore_eos = args.lcp_ignore_eos
    cfg.ngl = args.ngl

    have = setup(cfg, args.no_setup)
    print("== models", flush=True)
    paths = resolve_models(models)
    for k, p in paths.items():
        print(f"   {k}: {p}")
    suite = Workloads(cfg, paths, have)
    suite.build()
    cells = suite.cells
    contenders = report.contenders_of(cells)

    meta = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python benchmarks/run.py" + "".join(" " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(),
        "versions": versions(have),
        "config": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(cfg).items()},
        "models": paths,
        "quick": cfg.quick,
        "contenders": {k: v for k, v in have.items()},
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GGML_", "LLAMA_"))},
    }
    if cfg.ngl:
        meta["gpu"] = gpu_info()
    print(f"== {len(cells)} workloads x {reps} reps; contenders: {', '.join(contenders)}", flush=True)
    print(f"   settings: {cfg.threads} threads, -ngl {cfg.ngl} "
          f"({'CPU only' if cfg.ngl == 0 else 'GPU: ' + (meta['gpu'] or 'none found by nvidia-smi')}); "
          f"native tools: {NATIVE_BIN}", flush=True)
    run_suite(cells, reps)

    rows = [r for c in cells for r in report.summarize(c)]
    print()
    report.print_table(rows, contenders)
    report.print_errors(cells)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.json) if args.json else RESULTS / ("quick.json" if cfg.quick else "latest.json")
    result = {"meta": meta, "rows": rows, "samples": [
        {"model": c.model, "workload": c.name, "samples": c.samples, "errors": c.errors,
         "warnings": c.warnings} for c in cells]}
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nresults: {out}")
    write_md = args.md if args.md is not None else not cfg.quick
    if write_md:
        md = Path(args.md_file)
        report.write_markdown(report.render_markdown(meta, rows, contenders, cells), md)
        print(f"{md} rewritten")
    return 1 if report.errors_of(cells) else 0


if __name__ == "__main__":
    sys.exit(main())
