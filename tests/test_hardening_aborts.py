"""Hardening, round two (issue 18): asserts, aborts and C++ exceptions that llama.cpp could
still reach from Python, each refused with a Python exception before it gets there.

Every case that used to kill the interpreter runs in a fresh one (conftest's
run_python_subprocess) and checks the exit status (1 with the expected exception on the last
line of stderr, or 0 and "OK"), never a negative signal number (-6 abort, -11 segfault).
docs/hardening.md ("Round two") lists the classes.
"""

from __future__ import annotations

import http.server
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

import pyllama
from pyllama import _core
from conftest import run_python_subprocess

TIMEOUT = 120


def _prelude(model: Path) -> str:
    return (
        "import sys, os, threading, time, signal\n"
        "from pyllama import _core\n"
        "from pyllama.errors import GrammarError\n"
        f"TINY = {str(model)!r}\n"
        "m = _core.Model(TINY)\n"
    )


def _run(model: Path, code: str, timeout: float = TIMEOUT):
    return run_python_subprocess(_prelude(model) + code, timeout=timeout)


def _assert_raises(result, exc: str, *words: str) -> None:
    assert result.returncode == 1, (
        f"exit status {result.returncode} (negative: killed by a signal)\n"
        f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}")
    last = result.stderr.strip().splitlines()[-1]
    assert exc in last, last
    for w in words:
        assert w in last, (w, last)


def _assert_ok(result) -> None:
    assert result.returncode == 0 and "OK" in result.stdout, (
        f"exit status {result.returncode}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}")


# ---------------------------------------------------------------- 1. n_seq_max vs n_batch


def test_n_seq_max_above_n_batch_is_refused(tiny_model_path):
    # llama-context.cpp GGML_ASSERTs n_outputs_max at creation (abort before the fix)
    r = _run(tiny_model_path, "_core.Context(m, n_ctx=256, n_batch=4, n_ubatch=4, n_seq_max=8, n_threads=1)")
    _assert_raises(r, "ValueError", "n_seq_max=8", "n_batch")


def test_n_seq_max_above_small_n_ctx_is_refused(tiny_model_path):
    # causal models: llama.cpp's n_batch is min(n_ctx, n_batch)
    r = _run(tiny_model_path, "_core.Context(m, n_ctx=8, n_batch=64, n_seq_max=16, n_threads=1)")
    _assert_raises(r, "ValueError", "n_seq_max=16")


def test_many_sequences_with_n_batch_equal_to_n_seq_max_work(tiny_model_path):
    r = _run(tiny_model_path, (
        "c = _core.Context(m, n_ctx=256, n_batch=8, n_ubatch=8, n_seq_max=8, n_threads=1)\n"
        "b = _core.Batch(8, 8)\n"
        "for s in range(8): b.add(1, 0, s, True)\n"
        "c.decode(b)\n"
        "print('OK')\n"))
    _assert_ok(r)


# ---------------------------------------------------------------- 2. partial kv_seq_cp, split KV


def test_partial_kv_seq_cp_on_split_cache_is_refused(tiny_model_path):
    r = _run(tiny_model_path, (
        "c = _core.Context(m, n_ctx=256, n_seq_max=2, kv_unified=False, n_threads=1)\n"
        "b = _core.Batch(8, 2)\n"
        "b.add_sequence([1, 2, 3, 4], 0, 0)\n"
        "c.decode(b)\n"
        "c.kv_seq_cp(0, 1)            # a whole sequence: fine\n"
        "assert c.kv_seq_pos_max(1) == 3\n"
        "c.kv_seq_cp(0, 1, 0, 2)\n"))
    _assert_raises(r, "ValueError", "kv_unified=False")


def test_partial_kv_seq_cp_on_unified_cache_works(tiny_model_path):
    with _core.Context(_core.Model(tiny_model_path), n_ctx=64, n_seq_max=2, n_threads=1) as c:
        b = _core.Batch(8, 2)
        b.add_sequence([1, 2, 3, 4], 0, 0)
        c.decode(b)
        c.kv_seq_cp(0, 1, 0, 2)
        assert c.kv_seq_pos_max(1) == 1


