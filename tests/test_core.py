"""The Cython core: Model, Vocab, Context, Batch, KV memory, state, samplers, Engine.

Unit tests run on a tiny random-weight model; fidelity tests on the real models
(SmolLM2 and Gemma 3) compare against llama.cpp's own llama-simple, built from the
same vendored tree and linked against the very static libraries of our build.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import native_tools
import pyllama
from pyllama import LLM, Batch, Context, Engine, GenerationRequest, Model, SamplerChain
from pyllama.errors import (
    BatchCapacityError,
    ContextLengthError,
    GrammarError,
    InvalidSequenceError,
    InvalidTokenError,
    ModelLoadError,
)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    with Model(tiny_model_path) as m:
        yield m


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with Model(smollm2_path) as m:
        yield m


@pytest.fixture(scope="module")
def gemma(gemma_path):
    with Model(gemma_path) as m:
        yield m


def greedy_ids(model: Model, prompt_tokens, n: int, **ctx_kw) -> list:
    ctx = Context(model, n_threads=2, **ctx_kw)
    req = GenerationRequest(prompt_tokens, SamplerChain(model.vocab).add_greedy(), max_tokens=n)
    Engine(ctx).run([req])
    ctx.close()
    return req.tokens


# ---------------------------------------------------------------------------
# module-level answers
# ---------------------------------------------------------------------------

def test_system_info_and_backends():
    info = pyllama.system_info()
    assert "CPU" in info
    names = [b["name"] for b in pyllama.backends()]
    assert "CPU" in names
    cpu = next(b for b in pyllama.backends() if b["name"] == "CPU")
    assert cpu["devices"] and cpu["devices"][0]["type"] == "cpu"
    assert cpu["devices"][0]["memory_total"] > 0
    assert pyllama.__llama_cpp_commit__ == "0c1e57098"
    assert pyllama.build_info()["llama_cpp_commit"] == "0c1e57098"


def test_builtin_chat_template():
    assert "chatml" in pyllama._core.chat_builtin_templates()
    out = pyllama._core.apply_builtin_chat_template("chatml", [{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="does not know"):
        pyllama._core.apply_builtin_chat_template("no-such-template", [{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------
# tokenizer: upstream's test vectors
# ---------------------------------------------------------------------------

def _vocab_cases():
    models = ROOT / "vendor" / "llama.cpp" / "models"
    for inp in sorted(models.glob("ggml-vocab-*.gguf.inp")):
        gguf = inp.with_suffix("")
        out = inp.with_suffix(".out")
        if gguf.exists() and out.exists():
            yield pytest.param(gguf, id=gguf.name[len("ggml-vocab-"):-len(".gguf")])


def _read_vectors(gguf: Path):
    raw = Path(str(gguf) + ".inp").read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    texts = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(sep)
    outs = Path(str(gguf) + ".out").read_text(encoding="utf-8").split("\n")
    outs = outs[:len(texts)]
    expected = [[int(t) for t in line.split()] for line in outs]
    assert len(texts) == len(expected)
    return list(zip(texts, expected))


@pytest.mark.parametrize("gguf", list(_vocab_cases()))
def test_tokenizer_matches_upstream_vectors(vocab_dir, gguf):
    model = Model(gguf, vocab_only=True)
    vocab = model.vocab
    failures = []
    for text, expected in _read_vectors(gguf):
        got = vocab.tokenize(text, add_special=False, parse_special=False)
        if got != expected:
            failures.append((text, expected, got))
    assert not failures, f"{len(failures)} mismatches, first: {failures[0]!r}"


def test_vocab_basics(tiny):
    v = tiny.vocab
    assert v.n_tokens == len(v) == 32000
    assert v.type == "spm"
    assert v.bos == 1 and v.eos == 2
    assert v.is_eog(v.eos) and not v.is_eog(100)
    toks = v.tokenize("Hello world")
    assert toks[0] == v.bos
    assert v.tokenize("Hello world", add_special=False) == toks[1:]
    assert v.detokenize(toks[1:]) == "Hello world"          # round trip without specials
    assert v.detokenize(toks, unparse_special=True).startswith("<s>")
    assert v.tokenize(b"Hello world") == toks
    assert v.token_to_piece(toks[1]).decode().strip() == "Hello"
    assert v.token_text(v.bos) == "<s>"
    assert isinstance(v.token_score(5), float)
    # parse_special turns "<s>" into the BOS token instead of text
    assert v.tokenize("<s>", add_special=False, parse_special=True) == [v.bos]
    assert v.tokenize("<s>", add_special=False, parse_special=False) != [v.bos]


def test_vocab_multibyte_pieces(tiny):
    v = tiny.vocab
    toks = v.tokenize("🦙", add_special=False)
    pieces = b"".join(v.token_to_piece(t) for t in toks)
    assert pieces.decode("utf-8").strip() == "🦙"
    # a cut multi-byte character becomes U+FFFD, never an exception
    assert "\ufffd" in v.detokenize(toks[-1:]) or v.detokenize(toks[-1:]).strip() == "🦙"


def test_vocab_rejects_bad_tokens_and_text(tiny):
    v = tiny.vocab
    for bad in (-1, v.n_tokens, 2**31):
        with pytest.raises(InvalidTokenError, match=str(bad)):
            v.detokenize([1, bad])
        with pytest.raises((InvalidTokenError, OverflowError)):
            v.token_to_piece(bad)
    with pytest.raises(ValueError, match="UTF-8"):
        v.tokenize(b"\xff\xfe abc")
    with pytest.raises(ValueError, match="UTF-8"):
        v.tokenize("lone \ud800 surrogate")
    assert v.tokenize("a\0b", add_special=False)  # NULs are text like any other


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------

def test_model_properties(tiny, tiny_model_path):
    assert tiny.architecture == "llama"
    assert tiny.n_layer == 2 and tiny.n_embd == 64 and tiny.n_head == 4 and tiny.n_head_kv == 2
    assert tiny.n_ctx_train == 512
    assert tiny.n_params > 0 and tiny.size > 0
    meta = tiny.metadata
    assert meta["general.architecture"] == "llama"
    assert tiny.meta("llama.block_count") == "2"
    assert tiny.meta("no.such.key") is None
    assert "llama" in tiny.description
    assert tiny.path == str(tiny_model_path)


def test_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Model(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="directory"):
        Model(tmp_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        Model(empty)
    text = tmp_path / "text.gguf"
    text.write_bytes(b"this is not a model file at all")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        Model(text)
    with pytest.raises(ValueError, match="split_mode"):
        Model(text, split_mode="diagonal")


def test_model_progress_callback_can_cancel(tiny_model_path):
    seen = []
    with Model(tiny_model_path, progress_callback=seen.append) as m:
        assert m.n_layer == 2
    assert seen and seen[-1] == pytest.approx(1.0)
    with pytest.raises(ModelLoadError):
        Model(tiny_model_path, progress_callback=lambda p: False)


def test_model_close_and_context_manager(tiny_model_path):
    m = Model(tiny_model_path)
    v = m.vocab
    m.close()
    assert m.closed
    with pytest.raises(ValueError, match="closed"):
        _ = m.n_params
    with pytest.raises(ValueError, match="closed"):
        v.tokenize("x")


def test_kv_overrides(tiny_model_path):
    with Model(tiny_model_path, kv_overrides={"llama.context_length": 256}) as m:
        assert m.n_ctx_train == 256


def test_vocab_only_model_has_no_context(vocab_dir):
    m = Model(vocab_dir / "ggml-vocab-llama-spm.gguf", vocab_only=True)
    assert m.vocab.n_tokens == 32000
    with pytest.raises(ValueError):
        Context(m)


# ---------------------------------------------------------------------------
# context, batch, logits
# ---------------------------------------------------------------------------

def test_context_parameters_are_validated(tiny):
    for kwargs in ({"n_ctx": -1}, {"n_batch": 0}, {"n_ubatch": 0}, {"n_seq_max": 0}, {"n_seq_max": 10**6},
                   {"n_threads": 0}, {"type_k": "q9"}, {"pooling": "median"}, {"flash_attn": "maybe"},
                   {"rope_freq_base": -1.0}):
        with pytest.raises(ValueError):
            Context(tiny, **kwargs)
    with Context(tiny, n_ctx=256, n_batch=64, n_ubatch=32, n_seq_max=3, n_threads=1) as ctx:
        assert ctx.n_ctx >= 256 and ctx.n_batch == 64 and ctx.n_ubatch == 32 and ctx.n_seq_max == 3
        assert ctx.n_threads == 1
        ctx.set_threads(2, 2)
        assert ctx.n_threads == 2


def test_batch_capacity_and_ids(tiny):
    b = Batch(4, n_seq_max=2)
    assert b.add(5, 0, 0) == 0
    assert b.add(6, 1, [0, 1], logits=True) == 1
    with pytest.raises(InvalidSequenceError):
        b.add(7, 2, 2)
    with pytest.raises(BatchCapacityError):
        b.add_sequence([1, 2, 3], 2, 0)
    assert b.n_tokens == 2 and b.tokens() == [5, 6]
    b.clear()
    assert b.n_tokens == 0
    arr = Batch.from_arrays(np.array([1, 2, 3]), np.array([0, 1, 2]), np.array([0, 0, 0]), [False, False, True])
    assert arr.n_tokens == 3


def test_decode_validation(tiny):
    with Context(tiny, n_ctx=64, n_batch=8, n_seq_max=2, n_threads=1) as ctx:
        with pytest.raises(ValueError, match="empty"):
            ctx.decode(Batch(4))
        b = Batch(16, n_seq_max=4)
        b.add_sequence(list(range(1, 10)), 0, 0)
        with pytest.raises(BatchCapacityError, match="n_batch"):
            ctx.decode(b)
        b = Batch(4, n_seq_max=4)
        b.add(1, 0, 3, True)
        with pytest.raises(InvalidSequenceError, match="3"):
            ctx.decode(b)
        b = Batch(4)
        b.add(tiny.vocab.n_tokens, 0, 0, True)
        with pytest.raises(InvalidTokenError):
            ctx.decode(b)
        b = Batch(4)
        b.add(1, 10_000, 0, True)
        with pytest.raises(ContextLengthError):
            ctx.decode(b)


def test_logits_copy_and_view(tiny):
    with Context(tiny, n_ctx=64, n_threads=1) as ctx:
        b = Batch(8)
        b.add_sequence(tiny.vocab.tokenize("Hello"), 0, 0)
        ctx.decode(b)
        copy = ctx.logits()
        assert copy.shape == (tiny.vocab.n_tokens,) and copy.dtype == np.float32
        assert np.isfinite(copy).all()
        view = ctx.logits(copy=False)
        assert not view.flags.writeable
        np.testing.assert_array_equal(view, copy)
        # While a view is alive llama.cpp must not reuse its memory.
        with pytest.raises(BufferError):
            ctx.decode(b)
        with pytest.raises(BufferError):
            ctx.close()
        del view
        with pytest.raises(IndexError):
            ctx.logits(0)          # batch index 0 did not ask for logits
        with pytest.raises(IndexError):
            ctx.logits(-2)         # only one output


def test_kv_memory_and_state(tiny, tmp_path):
    v = tiny.vocab
    with Context(tiny, n_ctx=128, n_seq_max=2, n_threads=1) as ctx:
        toks = v.tokenize("The quick brown fox")
        b = Batch(32, 2)
        b.add_sequence(toks, 0, 0)
        ctx.decode(b)
        assert ctx.kv_seq_pos_min(0) == 0 and ctx.kv_seq_pos_max(0) == len(toks) - 1
        assert ctx.kv_seq_pos_max(1) == -1
        ctx.kv_seq_cp(0, 1)
        assert ctx.kv_seq_pos_max(1) == len(toks) - 1
        ctx.kv_seq_rm(1, 2, -1)
        assert ctx.kv_seq_pos_max(1) == 1
        ctx.kv_seq_keep(0)
        assert ctx.kv_seq_pos_max(1) == -1
        with pytest.raises(InvalidSequenceError):
            ctx.kv_seq_rm(5)

        state = ctx.state_get()
        assert len(state) > 0
        logits_before = ctx.logits()
        path = tmp_path / "state.bin"
        ctx.state_save_file(path, toks)
        seq_state = ctx.seq_state_get(0)
        ctx.kv_clear()
        assert ctx.kv_seq_pos_max(0) == -1
        ctx.state_set(state)
        assert ctx.kv_seq_pos_max(0) == len(toks) - 1
        ctx.kv_clear()
        assert ctx.state_load_file(path) == toks
        assert ctx.kv_seq_pos_max(0) == len(toks) - 1
        ctx.kv_clear()
        ctx.seq_state_set(seq_state, 1)
        assert ctx.kv_seq_pos_max(1) == len(toks) - 1
        with pytest.raises(ValueError):
            ctx.state_set(b"garbage" * 10)
        with pytest.raises(FileNotFoundError):
            ctx.state_load_file(tmp_path / "nope.bin")
        assert np.isfinite(logits_before).all()
        perf = ctx.perf()
        assert perf["n_p_eval"] >= len(toks)


# ---------------------------------------------------------------------------
# samplers and grammars
# ---------------------------------------------------------------------------

def test_sampler_chain_stages(tiny):
    v = tiny.vocab
    chain = (SamplerChain(v).add_logit_bias({5: -math.inf}).add_penalties(64, 1.1, 0.1, 0.1)
             .add_dry(0.8).add_top_n_sigma(2.0).add_top_k(40).add_typical(0.9).add_top_p(0.9).add_min_p(0.05)
             .add_xtc(0.1, 0.1).add_temp_ext(0.8, 0.1, 1.0).add_temp(0.8).add_dist(42))
    assert chain.names[0] == "logit-bias" and chain.names[-1] == "dist"
    assert len(chain) == len(chain.names)
    assert chain.seed == 42
    clone = chain.clone()
    assert clone.names == chain.names
    SamplerChain(v).add_mirostat(1, 5.0, 0.1)
    SamplerChain(v).add_mirostat_v2(1, 5.0, 0.1)
    for bad in (lambda c: c.add_top_p(2.0), lambda c: c.add_top_p(0.0), lambda c: c.add_temp(float("nan")),
                lambda c: c.add_top_k(-1), lambda c: c.add_dist(2**40), lambda c: c.add_penalties(64, 0.0),
                lambda c: c.add_logit_bias({v.n_tokens: 1.0})):
        with pytest.raises((ValueError, TypeError, OverflowError)):
            bad(SamplerChain(v))


def test_sampler_needs_selecting_stage(tiny):
    with Context(tiny, n_ctx=64, n_threads=1) as ctx:
        b = Batch(8)
        b.add_sequence([1, 100, 200], 0, 0)
        ctx.decode(b)
        with pytest.raises(ValueError, match="selecting"):
            SamplerChain(tiny.vocab).add_top_k(5).sample(ctx)
        tok = SamplerChain(tiny.vocab).add_greedy().sample(ctx)
        assert tok == int(np.argmax(ctx.logits()))


def test_grammar_errors_carry_parser_message(tiny):
    v = tiny.vocab
    with pytest.raises(GrammarError, match="empty"):
        SamplerChain(v).add_grammar("   ")
    with pytest.raises(GrammarError, match="parse|expecting|invalid"):
        SamplerChain(v).add_grammar('root ::= "unterminated')
    with pytest.raises(GrammarError, match="[Uu]ndefined"):
        SamplerChain(v).add_grammar("root ::= missing")
    with pytest.raises(GrammarError):
        pyllama._core.validate_grammar(v, 'root ::= "a"', root="nope")
    pyllama._core.validate_grammar(v, 'root ::= "yes" | "no"')


def test_grammar_accept_of_forbidden_token_is_an_error_not_an_abort(tiny):
    v = tiny.vocab
    chain = SamplerChain(v).add_grammar('root ::= "yes"').add_greedy()
    no = v.tokenize("no", add_special=False)[-1]
    with pytest.raises(GrammarError, match="not allowed"):
        chain.accept(no)
    with pytest.raises(GrammarError):
        chain.accept(v.eos)    # the grammar is not complete yet


def test_engine_grammar_constrains_output(tiny):
    v = tiny.vocab
    with Context(tiny, n_ctx=128, n_threads=1) as ctx:
        req = GenerationRequest(v.tokenize("Answer:"), SamplerChain(v).add_greedy(),
                                grammar=SamplerChain(v).add_grammar('root ::= ("yes" | "no") "."'), max_tokens=16)
        Engine(ctx).run([req])
        assert req.text in ("yes.", "no.")
        assert req.finish_reason == "eog"


def test_engine_stop_strings_and_tokens(tiny):
    v = tiny.vocab
    with Context(tiny, n_ctx=256, n_threads=1) as ctx:
        eng = Engine(ctx)
        free = GenerationRequest(v.tokenize("Once"), SamplerChain(v).add_greedy(), max_tokens=40)
        eng.run([free])
        assert free.finish_reason == "length" and len(free.tokens) == 40
        text = free.text
        stop = text[10:13]
        assert stop
        cut = GenerationRequest(v.tokenize("Once"), SamplerChain(v).add_greedy(), max_tokens=40, stop=[stop])
        eng.run([cut])
        assert cut.finish_reason == "stop"
        assert cut.text == text[:text.find(stop)]
        tok_stop = GenerationRequest(v.tokenize("Once"), SamplerChain(v).add_greedy(), max_tokens=40,
                                     stop_tokens=[free.tokens[3]])
        eng.run([tok_stop])
        assert tok_stop.finish_reason == "stop"
        assert tok_stop.tokens == free.tokens[:free.tokens.index(free.tokens[3]) + 1]


def test_engine_prompt_cache(tiny):
    v = tiny.vocab
    with Context(tiny, n_ctx=256, n_threads=1) as ctx:
        eng = Engine(ctx)
        prompt = v.tokenize("The quick brown fox jumps over the lazy dog")
        a = GenerationRequest(prompt, SamplerChain(v).add_greedy(), max_tokens=5)
        eng.run([a])
        assert a.n_prompt_evaluated == len(prompt)
        b = GenerationRequest(prompt + a.tokens[:2], SamplerChain(v).add_greedy(), max_tokens=3)
        eng.run([b])
        assert b.n_prompt_evaluated <= 2
        assert b.tokens == a.tokens[2:5]
        eng.reset()
        c = GenerationRequest(prompt, SamplerChain(v).add_greedy(), max_tokens=5)
        eng.run([c])
        assert c.n_prompt_evaluated == len(prompt) and c.tokens == a.tokens


def test_engine_continuous_batching(tiny):
    v = tiny.vocab
    with Context(tiny, n_ctx=512, n_seq_max=3, n_threads=1) as ctx:
        eng = Engine(ctx)
        prompts = [v.tokenize(f"Item number {i}:") for i in range(7)]
        reqs = [GenerationRequest(p, SamplerChain(v).add_greedy(), max_tokens=4 + i, tag=i)
                for i, p in enumerate(prompts)]
        eng.run(reqs)
        assert [len(r.tokens) for r in reqs] == [4 + i for i in range(7)]
        assert not eng.busy
        # each equals its own single-sequence run
        with Context(tiny, n_ctx=512, n_threads=1) as single:
            for r, p in zip(reqs, prompts):
                alone = GenerationRequest(p, SamplerChain(v).add_greedy(), max_tokens=len(r.tokens))
                Engine(single).run([alone])
                single.kv_clear()
                assert alone.tokens == r.tokens


def test_engine_rejects_bad_requests(tiny):
    v = tiny.vocab
    with pytest.raises(ValueError, match="empty"):
        GenerationRequest([], SamplerChain(v).add_greedy())
    with pytest.raises(InvalidTokenError):
        GenerationRequest([v.n_tokens], SamplerChain(v).add_greedy())
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationRequest([1], SamplerChain(v).add_greedy(), max_tokens=-5)
    with pytest.raises(ValueError, match="ignore_eos"):
        GenerationRequest([1], SamplerChain(v).add_greedy(), grammar=SamplerChain(v).add_grammar('root ::= "a"'),
                          ignore_eos=True)
    with Context(tiny, n_ctx=32, n_threads=1) as ctx:
        n = ctx.n_ctx    # llama.cpp may round the size up
        with pytest.raises(ContextLengthError, match=str(n)):
            Engine(ctx).submit(GenerationRequest([1] * (n + 5), SamplerChain(v).add_greedy()))


# ---------------------------------------------------------------------------
# real models: fidelity with llama.cpp's own tools
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def llama_simple(tmp_path_factory):
    """llama.cpp's examples/simple, compiled against our build's static libraries."""
    libs = native_tools.require_static_libs()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "vendor_llama_cpp.py"), "--with", "tools"], check=True,
                   capture_output=True)
    src = ROOT / "vendor" / "llama.cpp" / "examples" / "simple" / "simple.cpp"
    exe = tmp_path_factory.mktemp("native") / "llama-simple"
    inc = ROOT / "vendor" / "llama.cpp"
    # Upstream's file compiled as it is; a forced include logs the id of every token it prints.
    log_ids = ROOT / "tests" / "native" / "log_token_ids.h"
    cmd = ["g++", "-O2", "-std=c++17", "-include", str(log_ids), str(src), "-I", str(inc / "include"),
           "-I", str(inc / "ggml" / "include"), "-o", str(exe), *map(str, libs), *native_tools.link_flags()]
    subprocess.run(cmd, check=True, capture_output=True)
    return exe


def _simple_run(exe, model: Model, prompt: str, n: int) -> tuple[str, list]:
    """llama-simple's generated text and token ids (the prompt's echo removed)."""
    out = subprocess.run([str(exe), "-m", model.path, "-n", str(n), prompt], capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    text = out.stdout.decode("utf-8", "replace")
    ids = [int(line.split()[1]) for line in out.stderr.decode(errors="replace").splitlines()
           if line.startswith("PYLLAMA_TOKEN ")]
    v = model.vocab
    prompt_tokens = v.tokenize(prompt, True, True)   # as simple.cpp tokenizes (add and parse special)
    assert ids[:len(prompt_tokens)] == prompt_tokens
    prompt_text = b"".join(v.token_to_piece(t, special=True) for t in prompt_tokens).decode()
    assert text.startswith(prompt_text)
    return text[len(prompt_text):].removesuffix("\n"), ids[len(prompt_tokens):]


@pytest.mark.model
@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_greedy_matches_llama_simple(request, llama_simple, which):
    """The same token ids as llama.cpp's own example, through the engine and through
    LLM.complete(temperature=0), on both models."""
    model = request.getfixturevalue(which)
    prompt = "The capital of France is"
    n = 24
    expected_text, expected_ids = _simple_run(llama_simple, model, prompt, n)
    assert len(expected_ids) >= 8          # a real continuation to compare, not an instant EOG
    tokens = model.vocab.tokenize(prompt, add_special=True, parse_special=True)
    ctx = Context(model, n_ctx=len(tokens) + n, n_batch=len(tokens), n_threads=2)
    req = GenerationRequest(tokens, SamplerChain(model.vocab).add_greedy(), max_tokens=len(expected_ids),
                            render_special=True)
    Engine(ctx).run([req])
    ctx.close()
    assert req.tokens == expected_ids
    assert req.text == expected_text
    llm = LLM(model.path, n_ctx=256, n_threads=2)
    try:
        c = llm.complete(prompt, max_tokens=len(expected_ids), temperature=0)
        assert c.tokens == expected_ids
    finally:
        llm.close()


@pytest.mark.model
@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_batch_of_four_gives_the_same_logits_as_alone(request, which):
    """Without flash attention, four sequences decoded in one batch give bit-identical
    logits to each sequence decoded alone (unified KV memory).  With flash attention
    (llama.cpp's CPU default, 'auto'), the other sequences' masked KV cells change the
    order of the F16 online-softmax accumulation, so logits differ slightly (up to ~1.0
    on Gemma 3's scale of ~25); the strongest true property there is the same argmax
    and a small error.  See docs/batching.md."""
    model = request.getfixturevalue(which)
    v = model.vocab
    prompts = [v.tokenize(p) for p in ("Hello there", "The capital of France is", "1, 2, 3,", "Once upon a time")]
    for flash_attn in (False, True):
        alone = []
        with Context(model, n_ctx=256, n_threads=2, flash_attn=flash_attn) as ctx:
            for p in prompts:
                ctx.kv_clear()
                b = Batch(64)
                b.add_sequence(p, 0, 0)
                ctx.decode(b)
                alone.append(ctx.logits())
        with Context(model, n_ctx=256, n_seq_max=4, n_threads=2, flash_attn=flash_attn) as ctx:
            b = Batch(64, 4)
            last = [b.add_sequence(p, 0, s) for s, p in enumerate(prompts)]
            ctx.decode(b)
            for s, idx in enumerate(last):
                batched = ctx.logits(idx)
                if not flash_attn:
                    np.testing.assert_array_equal(batched, alone[s])
                else:
                    np.testing.assert_allclose(batched, alone[s], rtol=0, atol=0.06 * np.abs(alone[s]).max())
                    assert int(np.argmax(batched)) == int(np.argmax(alone[s]))


@pytest.mark.model
def test_state_restore_reproduces_the_continuation(smol):
    """Save the state after the prompt (minus its last token), continue greedily,
    restore, and continue again: the same tokens.  Logits are not part of the state at
    this llama.cpp version, so after restoring sampling refuses stale outputs until the
    last prompt token is decoded again."""
    v = smol.vocab
    prompt = v.tokenize("The three primary colors are")
    with Context(smol, n_ctx=256, n_threads=2) as ctx:
        b = Batch(64)
        b.add_sequence(prompt[:-1], 0, 0, logits_last=False)
        ctx.decode(b)
        state = ctx.state_get()

        def continue_greedy(n):
            chain = SamplerChain(v).add_greedy()
            bb = Batch(1)
            bb.add(prompt[-1], len(prompt) - 1, 0, True)
            ctx.decode(bb)
            out = []
            for i in range(n):
                tok = chain.sample(ctx)
                out.append(tok)
                bb = Batch(1)
                bb.add(tok, len(prompt) + i, 0, True)
                ctx.decode(bb)
            return out

        first = continue_greedy(12)
        ctx.kv_clear()
        ctx.state_set(state)
        with pytest.raises(IndexError):
            SamplerChain(v).add_greedy().sample(ctx)
        assert continue_greedy(12) == first
        assert first == greedy_ids(smol, prompt, 12, n_ctx=256)


@pytest.mark.model
def test_seq_cp_then_different_sampling_diverges(smol):
    v = smol.vocab
    prompt = v.tokenize("My favourite animal is the")
    with Context(smol, n_ctx=512, n_seq_max=3, n_threads=2) as ctx:
        eng = Engine(ctx)
        # share the prompt once, then run three samplers on copies of it
        eng.share_prefix([prompt + [10], prompt + [11], prompt + [12]])
        assert ctx.kv_seq_pos_max(1) == len(prompt) - 1 and ctx.kv_seq_pos_max(2) == len(prompt) - 1
        greedy = GenerationRequest(prompt, SamplerChain(v).add_greedy(), max_tokens=12)
        hot1 = GenerationRequest(prompt, SamplerChain(v).add_temp(1.5).add_dist(1), max_tokens=12)
        hot2 = GenerationRequest(prompt, SamplerChain(v).add_temp(1.5).add_dist(2), max_tokens=12)
        eng.run([greedy, hot1, hot2])
        assert greedy.n_prompt_evaluated == 1 and hot1.n_prompt_evaluated == 1
        assert len({tuple(greedy.tokens), tuple(hot1.tokens), tuple(hot2.tokens)}) == 3
    # the greedy copy still equals a fresh greedy run
    assert greedy.tokens == greedy_ids(smol, prompt, 12, n_ctx=512)


def _engine_tokens(model, chain, prompt, n):
    with Context(model, n_ctx=256, n_threads=1) as ctx:
        req = GenerationRequest(prompt, chain, max_tokens=n, ignore_eos=True)
        Engine(ctx).run([req])
        return req.tokens


def test_greedy_fast_path_picks_what_llama_greedy_picks(tiny):
    """The engine takes the argmax of the logits itself for [logit-bias ->] greedy chains
    (no n_vocab candidate array).  A temp(1.0) stage changes no logit but forces llama.cpp's
    own samplers: both must pick the same tokens, with biases at the first and last ids,
    -inf, large positive values and ties."""
    import random

    v = tiny.vocab
    n = v.n_tokens
    rng = random.Random(7)
    cases = [{}, {0: 100.0}, {n - 1: 100.0}, {0: 50.0, n - 1: 50.0}, {3: -math.inf, 4: -math.inf},
             {5: 1e-3, 6: -1e-3}, {0: -math.inf}, {n - 1: -math.inf}]
    cases.append({t: rng.choice([-math.inf, -1.0, 2.0]) for t in rng.sample(range(n), min(100, n - 1))})
    for _ in range(12):
        ids = rng.sample(range(n), rng.randint(1, 20))
        cases.append({t: rng.choice([-math.inf, -5.0, -0.5, 0.0, 0.5, 5.0, 30.0]) for t in ids})
    for bias in cases:
        prompt = [rng.randrange(n) for _ in range(rng.randint(1, 12))]
        fast = SamplerChain(v).add_logit_bias(bias).add_greedy() if bias else SamplerChain(v).add_greedy()
        slow = (SamplerChain(v).add_logit_bias(bias) if bias else SamplerChain(v)).add_temp(1.0).add_greedy()
        assert fast._plain_greedy and fast.clone()._plain_greedy and not slow._plain_greedy
        assert _engine_tokens(tiny, fast, prompt, 12) == _engine_tokens(tiny, slow, prompt, 12), bias
        assert _engine_tokens(tiny, fast.clone(), prompt, 12) == _engine_tokens(tiny, slow, prompt, 12), bias


@pytest.mark.model
@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_greedy_fast_path_on_real_models(request, which):
    model = request.getfixturevalue(which)
    v = model.vocab
    eog = {t: -math.inf for t in (v.eos, v.eot) if t is not None and t >= 0}
    for text in ("The capital of France is", "def fibonacci(n):", "Once upon a time"):
        prompt = v.tokenize(text)
        for bias in ({}, eog):
            fast = SamplerChain(v).add_logit_bias(bias).add_greedy() if bias else SamplerChain(v).add_greedy()
            slow = (SamplerChain(v).add_logit_bias(bias) if bias else SamplerChain(v)).add_temp(1.0).add_greedy()
            assert _engine_tokens(model, fast, prompt, 24) == _engine_tokens(model, slow, prompt, 24)


def test_fast_metadata_reader_agrees_with_ggml(tiny_model_path, vocab_dir, tmp_path):
    """The model pre-check reads GGUF metadata with its own scanner (10 ms instead of 40 for a
    262k vocabulary); where it reads a file at all, it must see what ggml's parser sees."""
    from pyllama._core import _gguf_precheck_metadata as read

    files = [tiny_model_path, *sorted(vocab_dir.glob("ggml-vocab-*.gguf"))]
    for f in files:
        assert read(f, fast=True, fallback=False) == read(f, fast=False), f   # the scanner itself read it
    # Truncated files: where the scanner gives up, ggml's parser explains (the same error);
    # a file cut inside its tensor data still has whole metadata for both.
    data = Path(tiny_model_path).read_bytes()
    for cut in (10, 100, 1000, 4096, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut-{cut}.gguf"
        broken.write_bytes(data[:cut])
        results = []
        for fast in (True, False):
            try:
                results.append(read(broken, fast=fast))
            except pyllama.ModelLoadError as e:
                results.append(("error", str(e)))
        assert results[0] == results[1], cut


@pytest.mark.model
def test_fast_metadata_reader_on_real_models(smollm2_path, gemma_path):
    from pyllama._core import _gguf_precheck_metadata as read

    for f in (smollm2_path, gemma_path):
        fast = read(f, fast=True, fallback=False)   # None if the scanner gave up
        assert fast == read(f, fast=False)
        assert fast[1] == 0 and isinstance(fast[0]["general.architecture"], str)
