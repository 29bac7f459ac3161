#!/usr/bin/env python3
"""The llama-cpp-python compatibility layer, measured (issue 24's benchmark).

    python benchmarks/compat_bench.py                        # SmolLM2, 128 tokens, 5 reps
    python benchmarks/compat_bench.py --tokens 128 --reps 5 --threads 2
    python benchmarks/compat_bench.py --skip-lcp             # without llama-cpp-python

Every measurement runs in a fresh process, the contenders interleaved rep by rep, on the same
model, prompt, threads and greedy sampling, each answer exactly ``--tokens`` tokens
(end-of-generation tokens banned: ``logit_bias`` for pyllama's compat layer, ``ignore_eos`` for
LLM.complete, and for llama-cpp-python its end-of-generation check patched off, which costs it
nothing per token, unlike its Python ``logit_bias``):

* **LLM.complete**: pyllama's own API (``ignore_eos`` is its native spelling of the same ban);
* **LLM.complete + no-op processor**: with ``logits_processors=[lambda ids, scores: scores]``;
* **compat Llama()**: ``pyllama.compat.Llama`` called exactly as llama-cpp-python code calls it;
* **compat + no-op processor**: the same with ``logits_processor=LogitsProcessorList([noop])``;
* **llama-cpp-python Llama()**: llama-cpp-python 0.3.36 built from source with the same flags
  (``bash benchmarks/setup_llama_cpp_python.sh``; its venv's Python runs this same file);
* **... with its defaults**: ``Llama(model_path=...)`` with nothing else set, in each library; the
  one difference is the thread count each picks (printed), not the binding;
* **8 threads, one Llama**: eight threads each call ``llm(prompt)`` on one shared ``Llama`` at
  once; aggregate tokens/s.  llama-cpp-python's ``Llama`` is not thread-safe, so its calls are
  serialised by a lock (what its users must do); pyllama's batch on the engine.

Reported: medians (min–max) of tokens/s over the reps, and the ratios the issue sets targets
for: compat vs LLM.complete (<= 3% slower), compat vs llama-cpp-python (>= 1.1x), eight threads
vs llama-cpp-python's eight threads (>= 3x).  The machine and its load are printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
N_THREADS_CALLERS = 8

# ---------------------------------------------------------------------------- one measurement
# (run in a child process: `compat_bench.py --child '<json>'`, under either interpreter)


def _child(spec: dict) -> dict:
    case, model, n_tok, threads = spec["case"], spec["model"], spec["tokens"], spec["threads"]
    noop = lambda ids, scores: scores  # noqa: E731 - the cheapest processor there is
    parallel = case.endswith("_x8")
    n_callers = N_THREADS_CALLERS if parallel else 1
    if case.startswith("native"):
        from pyllama import LLM

        llm = LLM(model, n_ctx=256 * n_callers, n_parallel=n_callers, n_threads=threads,
                  n_threads_batch=threads, kv_unified=False, verbose=False)
        hooks = {"logits_processors": [noop]} if case == "native_noop" else {}

        def call() -> int:
            c = llm.complete(PROMPT, max_tokens=n_tok, temperature=0.0, ignore_eos=True, **hooks)
            return c.usage["completion_tokens"]
    else:
        if case.startswith("lcp"):
            import llama_cpp
            from llama_cpp import Llama, LogitsProcessorList
            extra = {"swa_full": False}
        else:
            from pyllama.compat import Llama
            from pyllama.compat.llama import LogitsProcessorList
            extra = {"n_parallel": n_callers} if parallel else {}
        if case.endswith("_defaults"):
            # Each library's own defaults, as most code constructs it: what differs is the thread
            # count (llama-cpp-python: cpu_count() // 2 for generation; pyllama: the physical
            # cores, which is the same on a machine with SMT and twice as many on one without).
            llm = Llama(model_path=model, seed=0, verbose=False)
        else:
            llm = Llama(model_path=model, n_ctx=256 * (1 if case.startswith("lcp") else n_callers), n_threads=threads,
                        n_threads_batch=threads, flash_attn=True, seed=0, verbose=False, **extra)
        if case.startswith("lcp"):
            # llama-cpp-python applies logit_bias as a Python logits processor (a per-token cost),
            # and drops it when a logits_processor is given too (list.extend returns None): make it
            # never see an end-of-generation token instead, at no cost (benchmarks/worker.py's
            # "patch" way).  This favours llama-cpp-python slightly.
            import llama_cpp.llama as lcp_llama_mod

            lcp_llama_mod.llama_cpp.llama_vocab_is_eog = lambda vocab, tok: False  # type: ignore
            llama_cpp.llama_vocab_is_eog = lambda vocab, tok: False  # type: ignore
            kw = dict(max_tokens=n_tok, temperature=0.0)
        else:
            eog = set(llm.llm._eog_tokens())
            kw = dict(max_tokens=n_tok, temperature=0.0, logit_bias={t: float("-inf") for t in eog})
        if case.endswith("_noop"):
            kw["logits_processor"] = LogitsProcessorList([noop])
        lock = threading.Lock() if case.startswith("lcp") else None

        def call() -> int:
            if lock is not None:
                with lock:
                    out = llm(PROMPT, **kw)
            else:
                out = llm(PROMPT, **kw)
            return out["usage"]["completion_tokens"]

    call()   # warm-up: first-call costs (threads, caches) are not what is measured
    counts = [0] * n_callers
    errors: list = []

    def worker(i: int) -> None:
        try:
            counts[i] = call()
        except BaseException as exc:   # noqa: BLE001 - reported, not swallowed
            errors.append(repr(exc))

    t0 = time.perf_counter()
    if n_callers == 1:
        # One caller: in the main thread, where the warm-up ran, as a script calls it.  (From a
        # second thread llama-cpp-python's decode gets a second OpenMP team, which throttles
        # libgomp's barriers: ~3x slower on 2 cores.  pyllama runs every multi-threaded decode on
        # one compute thread, so the calling thread no longer matters to it; thread_bench.py.)
        worker(0)
    else:
        workers = [threading.Thread(target=worker, args=(i,)) for i in range(n_callers)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    n_threads = getattr(llm, "n_threads", None)
    return {"tokens": sum(counts), "wall_s": wall, "tok_s": sum(counts) / wall,
            "n_threads": n_threads if isinstance(n_threads, int) else threads}


# ---------------------------------------------------------------------------- the driver

CASES = {
    "native": "LLM.complete",
    "native_noop": "LLM.complete + no-op processor",
    "compat": "compat Llama()",
    "compat_noop": "compat + no-op processor",
    "lcp": "llama-cpp-python Llama()",
    "lcp_noop": "llama-cpp-python + no-op processor",
    "compat_defaults": "compat Llama(model_path) with its defaults",
    "lcp_defaults": "llama-cpp-python Llama(model_path) with its defaults",
    "compat_x8": f"{N_THREADS_CALLERS} threads, one compat Llama",
    "lcp_x8": f"{N_THREADS_CALLERS} threads, one llama-cpp-python Llama (locked)",
}


def _run_child(python: str, spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):])
    raise RuntimeError(f"{spec['case']} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per answer (default 128)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-lcp", action="store_true", help="leave llama-cpp-python out")
    parser.add_argument("--lcp-python", default=str(HERE / ".cache/venv-lcp/bin/python"),
                        help="the interpreter that has llama-cpp-python (setup_llama_cpp_python.sh makes it)")
    parser.add_argument("--cases", default=",".join(CASES), help="which cases (default: all)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args()

    if args.child:
        print("@@RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
        return 0

    sys.path.insert(0, str(HERE))
    from machine import describe

    model = args.model
    if model is None:
        from pyllama.models import fetch_model
        model = str(fetch_model("smollm2"))
    cases = [c for c in args.cases.split(",") if c]
    if args.skip_lcp or not Path(args.lcp_python).exists():
        if not args.skip_lcp:
            print(f"note: {args.lcp_python} not found (bash benchmarks/setup_llama_cpp_python.sh); "
                  "llama-cpp-python left out", file=sys.stderr)
        cases = [c for c in cases if not c.startswith("lcp")]
    print(describe())
    print(f"model {Path(model).name}; {args.tokens} greedy tokens per answer; {args.threads} threads; "
          f"{args.reps} reps, interleaved, each in a fresh process")
    results: dict = {c: [] for c in cases}
    for rep in range(args.reps):
        for case in cases:
            python = args.lcp_python if case.startswith("lcp") else sys.executable
            spec = {"case": case, "model": model, "tokens": args.tokens, "threads": args.threads}
            r = _run_child(python, spec, timeout=600)
            results[case].append(r["tok_s"])
            print(f"  rep {rep + 1}/{args.reps} {CASES[case]:<52} {r['tok_s']:8.1f} tok/s "
                  f"({r['n_threads']} generation threads)", flush=True)

    def med(case: str) -> float:
        return statistics.median(results[case]) if results.get(case) else float("nan")

    print()
    print("| case | tokens/s, median (min–max) |")
    print("|---|---|")
    for case in cases:
        v = results[case]
        print(f"| {CASES[case]} | {med(case):.1f} ({min(v):.1f}–{max(v):.1f}) |")
    print()
    ratios = [
        ("compat / LLM.complete (target >= 0.97)", "compat", "native"),
        ("compat + no-op processor / LLM.complete + no-op processor", "compat_noop", "native_noop"),
        ("LLM.complete + no-op processor / LLM.complete", "native_noop", "native"),
        ("compat / llama-cpp-python (target >= 1.1)", "compat", "lcp"),
        ("compat + no-op / llama-cpp-python + no-op", "compat_noop", "lcp_noop"),
        (f"{N_THREADS_CALLERS} threads: compat / llama-cpp-python (target >= 3)", "compat_x8", "lcp_x8"),
        ("constructor defaults: compat / llama-cpp-python", "compat_defaults", "lcp_defaults"),
    ]
    for label, a, b in ratios:
        if a in results and b in results and med(b) > 0:
            print(f"- {label}: **{med(a) / med(b):.2f}x**")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "tokens": args.tokens, "threads": args.threads,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