# ---------------------------------------------------------------- 3. C++ exceptions, huge windows


def test_huge_penalty_window_is_capped_not_bad_alloc(tiny_model_path):
    r = _run(tiny_model_path, (
        "ch = _core.SamplerChain(m.vocab)\n"
        "ch.add_penalties(2**31 - 1, 1.1).add_dry(0.8, last_n=2**31 - 1).add_greedy()\n"
        "params = dict(ch.stage_params)\n"
        "assert params['penalties']['last_n'] <= 1 << 20, params\n"
        "assert params['dry']['last_n'] <= 1 << 20, params\n"
        "for t in range(50): ch.accept(t + 10)\n"
        "print('OK')\n"))
    _assert_ok(r)


def test_every_llama_function_is_declared_except_plus():
    """The class fix for C++ exceptions: _core is C++ and every llama.h / ggml / gguf function
    it calls converts a C++ exception into a Python one at the call (Cython `except +`)."""
    pxd = Path(pyllama.__file__).with_name("_llama.pxd").read_text()
    block = pxd.split('cdef extern from "llama.h" nogil:', 1)[1].split("\ncdef extern", 1)[0]
    decls = []
    current = ""
    for line in block.splitlines():
        s = line.strip()
        if line.startswith("    ") and not line.startswith("     ") and "(" in s and not s.startswith(("ctypedef", "#")):
            current = s
        elif current:
            current += " " + s
        if current and current.count("(") == current.count(")"):
            decls.append(current)
            current = ""
    assert len(decls) > 100
    missing = [d for d in decls if not d.endswith("except +")]
    assert not missing, missing[:5]


# ---------------------------------------------------------------- 4. lazy grammar, rejected trigger


def test_lazy_grammar_whose_trigger_is_rejected_raises_grammar_error(tiny_model_path):
    # The trigger fires on "a", and the grammar (root ::= "x") rejects "a": llama.cpp threw
    # "Unexpected empty grammar stack" through its C API (std::terminate before the fix).
    r = _run(tiny_model_path, (
        "ch = _core.SamplerChain(m.vocab)\n"
        "ch.add_grammar_lazy('root ::= \"x\"', trigger_patterns=['a']).add_greedy()\n"
        "toks = m.vocab.tokenize('b a', add_special=False)\n"
        "try:\n"
        "    for t in toks: ch.accept(t)\n"
        "except GrammarError as e:\n"
        "    print('rejected:', e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "try:\n"
        "    ch.accept(toks[0])\n"
        "except GrammarError as e:\n"
        "    assert 'reset()' in str(e)\n"
        "ch.reset()\n"
        "ch.accept(m.vocab.tokenize('b', add_special=False)[0])\n"
        "print('OK')\n"))
    _assert_ok(r)
    assert "rejected:" in r.stdout


# ---------------------------------------------------------------- 5. encode / embeddings contexts


@pytest.mark.parametrize("pooling", ["mean", "rank", "none"])
def test_encode_on_a_decoder_model_is_refused(tiny_model_path, pooling):
    # llama_encode on a decoder-only model with KV memory: segfault (mean/rank) before the fix
    r = _run(tiny_model_path, (
        f"c = _core.Context(m, n_ctx=256, embeddings=True, pooling={pooling!r}, n_threads=1)\n"
        "b = _core.Batch(8, 1)\n"
        "b.add_sequence([1, 2, 3], 0, 0)\n"
        "c.encode(b)\n"))
    _assert_raises(r, "ValueError", "no encoder", "decode()")


def test_rank_pooling_returns_n_cls_out_values_not_n_embd(tiny_model_path):
    # embeddings_seq used to view n_embd floats of llama.cpp's n_cls_out-sized buffer
    r = _run(tiny_model_path, (
        "c = _core.Context(m, n_ctx=256, embeddings=True, pooling='rank', n_threads=1)\n"
        "b = _core.Batch(8, 1)\n"
        "b.add_sequence([1, 2, 3], 0, 0)\n"
        "c.decode(b)\n"
        "try:\n"
        "    e = c.embeddings_seq(0)\n"
        "except IndexError:\n"
        "    pass\n"
        "else:\n"
        "    assert len(e) < m.n_embd, len(e)\n"
        "print('OK')\n"))
    _assert_ok(r)


