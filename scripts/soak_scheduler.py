#!/usr/bin/env python3
"""Soak the shared scheduler: many randomized fault-injection schedules (the long run of
tests/test_scheduler_stateful.py, with the same code: tests/fault_injection.py).

    python scripts/soak_scheduler.py --schedules 100000 --seed 0 --minutes 240

Schedules run in child processes (a batch per process), so a hang or a crash is
reported with its seed; the run goes on after a failure.  Progress goes to stdout after
every batch; the last line is

    soak: N schedules, M failures, seeds: s1 s2 ...

Replay a failing seed with ``python tests/fault_injection.py --model PATH --seed N``.
The tiny random-weight model is made with tests/tiny_model.py unless --model is given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import fault_injection as fi  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=100000, help="how many schedules (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (schedules use seed, seed+1, ...)")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    parser.add_argument("--batch-size", type=int, default=100, help="schedules per child process")
    parser.add_argument("--jobs", type=int, default=1, help="child processes at once")
    parser.add_argument("--model", default=None, help="tiny model GGUF (default: make one)")
    parser.add_argument("--verbose", action="store_true", help="print every failure in full as it is found")
    args = parser.parse_args()

    model = args.model
    if model is None:
        from tiny_model import make_tiny_llama
        model = str(make_tiny_llama(Path(tempfile.mkdtemp(prefix="soak-")) / "tiny.gguf"))

    t0 = time.monotonic()
    stop_at = None if args.minutes is None else t0 + args.minutes * 60
    seeds = list(range(args.seed, args.seed + args.schedules))
    batches = [seeds[i:i + args.batch_size] for i in range(0, len(seeds), args.batch_size)]
    n_done = 0
    failures: list = []

    def run(batch: list) -> tuple:
        if stop_at is not None and time.monotonic() > stop_at:
            return 0, []
        done = [0]

        def count(n: int, _failures: list) -> None:
            done[0] = n
        failed = fi.run_schedules(model, batch, batch_size=len(batch), batch_timeout=max(300.0, 3.0 * len(batch)),
                                  progress=count)
        return done[0], failed

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for n, failed in pool.map(run, batches):
            n_done += n
            failures += failed
            for f in failed:
                print(fi.format_failure(f) if args.verbose else
                      f"FAIL seed {f['seed']}: {f['violations'][0].splitlines()[0][:300]}", flush=True)
            if n:
                print(f"progress: {n_done}/{len(seeds)} schedules, {len(failures)} failures, "
                      f"{time.monotonic() - t0:.0f}s", flush=True)

    print(f"soak: {n_done} schedules, {len(failures)} failures, seeds: "
          + (" ".join(str(f["seed"]) for f in failures) or "-"), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
