"""Memory: loading and freeing models, and thousands of generations, keep the resident set
flat; an LLM that is garbage-collected without close() frees its memory and says so with
a ResourceWarning.

The loops run in a child interpreter (a clean heap, and RSS measurements unaffected by the
rest of the test session) that prints its measurements as JSON.  RSS comes from
/proc/self/statm, so these tests are Linux-only.
"""

from __future__ import annotations

import gc
import json
import sys
import warnings
import weakref

import pytest

from conftest import run_python_subprocess

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc (Linux)")

MB = 1 << 20
MAX_GROWTH = 20 * MB

RSS_HELPER = r"""
import ctypes, gc, json, os
try:
    _trim = ctypes.CDLL("libc.so.6").malloc_trim   # glibc: give free heap pages back first, so
except (OSError, AttributeError):                  # RSS shows live memory, not allocator slack
    _trim = None
def rss():
    gc.collect()
    if _trim is not None:
        _trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
"""

LOAD_FREE_CHILD = RSS_HELPER + r"""
from pyllama import LLM, _core
PATH = os.environ["T_MODEL"]
N = int(os.environ["T_N"])
LOW = os.environ.get("T_LOWLEVEL") == "1"

def cycle(i):
    if LOW:
        m = _core.Model(PATH)
        c = _core.Context(m, n_ctx=64, n_threads=1)
        s = _core.SamplerChain(m.vocab).add_grammar('root ::= [a-z ]+').add_greedy()
        c.close()
        m.close()
        del s
    else:
        llm = LLM(PATH, n_ctx=64, n_threads=1, use_mmap=(i % 2 == 0), temperature=0)
        llm.complete("hi", max_tokens=2)
        llm.close()

for i in range(10):          # warm-up: allocator arenas, thread pools, caches
    cycle(i)
gc.collect()
before = rss()
samples = []
for i in range(N):
    cycle(i)
    if i % max(1, N // 10) == 0:
        gc.collect()
        samples.append(rss())
gc.collect()
after = rss()
print(json.dumps({"before": before, "after": after, "samples": samples}))
"""

GENERATIONS_CHILD = RSS_HELPER + r"""
from pyllama import LLM
PATH = os.environ["T_MODEL"]
N = int(os.environ["T_N"])
llm = LLM(PATH, n_ctx=128, n_threads=1, temperature=0, ignore_eos=True)
prompts = ["p%d: %s" % (i, "lorem ipsum " * (i % 7)) for i in range(50)]

def gen(i):
    k = i % 4
    p = prompts[i % len(prompts)]
    if k == 0:
        llm.complete(p, max_tokens=1)
    elif k == 1:
        for _ in llm.stream(p, max_tokens=2):
            pass
    elif k == 2:
        llm.complete(p, max_tokens=2, temperature=0.8, top_p=0.9, seed=i, stop=["zz"])
    else:
        llm.complete(p, max_tokens=2, grammar='root ::= [a-z ]+', ignore_eos=False)

for i in range(200):
    gen(i)
gc.collect()
before = rss()
samples = []
for i in range(N):
    gen(i)
    if i % max(1, N // 10) == 0:
        samples.append(rss())
gc.collect()
after = rss()
llm.close()
print(json.dumps({"before": before, "after": after, "samples": samples}))
"""


def _measure(code: str, model, n: int, timeout: float = 900, **env) -> dict:
    res = run_python_subprocess(code, timeout=timeout, env={"T_MODEL": str(model), "T_N": str(n), **env})
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    growth = out["after"] - out["before"]
    print(f"RSS {out['before'] / MB:.1f} MB -> {out['after'] / MB:.1f} MB ({growth / MB:+.1f} MB over {n}); "
          f"samples {[round(s / MB, 1) for s in out['samples']]}")
    return out


def _growth(out: dict) -> int:
    return out["after"] - out["before"]


def test_load_free_cycles_quick(tiny_model_path):
    out = _measure(LOAD_FREE_CHILD, tiny_model_path, 20)
    assert _growth(out) < MAX_GROWTH


@pytest.mark.slow
def test_200_load_free_cycles(tiny_model_path):
    """200 LLM load/generate/close cycles (mmap and not) grow RSS by less than 20 MB."""
    out = _measure(LOAD_FREE_CHILD, tiny_model_path, 200)
    assert _growth(out) < MAX_GROWTH