# ---------------------------------------------------------------- 6. F16 norm weights


def test_f16_norm_weights_are_refused_naming_the_tensor(tiny_model_factory):
    path = tiny_model_factory(norm_dtype="f16", n_layer=1)
    r = run_python_subprocess(
        "from pyllama import _core\n"
        f"m = _core.Model({str(path)!r})\n"
        "c = _core.Context(m, n_ctx=64, n_threads=1)\n"
        "b = _core.Batch(8, 1)\n"
        "b.add_sequence([1, 2, 3], 0, 0)\n"
        "c.decode(b)\n", timeout=TIMEOUT)
    _assert_raises(r, "UnsupportedTensorTypeError", "norm.weight", "f16")
    with pytest.raises(ValueError, match="norm.weight"):
        _core.Model(path)


# ---------------------------------------------------------------- 7. close during tokenize


def test_closing_the_model_during_tokenize_waits_for_it(tiny_model_path):
    r = _run(tiny_model_path, (
        "v = m.vocab\n"
        "text = 'hello world, this is some text to tokenize. ' * 20000\n"
        "errors, counts = [], []\n"
        "started = threading.Event()\n"
        "def work():\n"
        "    try:\n"
        "        for _ in range(50):\n"
        "            started.set()\n"
        "            counts.append(len(v.tokenize(text)))\n"
        "    except ValueError as e:\n"
        "        errors.append(str(e))\n"
        "ts = [threading.Thread(target=work) for _ in range(3)]\n"
        "for t in ts: t.start()\n"
        "started.wait(); time.sleep(0.05)\n"
        "m.close()\n"
        "for t in ts: t.join()\n"
        "assert all('closed' in e for e in errors), errors\n"
        "assert len(set(counts)) <= 1, set(counts)\n"
        "try:\n"
        "    v.tokenize('x')\n"
        "except ValueError as e:\n"
        "    assert 'closed' in str(e)\n"
        "else:\n"
        "    raise SystemExit('tokenize after close worked')\n"
        "print('OK', len(counts), len(errors))\n"), timeout=240)
    _assert_ok(r)


# ---------------------------------------------------------------- 8. objects without __init__


@pytest.mark.parametrize("code, exc, word", [
    ("s = _core.SamplerChain.__new__(_core.SamplerChain); s.add_greedy()", "RuntimeError", "not initialised"),
    ("s = _core.SamplerChain.__new__(_core.SamplerChain); len(s)", "RuntimeError", "not initialised"),
    ("s = _core.SamplerChain.__new__(_core.SamplerChain); s.add_penalties(64, 1.1)", "RuntimeError", "not initialised"),
    ("s = _core.SamplerChain.__new__(_core.SamplerChain); s.accept(1)", "RuntimeError", "not initialised"),
    ("class S(_core.SamplerChain):\n    def __init__(self, v): pass\nS(m.vocab).add_mirostat(1, 5.0, 0.1)",
     "RuntimeError", "super().__init__"),
    ("v = _core.Vocab.__new__(_core.Vocab); v.tokenize('hi')", "ValueError", "not initialised"),
    ("c = _core.Context.__new__(_core.Context); c.kv_clear()", "ValueError", "closed"),
    ("class C(_core.Context):\n    def __init__(self, m): pass\nb = _core.Batch(4); b.add(1, 0)\nC(m).encode(b)",
     "ValueError", "closed"),
    ("x = _core.Model.__new__(_core.Model); x.n_embd", "ValueError", "not loaded"),
    ("c = _core.Context(m, n_ctx=64, n_threads=1)\n"
     "c.set_lora_adapters([(_core.LoraAdapter.__new__(_core.LoraAdapter), 1.0)])", "ValueError", "not loaded"),
])
def test_objects_built_without_init_raise(tiny_model_path, code, exc, word):
    _assert_raises(_run(tiny_model_path, code), exc, word)


