"""The benchmark workloads: what each contender runs for one measurement (used by run.py).

A workload kind (pp/tg, e2e, stream, grammar, batched, ...) is one method of `Workloads` that
takes its sizes as parameters and returns a `Cell`: the metrics it reports, one runner per
contender and the targets it is checked against.  `Workloads.plan` says which kinds run with
which sizes.  Runners are parameterised measurements of one process each: a native llama.cpp
tool (`native`) or benchmarks/worker.py under pyllama's or llama-cpp-python's interpreter
(`worker`).  Summaries and tables live in report.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
# setup_native.sh builds into $NATIVE_BUILD_DIR when it is set (e.g. a CUDA build next to the
# CPU one), else into .cache/native; the tools are in its bin/.
NATIVE_BUILD = (Path(os.environ["NATIVE_BUILD_DIR"]).expanduser().resolve() if os.environ.get("NATIVE_BUILD_DIR")
                else CACHE / "native")
NATIVE_BIN = NATIVE_BUILD / "bin"
LCP_PY = CACHE / "venv-lcp" / "bin" / "python"
WORKER = HERE / "worker.py"

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
    ngl: int = 0  # layers offloaded to the GPU: -ngl for the native tools, n_gpu_layers for the Python ones

    @classmethod
    def quick_sizes(cls, **kw) -> "Config":
        c = cls(**kw)
        c.pp, c.tg, c.e2e, c.stream = (16, 64), (16, 32), (16, 32), (16,)
        c.grammar_tokens, c.batch_tg, c.batch_npl, c.seq_n = 32, 8, (1, 4), 4
        c.startup_tokens = 4
        c.rpc_tg = 16
        return c


# "import", then the workloads of Workloads.plan, in running order (the names --only takes).
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


def tail(text: str, n: int = 15) -> str:
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
    raise BenchError(f"{impl} {task} failed (exit {p.rc}):\n{tail(p.err or p.out)}")


def native(tool: str, args: list[str], timeout: float = 1800) -> Proc:
    exe = NATIVE_BIN / tool
    p = run_proc([str(exe), *args], timeout=timeout)
    if p.rc != 0:
        raise BenchError(f"{tool} failed (exit {p.rc}): {' '.join(args[:6])} ...\n{tail(p.err or p.out)}")
    return p


_PERF = {
    "load_ms": re.compile(r"load time\s*=\s*([\d.]+) ms"),
    "prompt_ms": re.compile(r"prompt eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) tokens"),
    "eval_ms": re.compile(r"(?<!prompt )eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) runs"),
    "sampling_ms": re.compile(r"sampling time\s*=\s*([\d.]+) ms"),
}


def parse_native_perf(text: str) -> dict:
    """llama-completion's perf counters (ms, and token counts as *_n)."""
    out: dict[str, float] = {}
    for key, rx in _PERF.items():
        m = rx.search(text)
        if m:
            out[key] = float(m.group(1))
            if m.lastindex and m.lastindex >= 2:
                out[key.replace("_ms", "_n")] = int(m.group(2))
    return out