@pytest.mark.slow
def test_200_load_free_cycles_lowlevel(tiny_model_path):
    """The same with Model/Context/SamplerChain(grammar) directly."""
    out = _measure(LOAD_FREE_CHILD, tiny_model_path, 200, T_LOWLEVEL="1")
    assert _growth(out) < MAX_GROWTH


def test_generations_quick(tiny_model_path):
    out = _measure(GENERATIONS_CHILD, tiny_model_path, 400)
    assert _growth(out) < MAX_GROWTH


@pytest.mark.slow
def test_5000_generations_rss_flat(tiny_model_path):
    """5,000 short generations (complete, stream, sampling with stop strings, grammar) after
    a warm-up keep RSS flat: growth under 20 MB, and no steady climb over the last half."""
    out = _measure(GENERATIONS_CHILD, tiny_model_path, 5000)
    assert _growth(out) < MAX_GROWTH
    s = out["samples"]
    assert s[-1] - s[len(s) // 2] < MAX_GROWTH // 2, s


GC_CHILD = RSS_HELPER + r"""
import warnings, weakref
from pyllama import LLM
warnings.simplefilter("always")
base = rss()

def make():
    llm = LLM(os.environ["T_MODEL"], n_ctx=256, n_threads=1, use_mmap=False)
    llm.complete("hello", max_tokens=2)
    return weakref.ref(llm.model), rss()

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model_ref, loaded = make()      # the LLM is unreachable once make() returns
    gc.collect()
freed = rss()
print(json.dumps({"base": base, "loaded": loaded, "freed": freed, "model_alive": model_ref() is not None,
                  "warnings": [(w.category.__name__, str(w.message)) for w in caught]}))
"""


def test_llm_garbage_collected_without_close(tiny_model_factory):
    """An LLM dropped without close() emits a ResourceWarning and gives its memory back."""
    model = tiny_model_factory(n_embd=256, n_layer=4, n_ff=768, n_head=4, n_head_kv=2)  # ~80 MB, read into RAM
    res = run_python_subprocess(GC_CHILD, timeout=300, env={"T_MODEL": str(model)})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print({k: (round(v / MB, 1) if isinstance(v, int) else v) for k, v in out.items()})
    assert any(cat == "ResourceWarning" and "not closed" in msg for cat, msg in out["warnings"]), out["warnings"]
    assert not out["model_alive"], "the Model is still alive after the LLM was collected"
    size = model.stat().st_size
    assert out["loaded"] - out["base"] > 0.5 * size, "the model did not show up in RSS (test is blind)"
    assert out["freed"] < out["loaded"] - 0.7 * size, "the model's memory was not given back"


def test_resource_warning_in_process(tiny_model_path):
    """Same, in this process (the warning is a real ResourceWarning, catchable as usual)."""
    from pyllama import LLM

    def make():
        llm = LLM(tiny_model_path, n_ctx=64, n_threads=1)
        return weakref.ref(llm), weakref.ref(llm.model)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm_ref, model_ref = make()
        gc.collect()
    assert llm_ref() is None and model_ref() is None
    assert any(issubclass(w.category, ResourceWarning) for w in caught), [str(w.message) for w in caught]

    # close() and the context manager: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LLM(tiny_model_path, n_ctx=64, n_threads=1) as llm:
            llm.complete("hi", max_tokens=1)
        LLM(tiny_model_path, n_ctx=64, n_threads=1).close()
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_model_closed_while_context_open_frees_when_context_closes(tiny_model_path):
    """Model.close() under an open Context waits for it (no use-after-free); closing the
    Context then frees the weights."""
    from pyllama import _core

    m = _core.Model(str(tiny_model_path))
    c = _core.Context(m, n_ctx=64, n_threads=1)
    m.close()
    assert m.closed
    b = _core.Batch(4)
    b.add_sequence([1, 2])
    c.decode(b)                       # still works: the weights are alive
    assert c.logits().shape == (c.n_vocab,)
    c.close()                         # last user gone: the weights are freed now
    with pytest.raises(ValueError, match="closed"):
        m.vocab