# ---------------------------------------------------------------- 9. abort() is one-shot


def test_abort_with_no_decode_running_does_not_abort_the_next_one(tiny_model_path):
    with _core.Context(_core.Model(tiny_model_path), n_ctx=64, n_threads=1) as c:
        c.abort()
        b = _core.Batch(8)
        b.add_sequence([1, 2, 3], 0, 0)
        c.decode(b)          # DecodeAborted before the fix: the flag stayed set
        assert c.logits().shape == (c.n_vocab,)


# ---------------------------------------------------------------- 10. penalty windows


def _greedy_tokens(model, chain, n=40):
    with _core.Context(model, n_ctx=128, n_threads=1) as c:
        b = _core.Batch(64)
        prompt = model.vocab.tokenize("the the the the")
        b.add_sequence(prompt, 0, 0)
        c.decode(b)
        out = []
        pos = len(prompt)
        for _ in range(n):
            t = chain.sample(c)
            out.append(t)
            b.clear()
            b.add(t, pos, 0, True)
            pos += 1
            c.decode(b)
        return out


def test_penalty_window_minus_one_means_the_whole_context(tiny_model_path):
    m = _core.Model(tiny_model_path)
    ch = _core.SamplerChain(m.vocab).add_penalties(-1, 1.5, n_ctx=128)
    assert dict(ch.stage_params)["penalties"]["last_n"] == 128
    ch = _core.SamplerChain(m.vocab).add_penalties(-1, 1.5)
    assert dict(ch.stage_params)["penalties"]["last_n"] == m.n_ctx_train
    ch = _core.SamplerChain(m.vocab).add_dry(0.8)        # DRY's default window is -1 too
    assert dict(ch.stage_params)["dry"]["last_n"] == m.n_ctx_train
    from pyllama.sampling import SamplingParams, build_chain
    ch = build_chain(SamplingParams(temperature=0, repeat_penalty=1.3, last_n_tokens_size=-1), m.vocab, n_ctx=96)
    assert dict(ch.stage_params)["penalties"]["last_n"] == 96


def test_penalty_and_dry_with_whole_context_window_change_the_output(tiny_model_path):
    # A strong bias makes greedy repeat one token; a whole-context (-1) window must push it
    # away again (before the fix llama.cpp read -1 as 0: penalty off, output unchanged).
    m = _core.Model(tiny_model_path)
    bias = {1000: 30.0}
    plain = _greedy_tokens(m, _core.SamplerChain(m.vocab).add_logit_bias(bias).add_greedy())
    assert plain == [1000] * len(plain)
    penalised = _greedy_tokens(m, _core.SamplerChain(m.vocab).add_logit_bias(bias)
                               .add_penalties(-1, 1.0, 100.0, n_ctx=128).add_greedy())
    assert penalised[0] == 1000 and penalised.count(1000) == 1, penalised
    dry = _greedy_tokens(m, _core.SamplerChain(m.vocab).add_logit_bias(bias)
                         .add_dry(4.0, allowed_length=1).add_greedy())
    assert dry != plain


# ---------------------------------------------------------------- 11. NaN LoRA scale, RoPE values


@pytest.mark.parametrize("value", [0.0, -10000.0, float("nan"), float("inf")])
def test_rope_base_override_must_be_positive_and_finite(tiny_model_path, value):
    with pytest.raises(pyllama.errors.ModelLoadError, match="rope.freq_base"):
        _core.Model(tiny_model_path, kv_overrides={"llama.rope.freq_base": value})


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_rope_base_in_the_file_must_be_positive_and_finite(tiny_model_factory, value):
    path = tiny_model_factory(rope_freq_base=value, n_layer=1)
    with pytest.raises(pyllama.errors.ModelLoadError, match="rope.freq_base"):
        _core.Model(path)


@pytest.mark.parametrize("kw", [{"rope_freq_base": float("nan")}, {"rope_freq_base": float("inf")},
                                {"rope_freq_base": -1.0}, {"rope_freq_scale": float("nan")},
                                {"rope_freq_scale": -0.5}, {"rope_freq_scale": float("inf")}])
