"""Encoder models (BERT family: bge, all-MiniLM, rerankers) through pyllama.

An encoder context has no KV memory (llama_get_memory() is NULL): every batch is evaluated on
its own.  Before the fix, ``LLM(path, embedding=True).embed(...)`` on such a model ended in
SIGSEGV (embed cleared the memory through a Cython helper that turned the NULL memory into an
error that was never set), and so did Context.kv_clear() and every other kv_* method.

The models are tiny random-weight BERTs (tests/tiny_bert.py) with the real WordPiece
tokenizer of bge; the vectors are compared with llama.cpp's own ``llama-embedding`` built
against the same static libraries (tests/native_tools.py), as tests/test_embed_native.py does
for decoder models.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import native_tools
from tiny_bert import make_tiny_bert, make_tiny_reranker

N_CTX = 512
# llama-embedding prints "%1.7f"; the two L2 normalisations differ by about a float32 ulp.
NORMALISED = dict(atol=5e-8 * (1 + 1e-6), rtol=2 * 2.0 ** -23)
SEP = "<<pyllama-next-text>>"
TEXTS = ["hello world", "The cat sat on the mat.", "Grüße aus Zürich, naïve café", "ok"]


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert.gguf")


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory):
    return make_tiny_reranker(tmp_path_factory.mktemp("rerank") / "tiny-reranker.gguf")


# Every Context method on an encoder context, in a subprocess (the bug was a segfault).
# Each line prints "name: ok <value>" or "name: <ExceptionType>".
_EVERY_METHOD = r"""
import os, sys, tempfile
from pyllama import Batch, Context, Engine, GenerationRequest, Model, SamplerChain
m = Model(sys.argv[1] if len(sys.argv) > 1 else {path!r})
ctx = Context(m, embeddings=True, n_ctx=128, n_batch=128, n_ubatch=128, n_seq_max=2, n_threads=1)
toks = m.vocab.tokenize("hello world", add_special=True)
batch = Batch(128, 2)
batch.add_sequence(toks, 0, 0)
d = tempfile.mkdtemp()
def run(name, f):
    try:
        v = f()
        print(f"{{name}}: ok {{v!r}}"[:200], flush=True)
    except Exception as e:
        print(f"{{name}}: {{type(e).__name__}}: {{e}}", flush=True)
