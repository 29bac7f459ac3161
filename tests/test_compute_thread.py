"""The compute thread (src/cxx/pyllama_compute.h): every multi-threaded llama_decode/llama_encode
of the process runs on one long-lived thread, so that calls from many Python threads keep one
OpenMP team (a second team throttled libgomp's barriers: decode ~3x slower on 2 cores;
benchmarks/thread_bench.py measures it).  Checked here: which decodes go there and which do not,
that the text does not depend on the calling thread, that llama.cpp's logged error and the
abort reach the caller, and the off switch.  Each in a fresh interpreter: the jobs counter is
process-wide.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_python_subprocess

CHILD = r"""
import concurrent.futures, json, os, threading
from pyllama import LLM, _core

PATH = os.environ["T_MODEL"]
THREADS = int(os.environ["T_THREADS"])
out = {}
llm = LLM(PATH, n_ctx=256, n_threads=THREADS, temperature=0, ignore_eos=True)
j0 = _core._compute_thread_jobs()
out["main"] = llm.complete("The quick brown fox", max_tokens=12).text
out["main_jobs"] = _core._compute_thread_jobs() - j0      # 1 prompt decode + 11 token decodes
box = []
th = threading.Thread(target=lambda: box.append(llm.complete("The quick brown fox", max_tokens=12).text))
th.start(); th.join()
out["thread"] = box[0]
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    out["pool"] = [f.result().text for f in [pool.submit(llm.complete, "The quick brown fox", max_tokens=12)
                                             for _ in range(4)]]
out["all_jobs"] = _core._compute_thread_jobs() - j0

# llama.cpp's own error text (logged on whichever thread decoded) reaches the DecodeError.
c = _core.Context(llm.model, n_ctx=64, n_threads=THREADS)
b = _core.Batch(8); b.add_sequence([1, 2, 3, 4]); c.decode(b)
b = _core.Batch(8); b.add(5, 10, [0], True)   # position 10 after 3: not X + 1
try:
    c.decode(b)
    out["error"] = None
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
b = _core.Batch(8); b.add(5, 4, [0], True); c.decode(b)   # and the context still works
llm.close()
print(json.dumps(out))
"""


def _run(model, threads: int, **env) -> dict:
    res = run_python_subprocess(CHILD, timeout=180, env={"T_MODEL": str(model), "T_THREADS": str(threads), **env})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("threads", [1, 2])
def test_which_decodes_go_to_the_compute_thread(tiny_model_path, threads):
    out = _run(tiny_model_path, threads)
    if threads == 1:
        # One thread: no OpenMP region, so no hand-off (and contexts keep running in parallel).
        assert out["main_jobs"] == 0 and out["all_jobs"] == 0, out
    else:
        assert out["main_jobs"] == 12, out
        assert out["all_jobs"] >= 12 + 12 + 12, out   # the pool's 4 calls batch: at least 12 more steps
    # The calling thread changes nothing in the result.
    assert out["thread"] == out["main"] and out["pool"] == [out["main"]] * 4, out
    assert out["error"] is not None and out["error"].startswith("DecodeError"), out
    assert "inconsistent sequence positions" in out["error"], out["error"]


def test_off_switch_runs_on_the_callers_thread(tiny_model_path):
    """PYLLAMA_COMPUTE_THREAD=0: every decode on the caller's thread (the old behaviour), same text."""
    on = _run(tiny_model_path, 2)
    off = _run(tiny_model_path, 2, PYLLAMA_COMPUTE_THREAD="0")
    assert off["all_jobs"] == 0, off
    assert off["main"] == on["main"] and off["pool"] == on["pool"], (on, off)
    assert "inconsistent sequence positions" in off["error"], off["error"]