def test_context_rope_parameters_must_be_finite(tiny_model_path, kw):
    with pytest.raises(ValueError, match="rope_freq"):
        _core.Context(_core.Model(tiny_model_path), n_ctx=64, n_threads=1, **kw)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_lora_scale_must_be_finite(tiny_model_path, scale):
    with _core.Context(_core.Model(tiny_model_path), n_ctx=64, n_threads=1) as c:
        with pytest.raises(ValueError, match="LoRA scale"):
            c.set_lora_adapters([(_core.LoraAdapter.__new__(_core.LoraAdapter), scale)])


# ---------------------------------------------------------------- 12. Ctrl-C


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_during_tokenize_is_raised_by_tokenize(tiny_model_path):
    r = _run(tiny_model_path, (
        "import traceback\n"
        "class Stop(Exception): pass\n"
        "def handler(*a): raise Stop()\n"
        "signal.signal(signal.SIGINT, handler)\n"
        "text = 'some words to tokenize here, and more. ' * 200000\n"
        "t0 = time.monotonic(); m.vocab.tokenize(text[:len(text) // 10]); dt = time.monotonic() - t0\n"
        "threading.Timer(min(0.2, dt), os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "try:\n"
        "    m.vocab.tokenize(text)\n"
        "except Stop as e:\n"
        "    names = [f.name for f in traceback.extract_tb(e.__traceback__)]\n"
        "    assert any(n.endswith('tokenize') for n in names), names\n"
        "    print('OK')\n"
        "else:\n"
        "    print('not interrupted')\n"))
    _assert_ok(r)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_handler_that_returns_does_not_interrupt_decode(tiny_model_path):
    r = _run(tiny_model_path, (
        "hits = []\n"
        "signal.signal(signal.SIGINT, lambda *a: hits.append(1))\n"
        "c = _core.Context(m, n_ctx=512, n_batch=512, n_threads=1)\n"
        "b = _core.Batch(512)\n"
        "b.add_sequence(list(range(1, 501)), 0, 0)\n"
        "stop = threading.Event()\n"
        "def pester():\n"
        "    for _ in range(5):\n"
        "        time.sleep(0.1); os.kill(os.getpid(), signal.SIGINT)\n"
        "    stop.set()\n"
        "th = threading.Thread(target=pester); th.start()\n"
        "n = 0\n"
        "while not stop.is_set():\n"
        "    c.kv_clear(); c.decode(b); n += 1\n"
        "th.join()\n"
        "assert len(hits) == 5 and n > 0, (hits, n)\n"
        "print('OK', len(hits))\n"), timeout=240)
    _assert_ok(r)


# ---------------------------------------------------------------- 13. RPC endpoints that do not speak RPC


class _SilentServer:
    """Accepts connections and never says a word."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


needs_rpc = pytest.mark.skipif(not _core.supports_rpc(), reason="built with GGML_RPC=OFF")


@needs_rpc
def test_rpc_server_that_never_answers_gives_connection_error_quickly():
    srv = _SilentServer()
    try:
        r = run_python_subprocess(
            "import time\nfrom pyllama import _core\nt0 = time.monotonic()\n"
            "try:\n"
            f"    _core.rpc_add_server('127.0.0.1:{srv.port}')\n"
            "except ConnectionError as e:\n"
            "    print('OK', round(time.monotonic() - t0, 1), e)\n", timeout=60)
    finally:
        srv.close()
    _assert_ok(r)
    assert float(r.stdout.split()[1]) < 10
    assert "did not answer" in r.stdout


@needs_rpc
def test_rpc_address_that_speaks_http_gives_connection_error():
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        r = run_python_subprocess(
            "from pyllama import _core\n"
            "try:\n"
            f"    _core.rpc_add_server('127.0.0.1:{httpd.server_address[1]}')\n"
            "except ConnectionError as e:\n"
            "    print('OK', e)\n", timeout=60)
    finally:
        httpd.shutdown()
        httpd.server_close()
    _assert_ok(r)
    assert "RPC" in r.stdout
