#!/usr/bin/env python3
"""pyllama side by side with native llama.cpp and llama-cpp-python, in one run.

    python benchmarks/run.py                      # everything, both models, 5 reps (long)
    python benchmarks/run.py --quick              # smoke test: tiny sizes, 1 rep, no BENCHMARKS.md
    python benchmarks/run.py --models smollm2 --only tg,e2e --reps 3
    python benchmarks/run.py --skip-lcp           # without llama-cpp-python (no 7-minute build)

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
"## Findings" section of an existing BENCHMARKS.md is kept).  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
NATIVE_BIN = CACHE / "native" / "bin"
LCP_VENV = CACHE / "venv-lcp"
LCP_PY = LCP_VENV / "bin" / "python"
WORKER = HERE / "worker.py"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"

CONTENDERS = ("native", "pyllama", "lcp")
LABELS = {"native": "native llama.cpp", "pyllama": "pyllama", "lcp": "llama-cpp-python"}
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct Q4_1", "gemma3": "Gemma 3 270M Q4_K_M"}

# --------------------------------------------------------------------------- prompts

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when a goldsmith in "
    "Mainz combined movable metal type, oil-based ink and a screw press. Within fifty years"
)
TTFT_PROMPT = (
    "You are reading a long report about the water supply of a mid-sized city. The report "
    "describes the reservoirs in the hills north of the city, the treatment plant that removes "
    "sediment and bacteria, the pumping stations that lift water to the higher districts, and "
    "the network of pipes, some more than a century old, that carry it to homes and businesses. "
    "It explains how demand rises in summer, how leaks are found with acoustic sensors, and how "
    "the utility plans to replace the oldest mains over the next twenty years. Summarise the "
    "report in three sentences:"
)
GRAMMAR_PROMPT = (
    'Return a JSON object with a key "books" whose value is a list of ten books; each book has '
    '"title", "author", "year", "genre" and "characters" (a list of objects with "name" and "age").\n'
)  # long enough that both models, greedy, fill the whole token budget with JSON
BATCH_PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
SEQ_PROMPTS = [
    "Write a short story about a lighthouse keeper:",
    "Explain how a bicycle gear works:",
    "Describe a walk through an autumn forest:",
    "Write a letter to a friend about a new job:",
    "Explain why the sky is blue:",
    "Describe the kitchen of a busy restaurant:",
    "Write a poem about the morning train:",
    "Explain how bread rises:",
    "Describe a city at night from a rooftop:",
    "Write a recipe for tomato soup:",
    "Explain what a compiler does:",
    "Describe a thunderstorm over the plains:",
    "Write a diary entry of a sailor:",
    "Explain how bees make honey:",
    "Describe an old library:",
    "Write a dialogue between a cat and a dog:",
]

# llama.cpp's grammars/json.gbnf (MIT), the grammar every contender gets.
JSON_GBNF = r'''root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
'''

# --------------------------------------------------------------------------- configuration


@dataclass
class Config:
    models: list[str]
    reps: int
    threads: int
    quick: bool
    skip_lcp: bool
    only: set[str] | None
    pp: tuple[int, ...] = (64, 512)
    tg: tuple[int, ...] = (128, 1024)
    e2e: tuple[int, ...] = (128, 1024)
    stream: tuple[int, ...] = (128, 1024)
    grammar_tokens: int = 256
    batch_tg: int = 128
    batch_npl: tuple[int, ...] = (1, 4, 8, 16)
    seq_n: int = 8
    rpc_tg: int = 128
    startup_tokens: int = 16
    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    native_kvu: bool = True
    lcp_ignore_eos: str = "logit_bias"

    @classmethod
    def quick_sizes(cls, **kw) -> "Config":
        c = cls(**kw)
        c.pp, c.tg, c.e2e, c.stream = (16, 64), (16, 32), (16, 32), (16,)
        c.grammar_tokens, c.batch_tg, c.batch_npl, c.seq_n = 32, 8, (1, 4), 4
        c.startup_tokens = 4
        c.rpc_tg = 16
        return c


WORKLOADS = ("import", "startup", "pp", "tg", "e2e", "stream", "grammar", "batched", "seqbatch", "rpc")

# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    rc: int
    out: str
    err: str
    wall_s: float
    maxrss_mb: float


def run_proc(cmd: list[str], env: dict | None = None, timeout: float = 1800, cwd: Path | None = None) -> Proc:
    """Run a command; wall time from outside, peak RSS of exactly this child (wait4)."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env,
                             cwd=str(cwd) if cwd else None)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.002)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        return Proc(p.returncode, fo.read(), fe.read(), wall, ru.ru_maxrss / 1024.0)


class BenchError(RuntimeError):
    pass


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def worker(impl: str, task: str, spec: dict, timeout: float = 1800) -> tuple[dict, Proc]:
    py = sys.executable if impl == "pyllama" else str(LCP_PY)
    spec = dict(spec, impl=impl, task=task)
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    p = run_proc([py, str(WORKER), json.dumps(spec)], env=env, timeout=timeout, cwd=HERE)
    for line in reversed(p.out.splitlines()):
        if line.startswith("@@RESULT "):
            if p.rc != 0:
                break
            return json.loads(line[len("@@RESULT "):]), p
    raise BenchError(f"{impl} {task} failed (exit {p.rc}):\n{_tail(p.err or p.out)}")


