#!/usr/bin/env python3
"""More conversations than slots: the host-memory prompt cache (--cache-ram) at work.

K conversations take turns on a server with S slots (K > S): each turn sends the whole history
(a long distinct opening, then every earlier question and answer) to /completion and asks for a
short answer. Without a prompt cache in RAM, a conversation's slot has gone to another one by
its next turn and the whole history is evaluated again; with it, the history comes back from RAM
and only the new question is evaluated.

    python benchmarks/prompt_cache_bench.py -m ~/.cache/pyllama/models/SmolLM2-135M-Instruct.Q4_1.gguf

Configurations, interleaved per round, each a fresh server: `pyllama serve --cache-ram 0`,
`pyllama serve` (its default, llama-server's 8192 MiB), and llama-server with its defaults when
its binary is there (benchmarks/setup_native.sh). Prints, per configuration, the median seconds
per turn and prompt tokens evaluated per turn (after each conversation's first turn), as medians
over rounds, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import describe  # noqa: E402
from server_bench import Server, commands, free_port  # noqa: E402

DEFAULT_LLAMA_SERVER = HERE / ".cache" / "native" / "bin" / "llama-server"

OPENINGS = [
    "You are a ship's navigator in the age of sail. Describe every island you pass, its harbours and its trade. ",
    "You are a chef in a busy Paris kitchen. Explain each dish you prepare, its sauces and its history. ",
    "You are an astronomer at a mountain observatory. Report each night's sky, its planets and its comets. ",
    "You are a gardener in an old English estate. Describe each bed you tend, its flowers and its pests. ",
]


def conversation_turns(args, url: str) -> list:
    """(seconds, prompt tokens evaluated) of every turn after each conversation's first."""
    histories = [OPENINGS[k % len(OPENINGS)] * args.opening_repeat for k in range(args.conversations)]
    out = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for turn in range(args.turns):
            for k in range(args.conversations):
                histories[k] += f"\nQuestion {turn}: and what comes next?\nAnswer:"
                t0 = time.perf_counter()
                r = client.post("/completion", json={"prompt": histories[k], "n_predict": args.n_predict,
                                                     "cache_prompt": True, "ignore_eos": True, "temperature": 0})
                dt = time.perf_counter() - t0
                r.raise_for_status()
                body = r.json()
                histories[k] += body["content"]
                if turn > 0:
                    out.append((dt, body["timings"]["prompt_n"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--opening-repeat", type=int, default=12, help="how many times each opening repeats (~25 tokens each)")
    ap.add_argument("--n-predict", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx-per-slot", type=int, default=4096)
    native = os.environ.get("NATIVE_BUILD_DIR")
    ap.add_argument("--llama-server", default=str(Path(native) / "bin" / "llama-server" if native else DEFAULT_LLAMA_SERVER))
    args = ap.parse_args()
    args.ngl = 0

    configs = [("pyllama --cache-ram 0", "pyllama", ["--cache-ram", "0"]), ("pyllama (default)", "pyllama", [])]
    if Path(args.llama_server).exists():
        configs.append(("llama-server (default)", "llama-server", []))
    print(describe())
    print(f"model {Path(args.model).name}; {args.slots} slot(s), {args.conversations} conversations x {args.turns} "
          f"turns, {args.n_predict} tokens per answer, {args.threads} threads, {args.rounds} rounds\n")
    results: dict = {name: {"turn_s": [], "prompt_n": []} for name, _, _ in configs}
    for rnd in range(args.rounds):
        for name, kind, extra in configs:
            port = free_port()
            cmd = commands(kind, args.model, args.slots, args.threads, args.ctx_per_slot, port, args) + extra
            server = Server(name, cmd, port, HERE / "results" / "server-logs" / f"prompt-cache-{kind}-{rnd}.log")
            try:
                server.wait_ready()
                turns = conversation_turns(args, server.url)
            finally:
                server.stop()
            results[name]["turn_s"].append(statistics.median(t for t, _ in turns))
            results[name]["prompt_n"].append(statistics.median(n for _, n in turns))
            print(f"round {rnd + 1} {name}: {results[name]['turn_s'][-1]:.3f} s/turn, "
                  f"{results[name]['prompt_n'][-1]:.0f} prompt tokens evaluated/turn", flush=True)

    base = statistics.median(results[configs[0][0]]["turn_s"])
    print("\n| configuration | s per turn, median of rounds (min-max) | prompt tokens evaluated per turn | "
          "speed-up vs --cache-ram 0 |")
    print("|---|---|---|---|")
    for name, _, _ in configs:
        ts = results[name]["turn_s"]
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} ({min(ts):.3f}-{max(ts):.3f}) | "
              f"{statistics.median(results[name]['prompt_n']):.0f} | {base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
