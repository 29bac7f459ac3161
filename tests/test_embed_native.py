"""``LLM.embed`` against llama.cpp's own ``llama-embedding`` tool, on the real models.

``llama-embedding`` is built from the vendored examples/embedding/embedding.cpp against the
static libraries of the build the installed pyllama came from (tests/native_tools.py), so
both sides run the same kernels.  With the same batch composition (which sequences share a
llama_decode call) and the same context shape, the pooled vectors are bit for bit the same;
what separates the two sides is only:

* printing: llama-embedding writes each float with "%1.7f", i.e. to within 5e-8;
* L2 normalisation: llama.cpp multiplies by a float reciprocal of a double norm, pyllama
  divides by a float32 norm; each is within about one float32 ulp of the exact quotient.

Defaults differ: llama-embedding pools the way the GGUF says (these are causal LMs without
a pooling key, so "none": one vector per token) while ``LLM.embed`` always mean-pools; both
L2-normalise by default.  The comparisons below set ``--pooling`` explicitly, and one test
checks llama-embedding's own default against pyllama's Context with the model's pooling.

llama-embedding reads every prompt from one ``-p`` string split at ``--embd-separator``
(default a newline); we pass a separator no text contains, so texts with newlines stay whole,
plus one test of the newline splitting itself.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import native_tools
from pyllama import LLM, Batch, Context, Model

pytestmark = pytest.mark.model

# Same bits, printed with "%1.7f": at most half a unit in the 7th decimal apart.
PRINTED = 5e-8 * (1 + 1e-6)
# L2-normalised (|x| <= 1): the printing, plus the two normalisations' rounding, each within
# one float32 ulp (2**-23 relative) of the exact quotient; seen: 9.4e-8 at |x| = 0.8.
NORMALISED = dict(atol=PRINTED, rtol=2 * 2.0 ** -23)

N_CTX = 512                           # both sides: one context shape, one micro-batch
SEP = "<<pyllama-next-text>>"         # --embd-separator no text below contains

LONG = ("Embeddings map text to points in a vector space, so that texts with similar meanings land "
        "close together.\n\nA retrieval system embeds every document once, then embeds each query "
        "and ranks the documents by cosine similarity. ") * 4
TEXTS = {
    "short": ["Hello world"],
    "long": [LONG],                   # ~200 tokens, with blank lines
    "unicode": ["Grüße aus Zürich — 東京タワー 🚀 naïve café, Ελληνικά, русский текст"],
    "batch": ["The cat sat on the mat.", "def add(a, b):\n    return a + b", "Quantum chromodynamics",
              "¿Dónde está la biblioteca?", "ok"],
}


@pytest.fixture(scope="session")
def llama_embedding():
    """llama.cpp's llama-embedding, built once and cached across sessions (native_tools)."""
    return native_tools.build_llama_embedding()


@pytest.fixture(scope="module", params=["smollm2_path", "gemma_path"], ids=["smol", "gemma"])
def model_path(request):
    return str(request.getfixturevalue(request.param))


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, embedding=True, n_ctx=N_CTX, n_batch=N_CTX, n_threads=2) as llm:
        yield llm


@pytest.fixture(scope="module")
def model(model_path):
    with Model(model_path) as m:
        yield m


_native_runs: dict[tuple, np.ndarray] = {}


def native_embed(exe, model_path: str, texts: list[str], *args: str, sep: str | None = SEP) -> np.ndarray:
    """llama-embedding's vectors for `texts` (one -p string; rows in its output order), float64.
    Without --pooling it pools as the model says; `args` add or override options.  A run is
    memoised per command line: tests asking the same question share it."""
    prompt = texts[0] if sep is None else sep.join(texts)
    cmd = (str(exe), "-m", model_path, "-p", prompt, "--embd-output-format", "array",
           "--no-escape",      # the prompt is literal text (no "\\n" escapes turned into newlines)
           "-t", "2",          # the test machines have 2 cores; the result does not depend on it
           *(("--embd-separator", sep) if sep is not None else ()), *args)
    if cmd not in _native_runs:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{cmd}\n{out.stderr[-3000:]}"
        try:
            _native_runs[cmd] = np.array(json.loads(out.stdout), dtype=np.float64)
        except ValueError:
            pytest.fail(f"llama-embedding printed no JSON array:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return _native_runs[cmd].copy()


def sized(*args: str) -> tuple[str, ...]:
    """The context shape of the `llm` fixture: all texts in one batch and one micro-batch.
    --fit only fills in what is left unset (here nothing, on a CPU) and the warm-up decode is
    thrown away: turning both off changes no number and halves llama-embedding's run time."""
    return ("-c", str(N_CTX), "-b", str(N_CTX), "-ub", str(N_CTX), "-fit", "off", "--no-warmup", *args)


MEAN_L2 = sized("--pooling", "mean", "--embd-normalize", "2")    # LLM.embed(texts)
MEAN_RAW = sized("--pooling", "mean", "--embd-normalize", "-1")  # LLM.embed(texts, normalize=False)


@pytest.mark.parametrize("case", TEXTS)
def test_mean_pooled_and_normalised_match(llm, llama_embedding, case):
    texts = TEXTS[case]
    ours = llm.embed(texts)
    ref = native_embed(llama_embedding, llm.model_path, texts, *MEAN_L2)
    assert ours.shape == ref.shape == (len(texts), ref.shape[1])
    np.testing.assert_allclose(ours, ref, **NORMALISED)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-6)


def test_mean_pooled_unnormalised_are_the_same_bits(llm, llama_embedding):
    texts = TEXTS["batch"]
    ours = llm.embed(texts, normalize=False)
    ref = native_embed(llama_embedding, llm.model_path, texts, *MEAN_RAW)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=PRINTED, rtol=0)
    assert np.abs(ref).max() > 1.0  # really unnormalised: the bound above is tight, not vacuous


