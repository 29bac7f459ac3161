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

End to end, the other calls such code makes (the same call in both libraries, ``Llama`` against
``Llama``, same settings):

* **JSON grammar**: ``llm(prompt, grammar=LlamaGrammar.from_string(JSON_GBNF))``, greedy, ended by
  the grammar or ``--tokens`` (structured output: what outlines, instructor and LangChain's
  grammar option send).  The same grammar text in both, so the greedy answers must be the same:
  the report says whether they were;
* **logprobs=5**: ``llm(prompt, logprobs=5)`` on a ``Llama(logits_all=True)`` (which
  llama-cpp-python requires for logprobs), ended by the model or ``--tokens``: again the greedy
  answers must be the same;
* **streamed chat**: ``create_chat_completion(messages, stream=True)`` read chunk by chunk,
  ``--tokens`` tokens.

``--cheap-decode`` runs the cases on a small random-weight model with SmolLM2's vocabulary, whose
decode takes about a tenth of SmolLM2's: what each binding adds per token is then a visible share of
a call, as on a GPU, where a small model's decode takes a millisecond or two.  ``--calls N`` times
N calls in a row per process (such calls are too short to time one by one).

And the ceiling of the eight-thread case on this machine: llama.cpp's own ``llama-batched-bench``
(``bash benchmarks/setup_native.sh``), generation tokens/s with 8 sequences against 1.  A lock
makes llama-cpp-python's eight callers one sequence at a time, so no binding can beat it here by
more than that ratio.

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
JSON_PROMPT = ("Describe a fictional person as a JSON object with a name, an age, a home town and a long "
               "list of hobbies:\n")
