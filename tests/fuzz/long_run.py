#!/usr/bin/env python
"""Long fuzz campaign: run tests/fuzz/run_atheris.py for each target for a time budget,
restarting after every crash (so one finding does not end the run), and print a summary.

    nice python tests/fuzz/long_run.py --seconds 300 --out fuzz-out [TARGET ...]

Per target, fuzz-out/TARGET/ holds the corpus, the crash-*/timeout-* inputs and the logs;
the summary (executions, crashes, timeouts, the first line of each llama.cpp abort) is
printed as JSON and written to fuzz-out/summary.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["tokenize_roundtrip", "tokenize_spm", "grammar", "gguf_header"]


def run_target(name: str, seconds: float, out: Path, timeout: int) -> dict:
    d = out / name
    corpus = d / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + seconds
    summary = {"target": name, "seconds": seconds, "executions": 0, "runs": 0, "crashes": [], "timeouts": 0}
    while (left := deadline - time.monotonic()) > 5:
        log = d / f"run-{summary['runs']}.log"
        cmd = [sys.executable, str(HERE / "run_atheris.py"), name, f"-max_total_time={int(left)}",
               f"-timeout={timeout}", f"-artifact_prefix={d}/", "-print_final_stats=1", str(corpus)]
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        text = log.read_text(errors="replace")
        summary["runs"] += 1
        m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
        if m:
            summary["executions"] += int(m[-1])
        else:  # killed without final stats: count the last progress line
            m = re.findall(r"#(\d+)\s+(?:pulse|NEW|REDUCE|INITED)", text)
            summary["executions"] += int(m[-1]) if m else 0
        if "timeout after" in text or "ERROR: libFuzzer: timeout" in text:
            summary["timeouts"] += 1
        elif proc.returncode != 0:
            what = (re.findall(r"(GGML_ASSERT\(.*?\) failed|GGML_ABORT.*|[a-z_/.-]+\.(?:cpp|c):\d+: .*)", text)
                    or re.findall(r"(Uncaught Python exception:.*|AssertionError.*|deadly signal)", text)
                    or [f"exit {proc.returncode}"])
            art = re.findall(r"Test unit written to (\S+)", text)
            summary["crashes"].append({"what": what[0][:300], "input": art[-1] if art else None, "log": str(log)})
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("targets", nargs="*", default=TARGETS)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--timeout", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("fuzz-out"))
    a = ap.parse_args()
    results = []
    for t in a.targets:
        r = run_target(t, a.seconds, a.out, a.timeout)
        print(json.dumps(r), flush=True)
        results.append(r)
    (a.out / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
