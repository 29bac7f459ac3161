"""LLM.rerank and the server's /rerank routes (pyllama.rerank, pyllama.server.rank_routes).

The models are tiny random-weight BERT rerankers (tests/tiny_bert.py, tests/tiny_rerank.py)
with bge's real WordPiece vocabulary.  Scores are checked against llama.cpp's own
``llama_get_embeddings_seq`` on a rank-pooling context made with pyllama._core, for the token
layout llama-server documents (format_prompt_rerank): ``[CLS] query [SEP] document`` for a
BERT vocabulary (BOS, no EOS, SEP), or the GGUF's rerank template.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pyllama import LLM, Batch, Context, Model
from pyllama.errors import ContextLengthError
from pyllama.rerank import RerankResult, pair_tokens
from pyllama.scheduler import ClosedError
from tiny_bert import make_tiny_bert, make_tiny_reranker
from tiny_rerank import make_headless_ranker, make_tiny_reranker_with_template

N_CTX = 512
QUERY = "what is a cat?"
DOCS = ["The cat sat on the mat.", "a dog barks", "ok", "Cats are small felines that purr.", "Paris, France"]
TEMPLATE = "[CLS]query: {query}[SEP]document: {document}[SEP]"


@pytest.fixture(scope="module")
def reranker_path(vocab_dir, tmp_path_factory):
    return make_tiny_reranker(tmp_path_factory.mktemp("rerank") / "tiny-reranker.gguf")


@pytest.fixture(scope="module")
def template_path(vocab_dir, tmp_path_factory):
    return make_tiny_reranker_with_template(tmp_path_factory.mktemp("rerank-tpl") / "tiny-rerank-tpl.gguf",
                                            TEMPLATE)


@pytest.fixture(scope="module")
def llm(reranker_path):
    with LLM(reranker_path, embedding=True, n_ctx=N_CTX, n_batch=N_CTX, n_threads=1, n_parallel=2,
             kv_unified=False) as llm:
        yield llm


def reference_scores(path, pairs, n_batch=N_CTX):
    """llama.cpp's scores of token sequences: one rank-pooling decode, the first float of
    llama_get_embeddings_seq per sequence."""
    with Model(str(path)) as m, Context(m, embeddings=True, pooling="rank", n_ctx=N_CTX, n_batch=n_batch,
                                        n_ubatch=n_batch, n_seq_max=len(pairs), n_threads=1) as ctx:
        b = Batch(n_batch, len(pairs))
        b.add_sequences(pairs, logits_all=True)
        ctx.decode(b)
        return [float(ctx.embeddings_seq(s)[0]) for s in range(len(pairs))]


def bert_layout(vocab, query, doc):
    """llama-server's layout for a BERT vocabulary (add_bos, add_sep, no add_eos)."""
    return ([vocab.bos] + vocab.tokenize(query, add_special=False) + [vocab.sep]
            + vocab.tokenize(doc, add_special=False))


# --------------------------------------------------------------------------- the prompt layout


def test_pair_layout_is_llama_servers(llm):
    v = llm.vocab
    assert (v.bos, v.sep, v.eos, v.add_bos, v.add_eos) == (101, 102, -1, True, False)   # [CLS] [SEP], no EOS
    toks = pair_tokens(llm, QUERY, DOCS[0])
    assert toks == bert_layout(v, QUERY, DOCS[0])
    assert toks[0] == 101 and toks.count(102) == 1 and toks[-1] != 102
    # the query and document are text: a "[SEP]" inside them is not the separator token
    spelled = pair_tokens(llm, "a [SEP] b", "c [CLS] d")
    assert spelled.count(102) == 1 and spelled.count(101) == 1


def test_the_rerank_template_when_the_gguf_has_one(template_path):
    with LLM(template_path, embedding=True, n_ctx=N_CTX, n_batch=N_CTX, n_threads=1) as llm:
        assert llm.model.chat_template("rerank") == TEMPLATE
        v = llm.vocab
        toks = pair_tokens(llm, QUERY, DOCS[0])
        filled = TEMPLATE.replace("{query}", QUERY).replace("{document}", DOCS[0])
        assert toks == v.tokenize(filled, add_special=False, parse_special=True)
        assert toks[0] == 101 and toks.count(102) == 2 and toks[-1] == 102    # the template's own markup
        assert toks != bert_layout(v, QUERY, DOCS[0])
        results = llm.rerank(QUERY, DOCS)
        ref = reference_scores(template_path, [pair_tokens(llm, QUERY, d) for d in DOCS])
        assert sorted(r.relevance_score for r in results) == sorted(ref)
        for r in results:
            assert r.relevance_score == ref[r.index]


# --------------------------------------------------------------------------- scores and order