run("has_memory", lambda: ctx.has_memory)
run("decode", lambda: ctx.decode(batch))
run("embeddings_seq", lambda: len(ctx.embeddings_seq(0)))
run("encode", lambda: ctx.encode(batch))
run("kv_clear", ctx.kv_clear)
run("kv_clear_meta", lambda: ctx.kv_clear(False))
run("kv_seq_rm", lambda: ctx.kv_seq_rm(0))
run("kv_seq_rm_all", lambda: ctx.kv_seq_rm(-1, 0, -1))
run("kv_seq_cp", lambda: ctx.kv_seq_cp(0, 1))
run("kv_seq_keep", lambda: ctx.kv_seq_keep(0))
run("kv_seq_add", lambda: ctx.kv_seq_add(0, 0, -1, 2))
run("kv_seq_pos_min", lambda: ctx.kv_seq_pos_min(0))
run("kv_seq_pos_max", lambda: ctx.kv_seq_pos_max(1))
run("kv_can_shift", ctx.kv_can_shift)
state = ctx.state_get()
run("state_get", lambda: type(state).__name__)
run("state_set", lambda: ctx.state_set(state))
seq = ctx.seq_state_get(0)
run("seq_state_get", lambda: type(seq).__name__)
run("seq_state_set", lambda: ctx.seq_state_set(seq, 1))
run("state_save_file", lambda: ctx.state_save_file(os.path.join(d, "s"), toks))
run("state_load_file", lambda: ctx.state_load_file(os.path.join(d, "s")))
run("seq_state_save_file", lambda: ctx.seq_state_save_file(os.path.join(d, "q"), 0, toks))
run("seq_state_load_file", lambda: ctx.seq_state_load_file(os.path.join(d, "q"), 0))
run("decode_after_state", lambda: ctx.decode(batch))
run("embeddings_seq_again", lambda: len(ctx.embeddings_seq(0)))
eng = Engine(ctx)
run("engine_submit", lambda: eng.submit(GenerationRequest(toks, SamplerChain(m.vocab).add_greedy(), max_tokens=2)))
run("engine_share_prefix", lambda: eng.share_prefix([toks + [1000], toks + [2000]]))
run("engine_step", lambda: eng.step())
run("engine_reset", eng.reset)
run("perf_reset", ctx.perf_reset)
run("memory_breakdown", lambda: sum(r["context"] for r in ctx.memory_breakdown()))
run("set_threads", lambda: ctx.set_threads(1))
run("abort", ctx.abort)
run("close", ctx.close)
print("END", flush=True)
"""


def test_every_context_method_on_an_encoder(bert_path, run_python):
    """No KV memory: each method works (an empty memory) or raises a clear ValueError, and the
    process survives them all (before the fix kv_clear alone was a SIGSEGV)."""
    proc = run_python(_EVERY_METHOD.format(path=str(bert_path)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert proc.stdout.rstrip().endswith("END"), proc.stdout
    assert lines["has_memory"] == "ok False"
    for name in ("decode", "encode", "kv_clear", "kv_clear_meta", "kv_seq_keep", "state_set", "seq_state_set",
                 "state_save_file", "seq_state_save_file", "decode_after_state", "engine_reset", "perf_reset",
                 "set_threads", "abort", "close"):
        assert lines[name] == "ok None", (name, lines[name])
    assert lines["embeddings_seq"] == lines["embeddings_seq_again"] == "ok 32"
    assert lines["kv_seq_rm"] == lines["kv_seq_rm_all"] == "ok True"     # nothing stored, nothing left
    assert lines["kv_seq_pos_min"] == lines["kv_seq_pos_max"] == "ok -1"  # empty
    assert lines["kv_can_shift"] == "ok False"
    assert lines["memory_breakdown"] == "ok 0"     # no KV bytes anywhere
    for name in ("kv_seq_cp", "kv_seq_add"):
        assert lines[name].startswith("ValueError: ") and "no KV memory" in lines[name], lines[name]
    assert lines["state_get"] == lines["seq_state_get"] == "ok 'bytes'"
    assert lines["state_load_file"] == f"ok {[101, 7592, 2088, 102]!r}"
    # A sequence state file of a memory-less context holds no state: llama.cpp refuses to
    # "restore" it, and that is a clean ValueError.
    assert lines["seq_state_load_file"].startswith("ValueError: could not load sequence state")
    # An Engine generates text: it refuses an encoder's requests instead of stepping on them.
    assert lines["engine_submit"].startswith("ValueError: ") and "encoder" in lines["engine_submit"]
    assert lines["engine_step"] == "ok []"
    assert lines["engine_share_prefix"].startswith("ok ")


def test_embed_on_an_encoder_does_not_crash(bert_path, run_python):
    """The issue's reproduction, in a subprocess: LLM(path, embedding=True).embed(...)."""
    code = (f"from pyllama import LLM\n"
            f"with LLM({str(bert_path)!r}, embedding=True, n_threads=1) as llm:\n"
            f"    v = llm.embed(['hello world'])\n"
            f"    print(v.shape)\n")
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "(1, 32)"


@pytest.fixture(scope="module")
def llama_embedding():
    return native_tools.build_llama_embedding()


def native_embed(exe, model_path, texts, *args):
    cmd = (str(exe), "-m", str(model_path), "-p", SEP.join(texts), "--embd-separator", SEP,
           "--embd-output-format", "array", "--no-escape", "-t", "1", "-c", str(N_CTX), "-b", str(N_CTX),
           "-ub", str(N_CTX), "-fit", "off", "--no-warmup", *args)
    for _attempt in range(2):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{cmd}\n{out.stderr[-3000:]}"
        # llama-embedding prints through common/log.cpp's asynchronous logger; once in CI (not
        # reproducible in 100 tries here) it exited 0 having printed nothing.  That is the
        # reference tool's output getting lost, not a wrong vector: run it once more.
        if out.stdout.strip():
            break
    assert out.stdout.strip(), f"llama-embedding printed nothing twice: {cmd}\n{out.stderr[-3000:]}"
    return np.array(json.loads(out.stdout), dtype=np.float64)