CHAT = [{"role": "system", "content": "You are a storyteller."}, {"role": "user", "content": PROMPT}]
N_THREADS_CALLERS = 8
# llama.cpp's grammars/json.gbnf (the grammar text both libraries get in the JSON case)
JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"""

# ---------------------------------------------------------------------------- one measurement
# (run in a child process: `compat_bench.py --child '<json>'`, under either interpreter)


def _child(spec: dict) -> dict:
    case, model, n_tok, threads = spec["case"], spec["model"], spec["tokens"], spec["threads"]
    library, _, workload = case.partition("_")
    noop = lambda ids, scores: scores  # noqa: E731 - the cheapest processor there is
    parallel = workload == "x8"
    n_callers = N_THREADS_CALLERS if parallel else 1
    text_of_last_call: list = [""]
    logprobs_of_last_call: list = [[]]
    if library == "native":
        from pyllama import LLM

        llm = LLM(model, n_ctx=max(256, n_tok + 128) * n_callers, n_parallel=n_callers, n_threads=threads,
                  n_threads_batch=threads, kv_unified=False, verbose=False)
        hooks = {"logits_processors": [noop]} if workload == "noop" else {}

        def call() -> int:
            c = llm.complete(PROMPT, max_tokens=n_tok, temperature=0.0, ignore_eos=True, **hooks)
            return c.usage["completion_tokens"]
    else:
        if library == "lcp":
            import llama_cpp
            from llama_cpp import Llama, LlamaGrammar, LogitsProcessorList
            extra = {"swa_full": False}
        else:
            from pyllama.compat import Llama, LlamaGrammar
            from pyllama.compat.llama import LogitsProcessorList
            extra = {"n_parallel": n_callers} if parallel else {}
        if workload == "defaults":
            # Each library's own defaults, as most code constructs it: what differs is the thread
            # count (llama-cpp-python: cpu_count() // 2 for generation; pyllama: the physical
            # cores, which is the same on a machine with SMT and twice as many on one without).
            llm = Llama(model_path=model, seed=0, verbose=False)
        else:
            # Room for the prompt and every answer token (no context shift in any case).
            n_ctx = max(1024 if workload in ("json", "logprobs", "stream") else 256, n_tok + 128)
            llm = Llama(model_path=model, n_ctx=n_ctx * (1 if library == "lcp" else n_callers), n_threads=threads,
                        n_threads_batch=threads, flash_attn=True, seed=0, verbose=False,
                        logits_all=workload == "logprobs", **extra)
        if workload in ("json", "logprobs"):
            # Ended by the model or the grammar (or max_tokens): no end-of-generation ban, the same
            # in both, so the two greedy answers can be compared token for token.
            kw = dict(max_tokens=n_tok, temperature=0.0)
            if workload == "json":
                kw["grammar"] = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        elif library == "lcp":
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
        if workload == "noop":
            kw["logits_processor"] = LogitsProcessorList([noop])
        if workload == "logprobs":
            kw["logprobs"] = 5
        lock = threading.Lock() if library == "lcp" else None

        def one_call() -> int:
            if workload == "stream":
                pieces, finish = [], None
                for chunk in llm.create_chat_completion(CHAT, stream=True, **kw):
                    choice = chunk["choices"][0]
                    pieces.append(choice["delta"].get("content") or "")
                    finish = choice["finish_reason"] or finish
                if finish != "length":   # the ban held, so every answer is max_tokens long
                    raise RuntimeError(f"streamed chat ended with {finish!r}, not 'length'")
                text_of_last_call[0] = "".join(pieces)
                return n_tok
            prompt = JSON_PROMPT if workload == "json" else PROMPT
            out = llm(prompt, **kw)
            text_of_last_call[0] = out["choices"][0]["text"]
            if workload == "logprobs":
                token_logprobs = out["choices"][0]["logprobs"]["token_logprobs"]
                if not token_logprobs:
                    raise RuntimeError("no logprobs came back")
                logprobs_of_last_call[0] = [float(x) for x in token_logprobs]
            return out["usage"]["completion_tokens"]

        def call() -> int:
            if lock is not None:
                with lock:
                    return one_call()
            return one_call()

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
        # --calls > 1 times several calls in a row (a fast model's call is too short to time once).
        for _ in range(spec.get("calls", 1)):
            before = counts[0]
            worker(0)
            counts[0] += before
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
            "n_threads": n_threads if isinstance(n_threads, int) else threads,
            "text": text_of_last_call[0], "logprobs": logprobs_of_last_call[0]}


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
    "compat_json": "compat, JSON grammar",
    "lcp_json": "llama-cpp-python, JSON grammar",
    "compat_logprobs": "compat, logprobs=5",
    "lcp_logprobs": "llama-cpp-python, logprobs=5",
    "compat_stream": "compat, streamed chat",
    "lcp_stream": "llama-cpp-python, streamed chat",
}
NATIVE_BATCHED = HERE / ".cache/native/bin/llama-batched-bench"


def cheap_decode_model(vocab_from: Path) -> Path:
    """A 4-layer, 128-wide random-weight llama with ``vocab_from``'s tokenizer (tests/tiny_model.py):
    the same 49k-token vocabulary and logits row as SmolLM2, a tenth of its decode time."""
    path = HERE / ".cache" / f"cheap-decode-{vocab_from.stem}.gguf"
    if not path.exists():
        sys.path.insert(0, str(HERE.parent / "tests"))
        from tiny_model import make_tiny_llama

        path.parent.mkdir(parents=True, exist_ok=True)
        make_tiny_llama(path.with_suffix(".tmp"), vocab_from=vocab_from, n_embd=128, n_layer=4, n_ff=256,
                        n_ctx_train=2048, dtype="f16")
        path.with_suffix(".tmp").rename(path)
    return path


def batching_ceiling(model: str, n_tok: int, threads: int) -> "tuple[float, float] | None":
    """llama.cpp's own generation tokens/s with 1 and with 8 sequences (llama-batched-bench)."""
    if not NATIVE_BATCHED.exists():
        return None
    n_ctx = max(256, n_tok + 128) * N_THREADS_CALLERS   # as the compat case's eight slots
    cmd = [str(NATIVE_BATCHED), "-m", model, "-c", str(n_ctx), "-b", "512", "-ub", "512",
           "-npp", "16", "-ntg", str(n_tok), "-npl", f"1,{N_THREADS_CALLERS}", "-t", str(threads), "-fa", "on"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    speed = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[2].isdigit():
            speed[int(cells[2])] = float(cells[7])   # B -> S_TG t/s
    if 1 not in speed or N_THREADS_CALLERS not in speed:
        return None
    return speed[1], speed[N_THREADS_CALLERS]


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
    parser.add_argument("--cheap-decode", action="store_true",
                        help="use a small random-weight model with the model's vocabulary (made once in "
                             "benchmarks/.cache): its decode costs ~1 ms, so what each binding adds per "
                             "token shows, as it would on a GPU")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per answer (default 128)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1,
                        help="one-caller cases: timed calls in a row per process (default 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-lcp", action="store_true", help="leave llama-cpp-python out")
    parser.add_argument("--lcp-python", default=str(HERE / ".cache/venv-lcp/bin/python"),
                        help="the interpreter that has llama-cpp-python (setup_llama_cpp_python.sh makes it)")
    parser.add_argument("--cases", default=",".join(CASES), help="which cases (default: all)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="do not run llama-batched-bench for the eight-thread ceiling")
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
    if args.cheap_decode:
        model = str(cheap_decode_model(Path(model)))
    cases = [c for c in args.cases.split(",") if c]
    if args.skip_lcp or not Path(args.lcp_python).exists():
        if not args.skip_lcp:
            print(f"note: {args.lcp_python} not found (bash benchmarks/setup_llama_cpp_python.sh); "
                  "llama-cpp-python left out", file=sys.stderr)
        cases = [c for c in cases if not c.startswith("lcp")]
    print(describe())
    print(f"model {Path(model).name}; {args.tokens} greedy tokens per answer; {args.threads} threads; "
          f"{args.reps} reps, interleaved, each in a fresh process"
          + (f" timing {args.calls} calls in a row" if args.calls > 1 else ""))
    results: dict = {c: [] for c in cases}
    texts: dict = {}
    logprobs: dict = {}
    for rep in range(args.reps):
        for case in cases:
            python = args.lcp_python if case.startswith("lcp") else sys.executable
            spec = {"case": case, "model": model, "tokens": args.tokens, "threads": args.threads,
                    "calls": args.calls}
            r = _run_child(python, spec, timeout=600)
            results[case].append(r["tok_s"])
            texts.setdefault(case, r.get("text", ""))
            logprobs.setdefault(case, r.get("logprobs", []))
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
        ("JSON grammar: compat / llama-cpp-python", "compat_json", "lcp_json"),
        ("logprobs=5: compat / llama-cpp-python", "compat_logprobs", "lcp_logprobs"),
        ("streamed chat: compat / llama-cpp-python", "compat_stream", "lcp_stream"),
    ]
    for label, a, b in ratios:
        if a in results and b in results and med(b) > 0:
            print(f"- {label}: **{med(a) / med(b):.2f}x**")
    for workload in ("json", "logprobs"):
        a, b = texts.get(f"compat_{workload}"), texts.get(f"lcp_{workload}")
        if a is not None and b is not None:
            same = "the same" if a == b else f"DIFFERENT ({a[:60]!r} vs {b[:60]!r})"
            print(f"- {workload}: the two libraries' greedy answers are {same}")
    a, b = logprobs.get("compat_logprobs"), logprobs.get("lcp_logprobs")
    if a and b and len(a) == len(b):
        print(f"- logprobs: the chosen tokens' log-probabilities differ by at most {max(abs(x - y) for x, y in zip(a, b)):.2g}")
    if "compat_x8" in results and not args.no_ceiling:
        ceiling = batching_ceiling(model, args.tokens, args.threads)
        if ceiling is None:
            print("- batching ceiling: llama-batched-bench not built (bash benchmarks/setup_native.sh)")
        else:
            one, eight = ceiling
            print(f"- batching ceiling here: llama-batched-bench generates {one:.1f} tokens/s with 1 sequence, "
                  f"{eight:.1f} with {N_THREADS_CALLERS}: **{eight / one:.2f}x**, the most any binding can gain "
                  f"over callers serialised by a lock on this machine")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "tokens": args.tokens, "threads": args.threads,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