def test_scores_equal_llama_get_embeddings_seq(reranker_path):
    """The very floats llama.cpp gives for the same pairs in the same batch."""
    with LLM(reranker_path, embedding=True, n_ctx=N_CTX, n_batch=N_CTX, n_threads=1) as llm:
        results = llm.rerank(QUERY, DOCS)
        pairs = [bert_layout(llm.vocab, QUERY, d) for d in DOCS]
    ref = reference_scores(reranker_path, pairs)
    assert len(set(ref)) == len(DOCS), ref                     # distinct: the order means something
    assert [r.index for r in results] == sorted(range(len(DOCS)), key=lambda i: -ref[i])
    for r in results:
        assert isinstance(r, RerankResult)
        assert r.relevance_score == ref[r.index]
        assert r.document == DOCS[r.index]
        assert r.n_tokens == len(pairs[r.index])


def test_order_top_n_and_ties(llm):
    full = llm.rerank(QUERY, DOCS)
    scores = [r.relevance_score for r in full]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r.index for r in full) == list(range(len(DOCS)))
    assert llm.rerank(QUERY, DOCS, top_n=2) == full[:2]
    assert llm.rerank(QUERY, DOCS, top_n=99) == full
    assert llm.rerank(QUERY, DOCS, top_n=1)[0].relevance_score == max(scores)
    # equal documents score equally and keep their order
    same = llm.rerank(QUERY, ["same text", "same text", "same text"])
    assert [r.index for r in same] == [0, 1, 2]
    assert len({r.relevance_score for r in same}) == 1
    assert llm.rerank(QUERY, []) == []
    assert full[0].to_dict() == {"index": full[0].index, "relevance_score": full[0].relevance_score,
                                 "document": full[0].document}