def native(tool: str, args: list[str], timeout: float = 1800) -> Proc:
    exe = NATIVE_BIN / tool
    p = run_proc([str(exe), *args], timeout=timeout)
    if p.rc != 0:
        raise BenchError(f"{tool} failed (exit {p.rc}): {' '.join(args[:6])} ...\n{_tail(p.err or p.out)}")
    return p


# --------------------------------------------------------------------------- native parsing

_PERF = {
    "load_ms": re.compile(r"load time\s*=\s*([\d.]+) ms"),
    "prompt_ms": re.compile(r"prompt eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) tokens"),
    "eval_ms": re.compile(r"(?<!prompt )eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) runs"),
    "sampling_ms": re.compile(r"sampling time\s*=\s*([\d.]+) ms"),
}


def parse_native_perf(text: str) -> dict:
    out: dict[str, float] = {}
    for key, rx in _PERF.items():
        m = rx.search(text)
        if m:
            out[key] = float(m.group(1))
            if m.lastindex and m.lastindex >= 2:
                out[key.replace("_ms", "_n")] = int(m.group(2))
    return out


# --------------------------------------------------------------------------- cells

Metric = tuple[str, str, str, str]  # key, label, unit, better ("higher"/"lower")


@dataclass
class Target:
    """A goal from issue 6/5, checked on the medians."""

    text: str
    metric: str
    kind: str  # "ratio_min" | "ratio_max" | "abs_max" | "plus_max"
    a: str  # contender (usually pyllama)
    b: str | None  # the one compared against
    value: float

    def check(self, med: dict[str, float]) -> tuple[bool | None, str]:
        va = med.get(self.a)
        vb = med.get(self.b) if self.b else None
        if va is None or (self.b and vb is None):
            return None, "n/a"
        if self.kind == "ratio_min":
            r = va / vb
            return r >= self.value, f"{r:.3f}x"
        if self.kind == "ratio_max":
            r = va / vb
            return r <= self.value, f"{r:.3f}x"
        if self.kind == "abs_max":
            return va <= self.value, f"{va:.3g}"
        if self.kind == "plus_max":
            d = va - vb
            return d <= self.value, f"{d:+.1f}"
        raise ValueError(self.kind)


