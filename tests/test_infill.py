"""LLM.infill and the server's /infill (pyllama.infill, pyllama.server.rank_routes).

The model is tests/tiny_model.py's random llama with FIM tokens appended to its vocabulary
(tests/tiny_fim.py: Qwen2.5-Coder's <|fim_prefix|> ... <|file_sep|>, found by llama.cpp by
their text).  The prompt is checked token by token against the layout llama-server's
format_prompt_infill documents:

    [FIM_REP]myproject\\n [FIM_SEP]{filename}\\n{text} ... [FIM_SEP]filename\\n
    [BOS][FIM_PRE]{prefix}{prompt}[FIM_SUF]{suffix}[FIM_MID]
"""

from __future__ import annotations

import asyncio
import json

import pytest

from pyllama import LLM
from pyllama.errors import InvalidTokenError
from pyllama.infill import format_infill, infill_prompt
from tiny_fim import make_tiny_fim_llama

N_CTX = 2048          # two slots of 1024
N_BATCH = 512         # budgets: prefix 384 tokens, suffix 128 - 2 - len(prompt)
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"
PROMPT = "return"
EXTRA = [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"}, {"text": "X = 1\n"}]
GREEDY = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture(scope="module")
def fim_path(vocab_dir, tmp_path_factory):
    return make_tiny_fim_llama(tmp_path_factory.mktemp("fim") / "tiny-fim.gguf", n_ctx_train=4096)


@pytest.fixture(scope="module")
def llm(fim_path):
    with LLM(fim_path, n_ctx=N_CTX, n_batch=N_BATCH, n_parallel=2, kv_unified=False, n_threads=1) as llm:
        yield llm


def tok(llm, text):
    return llm.vocab.tokenize(text, add_special=False, parse_special=False)


def repo_header(llm, chunks=()):
    """The extra-context part: [FIM_REP]myproject\\n, each chunk, [FIM_SEP]filename\\n."""
    v = llm.vocab
    out = [v.fim_rep] + tok(llm, "myproject\n")
    for c in chunks:
        out += [v.fim_sep] + tok(llm, c.get("filename", "tmp") + "\n") + tok(llm, c["text"])
    return out + [v.fim_sep] + tok(llm, "filename\n")


def fim_body(llm, prefix, suffix, prompt=""):
    v = llm.vocab
    return ([v.bos, v.fim_pre] + tok(llm, prefix) + v.tokenize(prompt, add_special=False, parse_special=True)
            + [v.fim_suf] + tok(llm, suffix) + [v.fim_mid])


# --------------------------------------------------------------------------- the prompt layout


def test_the_vocabulary_has_fim_tokens(llm):
    v = llm.vocab
    n = v.n_tokens
    assert (v.fim_pre, v.fim_suf, v.fim_mid, v.fim_pad, v.fim_rep, v.fim_sep) == tuple(range(n - 6, n))
    assert v.add_bos and v.bos == 1


def test_layout_without_extra_context(llm):
    toks = infill_prompt(llm, PREFIX, SUFFIX, prompt=PROMPT, n_predict=8)
    assert toks == repo_header(llm) + fim_body(llm, PREFIX, SUFFIX, PROMPT)
    v = llm.vocab
    # read back: the special tokens where the layout puts them
    text = llm.detokenize(toks, unparse_special=True)
    assert text.index("<|repo_name|>") < text.index("<|file_sep|>") < text.index("<s>") \
        < text.index("<|fim_prefix|>") < text.index("<|fim_suffix|>") < text.index("<|fim_middle|>")
    assert toks[-1] == v.fim_mid and toks.count(v.bos) == 1


def test_layout_with_extra_context(llm):
    toks = infill_prompt(llm, PREFIX, SUFFIX, prompt=PROMPT, extra_context=EXTRA, n_predict=8)
    assert toks == repo_header(llm, EXTRA) + fim_body(llm, PREFIX, SUFFIX, PROMPT)
    assert llm.detokenize(toks, unparse_special=True).count("<|file_sep|>") == 3   # two chunks + "filename"
    assert "<|file_sep|> tmp\n" in llm.detokenize(toks, unparse_special=True)   # llama-server's default name


def test_layout_without_repo_tokens(vocab_dir, tmp_path):
    """No FIM_REP/FIM_SEP: each chunk follows llama-server's snippet separator, and there is no
    header or trailing file name."""
    path = make_tiny_fim_llama(tmp_path / "fim3.gguf", repo_tokens=False)
    with LLM(path, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=1) as llm:
        assert (llm.vocab.fim_rep, llm.vocab.fim_sep) == (-1, -1)
        toks = infill_prompt(llm, PREFIX, SUFFIX, extra_context=EXTRA, n_predict=8)
        extra = []
        for c in EXTRA:
            extra += tok(llm, "\n\n--- snippet ---\n\n") + tok(llm, c["text"])
        assert toks == extra + fim_body(llm, PREFIX, SUFFIX)
        assert infill_prompt(llm, PREFIX, SUFFIX, n_predict=8) == fim_body(llm, PREFIX, SUFFIX)


def test_spm_infill_puts_the_suffix_first(llm):
    v = llm.vocab
    toks = infill_prompt(llm, PREFIX, SUFFIX, prompt=PROMPT, spm_infill=True, n_predict=8)
    assert toks == repo_header(llm) + ([v.bos, v.fim_suf] + tok(llm, SUFFIX) + [v.fim_pre] + tok(llm, PREFIX)
                                       + tok(llm, PROMPT) + [v.fim_mid])


def test_mixed_prefix_and_special_tokens(llm):
    v = llm.vocab
    ids = tok(llm, "x = ")
    toks = infill_prompt(llm, ["def f():", *ids], "pass", n_predict=8)
    assert toks == repo_header(llm) + [v.bos, v.fim_pre] + tok(llm, "def f():") + ids + [v.fim_suf] \
        + tok(llm, "pass") + [v.fim_mid]
    # prefix and suffix are text: a spelled control token stays text; the prompt is parsed
    spelled = infill_prompt(llm, "a <|fim_middle|> b", "c", prompt="<|fim_pad|>", n_predict=8)
    assert spelled.count(v.fim_mid) == 1 and spelled.count(v.fim_pad) == 1


def test_budgets_cut_as_llama_server_does(llm):
    """prefix: its last 3*(n_batch//4) tokens; suffix: its first n_batch//4 - 2 - len(prompt);
    extra context: its last n_ctx - n_batch - 2*n_predict tokens (n_ctx: one slot)."""
    v = llm.vocab
    n_ctx = llm.context.n_ctx_seq
    assert n_ctx == 1024
    prefix = "".join(f"line{i} = {i}\n" for i in range(300))
    suffix = "".join(f"after{i}()\n" for i in range(300))
    extra = [{"filename": f"f{i}.py", "text": f"value_{i} = {i * 7}\n" * 5} for i in range(40)]
    p, s = tok(llm, prefix), tok(llm, suffix)
    assert len(p) > 384 and len(s) > 128
    prompt_toks = tok(llm, PROMPT)
    n_predict = 100
    toks = infill_prompt(llm, prefix, suffix, prompt=PROMPT, extra_context=extra, n_predict=n_predict)
    header = repo_header(llm, extra)
    n_extra = n_ctx - N_BATCH - 2 * n_predict
    assert len(header) > n_extra
    body = ([v.bos, v.fim_pre] + p[-384:] + prompt_toks + [v.fim_suf] + s[:128 - 2 - len(prompt_toks)]
            + [v.fim_mid])
    assert toks == header[-n_extra:] + body
    # n_predict grows: less extra context; none once 2*n_predict >= n_ctx - n_batch
    assert len(infill_prompt(llm, prefix, suffix, prompt=PROMPT, extra_context=extra, n_predict=200)) \
        == len(body) + n_extra - 200
    assert infill_prompt(llm, prefix, suffix, prompt=PROMPT, extra_context=extra, n_predict=256) == body


def test_format_infill_directly(llm):
    """The pure function, with llama-server's arithmetic on odd numbers (C integer division)."""
    v = llm.vocab
    pre, suf, prm = list(range(1000, 1100)), list(range(2000, 2100)), [3000, 3001]
    out = format_infill(v, pre, suf, [], prm, n_batch=50, n_predict=10, n_ctx=100)
    # 3*(50//4) = 36 of the prefix; 50//4 - 2 - 2 = 8 of the suffix; the header's last
    # min(100 - 50 - 20, len) = 30 tokens, but the guard keeps the prompt under 100
    hdr = [v.fim_rep] + tok(llm, "myproject\n") + [v.fim_sep] + tok(llm, "filename\n")
    body = [v.bos, v.fim_pre] + pre[-36:] + prm + [v.fim_suf] + suf[:8] + [v.fim_mid]
    assert out == hdr[-min(30, len(hdr), 99 - len(body)):] + body
    # the guard: a prompt one token short of n_ctx at most
    tight = format_infill(v, pre, suf, [("a.py", "x = 1\n" * 50)], prm, n_batch=50, n_predict=-1, n_ctx=60)
    assert len(tight) == 59 and tight[-len(body):] == body


def test_a_large_batch_leaves_room_to_generate(fim_path):
    """n_batch larger than half a slot: the budgets use half a slot, so a long prefix, suffix
    and extra context still leave room for the answer (llama-server would fill the slot)."""
    with LLM(fim_path, n_ctx=1024, n_batch=1024, n_threads=1) as llm:
        prefix = "".join(f"line{i} = {i}\n" for i in range(400))
        suffix = "".join(f"after{i}()\n" for i in range(400))
        extra = [{"text": "y = 2\n" * 200}]
        toks = infill_prompt(llm, prefix, suffix, extra_context=extra)
        assert len(toks) < 1024
        assert toks.index(llm.vocab.fim_pre) + 1 + 3 * (512 // 4) == toks.index(llm.vocab.fim_suf)
        c = llm.infill(prefix, suffix, extra_context=extra, max_tokens=4, temperature=0.0)
        assert len(c.tokens) == 4


# --------------------------------------------------------------------------- generation


def test_generation_is_a_completion_of_the_layout(llm):
    c = llm.infill(PREFIX, SUFFIX, prompt=PROMPT, extra_context=EXTRA, **GREEDY)
    toks = infill_prompt(llm, PREFIX, SUFFIX, prompt=PROMPT, extra_context=EXTRA, n_predict=8)
    ref = llm.complete(toks, **GREEDY)
    assert c.prompt_tokens == len(toks)
    assert (c.text, c.tokens, c.finish_reason) == (ref.text, ref.tokens, ref.finish_reason)
    assert len(c.tokens) == 8 and c.text
    # the extra context is part of the prompt
    plain = llm.infill(PREFIX, SUFFIX, prompt=PROMPT, **GREEDY)
    assert plain.prompt_tokens < c.prompt_tokens
    # streamed: the same text, piece by piece
    pieces = list(llm.infill(PREFIX, SUFFIX, prompt=PROMPT, extra_context=EXTRA, stream=True, **GREEDY))
    assert len(pieces) > 1 and "".join(pieces) == c.text
    # complete()'s other arguments work too
    seen = []
    llm.infill(PREFIX, SUFFIX, callback=seen.append, **GREEDY)
    assert "".join(seen) == llm.infill(PREFIX, SUFFIX, **GREEDY).text


def test_errors(llm, tiny_model_path):
    with LLM(tiny_model_path, n_ctx=256, n_threads=1) as plain:
        with pytest.raises(ValueError, match="Infill is not supported by this model: prefix token is missing"):
            plain.infill(PREFIX, SUFFIX)
    for extra, exc, match in (
            ([{"filename": "a.py"}], ValueError, r"extra_context\[0\] must have a 'text'"),
            ([{"text": 1}], ValueError, "'text' string"),
            ([{"text": "x", "filename": 3}], ValueError, "filename"),
            ([{"text": "x", "file": "a"}], ValueError, "unknown keys"),
            (["just text"], TypeError, r"extra_context\[0\]"),
            ({"text": "x"}, TypeError, "list of"),
    ):
        with pytest.raises(exc, match=match):
            llm.infill(PREFIX, SUFFIX, extra_context=extra, **GREEDY)
    with pytest.raises(TypeError, match="prefix"):
        llm.infill(5, SUFFIX)
    with pytest.raises(TypeError, match="suffix"):
        llm.infill(PREFIX, [1.5])
    with pytest.raises(InvalidTokenError):
        llm.infill([llm.vocab.n_tokens + 5], SUFFIX)
    with pytest.raises(TypeError, match="prompt"):
        llm.infill(PREFIX, SUFFIX, prompt=3)
    with pytest.raises(TypeError, match="temprature"):
        llm.infill(PREFIX, SUFFIX, temprature=0)
    assert llm.infill(PREFIX, SUFFIX, **GREEDY).text       # still usable


# --------------------------------------------------------------------------- the server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

BODY = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": PROMPT, "input_extra": EXTRA,
        "n_predict": 8, "temperature": 0}


def _post(app, path, body):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post(path, json=body)
    return asyncio.run(asyncio.wait_for(go(), 120))


@pytest.fixture(scope="module")
def app(llm):
    from pyllama.server import create_app

    return create_app(llm)


def test_server_infill(app, llm):
    r = _post(app, "/infill", BODY)
    assert r.status_code == 200, r.text
    body = r.json()
    ref = llm.infill(PREFIX, SUFFIX, prompt=PROMPT, extra_context=EXTRA, **GREEDY)
    toks = infill_prompt(llm, PREFIX, SUFFIX, prompt=PROMPT, extra_context=EXTRA, n_predict=8)
    assert body["content"] == ref.text and body["tokens"] == ref.tokens
    assert body["stop"] is True and body["stop_type"] == "limit" and body["index"] == 0
    assert body["tokens_predicted"] == 8 and body["tokens_evaluated"] == len(toks)
    assert body["prompt"] == llm.detokenize(toks, unparse_special=True)
    assert body["model"] == "tiny-fim.gguf"
    assert body["generation_settings"]["n_predict"] == 8 and body["generation_settings"]["temperature"] == 0
    assert body["timings"]["predicted_n"] >= 1 and "prompt_ms" in body["timings"]
    assert body["has_new_line"] == ("\n" in ref.text)
    # without input_extra and prompt (both optional)
    r = _post(app, "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["content"] == llm.infill(PREFIX, SUFFIX, max_tokens=4, temperature=0.0).text
    assert r.json()["tokens_evaluated"] == len(infill_prompt(llm, PREFIX, SUFFIX, n_predict=4))


def test_server_infill_stream(app):
    whole = _post(app, "/infill", BODY).json()
    r = _post(app, "/infill", dict(BODY, stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in r.text                  # llama-server's own routes end without it
    events = [json.loads(line[len("data: "):]) for line in r.text.split("\n\n") if line.startswith("data: ")]
    *pieces, last = events
    assert pieces and all(e["stop"] is False for e in pieces)
    assert "".join(e["content"] for e in pieces) == whole["content"]
    assert [t for e in pieces for t in e["tokens"]] == whole["tokens"]
    assert pieces[-1]["tokens_predicted"] == 8 and pieces[0]["tokens_evaluated"] == whole["tokens_evaluated"]
    assert last["stop"] is True and last["content"] == "" and last["tokens"] == []
    assert last["stop_type"] == "limit" and last["tokens_predicted"] == 8 and "timings" in last


def test_server_response_fields(app):
    r = _post(app, "/infill", dict(BODY, response_fields=["content", "timings/predicted_n", "no/such"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"content", "timings/predicted_n"} and body["timings/predicted_n"] >= 1


def test_server_accepts_editor_plugin_fields(app):
    """llama.vim's request (id_slot, samplers, n_indent, t_max_*): accepted."""
    body = dict(BODY, id_slot=0, samplers=["top_k", "top_p", "infill"], n_indent=4, t_max_prompt_ms=500,
                t_max_predict_ms=1000, top_k=40, top_p=0.9, cache_prompt=True, stop=["\n\n\n"])
    r = _post(app, "/infill", body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("change,param", [
    ({"input_extra": [{}]}, "input_extra.0.text"),
    ({"input_extra": [{"filename": "ok"}]}, "input_extra.0.text"),
    ({"input_extra": [{"filename": 123}]}, None),
    ({"input_extra": [{"filename": 123, "text": "abc"}]}, "input_extra.0.filename"),
    ({"input_extra": [{"filename": 123, "text": 456}]}, None),
    ({"input_extra": {"text": "abc"}}, "input_extra"),
    ({"input_prefix": None}, "input_prefix"),
    ({"input_suffix": 5}, "input_suffix"),
    ({"prompt": 5}, "prompt"),
    ({"n": 2}, "n"),
    ({"input_prefix": [10 ** 9]}, "input_prefix"),
    ({"n_predit": 4}, "n_predit"),
])
def test_server_bad_requests(app, change, param):
    body = {k: v for k, v in dict(BODY, **change).items() if v is not None}
    r = _post(app, "/infill", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_server_missing_fields(app):
    for name in ("input_prefix", "input_suffix"):
        body = {k: v for k, v in BODY.items() if k != name}
        r = _post(app, "/infill", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text


def test_server_model_without_fim_tokens_is_501(tiny_model_path):
    from pyllama.server import create_app

    with LLM(tiny_model_path, n_ctx=256, n_threads=1) as plain:
        r = _post(create_app(plain), "/infill", BODY)
    assert r.status_code == 501, r.text
    err = r.json()["error"]
    assert err["type"] == "not_supported_error" and "Infill is not supported" in err["message"]


def test_pyllama_serve_infills(fim_path, llm):
    """`pyllama serve` with a FIM model: /infill gives the library's greedy answer."""
    from server_process import ServerProcess

    server = ServerProcess("-m", str(fim_path), "-np", "2", "-c", str(N_CTX), "-b", str(N_BATCH), "-t", "1")
    try:
        url = server.wait_ready(timeout=120)
        r = httpx.post(url + "/infill", json=BODY, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
    finally:
        assert server.stop() == 0, server.stderr[-3000:]
    ref = llm.infill(PREFIX, SUFFIX, prompt=PROMPT, extra_context=EXTRA, **GREEDY)
    assert body["tokens_evaluated"] == ref.prompt_tokens
    assert body["content"] == ref.text
