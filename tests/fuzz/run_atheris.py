#!/usr/bin/env python
"""Long fuzz runs with atheris (libFuzzer driving Python; pip install atheris).

    python tests/fuzz/run_atheris.py TARGET [libFuzzer options]

TARGET is one of tokenize_roundtrip, tokenize_spm, grammar, gguf_header (tests/fuzz/targets.py).
Useful options: -max_total_time=300 (seconds), -timeout=10 (a slower input is reported as
a hang), -artifact_prefix=DIR/ (where crash-*/timeout-* inputs go), -print_final_stats=1,
-fork=1 -ignore_crashes=1 -ignore_timeouts=1 (keep going after a crash, counting them).
Reproduce a finding with:  python tests/fuzz/run_atheris.py TARGET DIR/crash-<sha>

Coverage feedback comes from the Python code (pyllama's own and the targets); llama.cpp
itself is not instrumented, so libFuzzer mutates mostly blind there.  A crash of llama.cpp
(abort/segfault) ends the run (or, with -fork, the child) and leaves the input behind.
See docs/hardening.md for the runs done so far and their results.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import atheris  # noqa: E402

with atheris.instrument_imports():
    import targets  # noqa: E402
    import pyllama.grammar  # noqa: E402,F401


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(targets.TARGETS)}}} [libFuzzer options]")
    name = sys.argv.pop(1)
    fn = targets.TARGETS[name]
    if name == "gguf_header":
        targets.tiny_gguf_bytes()   # build the base model before fuzzing starts
    fn(b"")                         # load vocabularies etc. outside the timed runs

    def one_input(data: bytes) -> None:
        fn(data)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