class rpc_server:
    """A ggml RPC server subprocess on a free loopback port, for the length of a `with`:
    native `ggml-rpc-server` or `pyllama rpc-server`."""

    def __init__(self, impl: str, threads: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        t, port = str(threads), str(self.port)
        if impl == "native":
            self.cmd = [str(NATIVE_BIN / "ggml-rpc-server"), "-H", "127.0.0.1", "-t", t, "-p", port]
        else:
            self.cmd = [sys.executable, "-m", "pyllama", "rpc-server", "--host", "127.0.0.1", "-t", t,
                        "--port", port]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
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


# --------------------------------------------------------------------------- cells

Metric = tuple[str, str, str, str]  # key, label, unit, better ("higher"/"lower")
Runner = Callable[[], dict]


@dataclass
class Target:
    """A goal from issues 5, 6 and 10, checked on the medians (report.check_target)."""

    text: str
    metric: str
    kind: str  # "ratio_min" | "ratio_max" | "abs_max" | "plus_max"
    a: str  # contender (usually pyllama)
    b: str | None  # the one compared against
    value: float


@dataclass
class Cell:
    """One row group of the tables: a workload at one size on one model, and its samples."""

    model: str
    name: str
    description: str
    metrics: list[Metric]
    runners: dict[str, Runner]
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


def call_rate(call: Callable[[], tuple[dict, Proc]], n_tokens: int | None = None) -> Runner:
    """Tokens/s of one worker call: `n_tokens` (default: the tokens it reports) / its call time."""
    def run() -> dict:
        r, _ = call()
        return {"tps": (r["n_tokens"] if n_tokens is None else n_tokens) / r["call_s"]}
    return run


# --------------------------------------------------------------------------- workloads


class Workloads:
    """The cells of one run: every wanted workload at each of its sizes, for each model."""

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
        if self.cfg.ngl and cell.model != "-":   # not on `import`
            cell.description += (f"; {self.cfg.ngl} layers offloaded to the GPU (native `-ngl {self.cfg.ngl}`, "
                                 f"Python `n_gpu_layers={self.cfg.ngl}`)")
        if not cell.ratio_pairs:
            cell.ratio_pairs = ratio_pairs_default(cell.runners)
        if cell.runners:
            self.cells.append(cell)

    def plan(self) -> list[tuple[str, Callable[..., Cell], list[dict]]]:
        """Per model, in running order: workload name, the kind that makes its cells, and the
        parameters of each cell."""
        c = self.cfg
        return [
            ("startup", self.startup, [{}]),
            ("pp", self.decode, [{"n_prompt": n} for n in c.pp]),
            ("tg", self.decode, [{"n_gen": n} for n in c.tg]),
            ("e2e", self.e2e, [{"n": n} for n in c.e2e]),
            ("stream", self.stream, [{"n": n} for n in c.stream]),
            ("grammar", self.grammar, [{}]),
            ("batched", self.batched, [{"npl": n} for n in c.batch_npl]),
            ("seqbatch", self.seqbatch, [{}]),
            ("rpc", self.rpc, [{}]),
        ]

    def build(self) -> None:
        if self.want("import"):
            self.add(self.import_time())
        for m in self.cfg.models:
            for workload, make, params in self.plan():
                if self.want(workload):
                    for kw in params:
                        self.add(make(m, **kw))

    # ---------------------------------------------------------------- measurements

    def spec(self, model: str, **kw) -> dict:
        """A worker spec: the common settings, then the task's parameters."""
        s = dict(model=self.models[model], threads=self.cfg.threads, n_ctx=self.cfg.n_ctx,
                 n_batch=self.cfg.n_batch, n_ubatch=self.cfg.n_ubatch,
                 lcp_ignore_eos=self.cfg.lcp_ignore_eos, ngl=self.cfg.ngl)
        s.update(kw)
        return s

    def native_common(self) -> list[str]:
        t = str(self.cfg.threads)
        return ["-t", t, "-tb", t, "-b", str(self.cfg.n_batch), "-ub", str(self.cfg.n_ubatch),
                "-ngl", str(self.cfg.ngl)]

    def completion(self, m: str, prompt: str, n: int, ignore_eos: bool = True, extra: tuple = ()) -> Proc:
        """One greedy llama-completion process (no chat, prompt not echoed)."""
        return native("llama-completion", [
            "-m", self.models[m], "-p", prompt, "-n", str(n), "-c", str(self.cfg.n_ctx),
            *self.native_common(), "--temp", "0", *(["--ignore-eos"] if ignore_eos else []), "-no-cnv",
            "--no-display-prompt", "--simple-io", "-s", "0", *extra])

    def complete(self, impl: str, m: str, prompt: str, n: int, **kw) -> tuple[dict, Proc]:
        """One greedy complete()/__call__ in a fresh worker."""
        return worker(impl, "complete", self.spec(m, prompt=prompt, max_tokens=n, **kw))

    def decode_rate(self, impl: str, m: str, n_prompt: int, n_gen: int, reps: int = 1,
                    rpc: bool = False) -> Runner:
        """llama-bench's pp or tg loop (native: llama-bench itself), tokens/s averaged over `reps`
        in one process; with `rpc`, every layer on a fresh RPC server of the same contender."""
        cfg = self.cfg

        def run() -> dict:
            with (rpc_server(impl, cfg.threads) if rpc else contextlib.nullcontext()) as endpoint:
                if impl == "native":
                    args = ["-m", self.models[m], "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps),
                            "-t", str(cfg.threads), "-b", str(cfg.n_batch), "-ub", str(cfg.n_ubatch),
                            "-o", "json"]
                    if endpoint:
                        args += ["--rpc", endpoint, "-ngl", "99"]
                    else:   # llama-bench appends repeated -ngl values (one test each): only one here
                        args += ["-ngl", str(cfg.ngl)]
                    p = native("llama-bench", args)
                    return {"tps": float(json.loads(p.out[p.out.index("["):])[0]["avg_ts"])}
                spec = self.spec(m, n_prompt=n_prompt, n_gen=n_gen, inner_reps=reps)
                if endpoint:
                    spec["rpc"] = [endpoint]
                r, _ = worker(impl, "pptg", spec)
                return {"tps": r["tps"]}
        return run

    def batched_call(self, m: str, prompts: list[str], mode: str, n_ctx: int) -> tuple[dict, Proc]:
        """pyllama generating `batch_tg` tokens for each prompt, batched or one after another."""
        return worker("pyllama", "batched", self.spec(
            m, n_ctx=n_ctx, prompts=prompts, max_tokens=self.cfg.batch_tg, n_parallel=len(prompts),
            mode=mode, ignore_eos=True))

    def grammar_file(self) -> Path:
        path = CACHE / "json.gbnf"
        CACHE.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != JSON_GBNF:
            path.write_text(JSON_GBNF)
        return path

    def batch_prompt_tokens(self, m: str) -> int:
        if m not in self.prompt_tokens:
            code = ("import sys; from pyllama import _core as C; "
                    "m = C.Model(sys.argv[1], vocab_only=True); "
                    "print(len(m.vocab.tokenize(sys.argv[2], add_special=True, parse_special=False)))")
            p = run_proc([sys.executable, "-c", code, self.models[m], BATCH_PROMPT])
            if p.rc != 0:
                raise BenchError("could not tokenize the batch prompt with pyllama:\n" + tail(p.err))
            self.prompt_tokens[m] = int(p.out.strip().splitlines()[-1])
        return self.prompt_tokens[m]

    def batch_ctx(self, m: str) -> int:
        need = max(self.cfg.batch_npl) * (self.batch_prompt_tokens(m) + self.cfg.batch_tg) + 64
        return max(self.cfg.n_ctx, -(-need // 256) * 256)

    # ---------------------------------------------------------------- kinds

    def import_time(self) -> Cell:
        def imp(py: str, module: str) -> Runner:
            def run() -> dict:
                base = run_proc([py, "-c", "pass"])
                p = run_proc([py, "-c", f"import {module}"])
                if p.rc != 0:
                    raise BenchError(f"import {module} failed:\n{tail(p.err)}")
                return {"import_s": p.wall_s - base.wall_s}
            return run

        return Cell(
            model="-", name="import",
            description="`python -c 'import X'` wall time minus `python -c pass` (same interpreter)",
            metrics=[("import_s", "import time", "s", "lower")],
            runners={"pyllama": imp(sys.executable, "pyllama"), "lcp": imp(str(LCP_PY), "llama_cpp")},
            targets=[Target("import pyllama < 0.2 s", "import_s", "abs_max", "pyllama", None, 0.2)],
            py_needs_llm=False,
        )

    def startup(self, m: str) -> Cell:
        cfg = self.cfg
        n = cfg.startup_tokens

        def run_native() -> dict:
            # Model load: the C call timed around it (load_time), like the Python contenders'
            # Model()/llama_model_load_from_file.  llama-completion's "load time" counter is
            # not comparable: it starts after the GGUF metadata is parsed and ends at the first
            # decode.  TTFT and peak RSS come from a llama-completion run.
            lt = native("load_time", [self.models[m]])
            load_ms = json.loads(lt.out.strip().splitlines()[-1])["load_ms"]
            p = self.completion(m, TTFT_PROMPT, n)
            perf = parse_native_perf(p.err + p.out)
            if "load_ms" not in perf:
                raise BenchError("could not parse llama-completion timings:\n" + tail(p.err))
            return {"load_ms": load_ms, "ttft_ms": perf.get("prompt_ms"),
                    "rss_mb": p.maxrss_mb, "prompt_n": perf.get("prompt_n"),
                    "load_counter_ms": perf["load_ms"]}

        def run_py(impl: str) -> Runner:
            def run() -> dict:
                ml, _ = worker(impl, "model_load", self.spec(m))
                r, p = self.complete(impl, m, TTFT_PROMPT, n, ignore_eos=True, stream=True)
                return {"load_ms": ml["load_s"] * 1e3, "construct_ms": r["load_s"] * 1e3,
                        "ttft_ms": r["ttft_s"] * 1e3, "rss_mb": p.maxrss_mb}
            return run

        return Cell(
            model=m, name="startup",
            description=(f"model load, each timed around one call in a fresh process (native: "
                         f"`llama_model_load_from_file` from C, benchmarks/native/load_time.c; pyllama: "
                         f"`_core.Model()`; llama-cpp-python: `llama_model_load_from_file` through ctypes), constructor of LLM/Llama "
                         f"(model + context), time to first token of a {len(TTFT_PROMPT)}-char prompt "
                         f"(native: prompt-eval counter; Python: first streamed piece), peak RSS of a "
                         f"process that loads, evaluates the prompt and generates {n} tokens (n_ctx {cfg.n_ctx})"
                         + ("; native load_time loads with llama.cpp's default model parameters (every layer "
                            "on the GPU of a GPU build), not with --ngl" if cfg.ngl else "")),
            metrics=[("load_ms", "model load", "ms", "lower"),
                     ("construct_ms", "LLM()/Llama() construct", "ms", "lower"),
                     ("ttft_ms", "time to first token", "ms", "lower"),
                     ("rss_mb", "peak RSS", "MB", "lower")],
            runners={"native": run_native, "pyllama": run_py("pyllama"), "lcp": run_py("lcp")},
            targets=[Target("load time within 1.1x native", "load_ms", "ratio_max", "pyllama", "native", 1.1),
                     Target("peak RSS at most native + 50 MB", "rss_mb", "plus_max", "pyllama", "native", 50.0)],
        )

    def decode(self, m: str, n_prompt: int = 0, n_gen: int = 0) -> Cell:
        """pp<n_prompt> (prompt processing) or tg<n_gen> (generation), llama-bench's loops."""
        name = f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"
        # Short runs are noisy: pp64 takes ~0.1 s, so each process does 5 reps (llama-bench -r 5,
        # the mean of their t/s, for both contenders); the others one.
        inner = 5 if 0 < n_prompt + n_gen <= 64 else 1
        kind = "prompt processing" if n_prompt else "generation"
        return Cell(
            model=m, name=name,
            description=(f"llama-bench's {kind} loop, {n_prompt or n_gen} tokens, one rep per process "
                         f"(5 for runs of 64 tokens or fewer, averaged as llama-bench -r does) after llama-bench's warmup (pyllama: `_core.Context.decode`; "
                         f"llama-cpp-python: `Llama.eval`)"),
            metrics=[("tps", f"{name} tokens/s", "t/s", "higher")],
            runners={c: self.decode_rate(c, m, n_prompt, n_gen, inner) for c in ("native", "pyllama", "lcp")},
            targets=[Target(f"{kind} tokens/s at least 0.97x native", "tps", "ratio_min", "pyllama", "native", 0.97)],
            py_needs_llm=False,
        )

    def rpc(self, m: str) -> Cell:
        """Generation over llama.cpp's RPC backend on loopback vs local, for pyllama (its own
        `pyllama rpc-server`) and native (`ggml-rpc-server` + `llama-bench --rpc`)."""
        cfg = self.cfg
        n = cfg.rpc_tg
        return Cell(
            model=m, name=f"rpc_tg{n}",
            description=(f"generation of {n} tokens (llama-bench's tg loop) with every layer on one RPC "
                         f"server on 127.0.0.1 (server and client on this machine, {cfg.threads} threads "
                         f"each): pyllama's `pyllama rpc-server` + `_core` client vs native "
                         f"`ggml-rpc-server` + `llama-bench --rpc -ngl 99`; `local` rows: the same "
                         f"without RPC"),
            metrics=[("tps", f"tg{n} tokens/s", "t/s", "higher")],
            runners={impl + (":rpc" if rpc else ""): self.decode_rate(impl, m, 0, n, rpc=rpc)
                     for impl in ("native", "pyllama") for rpc in (False, True)},
            ratio_pairs=[("pyllama:rpc", "native:rpc"), ("pyllama:rpc", "pyllama"), ("native:rpc", "native")],
            targets=[Target("RPC generation at least 0.97x native RPC", "tps", "ratio_min",
                            "pyllama:rpc", "native:rpc", 0.97)],
            py_needs_llm=False,
        )

    def e2e(self, m: str, n: int) -> Cell:
        """Greedy generation of n tokens timed from outside: (t(n) - t(1)) / (n - 1)."""

        def timed(impl: str, k: int) -> tuple[float, dict]:
            """Seconds for max_tokens=k, and what the run says it did."""
            if impl == "native":
                p = self.completion(m, PROMPT, k)
                return p.wall_s, parse_native_perf(p.err + p.out)
            r, _ = self.complete(impl, m, PROMPT, k, ignore_eos=True, stream=False)
            return r["call_s"], r

        def measure(impl: str) -> Runner:
            def run() -> dict:
                t_n, info = timed(impl, n)
                t_1, _ = timed(impl, 1)
                out = {"tps": (n - 1) / (t_n - t_1), "delta_s": t_n - t_1}
                if impl == "native":  # llama-completion does not decode the last sampled token
                    out["eval_n"] = info.get("eval_n")
                    if info.get("eval_n") != n - 1:
                        out["warning"] = f"llama-completion decoded {info.get('eval_n')} tokens, expected {n - 1}"
                else:
                    out["n_tokens"] = info.get("n_tokens")
                    if info.get("n_tokens") not in (None, n):
                        out["warning"] = f"generated {info.get('n_tokens')} tokens, expected {n}"
                return out
            return run

        targets = []
        if m == "smollm2":
            want = 1.05 if n <= 128 else 1.2
            targets.append(Target(f"at least {want}x llama-cpp-python (SmolLM2)", "tps", "ratio_min",
                                  "pyllama", "lcp", want))
        return Cell(
            model=m, name=f"e2e{n}",
            description=(f"greedy generation timed from outside: (time of max_tokens={n} - time of "
                         f"max_tokens=1) / {n - 1}, each in a fresh process, end-of-generation ignored; "
                         f"native: llama-completion process wall time; Python: the complete()/__call__ call"),
            metrics=[("tps", f"e2e{n} tokens/s", "t/s", "higher")],
            runners={c: measure(c) for c in ("native", "pyllama", "lcp")},
            targets=targets,
        )

    def stream(self, m: str, n: int) -> Cell:
        """One call generating n tokens, streaming or not (Python contenders only)."""

        return Cell(
            model=m, name=f"stream{n}",
            description=(f"one call generating {n} tokens (prompt included), streaming "
                         f"(pyllama `LLM.stream`, llama-cpp-python `stream=True`) vs not"),
            metrics=[("tps", f"call tokens/s ({n})", "t/s", "higher")],
            runners={impl + (":stream" if stream else ""): call_rate(
                        partial(self.complete, impl, m, PROMPT, n, ignore_eos=True, stream=stream), n)
                     for impl in ("pyllama", "lcp") for stream in (False, True)},
            ratio_pairs=[("pyllama:stream", "pyllama"), ("lcp:stream", "lcp"),
                         ("pyllama:stream", "lcp:stream"), ("pyllama", "lcp")],
        )

    def grammar(self, m: str) -> Cell:
        n = self.cfg.grammar_tokens

        def run_native() -> dict:
            p = self.completion(m, GRAMMAR_PROMPT, n, ignore_eos=False,
                                extra=("--grammar-file", str(self.grammar_file())))
            perf = parse_native_perf(p.err + p.out)
            if "sampling_ms" not in perf or "eval_n" not in perf:
                raise BenchError("could not parse llama-completion sampling time:\n" + tail(p.err))
            n_tok = perf["eval_n"] + 1  # the last sampled token is not decoded
            return {"sample_ms_per_tok": perf["sampling_ms"] / n_tok, "n_tokens": n_tok}

        def run_py(impl: str) -> Runner:
            def run() -> dict:
                r, _ = self.complete(impl, m, GRAMMAR_PROMPT, n, grammar=JSON_GBNF, stream=False)
                out = {"n_tokens": r.get("n_tokens"), "tps": (r.get("n_tokens") or 0) / r["call_s"]}
                t = r.get("timings") or {}
                if t.get("sample_ms") is not None and t.get("sample_n"):
                    out["sample_ms_per_tok"] = float(t["sample_ms"]) / float(t["sample_n"])
                return out
            return run

        return Cell(
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
        )

    def batched(self, m: str, npl: int) -> Cell:
        """npl sequences from one shared prompt: llama-batched-bench vs LLM.generate."""
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
            raise BenchError("no jsonl line from llama-batched-bench:\n" + tail(p.out + p.err))

        def run_py() -> dict:
            r, _ = self.batched_call(m, [BATCH_PROMPT] * npl, "batched", self.batch_ctx(m))
            out = {"tps": r["n_tokens"] / r["call_s"], "n_tokens": r["n_tokens"]}
            if r["n_tokens"] != npl * tg:
                out["warning"] = f"generated {r['n_tokens']} tokens, expected {npl * tg}"
            return out

        return Cell(
            model=m, name=f"batched{npl}",
            description=(f"{npl} sequences x {tg} generated tokens from one shared prompt, aggregate "
                         f"generated tokens/s over the whole call (prompt included): native "
                         f"llama-batched-bench -pps{' -kvu' if cfg.native_kvu else ''} "
                         f"(npl*ntg/(t_pp+t_tg)); pyllama `LLM.generate([prompt]*{npl}, ignore_eos=True)`"),
            metrics=[("tps", f"aggregate t/s, {npl} seq", "t/s", "higher")],
            runners={"native": run_native, "pyllama": run_py},
            targets=[Target("batched aggregate at least 0.9x llama-batched-bench", "tps", "ratio_min",
                            "pyllama", "native", 0.9)],
        )

    def seqbatch(self, m: str) -> Cell:
        """seq_n different prompts with pyllama: LLM.generate(prompts) vs complete() in turn."""
        cfg = self.cfg
        prompts = SEQ_PROMPTS[: cfg.seq_n]
        n_ctx = max(cfg.n_ctx, -(-(len(prompts) * (32 + cfg.batch_tg) + 64) // 256) * 256)

        return Cell(
            model=m, name=f"seqbatch{len(prompts)}",
            description=(f"{len(prompts)} different prompts x {cfg.batch_tg} tokens with pyllama: "
                         f"`LLM.generate(prompts)` vs `complete()` one after another (tokens/s)"),
            metrics=[("tps", f"{len(prompts)} prompts t/s", "t/s", "higher")],
            runners={"pyllama": call_rate(partial(self.batched_call, m, prompts, "batched", n_ctx)),
                     "pyllama:sequential": call_rate(partial(self.batched_call, m, prompts, "sequential", n_ctx))},
            ratio_pairs=[("pyllama", "pyllama:sequential")],
            targets=[Target(f"batched at least 1.5x sequential ({len(prompts)} prompts)", "tps",
                            "ratio_min", "pyllama", "pyllama:sequential", 1.5)],
        )