def test_more_documents_than_one_round(llm):
    """70 documents: more sequences than one batch round takes (64); every score is the
    document's own (to rounding: other rounds, other matmul shapes)."""
    docs = [f"document number {i} about {'cats' if i % 3 else 'dogs'}" for i in range(70)]
    ranked = llm.rerank(QUERY, docs)
    assert sorted(r.index for r in ranked) == list(range(70))
    alone = {i: llm.rerank(QUERY, [docs[i]])[0].relevance_score for i in (0, 1, 63, 64, 69)}
    by_index = {r.index: r.relevance_score for r in ranked}
    for i, score in alone.items():
        np.testing.assert_allclose(by_index[i], score, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- errors


def test_models_that_cannot_rank(reranker_path, tiny_model_path, tmp_path):
    cls_bert = make_tiny_bert(tmp_path / "bert.gguf")
    with LLM(cls_bert, embedding=True, n_threads=1) as llm:
        with pytest.raises(ValueError, match=r"pools with 'cls', not 'rank'"):
            llm.rerank(QUERY, DOCS)
    with LLM(make_headless_ranker(tmp_path / "headless.gguf"), embedding=True, n_threads=1) as llm:
        with pytest.raises(ValueError, match="no classification head"):
            llm.rerank(QUERY, DOCS)
    with LLM(tiny_model_path, embedding=True, n_ctx=256, n_threads=1) as llm:   # a decoder LM
        with pytest.raises(ValueError, match=r"pools with 'none', not 'rank'"):
            llm.rerank(QUERY, DOCS)
    with LLM(reranker_path, n_threads=1) as llm:                                  # no embedding=True
        with pytest.raises(ValueError, match=r"embedding=True"):
            llm.rerank(QUERY, DOCS)


def test_rank_pooling_asked_for_when_loading(tmp_path):
    """LLM(pooling="rank") (llama-server's --pooling rank / --reranking): a model with a
    classification head whose GGUF says CLS pooling ranks; one without a head is refused."""
    import inspect

    if "pooling" not in inspect.signature(LLM.__init__).parameters:
        pytest.skip("this LLM has no pooling option")
    import gguf

    headed = make_tiny_bert(tmp_path / "headed.gguf", pooling=gguf.PoolingType.CLS, classifier_labels=["LABEL_0"])
    with LLM(headed, embedding=True, n_ctx=N_CTX, n_batch=N_CTX, n_threads=1) as llm:
        with pytest.raises(ValueError, match=r"pools with 'cls'"):
            llm.rerank(QUERY, DOCS)
    with LLM(headed, embedding=True, pooling="rank", n_ctx=N_CTX, n_batch=N_CTX, n_threads=1) as llm:
        results = llm.rerank(QUERY, DOCS)
        pairs = [bert_layout(llm.vocab, QUERY, d) for d in DOCS]
    ref = reference_scores(headed, pairs)
    assert [r.relevance_score for r in sorted(results, key=lambda r: r.index)] == ref
    with LLM(make_tiny_bert(tmp_path / "plain.gguf"), embedding=True, pooling="rank", n_threads=1) as llm:
        with pytest.raises(ValueError, match="no classification head"):
            llm.rerank(QUERY, DOCS)


def test_bad_arguments(llm, reranker_path):
    with pytest.raises(TypeError, match="query"):
        llm.rerank(5, DOCS)
    with pytest.raises(TypeError, match="not one string"):
        llm.rerank(QUERY, "a document")
    with pytest.raises(TypeError, match=r"documents\[1\]"):
        llm.rerank(QUERY, ["ok", 2])
    for top_n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top_n"):
            llm.rerank(QUERY, DOCS, top_n=top_n)
    with pytest.raises(ContextLengthError):
        llm.rerank(QUERY, ["word " * 600])
    assert len(llm.rerank(QUERY, DOCS)) == len(DOCS)     # still usable
    closed = LLM(reranker_path, embedding=True, n_threads=1)
    closed.close()
    with pytest.raises(ClosedError):
        closed.rerank(QUERY, DOCS)


# --------------------------------------------------------------------------- the server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


def _post(app, path, body):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post(path, json=body)
    return asyncio.run(asyncio.wait_for(go(), 120))


def _error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def app(llm):
    from pyllama.server import create_app

    return create_app(llm)


@pytest.mark.parametrize("route", ["/v1/rerank", "/rerank", "/v1/reranking", "/reranking"])
def test_server_rerank_shape(app, llm, route):
    r = _post(app, route, {"query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    ranked = llm.rerank(QUERY, DOCS)
    assert body["object"] == "list" and body["model"] == "tiny-reranker.gguf"
    assert body["results"] == [{"index": x.index, "relevance_score": x.relevance_score} for x in ranked]
    n = sum(x.n_tokens for x in ranked)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}


@pytest.mark.parametrize("top_n,expected", [(None, len(DOCS)), (2, 2), (len(DOCS), len(DOCS)), (99, len(DOCS))])
def test_server_top_n(app, llm, top_n, expected):
    body = {"query": QUERY, "documents": DOCS, "model": "my-reranker"}
    if top_n is not None:
        body["top_n"] = top_n
    r = _post(app, "/v1/rerank", body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [x.index for x in llm.rerank(QUERY, DOCS)][:expected]
    assert r.json()["model"] == "my-reranker"          # the request's model name, as llama-server
    n = sum(x.n_tokens for x in llm.rerank(QUERY, DOCS))
    assert r.json()["usage"]["prompt_tokens"] == n     # every document was scored


def test_server_tei_and_documents_formats(app, llm):
    ranked = llm.rerank(QUERY, DOCS)
    r = _post(app, "/rerank", {"query": QUERY, "texts": DOCS})
    assert r.status_code == 200, r.text
    assert r.json() == [{"index": x.index, "score": x.relevance_score} for x in ranked]
    r = _post(app, "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True, "top_n": 2})
    assert r.json() == [{"index": x.index, "score": x.relevance_score, "text": x.document} for x in ranked[:2]]
    r = _post(app, "/v1/rerank", {"query": QUERY, "documents": DOCS, "return_documents": True})
    assert [x["document"] for x in r.json()["results"]] == [{"text": x.document} for x in ranked]


@pytest.mark.parametrize("body,param", [
    ({"query": QUERY, "documents": []}, "documents"),
    ({"query": QUERY, "documents": None}, "documents"),
    ({"query": QUERY, "documents": 123}, "documents"),
    ({"query": QUERY, "documents": [1, 2, 3]}, "documents.0"),
    ({"query": QUERY}, "documents"),
    ({"documents": DOCS}, "query"),
    ({"query": 5, "documents": DOCS}, "query"),
    ({"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n"),
    ({"query": QUERY, "documents": DOCS, "top_k": 2}, "top_k"),
    ({"query": QUERY, "documents": DOCS, "texts": DOCS}, None),
    ({"query": QUERY, "documents": ["word " * 600]}, "documents"),
])
def test_server_bad_requests(app, body, param):
    _error(_post(app, "/v1/rerank", body), 400, param)


def test_server_model_that_cannot_rank_is_501(tiny_model_path):
    from pyllama.server import create_app

    with LLM(tiny_model_path, embedding=True, n_ctx=256, n_threads=1) as llm:
        err = _error(_post(create_app(llm), "/v1/rerank", {"query": QUERY, "documents": DOCS}), 501)
    assert err["type"] == "not_supported_error" and "cannot rerank" in err["message"]


def test_pyllama_serve_reranks(reranker_path):
    """`pyllama serve -m reranker.gguf` (no flag: the pooling comes from the GGUF) answers
    /v1/rerank as the library ranks."""
    from server_process import ServerProcess

    server = ServerProcess("-m", str(reranker_path), "-np", "2", "-c", "1024", "-t", "1")
    try:
        url = server.wait_ready(timeout=120)
        r = httpx.post(url + "/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 3}, timeout=60)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
    finally:
        assert server.stop() == 0, server.stderr[-3000:]
    with LLM(reranker_path, embedding=True, n_ctx=N_CTX, n_batch=N_CTX, n_threads=1) as llm:
        ranked = llm.rerank(QUERY, DOCS, top_n=3)
    assert [x["index"] for x in results] == [x.index for x in ranked]
    np.testing.assert_allclose([x["relevance_score"] for x in results], [x.relevance_score for x in ranked],
                               rtol=1e-4, atol=1e-5)
