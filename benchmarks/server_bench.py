#!/usr/bin/env python3
"""Server workload (issue 15): N concurrent streaming chat clients against `pyllama serve`,
llama.cpp's `llama-server` (built from the same vendored tree) and llama-cpp-python's server.

    python benchmarks/server_bench.py -m ~/.cache/pyllama/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --clients 1 4 8 16 --threads 2 --ctx-per-slot 2048 --max-tokens 64 --reps 3

For each N, each server is started fresh on a free loopback port with N slots (pyllama
`-np N`, llama-server `-np N`; llama-cpp-python's server has no slots: it serves one request at
a time, and is run with `--interrupt_requests False` so that a new request waits instead of
cancelling the running stream), the same model, threads (generation and batch) and context per
slot (`-c` = N x --ctx-per-slot for the slotted servers, `--n_ctx` = --ctx-per-slot for
llama-cpp-python).  After a warm-up round (N clients, 8 tokens), --reps rounds: N clients each
send one greedy (temperature 0) streaming chat completion of --max-tokens tokens, all at once.
Every answer has exactly --max-tokens tokens: `ignore_eos` for pyllama and llama-server,
`min_tokens` for llama-cpp-python (its logits processor holding back end-of-generation).

Reported per server and N: aggregate generated tokens/s (all tokens of the round / wall time
of the round, median over the rounds, min-max) and time to first token (first content delta,
measured by the client) p50/p99 over all requests of all rounds.  Tokens are counted from
`usage.completion_tokens` (`stream_options.include_usage`) where the server sends it, else as
content deltas (all three stream one token per delta); a round where any answer is short is
reported.

Prompt cache (at the first N, i.e. one slot): per rep, a fresh ~1,000-token system prompt; the
first request with it (cold) and then a second request with the same system prompt and a
different user message; ratio = median TTFT of the second / median TTFT of the first.

GPU: `--ngl N` offloads N layers in every server (llama-server and `pyllama serve` `-ngl N`,
llama-cpp-python `--n_gpu_layers N`; default 0, CPU only, as llama-server's `-ngl 0` always was).

Servers: llama-server from benchmarks/.cache/native/bin, or $NATIVE_BUILD_DIR/bin when that is set
(benchmarks/setup_native.sh builds it),
llama-cpp-python's from benchmarks/.cache/venv-lcp (benchmarks/setup_llama_cpp_python.sh, then
`benchmarks/.cache/venv-lcp/bin/pip install "llama-cpp-python[server]==0.3.36"`).  A missing one
is skipped with a note.  Every server process started is stopped (SIGINT, then SIGKILL of its
process group after 15 s), also when the run is interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime as _dt
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOG_DIR = HERE / "results" / "server-logs"
SERVERS = ("pyllama", "llama-server", "llama-cpp-python")
_LIVE: list = []                    # servers not yet stopped (stopped at exit whatever happens)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(name: str, model: str, n: int, threads: int, ctx_per_slot: int, port: int, args) -> list | None:
    total = ctx_per_slot * n
    if name == "pyllama":
        return [sys.executable, "-m", "pyllama", "serve", "-m", model, "-np", str(n), "-c", str(total),
                "-t", str(threads), "-b", "512", "--host", "127.0.0.1", "--port", str(port),
                "--max-queue", "256"] + (["-ngl", str(args.ngl)] if args.ngl else [])
    if name == "llama-server":
        exe = Path(args.llama_server)
        if not exe.exists():
            return None
        return [str(exe), "-m", model, "-np", str(n), "-c", str(total), "-t", str(threads), "-tb", str(threads),
                "-b", "512", "--host", "127.0.0.1", "--port", str(port), "--no-webui", "-ngl", str(args.ngl)]
    if name == "llama-cpp-python":
        py = Path(args.lcp_python)
        if not py.exists():
            return None
        # one Llama, one request at a time whatever N is; n_ctx is that one context's size
        return [str(py), "-m", "llama_cpp.server", "--model", model, "--n_ctx", str(ctx_per_slot),
                "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_batch", "512",
                "--flash_attn", "True", "--interrupt_requests", "False",
                "--host", "127.0.0.1", "--port", str(port)] + (["--n_gpu_layers", str(args.ngl)] if args.ngl else [])
    raise ValueError(name)


def extra_body(name: str, max_tokens: int) -> dict:
    """How each server is told to produce exactly max_tokens tokens (and to report usage)."""
    if name == "llama-cpp-python":
        return {"min_tokens": max_tokens}          # no ignore_eos, no stream_options there
    return {"ignore_eos": True, "stream_options": {"include_usage": True}}


class Server:
    def __init__(self, name: str, cmd: list, port: int, log_path: Path) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        _LIVE.append(self)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200 and \
                        httpx.get(self.url + "/health", timeout=2).status_code in (200, 404):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout:.0f} s (log: {self.log_path})")

    def stop(self) -> None:
        if self in _LIVE:
            _LIVE.remove(self)
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    pass
            # whatever is left of its process group (the server itself, or any child)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._log.close()


def _stop_all() -> None:
    for s in list(_LIVE):
        s.stop()


atexit.register(_stop_all)


def _on_signal(signum, frame):  # noqa: ARG001
    _stop_all()
    sys.exit(128 + signum)


async def one_request(client: httpx.AsyncClient, url: str, messages: list, max_tokens: int, extra: dict) -> dict:
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body.update(extra)
    t0 = time.perf_counter()
    ttft = None
    deltas = 0
    usage = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices") or ():
                if (c.get("delta") or {}).get("content"):
                    deltas += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    n = usage["completion_tokens"] if usage and usage.get("completion_tokens") is not None else deltas
    return {"ttft": ttft if ttft is not None else float("nan"), "tokens": n, "deltas": deltas, "usage": usage,
            "total": time.perf_counter() - t0}


async def round_of(url: str, n_clients: int, max_tokens: int, extra: dict, salt: str = "") -> dict:
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        prompts = [[{"role": "user", "content": f"Write a short story about a robot{salt}, number {i}."}]
                   for i in range(n_clients)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, p, max_tokens, extra) for p in prompts))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "ttfts": [r["ttft"] for r in results],
            "short": sum(1 for r in results if r["tokens"] != max_tokens)}


def system_prompt(tag: str) -> str:
    # ~1,000 tokens under SmolLM2's tokenizer (the first request reports prompt_tokens; see JSON)
    rules = " ".join(f"Rule {i}: answer politely and precisely about topic {i}." for i in range(65))
    return f"Session {tag}. You are a careful assistant. {rules}"


async def prompt_cache(url: str, extra: dict, reps: int) -> dict:
    firsts, seconds, details = [], [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for r in range(reps):
            system = system_prompt(f"{r}-{time.time_ns()}")
            a = await one_request(client, url, [{"role": "system", "content": system},
                                                {"role": "user", "content": "Hi"}], 4, extra)
            b = await one_request(client, url, [{"role": "system", "content": system},
                                                {"role": "user", "content": "Hello there"}], 4, extra)
            firsts.append(a["ttft"])
            seconds.append(b["ttft"])
            details.append({"first_usage": a["usage"], "second_usage": b["usage"]})
    f, s = statistics.median(firsts), statistics.median(seconds)
    return {"ttft_first_ms": 1000 * f, "ttft_second_ms": 1000 * s, "ratio": s / f,
            "firsts_ms": [1000 * x for x in firsts], "seconds_ms": [1000 * x for x in seconds], "usage": details}


def pct(xs: list, q: float) -> float:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)"):
                info[k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info["loadavg"] = os.getloadavg()
    return info


def run_server(name: str, n: int, args, port: int, cmd: list, do_cache: bool) -> dict:
    extra = extra_body(name, args.max_tokens)
    log = LOG_DIR / f"{name}-np{n}.log"
    server = Server(name, cmd, port, log)
    try:
        server.wait_ready()
        asyncio.run(round_of(server.url, n, 8, extra, salt=" (warm-up)"))
        rounds = [asyncio.run(round_of(server.url, n, args.max_tokens, extra)) for _ in range(args.reps)]
        rates = [r["tok_s"] for r in rounds]
        ttfts = [t for r in rounds for t in r["ttfts"]]
        row = {"server": name, "clients": n, "tok_s": statistics.median(rates), "tok_s_min": min(rates),
               "tok_s_max": max(rates), "ttft_p50_ms": 1000 * pct(ttfts, 0.5),
               "ttft_p99_ms": 1000 * pct(ttfts, 0.99), "short_answers": sum(r["short"] for r in rounds),
               "rounds": [{k: v for k, v in r.items() if k != "ttfts"} | {"ttfts_ms": [1000 * t for t in r["ttfts"]]}
                          for r in rounds],
               "command": shlex.join(cmd)}
        if do_cache:
            row["cache"] = asyncio.run(prompt_cache(server.url, extra, args.reps))
        return row
    finally:
        server.stop()


def render(results: list, args) -> str:
    by = {(r["server"], r["clients"]): r for r in results}
    lines = ["| clients | server | tokens/s (min–max) | TTFT p50 [ms] | TTFT p99 [ms] | vs llama-server | vs llama-cpp-python |",
             "|---|---|---|---|---|---|---|"]
    if args.ngl:   # the table says where it was measured (CPU-only tables stay as they were)
        lines[:0] = [f"Every server with `-ngl {args.ngl}` (layers offloaded to the GPU), {args.threads} threads.", ""]
    for n in args.clients:
        for name in args.servers:
            r = by.get((name, n))
            if r is None:
                continue
            ls, lcp = by.get(("llama-server", n)), by.get(("llama-cpp-python", n))
            vs_ls = f"{r['tok_s'] / ls['tok_s']:.2f}x" if ls and name != "llama-server" else ""
            vs_lcp = f"{r['tok_s'] / lcp['tok_s']:.2f}x" if lcp and name != "llama-cpp-python" else ""
            short = f" ({r['short_answers']} short)" if r["short_answers"] else ""
            lines.append(f"| {n} | {name} | {r['tok_s']:.1f} ({r['tok_s_min']:.1f}–{r['tok_s_max']:.1f}){short} | "
                         f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {vs_ls} | {vs_lcp} |")
    lines += ["", "| server | TTFT first (cold) [ms] | TTFT second (shared system prompt) [ms] | ratio | prompt tokens | cached tokens (2nd) |",
              "|---|---|---|---|---|---|"]
    for r in results:
        c = r.get("cache")
        if not c:
            continue
        u1 = (c["usage"][0]["first_usage"] or {})
        u2 = (c["usage"][0]["second_usage"] or {})
        cached = (u2.get("prompt_tokens_details") or {}).get("cached_tokens", "")
        lines.append(f"| {r['server']} | {c['ttft_first_ms']:.0f} | {c['ttft_second_ms']:.0f} | {c['ratio']:.3f}x | "
                     f"{u1.get('prompt_tokens', '')} | {cached} |")
    # issue 15's targets
    lines += ["", "| target | measured | result |", "|---|---|---|"]
    for n in args.clients:
        py, ls = by.get(("pyllama", n)), by.get(("llama-server", n))
        if py and ls:
            v = py["tok_s"] / ls["tok_s"]
            lines.append(f"| tokens/s ≥ 0.9× llama-server, {n} clients | {v:.3f}x | {'✅ pass' if v >= 0.9 else '❌ fail'} |")
    py, lcp = by.get(("pyllama", 8)), by.get(("llama-cpp-python", 8))
    if py and lcp:
        v = py["tok_s"] / lcp["tok_s"]
        lines.append(f"| tokens/s ≥ 2× llama-cpp-python's server, 8 clients | {v:.2f}x | {'✅ pass' if v >= 2 else '❌ fail'} |")
    for r in results:
        if r["server"] == "pyllama" and r.get("cache"):
            v = r["cache"]["ratio"]
            lines.append(f"| cached TTFT ≤ 0.25× the first (1,000-token system prompt) | {v:.3f}x | "
                         f"{'✅ pass' if v <= 0.25 else '❌ fail'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ngl", type=int, default=0, metavar="N",
                    help="layers offloaded to the GPU (default 0: CPU only; 99 or -1: all): llama-server -ngl N, "
                         "pyllama serve -ngl N, llama-cpp-python --n_gpu_layers N (each needs a GPU build)")
    ap.add_argument("--ctx-per-slot", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    ap.add_argument("--no-cache-test", action="store_true", help="skip the shared-system-prompt TTFT workload")
    native_build = (Path(os.environ["NATIVE_BUILD_DIR"]).expanduser().resolve() if os.environ.get("NATIVE_BUILD_DIR")
                    else HERE / ".cache" / "native")          # where setup_native.sh builds
    ap.add_argument("--llama-server", default=str(native_build / "bin" / "llama-server"))
    ap.add_argument("--lcp-python", default=str(HERE / ".cache" / "venv-lcp" / "bin" / "python"))
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    args.model = os.path.expanduser(args.model)
    signal.signal(signal.SIGTERM, _on_signal)

    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "command": shlex.join([sys.executable, *sys.argv]), "args": vars(args)}
    print(json.dumps(meta), flush=True)
    print(f"settings: {args.threads} threads, -ngl {args.ngl} ({'CPU only' if args.ngl == 0 else 'GPU offload'}), "
          f"{args.ctx_per_slot} context per slot, {args.max_tokens} tokens per answer, {args.reps} reps",
          file=sys.stderr, flush=True)
    results: list = []
    try:
        for i, n in enumerate(args.clients):
            k = i % len(args.servers)
            for name in args.servers[k:] + args.servers[:k]:        # order rotated per N
                port = free_port()
                cmd = commands(name, args.model, n, args.threads, args.ctx_per_slot, port, args)
                if cmd is None:
                    print(f"{name}: not installed, skipped", file=sys.stderr)
                    continue
                try:
                    row = run_server(name, n, args, port, cmd, do_cache=(i == 0 and not args.no_cache_test))
                except Exception as exc:  # noqa: BLE001  (one server failing must not stop the others)
                    print(f"{name} -np {n}: failed: {exc}", file=sys.stderr, flush=True)
                    continue
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("rounds",)}), flush=True)
    finally:
        _stop_all()
    meta["loadavg_end"] = os.getloadavg()
    print()
    print(render(results, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
