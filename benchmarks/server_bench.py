"""Server workload: N concurrent streaming chat clients against pyllama serve, llama.cpp's
llama-server (built from the same vendored tree) and llama-cpp-python's server.

    python benchmarks/server_bench.py -m ~/.cache/pyllama/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --clients 1 4 8 16 --threads 2 --ctx-per-slot 2048 --max-tokens 64

Each server is started with -np N (slots = clients), the same model, threads and context
per slot, on a free loopback port.  Each of the N clients sends one greedy streaming chat
completion of --max-tokens tokens (ignore_eos, so every answer has the same length); a
round is repeated --reps times.  Reported per server and N: aggregate generated tokens/s
(all tokens / wall time of the round, median over rounds) and time to first token p50/p99
over all requests.  A second workload measures the prompt cache: two requests that share
a ~1,000-token system prompt, TTFT of the second relative to the first.

llama-server: benchmarks/.cache/native/bin/llama-server (add `llama-server` to the TARGETS of
benchmarks/setup_native.sh, or pass --llama-server PATH).  llama-cpp-python's server:
benchmarks/.cache/venv-lcp/bin/python with `pip install "llama-cpp-python[server]"` deps
(or --lcp-python PATH).  A server whose executable is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(name: str, model: str, n: int, threads: int, ctx_per_slot: int, port: int, args) -> list | None:
    total = ctx_per_slot * n
    if name == "pyllama":
        return [sys.executable, "-m", "pyllama", "serve", "-m", model, "-np", str(n), "-c", str(total),
                "-t", str(threads), "--port", str(port), "--max-queue", "256"]
    if name == "llama-server":
        exe = Path(args.llama_server)
        if not exe.exists():
            return None
        return [str(exe), "-m", model, "-np", str(n), "-c", str(total), "-t", str(threads), "-tb", str(threads),
                "--port", str(port), "--host", "127.0.0.1", "--no-webui", "-ngl", "0"]
    if name == "llama-cpp-python":
        py = Path(args.lcp_python)
        if not py.exists():
            return None
        # its server serves one request at a time whatever n is; n_ctx is per context
        return [str(py), "-m", "llama_cpp.server", "--model", model, "--n_ctx", str(ctx_per_slot),
                "--n_threads", str(threads), "--port", str(port), "--host", "127.0.0.1"]
    raise ValueError(name)


class Server:
    def __init__(self, cmd: list, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=2)
                if r.status_code == 200 and httpx.get(self.url + "/health", timeout=2).status_code in (200, 404):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


async def one_request(client: httpx.AsyncClient, url: str, messages: list, max_tokens: int) -> tuple:
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    ttft = None
    n = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", ()):
                if c.get("delta", {}).get("content"):
                    n += 1          # one content delta ~ one token (all three servers stream per token)
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else float("nan")), n, time.perf_counter() - t0


async def round_of(url: str, n_clients: int, max_tokens: int) -> tuple:
    async with httpx.AsyncClient(timeout=600) as client:
        prompts = [[{"role": "user", "content": f"Write a short story about a robot, number {i}."}]
                   for i in range(n_clients)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    return sum(r[1] for r in results) / wall, [r[0] for r in results]


async def prompt_cache(url: str) -> float:
    system = " ".join(f"Rule {i}: answer politely and precisely about topic {i}." for i in range(80))
    async with httpx.AsyncClient(timeout=600) as client:
        first, _, _ = await one_request(client, url, [{"role": "system", "content": system},
                                                      {"role": "user", "content": "Hi"}], 4)
        second, _, _ = await one_request(client, url, [{"role": "system", "content": system},
                                                       {"role": "user", "content": "Hello"}], 4)
    return second / first


def pct(xs: list, q: float) -> float:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ctx-per-slot", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--servers", nargs="+", default=["pyllama", "llama-server", "llama-cpp-python"])
    ap.add_argument("--llama-server", default=str(HERE / ".cache" / "native" / "bin" / "llama-server"))
    ap.add_argument("--lcp-python", default=str(HERE / ".cache" / "venv-lcp" / "bin" / "python"))
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    results: list = []
    for n in args.clients:
        for name in args.servers:
            port = free_port()
            cmd = commands(name, args.model, n, args.threads, args.ctx_per_slot, port, args)
            if cmd is None:
                print(f"{name}: not installed, skipped", file=sys.stderr)
                continue
            server = Server(cmd, port)
            try:
                server.wait()
                asyncio.run(round_of(server.url, 1, 4))            # warm-up
                rates, ttfts = [], []
                for _ in range(args.reps):
                    rate, t = asyncio.run(round_of(server.url, n, args.max_tokens))
                    rates.append(rate)
                    ttfts.extend(t)
                row = {"server": name, "clients": n, "tok_s": statistics.median(rates),
                       "ttft_p50_ms": 1000 * pct(ttfts, 0.5), "ttft_p99_ms": 1000 * pct(ttfts, 0.99)}
                if n == args.clients[0]:
                    row["cache_ttft_ratio"] = asyncio.run(prompt_cache(server.url))
                results.append(row)
                print(json.dumps(row), flush=True)
            except Exception as exc:  # noqa: BLE001  (one server failing must not stop the others)
                print(f"{name} -np {n}: failed: {exc}", file=sys.stderr)
            finally:
                server.stop()

    print("\n| server | clients | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) |\n| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['server']} | {r['clients']} | {r['tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} |")
    for r in results:
        if "cache_ttft_ratio" in r:
            print(f"{r['server']}: TTFT of a request sharing a ~1,000-token system prompt = "
                  f"{r['cache_ttft_ratio']:.2f} x the first")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
