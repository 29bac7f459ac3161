#!/usr/bin/env python3
"""Speculative decoding (issue 25's benchmark): plain vs n-gram speculation, pyllama and
llama-server, on input-grounded and free-form chats, one stream and eight.

    python benchmarks/spec_bench.py -m ~/.cache/pyllama/models/SmolLM2-135M-Instruct.Q4_1.gguf --reps 3
    python benchmarks/spec_bench.py --models smollm2,gemma3 --reps 3 --threads 2

Four servers, each started fresh per round on a free loopback port with the same model,
threads and context per slot: ``pyllama serve`` plain and with ``--spec-type ngram-simple``
(pyllama's defaults), llama.cpp's ``llama-server`` (benchmarks/setup_native.sh builds it from
the vendored tree) plain and with ``--spec-type ngram-simple`` (its defaults, as a new user runs
it).  Workloads (greedy chat completions, streamed, each answer ending where the model ends it,
at most --max-tokens):

* **grounded**: answers that copy from their input: rename an identifier in a ~40-line function,
  copy a ten-row table adding a word to each row, repeat a snippet;
* **free-form**: stories and explanations that copy nothing.

Single stream: each prompt alone; the workload's rate is the decode rate the client sees over
all of its answers, sum(tokens - 1) / sum(time of the last token - time of the first) — a
median of per-answer rates would drop the answers that copy most, when a small model answers
some prompts in a line — and each answer's own rate is printed too.  Eight clients: the eight prompts of the workload
at once (each repeated as needed), aggregate tokens / wall time.  Reported: medians (min-max) over
--reps rounds, the ratios the issue sets targets for (grounded single stream: pyllama n-gram >= 1.3x
pyllama plain and >= 1.0x llama-server's speculation; free-form and eight clients: >= 0.97x plain),
and the drafted / accepted counts of pyllama's (``timings.draft_n``) and llama-server's responses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe  # noqa: E402
from server_bench import LOG_DIR, Server, free_port  # noqa: E402

FUNCTION = "\n".join([
    "def summarize_orders(orders, tax_rate):",
    "    total_amount = 0.0",
    "    count = 0",
    "    largest = None",
    "    for order in orders:",
    "        if order.get('cancelled'):",
    "            continue",
    "        amount = order['price'] * order['quantity']",
    "        amount = amount * (1.0 + tax_rate)",
    "        total_amount += amount",
    "        count += 1",
    "        if largest is None or amount > largest:",
    "            largest = amount",
    "    if count == 0:",
    "        return {'total': 0.0, 'count': 0, 'average': 0.0, 'largest': 0.0}",
    "    average = total_amount / count",
    "    return {",
    "        'total': round(total_amount, 2),",
    "        'count': count,",
    "        'average': round(average, 2),",
    "        'largest': round(largest, 2),",
    "    }",
])
TABLE = "\n".join(["| city | country | population |", "|---|---|---|"] + [
    f"| {c} | {k} | {p} |" for c, k, p in [
        ("Paris", "France", "2.1M"), ("Berlin", "Germany", "3.6M"), ("Madrid", "Spain", "3.3M"),
        ("Rome", "Italy", "2.8M"), ("Vienna", "Austria", "1.9M"), ("Prague", "Czechia", "1.3M"),
        ("Lisbon", "Portugal", "0.5M"), ("Dublin", "Ireland", "0.6M"), ("Oslo", "Norway", "0.7M"),
        ("Warsaw", "Poland", "1.8M")]])
SNIPPET = ("import json\n\nwith open('config.json') as f:\n    config = json.load(f)\n"
           "print(config['name'], config['version'])\n")

GROUNDED = [
    f"Rewrite this function, renaming the variable total_amount to running_total. Output only the code.\n\n{FUNCTION}",
    f"Copy this table exactly, adding the word 'capital' after each city name. Output only the table.\n\n{TABLE}",
    f"Repeat this snippet exactly, twice.\n\n{SNIPPET}",
]
FREE = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while moving.",
    "Describe a walk through a forest in autumn.",
]
CONFIGS = ("pyllama", "pyllama+ngram", "llama-server", "llama-server+ngram")


def command(config: str, model: str, n: int, args, port: int) -> list:
    total = args.ctx_per_slot * n
    if config.startswith("pyllama"):
        cmd = [sys.executable, "-m", "pyllama", "serve", "-m", model, "-np", str(n), "-c", str(total),
               "-t", str(args.threads), "-b", "512", "--host", "127.0.0.1", "--port", str(port)]
    else:
        cmd = [args.llama_server, "-m", model, "-np", str(n), "-c", str(total), "-t", str(args.threads),
               "-tb", str(args.threads), "-b", "512", "--host", "127.0.0.1", "--port", str(port), "--no-webui",
               "-ngl", "0"]
    if config.endswith("+ngram"):
        cmd += ["--spec-type", "ngram-simple"]
    return cmd


async def one(client: httpx.AsyncClient, url: str, text: str, max_tokens: int) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    usage = timings = None
    parts = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
            for c in chunk.get("choices") or ():
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    parts.append(piece)
    n = usage["completion_tokens"] if usage else len(parts)
    span = (last - first) if first is not None and last is not None else 0.0
    return {"tokens": n, "rate": (n - 1) / span if span > 0 and n > 1 else float("nan"), "span": span,
            "wall": time.perf_counter() - t0, "text": "".join(parts),
            "draft_n": (timings or {}).get("draft_n", 0), "draft_n_accepted": (timings or {}).get("draft_n_accepted", 0)}


# A fresh connection per request: llama-server sometimes closed a kept-alive connection just as
# the next request went out on it ("Server disconnected without sending a response"; the server
# itself was fine).  Both servers get the same client.
NO_KEEPALIVE = httpx.Limits(max_keepalive_connections=0)


async def single(url: str, prompts: list, max_tokens: int) -> list:
    async with httpx.AsyncClient(timeout=600, limits=NO_KEEPALIVE) as client:
        return [await one(client, url, p, max_tokens) for p in prompts]


async def many(url: str, prompts: list, n: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(client, url, prompts[i % len(prompts)], max_tokens) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"tok_s": sum(r["tokens"] for r in res) / wall, "draft_n": sum(r["draft_n"] for r in res),
            "draft_n_accepted": sum(r["draft_n_accepted"] for r in res)}


def measure(config: str, model: str, n: int, args) -> dict:
    """One configuration's round; if a request fails on the transport (a dropped connection),
    the round is run once more on a fresh server, and said so."""
    try:
        return _measure(config, model, n, args)
    except (httpx.HTTPError, RuntimeError) as exc:
        print(f"  {config} np={n}: a request failed mid-round ({type(exc).__name__}: {exc}); "
              "running the round again on a fresh server", flush=True)
        return _measure(config, model, n, args)


def _measure(config: str, model: str, n: int, args) -> dict:
    port = free_port()
    server = Server(config, command(config, model, n, args, port), port,
                    LOG_DIR / f"spec-{config}-np{n}.log")
    try:
        server.wait_ready()
        asyncio.run(single(server.url, ["Say hi."], 8))     # warm-up
        out: dict = {}
        for name, prompts in (("grounded", GROUNDED), ("free", FREE)):
            if n == 1:
                res = asyncio.run(single(server.url, prompts, args.max_tokens))
                spans = [r for r in res if r["span"] > 0 and r["tokens"] > 1]
                out[name] = {"tok_s": sum(r["tokens"] - 1 for r in spans) / sum(r["span"] for r in spans),
                             "per_answer": [(r["tokens"], r["rate"]) for r in res],
                             "draft_n": sum(r["draft_n"] for r in res),
                             "draft_n_accepted": sum(r["draft_n_accepted"] for r in res),
                             "texts": [r["text"] for r in res]}
            else:
                out[name] = asyncio.run(many(server.url, prompts, n, args.max_tokens))
        return out
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", action="append", default=None, help="GGUF (repeatable)")
    parser.add_argument("--models", default=None, help="known model names, comma-separated (smollm2,gemma3)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--ctx-per-slot", type=int, default=2048)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--llama-server", default=str(HERE / ".cache/native/bin/llama-server"))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args()

    models = list(args.model or [])
    if args.models or not models:
        from pyllama.models import fetch_model
        models += [str(fetch_model(name)) for name in (args.models or "smollm2").split(",")]
    configs = [c for c in args.configs.split(",") if c]
    if not Path(args.llama_server).exists():
        print(f"note: {args.llama_server} not found (bash benchmarks/setup_native.sh): llama-server left out",
              file=sys.stderr)
        configs = [c for c in configs if not c.startswith("llama-server")]
    print(describe())
    print(f"{args.threads} threads, greedy, at most {args.max_tokens} tokens per answer, {args.reps} rounds "
          f"(servers restarted each round, configurations interleaved)")
    raw: dict = {}
    for model in models:
        for n in args.clients:
            for rep in range(args.reps):
                for config in configs:
                    r = measure(config, model, n, args)
                    for work, v in r.items():
                        raw.setdefault((Path(model).name, n, work, config), []).append(v)
                    print(f"  {Path(model).name} np={n} round {rep + 1}: {config:<20} "
                          + "  ".join(f"{w} {v['tok_s']:.1f} tok/s" for w, v in r.items()), flush=True)
                    for w, v in r.items():
                        if "per_answer" in v:
                            print(f"      {w} answers (tokens, tok/s): "
                                  + ", ".join(f"({t}, {x:.1f})" for t, x in v["per_answer"]), flush=True)

    def med(key) -> float:
        vals = [v["tok_s"] for v in raw.get(key, [])]
        return statistics.median(vals) if vals else float("nan")

    print()
    print("| model | clients | workload | " + " | ".join(configs) + " | n-gram / plain | n-gram / llama-server n-gram |")
    print("|---|---|---|" + "---|" * len(configs) + "---|---|")
    for model in models:
        name = Path(model).name
        for n in args.clients:
            for work in ("grounded", "free"):
                cells = []
                for c in configs:
                    vals = [v["tok_s"] for v in raw.get((name, n, work, c), [])]
                    cells.append(f"{statistics.median(vals):.1f} ({min(vals):.1f}–{max(vals):.1f})" if vals else "-")
                r1 = med((name, n, work, "pyllama+ngram")) / med((name, n, work, "pyllama"))
                r2 = med((name, n, work, "pyllama+ngram")) / med((name, n, work, "llama-server+ngram"))
                print(f"| {name} | {n} | {work} | " + " | ".join(cells) + f" | {r1:.2f}x | {r2:.2f}x |")
    print()
    for (name, n, work, c), vals in raw.items():
        d = sum(v["draft_n"] for v in vals)
        if d:
            a = sum(v["draft_n_accepted"] for v in vals)
            print(f"- {name} np={n} {work} {c}: drafted {d}, accepted {a} ({100.0 * a / d:.0f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps({" / ".join(map(str, k)): v for k, v in raw.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
