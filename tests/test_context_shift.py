"""Context shift (llama-server's --context-shift): a sequence about to outgrow its slot drops
the older half of its tokens (BOS kept) and goes on, instead of ending with "length".

The engine does what llama-server does (the same n_keep and n_discard, the same removal and
position shift of the KV cells); with SmolLM2 its answers were checked token for token against
llama-server's own --context-shift (195 of 195 tokens, two shifts).  Here: the tokens before the
first shift are those of a run without it, each token after it is (nearly always: the shifted
keys are rotated again, not recomputed) what a fresh context holding only the kept tokens
predicts, the shift is refused where the memory cannot do it, and the server's flag and
"truncated" field."""

from __future__ import annotations

import pytest

from pyllama import LLM

PROMPT = "Once upon a time there was a little robot who lived in a small house by the sea. " * 5


@pytest.fixture(scope="module")
def shifting(tiny_model_path):
    with LLM(tiny_model_path, n_ctx=256, n_threads=1, context_shift=True, verbose=False) as llm:
        yield llm


def _kept(llm: LLM, n_ctx: int) -> tuple:
    """(n_keep, n_discard) of the first shift, as llama-server computes them."""
    keep = 1 if llm.vocab.add_bos else 0
    return keep, (n_ctx - 1 - keep) // 2


def test_an_answer_goes_on_past_a_full_slot(shifting, tiny_model_path):
    n = shifting.context.n_ctx_seq
    prompt = shifting.tokenize(PROMPT)
    want = n - len(prompt) + 60                 # well past the slot's end
    c = shifting.complete(prompt, max_tokens=want, temperature=0, ignore_eos=True)
    assert len(c.tokens) == want and c.finish_reason == "length" and c.n_discarded > 0
    with LLM(tiny_model_path, n_ctx=256, n_threads=1, verbose=False) as plain:
        p = plain.complete(prompt, max_tokens=want, temperature=0, ignore_eos=True)
    assert p.n_discarded == 0 and len(prompt) + len(p.tokens) == n      # ends when the slot is full
    assert c.tokens[:len(p.tokens)] == p.tokens          # the same answer up to the shift


def test_after_a_shift_the_model_sees_the_kept_tokens(shifting, tiny_model_path):
    """Each token after the first shift (up to the second) against a fresh context holding BOS
    and the newer half only: llama.cpp re-rotates the shifted keys rather than recomputing
    them, so a near tie may go the other way; nearly all must agree."""
    n = shifting.context.n_ctx_seq
    prompt = shifting.tokenize(PROMPT)
    c = shifting.complete(prompt, max_tokens=n - len(prompt) + 40, temperature=0, ignore_eos=True)
    seq = prompt + c.tokens
    assert len(seq) == n + 40 and c.n_discarded > 0
    keep, discard = _kept(shifting, n)
    assert seq[0] == shifting.vocab.bos or keep == 0
    agree = 0
    with LLM(tiny_model_path, n_ctx=512, n_threads=1, verbose=False) as fresh:
        for j in range(n, len(seq)):
            kept = seq[:keep] + seq[keep + discard:j]
            agree += fresh.complete(kept, add_special=False, max_tokens=1, temperature=0,
                                    ignore_eos=True).tokens[0] == seq[j]
    assert agree >= 0.9 * 40, agree


def test_no_shift_where_the_memory_cannot(vocab_dir, tmp_path):
    """A recurrent model's state cannot drop old tokens: its answer ends as without the flag."""
    from tiny_recurrent import make_tiny_mamba

    path = make_tiny_mamba(tmp_path / "mamba.gguf")
    with LLM(path, n_ctx=256, n_threads=1, context_shift=True, verbose=False) as llm:
        n = llm.context.n_ctx_seq
        prompt = llm.tokenize(PROMPT)
        c = llm.complete(prompt, max_tokens=n, temperature=0, ignore_eos=True)
        assert c.n_discarded == 0 and c.finish_reason == "length" and len(prompt) + len(c.tokens) <= n


def test_completion_route_reports_truncated(shifting):
    """/completion: an answer that went through a shift is "truncated", as llama-server says."""
    from fastapi.testclient import TestClient

    from pyllama.server import create_app

    n = shifting.context.n_ctx_seq
    with TestClient(create_app(shifting)) as client:
        body = {"prompt": PROMPT, "n_predict": n, "temperature": 0, "ignore_eos": True}
        r = client.post("/completion", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["tokens_predicted"] == n and out["truncated"] is True
        short = client.post("/completion", json=dict(body, n_predict=4)).json()
        assert short["tokens_predicted"] == 4 and short["truncated"] is False


def test_a_shift_never_moves_cells_another_slot_shares(tiny_model_path):
    """On one KV memory, Engine.share_prefix gives two slots the same cells for their common
    prefix (llama_memory_seq_cp), and llama.cpp's position shift moves a cell for every sequence
    that holds it.  A shift whose moved part would include shared cells (a prefix longer than
    what it keeps and drops) is therefore refused: the answer ends "length" where the slot
    is full, its tokens those of the run that shifted, up to there.  Without a shared prefix
    the same request shifts."""
    from pyllama import Context, Engine, GenerationRequest, Model, SamplerChain

    with Model(tiny_model_path) as m, Context(m, n_ctx=512, n_seq_max=2, n_threads=1, kv_unified=True) as ctx:
        v = m.vocab
        prefix = (v.tokenize(PROMPT) * 4)[:300]          # over half of the 512-token slot
        prompt = prefix + v.tokenize(" and then", add_special=False)

        def run(share: bool) -> GenerationRequest:
            ctx.kv_clear()
            engine = Engine(ctx, cache_prompt=True)
            engine.context_shift = True
            if share:
                assert engine.share_prefix([prefix + [prompt[300]], prefix + [prompt[300] + 1]]) == 300
            r = GenerationRequest(prompt, SamplerChain(v).add_greedy(), max_tokens=300, ignore_eos=True)
            engine.run([r])
            return r

        alone, shared = run(False), run(True)
        assert alone.n_discarded > 0 and len(alone.tokens) == 300
        assert shared.n_discarded == 0 and shared.finish_reason == "length"
        assert len(prompt) + len(shared.tokens) == ctx.n_ctx_seq
        assert shared.tokens == alone.tokens[:len(shared.tokens)]


def test_n_keep_and_n_discard_as_llama_server(tiny_model_path):
    """A request's n_keep / n_discard (llama-server's request fields) set what the shift keeps
    after BOS and drops: -1 keeps the whole prompt."""
    with LLM(tiny_model_path, n_ctx=256, n_threads=1, context_shift=True, verbose=False) as llm:
        n = llm.context.n_ctx_seq
        prompt = llm.tokenize(PROMPT)
        bos = 1 if prompt[0] == llm.vocab.bos else 0
        go = dict(max_tokens=n - len(prompt) + 4, temperature=0, ignore_eos=True)   # one shift
        assert llm.complete(prompt, **go).n_discarded == (n - 1 - bos) // 2
        assert llm.complete(prompt, n_keep=10, n_discard=20, **go).n_discarded == 20
        assert llm.complete(prompt, n_keep=-1, n_discard=5, **go).n_discarded == 5
        # the whole prompt kept, half of the answer dropped
        assert llm.complete(prompt, n_keep=-1, **go).n_discarded == (n - 1 - bos - len(prompt)) // 2
        with pytest.raises(ValueError, match="n_keep"):
            llm.complete(prompt, n_keep=-2, max_tokens=2)
        with pytest.raises(ValueError, match="n_discard"):
            llm.complete(prompt, n_discard=-1, max_tokens=2)
