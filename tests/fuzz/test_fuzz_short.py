"""Short fuzz runs for the normal test suite: hypothesis, ~100 examples per target.

Each target runs in a child interpreter: a crash inside llama.cpp (a signal) fails the
test with the child's output instead of taking pytest down.  The examples are
derandomized (the same ones every run, so CI is stable); set PYLLAMA_FUZZ_SEED to explore
others, PYLLAMA_FUZZ_EXAMPLES to run more.  Long runs: tests/fuzz/run_atheris.py and
docs/hardening.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run_python_subprocess

HERE = Path(__file__).resolve().parent
EXAMPLES = int(os.environ.get("PYLLAMA_FUZZ_EXAMPLES", "100"))
SEED = os.environ.get("PYLLAMA_FUZZ_SEED")

CHILD = r"""
import os, sys
sys.path.insert(0, os.environ["T_FUZZ_DIR"])
from hypothesis import HealthCheck, given, seed, settings, strategies as st
import targets

name = os.environ["T_TARGET"]
fn = targets.TARGETS[name]
if name == "tokenize_roundtrip":
    # text (lone surrogates included, encoded with surrogatepass: invalid UTF-8) or raw bytes
    strategy = st.one_of(
        st.text(alphabet=st.characters(blacklist_categories=()), max_size=64).map(
            lambda s: s.encode("utf-8", "surrogatepass")),
        st.text(max_size=64).map(lambda s: s.encode("utf-8")),
        st.binary(max_size=64))
elif name == "grammar":
    strategy = st.one_of(st.binary(max_size=96),
                         st.text(max_size=200).map(lambda s: b"\xff" + s.encode("utf-8", "surrogatepass")))
else:
    strategy = st.binary(max_size=96)

run = settings(max_examples=int(os.environ["T_EXAMPLES"]), deadline=None, database=None,
               derandomize=os.environ.get("T_SEED") is None,
               suppress_health_check=list(HealthCheck))(given(strategy)(fn))
if os.environ.get("T_SEED") is not None:
    run = seed(int(os.environ["T_SEED"]))(run)
run()
print("OK", name)
"""


@pytest.mark.parametrize("target", ["tokenize_roundtrip", "tokenize_spm", "grammar", "gguf_header"])
def test_fuzz_short(target, vocab_dir):
    env = {"T_FUZZ_DIR": str(HERE), "T_TARGET": target, "T_EXAMPLES": str(EXAMPLES)}
    if SEED is not None:
        env["T_SEED"] = SEED
    res = run_python_subprocess(CHILD, timeout=300, env=env)
    assert res.returncode >= 0, f"the interpreter crashed (signal {-res.returncode})\n{res.stderr[-6000:]}"
    assert res.returncode == 0 and "OK" in res.stdout, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-6000:]}"