def test_single_text_returns_a_vector(llm, llama_embedding):
    ours = llm.embed(TEXTS["unicode"][0])
    ref = native_embed(llama_embedding, llm.model_path, TEXTS["unicode"], *MEAN_L2)
    assert ours.ndim == 1
    np.testing.assert_allclose(ours, ref[0], **NORMALISED)


def test_newlines_split_prompts_like_llama_embedding(llm, llama_embedding):
    """Without --embd-separator llama-embedding splits -p at newlines: one vector per line."""
    lines = ["first line", "the second line", "third"]
    ref = native_embed(llama_embedding, llm.model_path, ["\n".join(lines)], *MEAN_L2, sep=None)
    assert ref.shape[0] == len(lines)
    np.testing.assert_allclose(llm.embed(lines), ref, **NORMALISED)


def test_defaults_with_mean_pooling(model_path, llama_embedding):
    """Each side's own defaults (context size, batch sizes, --fit, normalisation), pooling set
    to LLM.embed's mean: the same vectors (the batch fits one micro-batch on both sides)."""
    texts = TEXTS["batch"]
    with LLM(model_path, embedding=True, n_threads=2) as llm:
        ours = llm.embed(texts)
    ref = native_embed(llama_embedding, model_path, texts, "--pooling", "mean")
    np.testing.assert_allclose(ours, ref, **NORMALISED)


def _core_embeddings(model: Model, texts: list[str], pooling) -> np.ndarray:
    """Raw (unnormalised) embeddings from pyllama's Context with `pooling`, all texts in one
    batch as llama-embedding does: one row per text, or per token when pooling is 'none'."""
    toks = [model.vocab.tokenize(t, add_special=True, parse_special=True) for t in texts]
    ctx = Context(model, n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_seq_max=len(texts), embeddings=True,
                  pooling=pooling, n_threads=2)
    try:
        batch = Batch(N_CTX, len(texts))
        batch.add_sequences(toks, logits_all=True)
        ctx.decode(batch)
        n = sum(map(len, toks))
        if pooling in ("none", None):  # None: the model's own, "none" for these models
            return np.stack([ctx.embeddings(i) for i in range(n)])
        return np.stack([ctx.embeddings_seq(s) for s in range(len(texts))])
    finally:
        ctx.close()


@pytest.mark.parametrize("pooling", ["last", "cls"])
def test_other_poolings_match(model, model_path, llama_embedding, pooling):
    texts = TEXTS["batch"]
    ours = _core_embeddings(model, texts, pooling)
    ref = native_embed(llama_embedding, model_path, texts, *sized("--pooling", pooling, "--embd-normalize", "-1"))
    assert ours.shape == ref.shape == (len(texts), model.n_embd)
    np.testing.assert_allclose(ours, ref, atol=PRINTED, rtol=0)


def test_llama_embedding_default_is_the_models_pooling(model, model_path, llama_embedding):
    """No --pooling: llama-embedding pools as the GGUF says; for these causal LMs that is
    'none', one L2-normalised vector per token, as pyllama's Context with pooling=None gives."""
    texts = TEXTS["batch"][:3]
    ours = _core_embeddings(model, texts, None)
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    ref = native_embed(llama_embedding, model_path, texts, *sized())
    n_tokens = sum(len(model.vocab.tokenize(t, add_special=True, parse_special=True)) for t in texts)
    assert ours.shape == ref.shape == (n_tokens, model.n_embd)
    np.testing.assert_allclose(ours, ref, **NORMALISED)


def test_one_text_at_a_time_is_close_to_a_batch(llm, llama_embedding):
    """Batch composition changes rounding only: texts embedded one per call against
    llama-embedding's single batch.  llama.cpp itself is not batch-invariant (different
    matmul and attention shapes): llama-embedding alone on "¿Dónde está la biblioteca?"
    differs from the same text inside this batch by 0.43% (L2, gemma; 1e-7 on SmolLM2), and
    pyllama alone equals llama-embedding alone to the printed digit.  How far depends on the
    CPU's kernels: 0.43% at most on a Sapphire Rapids Xeon, 3.7% on an AMD EPYC.  The bound
    (6%) keeps a margin over both and still catches any mix-up of sequences (distinct texts
    differ by tens of percent, checked below)."""
    texts = TEXTS["batch"]
    ours = np.stack([llm.embed(t, normalize=False) for t in texts])
    ref = native_embed(llama_embedding, llm.model_path, texts, *MEAN_RAW)
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 0.06, rel
    others = np.linalg.norm(ref[:, None] - ref[None], axis=2) / np.linalg.norm(ref, axis=1)[:, None]
    assert (others + np.eye(len(texts))).min() > 0.1  # the bound separates different texts


def test_special_token_text_differs_only_by_tokenisation(llm, llama_embedding):
    """llama-embedding tokenises with parse_special=true, so "<|im_start|>" in a text becomes
    the control token; LLM.embed(text) keeps such text literal (parse_special=False, as for
    prompts).  Given the same tokens (LLM.embed takes token lists) the vectors agree."""
    text = "<|im_start|>user hi" if "SmolLM2" in llm.model_path else "<start_of_turn>user hi"
    tokens = llm.vocab.tokenize(text, add_special=True, parse_special=True)
    assert tokens != llm.vocab.tokenize(text, add_special=True, parse_special=False)
    ref = native_embed(llama_embedding, llm.model_path, [text], *MEAN_L2)
    np.testing.assert_allclose(llm.embed([tokens]), ref, **NORMALISED)