def test_embed_matches_llama_embedding(bert_path, llama_embedding):
    """LLM.embed pools as the GGUF says (CLS here, as bge does) and L2-normalises: the same
    vectors as llama-embedding's defaults, to the printed precision."""
    from pyllama import LLM

    with LLM(str(bert_path), embedding=True, n_ctx=N_CTX, n_batch=N_CTX, n_threads=1) as llm:
        ours = llm.embed(TEXTS)
        raw = llm.embed(TEXTS, normalize=False)
        single = llm.embed(TEXTS[0])
    ref = native_embed(llama_embedding, bert_path, TEXTS)
    assert ours.shape == ref.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(ours, ref, **NORMALISED)
    np.testing.assert_allclose(single, ref[0], **NORMALISED)
    ref_raw = native_embed(llama_embedding, bert_path, TEXTS, "--embd-normalize", "-1")
    np.testing.assert_allclose(raw, ref_raw, atol=5e-8 * (1 + 1e-6), rtol=0)
    # Pooling really is CLS, not mean: the mean-pooled vectors are different.
    ref_mean = native_embed(llama_embedding, bert_path, TEXTS, "--pooling", "mean")
    assert np.abs(ref_mean - ref).max() > 1e-2


def test_reranker_scores_equal_embeddings_seq(reranker_path, run_python):
    """Rank pooling: LLM.embed gives the classifier's score per text (normalize=False), the
    very floats llama_get_embeddings_seq returns through Context.embeddings_seq, for a
    (query, document) pair and alone; and nothing crashes."""
    code = f"""
import numpy as np
from pyllama import LLM, Batch, Context, Model
path = {str(reranker_path)!r}
pair = "what is a cat? [SEP] The cat sat on the mat."
texts = [pair, "a dog", "ok"]
with LLM(path, embedding=True, n_ctx=512, n_batch=512, n_threads=1) as llm:
    ours = llm.embed(texts, normalize=False)
    one = llm.embed(pair, normalize=False)
    toks = [llm.vocab.tokenize(t, add_special=True) for t in texts]
m = Model(path)
ctx = Context(m, embeddings=True, pooling="rank", n_ctx=512, n_batch=512, n_ubatch=512, n_seq_max=3, n_threads=1)
b = Batch(512, 3)
b.add_sequences(toks, logits_all=True)
ctx.decode(b)
ref = np.stack([ctx.embeddings_seq(s) for s in range(3)])
assert ours.shape == ref.shape == (3, 1), (ours.shape, ref.shape)
assert np.array_equal(ours, ref), (ours, ref)
# alone, the pair is one batch of its own: other matmul shapes, the same score to rounding
np.testing.assert_allclose(one, ref[0], rtol=1e-5)
assert len(set(ref[:, 0].tolist())) == 3, ref   # distinct texts, distinct scores
print("OK")
"""
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_mean_pooled_encoder_with_a_context_that_is_not_a_multiple_of_256(tmp_path):
    """Mean pooling with non-causal attention: llama.cpp's worst-case micro-batch is n_ctx
    padded to 256 (here 512, n_ctx=300), and it must split evenly over the sequences; before,
    embed chose 3 sequences (a divisor of 300) and the context was refused."""
    import gguf

    from pyllama import LLM

    path = make_tiny_bert(tmp_path / "mean-bert.gguf", pooling=gguf.PoolingType.MEAN)
    texts = ["a b c", "hello world", "x y"]
    with LLM(str(path), embedding=True, n_ctx=300, n_threads=1) as llm:
        vecs = llm.embed(texts)
        alone = np.stack([llm.embed(t) for t in texts])
    assert vecs.shape == (3, 32)
    np.testing.assert_allclose(vecs, alone, atol=1e-5)   # encoders: sequences do not interact


def test_memory_breakdown_of_an_encoder_context(bert_path):
    """An encoder has no KV memory: the breakdown reports none instead of touching it."""
    from pyllama import LLM

    llm = LLM(bert_path, embedding=True, n_ctx=128, verbose=False)
    try:
        rows = llm.context.memory_breakdown()
        assert sum(r["model"] for r in rows) > 0
        assert sum(r["context"] for r in rows) == 0, rows
    finally:
        llm.close()