@dataclass
class Cell:
    model: str
    name: str
    description: str
    metrics: list[Metric]
    runners: dict[str, Callable[[], dict]]
    targets: list[Target] = field(default_factory=list)
    ratio_pairs: list[tuple[str, str]] = field(default_factory=list)
    samples: dict[str, list[dict]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    py_needs_llm: bool = True  # pyllama runners need the LLM class (else only pyllama._core)
    warnings: list[str] = field(default_factory=list)


def ratio_pairs_default(names) -> list[tuple[str, str]]:
    pairs = []
    if "pyllama" in names and "native" in names:
        pairs.append(("pyllama", "native"))
    if "pyllama" in names and "lcp" in names:
        pairs.append(("pyllama", "lcp"))
    if "lcp" in names and "native" in names:
        pairs.append(("lcp", "native"))
    return pairs


class Suite:
    def __init__(self, cfg: Config, models: dict[str, str], have: dict[str, bool]):
        self.cfg = cfg
        self.models = models
        self.have = have
        self.cells: list[Cell] = []
        self.prompt_tokens: dict[str, int] = {}

    def want(self, workload: str) -> bool:
        return self.cfg.only is None or workload in self.cfg.only

    def add(self, cell: Cell) -> None:
        def usable(k: str) -> bool:
            impl = k.split(":")[0]
            if impl == "pyllama" and cell.py_needs_llm:
                return self.have.get("pyllama_llm", False)
            return self.have.get(impl, False)

        cell.runners = {k: v for k, v in cell.runners.items() if usable(k)}
        if not cell.ratio_pairs:
            cell.ratio_pairs = ratio_pairs_default(cell.runners)
        if cell.runners:
            self.cells.append(cell)

    # -- common spec
    def spec(self, model: str, **kw) -> dict:
        s = dict(model=self.models[model], threads=self.cfg.threads, n_ctx=self.cfg.n_ctx,
                 n_batch=self.cfg.n_batch, n_ubatch=self.cfg.n_ubatch,
                 lcp_ignore_eos=self.cfg.lcp_ignore_eos)
        s.update(kw)
        return s

    def native_common(self) -> list[str]:
        t = str(self.cfg.threads)
        return ["-t", t, "-tb", t, "-b", str(self.cfg.n_batch), "-ub", str(self.cfg.n_ubatch)]

    # ---------------------------------------------------------------- workloads
    def build(self) -> None:
        cfg = self.cfg
        if self.want("import"):
            self.add_import()
        for m in cfg.models:
            if self.want("startup"):
                self.add_startup(m)
            if self.want("pp"):
                for n in cfg.pp:
                    self.add_pptg(m, n, 0)
            if self.want("tg"):
                for n in cfg.tg:
                    self.add_pptg(m, 0, n)
            if self.want("e2e"):
                for n in cfg.e2e:
                    self.add_e2e(m, n)
            if self.want("stream"):
                for n in cfg.stream:
                    self.add_stream(m, n)
            if self.want("grammar"):
                self.add_grammar(m)
            if self.want("batched"):
                for n in cfg.batch_npl:
                    self.add_batched(m, n)
            if self.want("seqbatch"):
                self.add_seqbatch(m)
            if self.want("rpc"):
                self.add_rpc(m)

    def add_import(self) -> None:
        def imp(py: str, module: str) -> Callable[[], dict]:
            def run() -> dict:
                base = run_proc([py, "-c", "pass"])
                p = run_proc([py, "-c", f"import {module}"])
                if p.rc != 0:
                    raise BenchError(f"import {module} failed:\n{_tail(p.err)}")
                return {"import_s": p.wall_s - base.wall_s}
            return run

        self.add(Cell(
            model="-", name="import",
            description="`python -c 'import X'` wall time minus `python -c pass` (same interpreter)",
            metrics=[("import_s", "import time", "s", "lower")],
            runners={"pyllama": imp(sys.executable, "pyllama"), "lcp": imp(str(LCP_PY), "llama_cpp")},
            targets=[Target("import pyllama < 0.2 s", "import_s", "abs_max", "pyllama", None, 0.2)],
            py_needs_llm=False,
        ))

    def add_startup(self, m: str) -> None:
        cfg = self.cfg
        n = cfg.startup_tokens

        def run_native() -> dict:
            # Model load: the C call timed around it (load_time), like the Python contenders'
            # Model()/llama_model_load_from_file.  llama-completion's "load time" counter is
            # not comparable: it starts after the GGUF metadata is parsed and ends at the first
            # decode.  TTFT and peak RSS come from a llama-completion run.
            lt = native("load_time", [self.models[m]])
            load_ms = json.loads(lt.out.strip().splitlines()[-1])["load_ms"]
            p = native("llama-completion", [
                "-m", self.models[m], "-p", TTFT_PROMPT, "-n", str(n), "-c", str(cfg.n_ctx),
                *self.native_common(), "--temp", "0", "--ignore-eos", "-no-cnv",
                "--no-display-prompt", "--simple-io", "-s", "0"])
            perf = parse_native_perf(p.err + p.out)
            if "load_ms" not in perf:
                raise BenchError("could not parse llama-completion timings:\n" + _tail(p.err))
            return {"load_ms": load_ms, "ttft_ms": perf.get("prompt_ms"),
                    "rss_mb": p.maxrss_mb, "prompt_n": perf.get("prompt_n"),
                    "load_counter_ms": perf["load_ms"]}

        def run_py(impl: str) -> Callable[[], dict]:
            def run() -> dict:
                ml, _ = worker(impl, "model_load", self.spec(m))
                r, p = worker(impl, "complete", self.spec(
                    m, prompt=TTFT_PROMPT, max_tokens=n, ignore_eos=True, stream=True))
                return {"load_ms": ml["load_s"] * 1e3, "construct_ms": r["load_s"] * 1e3,
                        "ttft_ms": r["ttft_s"] * 1e3, "rss_mb": p.maxrss_mb}
            return run

        self.add(Cell(
            model=m, name="startup",
            description=(f"model load, each timed around one call in a fresh process (native: "
                         f"`llama_model_load_from_file` from C, benchmarks/native/load_time.c; pyllama: "
                         f"`_core.Model()`; llama-cpp-python: `llama_model_load_from_file` through ctypes), constructor of LLM/Llama "
                         f"(model + context), time to first token of a {len(TTFT_PROMPT)}-char prompt "
                         f"(native: prompt-eval counter; Python: first streamed piece), peak RSS of a "
                         f"process that loads, evaluates the prompt and generates {n} tokens (n_ctx {cfg.n_ctx})"),
            metrics=[("load_ms", "model load", "ms", "lower"),
                     ("construct_ms", "LLM()/Llama() construct", "ms", "lower"),
                     ("ttft_ms", "time to first token", "ms", "lower"),
                     ("rss_mb", "peak RSS", "MB", "lower")],
            runners={"native": run_native, "pyllama": run_py("pyllama"), "lcp": run_py("lcp")},
            targets=[Target("load time within 1.1x native", "load_ms", "ratio_max", "pyllama", "native", 1.1),
                     Target("peak RSS at most native + 50 MB", "rss_mb", "plus_max", "pyllama", "native", 50.0)],
        ))

    def add_pptg(self, m: str, n_prompt: int, n_gen: int) -> None:
        cfg = self.cfg
        name = f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"

        # Short runs are noisy: pp64 takes ~0.1 s, so each process does 5 reps (llama-bench -r 5,
        # the mean of their t/s, for both contenders); the others one.
        inner = 5 if 0 < n_prompt + n_gen <= 64 else 1

        def run_native() -> dict:
            p = native("llama-bench", [
                "-m", self.models[m], "-p", str(n_prompt), "-n", str(n_gen), "-r", str(inner),
                "-t", str(cfg.threads), "-b", str(cfg.n_batch), "-ub", str(cfg.n_ubatch), "-o", "json"])
            data = json.loads(p.out[p.out.index("["):])
            return {"tps": float(data[0]["avg_ts"])}

        def run_py(impl: str) -> Callable[[], dict]:
            def run() -> dict:
                r, _ = worker(impl, "pptg", self.spec(m, n_prompt=n_prompt, n_gen=n_gen, inner_reps=inner))
                return {"tps": r["tps"]}
            return run

        kind = "prompt processing" if n_prompt else "generation"
        targets = [Target(f"{kind} tokens/s at least 0.97x native", "tps", "ratio_min", "pyllama", "native", 0.97)]
        self.add(Cell(
            model=m, name=name,
            description=(f"llama-bench's {kind} loop, {n_prompt or n_gen} tokens, one rep per process "
                         f"(5 for runs of 64 tokens or fewer, averaged as llama-bench -r does) after llama-bench's warmup (pyllama: `_core.Context.decode`; "
                         f"llama-cpp-python: `Llama.eval`)"),
            metrics=[("tps", f"{name} tokens/s", "t/s", "higher")],
            runners={"native": run_native, "pyllama": run_py("pyllama"), "lcp": run_py("lcp")},
            targets=targets,
            py_needs_llm=False,
        ))

    def add_e2e(self, m: str, n: int) -> None:
        cfg = self.cfg

        def run_native() -> dict:
            walls = {}
            for k in (n, 1):
                p = native("llama-completion", [
                    "-m", self.models[m], "-p", PROMPT, "-n", str(k), "-c", str(cfg.n_ctx),
                    *self.native_common(), "--temp", "0", "--ignore-eos", "-no-cnv",
                    "--no-display-prompt", "--simple-io", "-s", "0"])
                walls[k] = p.wall_s
                if k == n:
                    perf = parse_native_perf(p.err + p.out)
            dt = walls[n] - walls[1]
            r = {"tps": (n - 1) / dt, "delta_s": dt, "eval_n": perf.get("eval_n")}
            if perf.get("eval_n") != n - 1:
                r["warning"] = f"llama-completion decoded {perf.get('eval_n')} tokens, expected {n - 1}"
            return r

        def run_py(impl: str) -> Callable[[], dict]:
            def run() -> dict:
                calls = {}
                info = {}
                for k in (n, 1):
                    r, _ = worker(impl, "complete", self.spec(
                        m, prompt=PROMPT, max_tokens=k, ignore_eos=True, stream=False))
                    calls[k] = r["call_s"]
                    if k == n:
                        info = r
                dt = calls[n] - calls[1]
                r = {"tps": (n - 1) / dt, "delta_s": dt, "n_tokens": info.get("n_tokens")}
                if info.get("n_tokens") not in (None, n):
                    r["warning"] = f"generated {info.get('n_tokens')} tokens, expected {n}"
                return r
            return run

        targets = []
        if m == "smollm2":
            want = 1.05 if n <= 128 else 1.2
            targets.append(Target(f"at least {want}x llama-cpp-python (SmolLM2)", "tps", "ratio_min",
                                  "pyllama", "lcp", want))
        self.add(Cell(
            model=m, name=f"e2e{n}",
            description=(f"greedy generation timed from outside: (time of max_tokens={n} - time of "
                         f"max_tokens=1) / {n - 1}, each in a fresh process, end-of-generation ignored; "
                         f"native: llama-completion process wall time; Python: the complete()/__call__ call"),
            metrics=[("tps", f"e2e{n} tokens/s", "t/s", "higher")],
            runners={"native": run_native, "pyllama": run_py("pyllama"), "lcp": run_py("lcp")},
            targets=targets,
        ))

    def add_stream(self, m: str, n: int) -> None:
        def run_py(impl: str, stream: bool) -> Callable[[], dict]:
            def run() -> dict:
                r, _ = worker(impl, "complete", self.spec(
                    m, prompt=PROMPT, max_tokens=n, ignore_eos=True, stream=stream))
                return {"tps": n / r["call_s"]}
            return run

        self.add(Cell(
            model=m, name=f"stream{n}",
            description=(f"one call generating {n} tokens (prompt included), streaming "
                         f"(pyllama `LLM.stream`, llama-cpp-python `stream=True`) vs not"),
            metrics=[("tps", f"call tokens/s ({n})", "t/s", "higher")],
            runners={"pyllama": run_py("pyllama", False), "pyllama:stream": run_py("pyllama", True),
                     "lcp": run_py("lcp", False), "lcp:stream": run_py("lcp", True)},
            ratio_pairs=[("pyllama:stream", "pyllama"), ("lcp:stream", "lcp"),
                         ("pyllama:stream", "lcp:stream"), ("pyllama", "lcp")],
        ))

    def grammar_file(self) -> Path:
        path = CACHE / "json.gbnf"
        CACHE.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != JSON_GBNF:
            path.write_text(JSON_GBNF)
        return path

    def add_grammar(self, m: str) -> None:
        cfg = self.cfg
        n = cfg.grammar_tokens

        def run_native() -> dict:
            p = native("llama-completion", [
                "-m", self.models[m], "-p", GRAMMAR_PROMPT, "-n", str(n), "-c", str(cfg.n_ctx),
                *self.native_common(), "--temp", "0", "-no-cnv", "--no-display-prompt",
                "--simple-io", "-s", "0", "--grammar-file", str(self.grammar_file())])
            perf = parse_native_perf(p.err + p.out)
            if "sampling_ms" not in perf or "eval_n" not in perf:
                raise BenchError("could not parse llama-completion sampling time:\n" + _tail(p.err))
            n_tok = perf["eval_n"] + 1  # the last sampled token is not decoded
            return {"sample_ms_per_tok": perf["sampling_ms"] / n_tok, "n_tokens": n_tok}

        def run_py(impl: str) -> Callable[[], dict]:
            def run() -> dict:
                r, _ = worker(impl, "complete", self.spec(
                    m, prompt=GRAMMAR_PROMPT, max_tokens=n, grammar=JSON_GBNF, stream=False))
                out = {"n_tokens": r.get("n_tokens"), "tps": (r.get("n_tokens") or 0) / r["call_s"]}
                t = r.get("timings") or {}
                if t.get("sample_ms") is not None and t.get("sample_n"):
                    out["sample_ms_per_tok"] = float(t["sample_ms"]) / float(t["sample_n"])
                return out
            return run

        self.add(Cell(
            model=m, name="grammar",
            description=(f"JSON grammar (llama.cpp's json.gbnf), greedy, up to {n} tokens; sampling ms "
                         f"per token as each library reports it (native: llama-completion's sampling "
                         f"time / sampled tokens; pyllama: Completion.timings sample_ms / sample_n) and "
                         f"the call's tokens/s (prompt included)"),
            metrics=[("sample_ms_per_tok", "grammar sampling ms/token", "ms", "lower"),
                     ("tps", "grammar call tokens/s", "t/s", "higher")],
            runners={"native": run_native, "pyllama": run_py("pyllama"), "lcp": run_py("lcp")},
            targets=[Target("grammar sampling per token within 1.1x native", "sample_ms_per_tok",
                            "ratio_max", "pyllama", "native", 1.1)],
        ))

    def batch_prompt_tokens(self, m: str) -> int:
        if m not in self.prompt_tokens:
            code = ("import sys; from pyllama import _core as C; "
                    "m = C.Model(sys.argv[1], vocab_only=True); "
                    "print(len(m.vocab.tokenize(sys.argv[2], add_special=True, parse_special=False)))")
            p = run_proc([sys.executable, "-c", code, self.models[m], BATCH_PROMPT])
            if p.rc != 0:
                raise BenchError("could not tokenize the batch prompt with pyllama:\n" + _tail(p.err))
            self.prompt_tokens[m] = int(p.out.strip().splitlines()[-1])
        return self.prompt_tokens[m]

    def batch_ctx(self, m: str) -> int:
        need = max(self.cfg.batch_npl) * (self.batch_prompt_tokens(m) + self.cfg.batch_tg) + 64
        return max(self.cfg.n_ctx, -(-need // 256) * 256)

    def add_batched(self, m: str, npl: int) -> None:
        cfg = self.cfg
        tg = cfg.batch_tg

        def run_native() -> dict:
            pp = self.batch_prompt_tokens(m)
            args = ["-m", self.models[m], "-c", str(self.batch_ctx(m)), *self.native_common(),
                    "-npp", str(pp), "-ntg", str(tg), "-npl", str(npl), "-pps",
                    "--output-format", "jsonl"]
            if cfg.native_kvu:
                args.append("-kvu")
            p = native("llama-batched-bench", args)
            for line in (p.out + "\n" + p.err).splitlines():
                line = line.strip()
                if line.startswith("{") and '"speed_tg"' in line:
                    d = json.loads(line)
                    return {"tps": npl * tg / (d["t_pp"] + d["t_tg"]), "speed_tg": d["speed_tg"],
                            "t_pp": d["t_pp"], "t_tg": d["t_tg"]}
            raise BenchError("no jsonl line from llama-batched-bench:\n" + _tail(p.out + p.err))

        def run_py() -> dict:
            r, _ = worker("pyllama", "batched", self.spec(
                m, n_ctx=self.batch_ctx(m), prompts=[BATCH_PROMPT] * npl, max_tokens=tg,
                n_parallel=npl, mode="batched", ignore_eos=True))
            out = {"tps": r["n_tokens"] / r["call_s"], "n_tokens": r["n_tokens"]}
            if r["n_tokens"] != npl * tg:
                out["warning"] = f"generated {r['n_tokens']} tokens, expected {npl * tg}"
            return out

        self.add(Cell(
            model=m, name=f"batched{npl}",
            description=(f"{npl} sequences x {tg} generated tokens from one shared prompt, aggregate "
                         f"generated tokens/s over the whole call (prompt included): native "
                         f"llama-batched-bench -pps{' -kvu' if cfg.native_kvu else ''} "
                         f"(npl*ntg/(t_pp+t_tg)); pyllama `LLM.generate([prompt]*{npl}, ignore_eos=True)`"),
            metrics=[("tps", f"aggregate t/s, {npl} seq", "t/s", "higher")],
            runners={"native": run_native, "pyllama": run_py},
            targets=[Target("batched aggregate at least 0.9x llama-batched-bench", "tps", "ratio_min",
                            "pyllama", "native", 0.9)],
        ))

    def add_seqbatch(self, m: str) -> None:
        cfg = self.cfg
        prompts = SEQ_PROMPTS[: cfg.seq_n]

        def run_py(mode: str) -> Callable[[], dict]:
            def run() -> dict:
                r, _ = worker("pyllama", "batched", self.spec(
                    m, n_ctx=max(cfg.n_ctx, -(-(len(prompts) * (32 + cfg.batch_tg) + 64) // 256) * 256),
                    prompts=prompts, max_tokens=cfg.batch_tg, n_parallel=len(prompts), mode=mode,
                    ignore_eos=True))
                return {"tps": r["n_tokens"] / r["call_s"]}
            return run

        self.add(Cell(
            model=m, name=f"seqbatch{len(prompts)}",
            description=(f"{len(prompts)} different prompts x {cfg.batch_tg} tokens with pyllama: "
                         f"`LLM.generate(prompts)` vs `complete()` one after another (tokens/s)"),
            metrics=[("tps", f"{len(prompts)} prompts t/s", "t/s", "higher")],
            runners={"pyllama": run_py("batched"), "pyllama:sequential": run_py("sequential")},
            ratio_pairs=[("pyllama", "pyllama:sequential")],
            targets=[Target(f"batched at least 1.5x sequential ({len(prompts)} prompts)", "tps",
                            "ratio_min", "pyllama", "pyllama:sequential", 1.5)],
        ))


    def add_rpc(self, m: str) -> None:
        """Generation over llama.cpp's RPC backend on loopback vs local, for pyllama (its own
        `pyllama rpc-server`) and native (`ggml-rpc-server` + `llama-bench --rpc`)."""
        cfg = self.cfg
        n = cfg.rpc_tg
        t = str(cfg.threads)

        def run_native(rpc: bool) -> Callable[[], dict]:
            def run() -> dict:
                args = ["-m", self.models[m], "-p", "0", "-n", str(n), "-r", "1", "-t", t,
                        "-b", str(cfg.n_batch), "-ub", str(cfg.n_ubatch), "-o", "json"]
                if not rpc:
                    p = native("llama-bench", args)
                else:
                    with rpc_server([str(NATIVE_BIN / "ggml-rpc-server"), "-H", "127.0.0.1", "-t", t]) as ep:
                        p = native("llama-bench", [*args, "--rpc", ep, "-ngl", "99"])
                data = json.loads(p.out[p.out.index("["):])
                return {"tps": float(data[0]["avg_ts"])}
            return run

        def run_py(rpc: bool) -> Callable[[], dict]:
            def run() -> dict:
                spec = self.spec(m, n_prompt=0, n_gen=n)
                if not rpc:
                    r, _ = worker("pyllama", "pptg", spec)
                else:
                    with rpc_server([sys.executable, "-m", "pyllama", "rpc-server", "--host", "127.0.0.1",
                                     "-t", t]) as ep:
                        r, _ = worker("pyllama", "pptg", dict(spec, rpc=[ep]))
                return {"tps": r["tps"]}
            return run

        self.add(Cell(
            model=m, name=f"rpc_tg{n}",
            description=(f"generation of {n} tokens (llama-bench's tg loop) with every layer on one RPC "
                         f"server on 127.0.0.1 (server and client on this machine, {cfg.threads} threads "
                         f"each): pyllama's `pyllama rpc-server` + `_core` client vs native "
                         f"`ggml-rpc-server` + `llama-bench --rpc -ngl 99`; `local` rows: the same "
                         f"without RPC"),
            metrics=[("tps", f"tg{n} tokens/s", "t/s", "higher")],
            runners={"native": run_native(False), "native:rpc": run_native(True),
                     "pyllama": run_py(False), "pyllama:rpc": run_py(True)},
            ratio_pairs=[("pyllama:rpc", "native:rpc"), ("pyllama:rpc", "pyllama"), ("native:rpc", "native")],
            targets=[Target("RPC generation at least 0.97x native RPC", "tps", "ratio_min",
                            "pyllama:rpc", "native:rpc", 0.97)],
            py_needs_llm=False,
        ))


class rpc_server:
    """A ggml RPC server subprocess on a free loopback port, for the length of a `with`."""

    def __init__(self, cmd: list[str]) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cmd = [*cmd, "-p" if "ggml-rpc-server" in cmd[0] else "--port", str(self.port)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        import socket

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"rpc server exited: {self.proc.stderr.read().decode(errors='replace')[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise BenchError(f"rpc server did not listen on {self.port}")
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(2)   # SIGINT: both servers stop cleanly on Ctrl-C
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- running


def run_suite(suite: Suite, reps: int) -> None:
    total = sum(len(c.runners) for c in suite.cells) * reps
    done = 0
    t_start = time.perf_counter()
    for cell in suite.cells:
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
                shown = ", ".join(f"{k}={_fmt(r.get(k))}" for k, *_ in cell.metrics if r.get(k) is not None)
                elapsed = time.perf_counter() - t_start
                eta = elapsed / done * (total - done)
                print(f"  [{done}/{total} eta {eta / 60:.0f} min] {cell.model}/{cell.name} rep {rep + 1} "
                      f"{c}: {shown} ({time.perf_counter() - t0:.1f}s)", flush=True)


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def summarize(cell: Cell) -> list[dict]:
    rows = []
    for key, label, unit, better in cell.metrics:
        stats = {}
        for c, samples in cell.samples.items():
            vals = [s[key] for s in samples if s.get(key) is not None]
            if vals:
                stats[c] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                            "n": len(vals), "samples": vals}
        if not stats:
            continue
        med = {c: s["median"] for c, s in stats.items()}
        ratios = {}
        for a, b in cell.ratio_pairs:
            if a in med and b in med and med[b]:
                ratios[f"{a}/{b}"] = med[a] / med[b]
        targets = []
        for t in cell.targets:
            if t.metric != key:
                continue
            ok, shown = t.check(med)
            targets.append({"text": t.text, "pass": ok, "measured": shown})
        rows.append({"model": cell.model, "workload": cell.name, "metric": key, "label": label,
                     "unit": unit, "better": better, "stats": stats, "ratios": ratios,
                     "targets": targets, "description": cell.description})
    return rows


def cell_of(stats: dict, c: str) -> str:
    s = stats.get(c)
    if not s:
        return "-"
    if s["n"] == 1:
        return _fmt(s["median"])
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}–{_fmt(s['max'])})"


def _ratio_text(ratios: dict) -> str:
    return ", ".join(f"{k.replace('pyllama', 'py').replace('native', 'nat').replace(':sequential', ':seq')} "
                     f"{v:.3f}x" for k, v in ratios.items())


def _target_text(row: dict) -> str:
    out = []
    for t in row["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        out.append(f"{mark} {t['measured']} ({t['text']})")
    return "; ".join(out)


def main_columns(contenders: list[str]) -> list[str]:
    """The table columns: native, pyllama, lcp (variants such as "pyllama:stream" get rows)."""
    return [c for c in CONTENDERS if any(k.split(":")[0] == c for k in contenders)]


def display_rows(rows: list[dict], columns: list[str]) -> list[dict]:
    """One line per row and variant: "pyllama:stream" goes into the pyllama column of a
    "<workload> (stream)" line; ratios and targets stay on the first line of the row."""
    out = []
    for r in rows:
        arrow = "↑" if r["better"] == "higher" else "↓"
        variants = [""]
        for c in r["stats"]:
            v = c.split(":", 1)[1] if ":" in c else ""
            if v not in variants:
                variants.append(v)
        first_variant = "complete" if any(v == "stream" for v in variants) else (
            "batched" if "sequential" in variants else ("local" if "rpc" in variants else ""))
        for i, v in enumerate(variants):
            label = v if v else first_variant
            vals = [cell_of(r["stats"], f"{c}:{v}" if v else c) for c in columns]
            if v and all(x == "-" for x in vals):
                continue
            out.append({
                "model": r["model"],
                "workload": r["workload"] + (f" ({label})" if label and len(variants) > 1 else ""),
                "metric": f"{r['label']} [{r['unit']}] {arrow}",
                "values": vals,
                "ratios": _ratio_text(r["ratios"]) if i == 0 else "",
                "target": _target_text(r) if i == 0 else "",
            })
    return out


def print_table(rows: list[dict], contenders: list[str]) -> None:
    columns = main_columns(contenders)
    hdr = ["model", "workload", "metric", *columns, "ratios (medians)", "target"]
    table = [hdr]
    for d in display_rows(rows, columns):
        table.append([d["model"], d["workload"], d["metric"], *d["values"], d["ratios"], d["target"]])
    widths = [min(max(len(str(row[i])) for row in table), 72) for i in range(len(hdr))]
    for i, row in enumerate(table):
        print("  ".join(str(v)[:72].ljust(widths[j]) for j, v in enumerate(row)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


# --------------------------------------------------------------------------- machine, outputs


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    load = None
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": affinity, "mem_gib": mem,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "loadavg_at_start": load}


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
    why = "" if llm else (_tail(p.err, 2) or " ".join(out))
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
    tools = ("llama-bench", "llama-batched-bench", "llama-completion", "load_time")
    missing = [t for t in tools if not (NATIVE_BIN / t).exists()]
    if missing:
        print(f"!! native tools missing ({', '.join(missing)}): native runs skipped")
        have["native"] = False
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


def render_markdown(meta: dict, rows: list[dict], contenders: list[str], cells: list[Cell]) -> str:
    m = meta["machine"]
    v = meta["versions"]
    lines = [
        "# Benchmarks",
        "",
        "pyllama side by side with llama.cpp's own tools (*native*) and llama-cpp-python 0.3.36, "
        "measured in one run on one machine by `benchmarks/run.py` (see benchmarks/README.md). "
        "This file is rewritten by each full run; the *Findings* section and the *Server* and *logprobs overhead* "
        "sections (written from benchmarks/server_bench.py and benchmarks/logprobs_bench.py) are kept.",
        "",
        f"- **Date**: {meta['date']}",
        f"- **Machine**: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['mem_gib']} GiB RAM, {m['os']}, Python {m['python']}; load average at start "
        f"{' '.join(m['loadavg_at_start'] or [])}",
        f"- **Command**: `{meta['command']}`",
        f"- **Threads**: {meta['config']['threads']} everywhere; reps per measurement: {meta['config']['reps']} "
        "(interleaved native / pyllama / llama-cpp-python, each in a fresh process)",
        f"- **llama.cpp**: {v.get('llama_cpp_commit', '?')} (vendored); native tools built with "
        "`GGML_NATIVE=ON`, Release, static, PIC, `GGML_RPC=ON` (benchmarks/setup_native.sh)",
        f"- **pyllama**: {v.get('pyllama_version', '?')} at {v.get('pyllama_commit', '?')}"
        f"{' (working tree modified)' if v.get('pyllama_dirty') else ''}",
        f"- **llama-cpp-python**: {v.get('llama_cpp_python_version', 'not measured')} built from source "
        "with `CMAKE_ARGS=-DGGML_NATIVE=ON`",
        f"- **Models**: " + ", ".join(f"{k} = {MODEL_NAMES.get(k, k)}" for k in meta["models"]),
        "",
        "Values are medians with min–max over the reps; ratios are of medians "
        "(for ↑ metrics > 1 means faster, for ↓ metrics < 1 means smaller/faster).",
        "",
    ]
    if meta.get("quick"):
        lines[2:2] = ["> **Quick smoke run** (tiny sizes, 1 rep): not a measurement.", ""]
    # Targets first.
    lines += ["## Targets (issues 5, 6 and 10)", "",
              "| model | workload | target | measured | result |", "|---|---|---|---|---|"]
    for r in rows:
        for t in r["targets"]:
            mark = {True: "✅ pass", False: "❌ fail", None: "n/a"}[t["pass"]]
            lines.append(f"| {r['model']} | {r['workload']} | {t['text']} | {t['measured']} | {mark} |")
    lines.append("")
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    columns = main_columns(contenders)
    for model, mrows in by_model.items():
        title = "Import time" if model == "-" else f"{MODEL_NAMES.get(model, model)} ({model})"
        lines += [f"## {title}", "",
                  "| workload | metric | " + " | ".join(LABELS.get(c, c) for c in columns)
                  + " | ratios | target |",
                  "|---|---|" + "---|" * len(columns) + "---|---|"]
        for d in display_rows(mrows, columns):
            lines.append(f"| {d['workload']} | {d['metric']} | " + " | ".join(d["values"])
                         + f" | {d['ratios']} | {d['target']} |")
        lines.append("")
    lines += ["## What each workload measures", ""]
    seen = set()
    for c in cells:
        key = re.sub(r"\d+$", "N", c.name)
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"- **{c.name}**: {c.description}")
    lines.append("")
    warns = [(c.model, c.name, w) for c in cells for w in dict.fromkeys(c.warnings)]
    if warns:
        lines += ["## Warnings in this run", ""]
        for model, name, w in warns:
            lines.append(f"- {model}/{name} {w}")
        lines.append("")
    errs = [(c.model, c.name, k, e) for c in cells for k, e in c.errors.items()]
    if errs:
        lines += ["## Errors in this run", ""]
        for model, name, k, e in errs:
            lines.append(f"- {model}/{name} {k}: `{e.splitlines()[0][:200]}`")
        lines.append("")
    return "\n".join(lines)


FINDINGS_RE = re.compile(r"^## Findings\b.*?(?=^## (?!Findings)|\Z)", re.S | re.M)
# Sections written by the separate scripts (benchmarks/server_bench.py, benchmarks/logprobs_bench.py):
# kept, like Findings, when run.py rewrites the file.
KEPT_SECTIONS = ("Server", "logprobs overhead")


def _section(text: str, title: str) -> str | None:
    m = re.search(r"^## " + re.escape(title) + r"\b.*?(?=^## |\Z)", text, re.S | re.M)
    return m.group(0).rstrip() + "\n" if m else None


def write_markdown(text: str, path: Path = BENCHMARKS_MD) -> None:
    findings = "## Findings\n\n_Profiling notes: where pyllama falls short, what was found and fixed._\n"
    kept: list[str] = []
    if path.exists():
        old = path.read_text()
        m = FINDINGS_RE.search(old)
        if m:
            findings = m.group(0).rstrip() + "\n"
        kept = [sec for sec in (_section(old, t) for t in KEPT_SECTIONS) if sec]
    path.write_text(text.rstrip() + "\n\n" + "".join(k + "\n" for k in kept) + findings)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Workloads: " + ", ".join(WORKLOADS))
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 1 rep, no BENCHMARKS.md")
    ap.add_argument("--models", default="smollm2,gemma3", help="comma list (smollm2, gemma3)")
    ap.add_argument("--reps", type=int, default=None, help="runs per contender and workload (default 5; quick 1)")
    ap.add_argument("--threads", type=int, default=2)
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

    have = setup(cfg, args.no_setup)
    print("== models", flush=True)
    paths = resolve_models(models)
    for k, p in paths.items():
        print(f"   {k}: {p}")
    suite = Suite(cfg, paths, have)
    suite.build()
    contenders = []
    for c in suite.cells:
        for k in c.runners:
            if k not in contenders:
                contenders.append(k)
    order = {"native": 0, "native:rpc": 1, "pyllama": 2, "pyllama:stream": 3, "pyllama:sequential": 4,
             "pyllama:rpc": 5, "lcp": 6, "lcp:stream": 7}
    contenders.sort(key=lambda c: order.get(c, 9))

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
    print(f"== {len(suite.cells)} workloads x {reps} reps; contenders: {', '.join(contenders)}", flush=True)
    run_suite(suite, reps)

    rows = [r for c in suite.cells for r in summarize(c)]
    print()
    print_table(rows, contenders)
    errs = [(c.model, c.name, k, e) for c in suite.cells for k, e in c.errors.items()]
    if errs:
        print("\nErrors:")
        for model, name, k, e in errs:
            print(f"  {model}/{name} {k}:\n    " + e.replace("\n", "\n    "))

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.json) if args.json else RESULTS / ("quick.json" if cfg.quick else "latest.json")
    result = {"meta": meta, "rows": rows, "samples": [
        {"model": c.model, "workload": c.name, "samples": c.samples, "errors": c.errors,
         "warnings": c.warnings} for c in suite.cells]}
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nresults: {out}")
    write_md = args.md if args.md is not None else not cfg.quick
    if write_md:
        md = Path(args.md_file)
        write_markdown(render_markdown(meta, rows, contenders, suite.cells), md)
        print(f"{md} rewritten")
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
