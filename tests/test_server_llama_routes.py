"""llama-server's own routes (src/pyllama/server/llama_routes.py) and `pyllama serve`'s
llama-server flags: /completion (shapes, prompts, streaming, n_probs, logit_bias, errors),
/embedding (pooled and per token), /props, /apply-template, /slots/{id} actions, --no-slots,
and the flags' translation into LLM(...) arguments and server settings.

In-process (httpx.ASGITransport) on the tiny random llama and the tiny random BERT; one
`pyllama serve` process for the flags as the command line gives them."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from pyllama import LLM  # noqa: E402
from pyllama.server.app import create_app  # noqa: E402

PROMPT = "Once upon a time"


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120)


def call(app, method, path, **kw):
    async def go():
        async with _client(app) as c:
            return await c.request(method, path, **kw)
    return asyncio.run(asyncio.wait_for(go(), 120))


def post(app, path, body):
    return call(app, "POST", path, json=body)


def events(response):
    """The JSON objects of an SSE body (llama-server's /completion stream has no [DONE])."""
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            assert line != "data: [DONE]", "/completion streams end without [DONE]"
            out.append(json.loads(line[6:]))
    return out


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_path):
    llm = LLM(tiny_model_path, n_ctx=512, n_parallel=2, kv_unified=False, embedding=True)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def app(tiny_llm):
    return create_app(tiny_llm, sampling_defaults={"seed": 42, "temperature": 0.8})


def greedy(body=None, **kw):
    out = {"prompt": PROMPT, "n_predict": 6, "temperature": 0, "ignore_eos": True}
    out.update(body or {}, **kw)
    return out


# --------------------------------------------------------------------------- /completion


def test_completion_has_llama_servers_shape(app, tiny_llm):
    r = post(app, "/completion", greedy(return_tokens=True))
    assert r.status_code == 200, r.text
    b = r.json()
    n_prompt = len(tiny_llm.tokenize(PROMPT, add_special=True, parse_special=True))
    assert isinstance(b["content"], str) and len(b["tokens"]) == 6
    assert tiny_llm.detokenize(b["tokens"]) == b["content"]
    assert b["stop"] is True and b["stop_type"] == "limit" and b["stopping_word"] == ""
    assert b["tokens_predicted"] == 6 and b["tokens_evaluated"] == n_prompt
    assert b["timings"]["predicted_n"] == 6
    assert b["timings"]["prompt_n"] + b["timings"]["cache_n"] == n_prompt
    assert b["truncated"] is False and isinstance(b["has_new_line"], bool)
    gs = b["generation_settings"]
    assert gs["n_predict"] == 6 and gs["temperature"] == 0 and gs["seed"] == 42
    assert "adaptive_target" in gs and "adaptive_decay" in gs
    # ignore_eos shows as bans (null: -inf) of the end-of-generation tokens, as in llama-server
    eog = [t for t in range(tiny_llm.vocab.n_tokens) if tiny_llm.vocab.is_eog(t)]
    assert gs["ignore_eos"] is True and gs["logit_bias"] == [{"bias": None, "token": t} for t in eog]
    assert post(app, "/completion", greedy(ignore_eos=False)).json()["generation_settings"]["logit_bias"] == []
    assert b["prompt"].endswith(PROMPT)
    # without return_tokens, no tokens (as llama-server)
    assert post(app, "/completion", greedy()).json()["tokens"] == []


def test_timings_rates_count_decode_steps(app):
    """As llama-server: the first token comes from the prompt's logits, so the generation rate
    is over n - 1 steps; draft_n appears only when something was drafted."""
    one = post(app, "/completion", greedy(n_predict=1)).json()["timings"]
    assert one["predicted_n"] == 1 and one["predicted_per_second"] == 0 and one["predicted_per_token_ms"] == 0
    t = post(app, "/completion", greedy(n_predict=6, **{"speculative.p_min": 0.5})).json()["timings"]
    assert t["predicted_n"] == 6 and "draft_n" not in t
    assert math.isclose(t["predicted_per_second"], 1000.0 * 5 / t["predicted_ms"])
    assert math.isclose(t["predicted_per_token_ms"], t["predicted_ms"] / 5)


def test_completion_equals_the_openai_route_and_the_alias(app):
    native = post(app, "/completion", greedy()).json()["content"]
    assert post(app, "/completions", greedy()).json()["content"] == native
    oai = post(app, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert oai.json()["choices"][0]["text"] == native


def test_prompt_forms(app, tiny_llm):
    ids = tiny_llm.tokenize(PROMPT, add_special=True, parse_special=True)
    want = post(app, "/completion", greedy()).json()["content"]
    assert post(app, "/completion", greedy(prompt=ids)).json()["content"] == want
    assert post(app, "/completion", greedy(prompt={"prompt_string": PROMPT})).json()["content"] == want
    both = post(app, "/completion", greedy(prompt=[ids, PROMPT])).json()
    assert isinstance(both, list) and [x["content"] for x in both] == [want, want]
    assert [x["index"] for x in both] == [0, 1]
    # ids and text in one prompt: the text is tokenized without BOS after an id
    mixed = post(app, "/completion", greedy(prompt=[ids[0], PROMPT], return_tokens=True))
    assert mixed.status_code == 200 and mixed.json()["tokens_evaluated"] == 1 + len(
        tiny_llm.tokenize(PROMPT, add_special=False, parse_special=True))


@pytest.mark.parametrize("prompt,param", [
    ([], "prompt"),
    ([{"x": 1}], "prompt"),
    ([3.5], "prompt"),
    ([1, 10**9], "prompt"),
    ({"prompt_string": "hi", "multimodal_data": ["AAAA"]}, "prompt"),
])
def test_bad_prompts_are_400(app, prompt, param):
    assert_error(post(app, "/completion", {"prompt": prompt}), 400, param)


def test_post_sampling_probs(app):
    """post_sampling_probs: completion_probabilities hold "prob"/"top_probs" (probabilities, as
    llama-server), of the distribution the sampler chain left: with top_k=3 at most three
    alternatives, summing to 1; the sampled token's prob is among them."""
    body = {"prompt": "Once upon a time", "n_predict": 4, "n_probs": 10, "temperature": 1.0, "top_k": 3,
            "seed": 7, "post_sampling_probs": True}
    for stream in (False, True):
        r = post(app, "/completion", dict(body, stream=stream))
        assert r.status_code == 200, r.text
        objs = [e for e in events(r) if e.get("completion_probabilities")] if stream else [r.json()]
        entries = [e for o in objs for e in o["completion_probabilities"]]
        assert len(entries) == 4
        for e in entries:
            assert "logprob" not in e and 0 < e["prob"] <= 1 and 1 <= len(e["top_probs"]) <= 3
            assert sum(t["prob"] for t in e["top_probs"]) == pytest.approx(1.0, abs=1e-5)
            assert e["prob"] == pytest.approx(next(t["prob"] for t in e["top_probs"] if t["id"] == e["id"]))
    plain = post(app, "/completion", dict(body, post_sampling_probs=False)).json()["completion_probabilities"]
    assert all("logprob" in e and len(e["top_logprobs"]) == 10 for e in plain)


def test_bad_fields_are_400(app):
    assert_error(post(app, "/completion", greedy(temprature=1)), 400, "temprature")
    assert_error(post(app, "/completion", greedy(samplers=["temperature", "top_k"])), 400, "samplers")
    assert_error(post(app, "/completion", greedy(n_probs=21)), 400, "n_probs")
    assert_error(post(app, "/completion", greedy(logit_bias=[[1]])), 400, "logit_bias")
    assert_error(call(app, "POST", "/completion", content=b"{nope", headers={"content-type": "application/json"}),
                 400)
    # llama-server's own default order is accepted
    order = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]
    assert post(app, "/completion", greedy(samplers=order)).status_code == 200


def test_prompt_longer_than_a_slot(app, tiny_llm):
    r = post(app, "/completion", {"prompt": "hello " * 400})
    err = assert_error(r, 400, "prompt")
    assert "exceeds the available context size" in err["message"]
    assert err["n_ctx"] == tiny_llm.context.n_ctx_seq and err["n_prompt_tokens"] >= 256


def test_stream_one_event_per_token(app):
    want = post(app, "/completion", greedy()).json()
    r = post(app, "/completion", greedy(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r)
    parts, final = evs[:-1], evs[-1]
    assert len(parts) == 6 and all(len(e["tokens"]) == 1 and e["stop"] is False for e in parts)
    assert [e["tokens_predicted"] for e in parts] == [1, 2, 3, 4, 5, 6]
    assert "".join(e["content"] for e in parts) == want["content"]
    assert final["stop"] is True and final["content"] == "" and final["stop_type"] == "limit"
    assert final["timings"]["predicted_n"] == 6 and final["generation_settings"]["stream"] is True


def test_n_probs(app):
    b = post(app, "/completion", greedy(n_probs=3)).json()
    probs = b["completion_probabilities"]
    assert len(probs) == 6
    for p in probs:
        assert p["logprob"] <= 0 and isinstance(p["bytes"], list) and len(p["top_logprobs"]) == 3
        # greedy: the chosen token is the most likely one
        assert p["id"] == p["top_logprobs"][0]["id"]
    streamed = [e for e in events(post(app, "/completion", greedy(n_probs=3, stream=True))) if not e["stop"]]
    assert all(len(e["completion_probabilities"]) == 1 for e in streamed)
    assert [e["completion_probabilities"][0]["id"] for e in streamed] == [p["id"] for p in probs]


def test_logit_bias_forms_ban_tokens(app, tiny_llm):
    first = post(app, "/completion", greedy(n_predict=1, return_tokens=True)).json()["tokens"][0]
    for bias in ([[first, False]], [[first, -100]], {str(first): -100}):
        got = post(app, "/completion", greedy(n_predict=1, return_tokens=True, logit_bias=bias))
        assert got.status_code == 200, got.text
        assert got.json()["tokens"][0] != first, bias
    text = tiny_llm.detokenize([first])
    banned = tiny_llm.tokenize(text, add_special=False)
    if banned == [first]:       # a text key bans its tokens
        got = post(app, "/completion", greedy(n_predict=1, return_tokens=True, logit_bias=[[text, False]]))
        assert got.json()["tokens"][0] != first


def test_stop_word_and_response_fields(app):
    text = post(app, "/completion", greedy(n_predict=8)).json()["content"]
    word = text[len(text) // 2:][:3]
    if not word.strip():
        pytest.skip("the tiny model's text has no usable stop word")
    b = post(app, "/completion", greedy(n_predict=8, stop=[word])).json()
    assert b["stop_type"] == "word" and b["stopping_word"] == word
    assert text.startswith(b["content"] + word)
    six = post(app, "/completion", greedy()).json()["content"]
    r = post(app, "/completion", greedy(response_fields=["content", "generation_settings/n_predict", "nothing"]))
    assert r.json() == {"content": six, "generation_settings/n_predict": 6}


def test_server_n_predict_is_the_default(tiny_llm):
    app = create_app(tiny_llm, default_max_tokens=3)
    for body in ({"prompt": PROMPT, "ignore_eos": True}, greedy(n_predict=-1)):
        b = post(app, "/completion", body).json()
        assert b["timings"]["predicted_n"] == 3 and b["generation_settings"]["n_predict"] == 3
    # a request's own n_predict wins, larger or not (as llama-server: no cap)
    assert post(app, "/completion", greedy(n_predict=5)).json()["timings"]["predicted_n"] == 5


def test_server_seed_default_makes_answers_repeatable(app):
    a = post(app, "/completion", {"prompt": PROMPT, "n_predict": 8, "ignore_eos": True, "cache_prompt": False})
    b = post(app, "/completion", {"prompt": PROMPT, "n_predict": 8, "ignore_eos": True, "cache_prompt": False})
    assert a.json()["content"] == b.json()["content"]
    assert a.json()["generation_settings"]["seed"] == 42
    c = post(app, "/completion", {"prompt": PROMPT, "n_predict": 8, "ignore_eos": True, "seed": 7})
    assert c.json()["generation_settings"]["seed"] == 7


# --------------------------------------------------------------------------- /props, /apply-template, /slots


def test_props(app, tiny_llm):
    r = call(app, "GET", "/props")
    assert r.status_code == 200
    b = r.json()
    assert b["total_slots"] == 2 and b["model_path"] == tiny_llm.model_path
    assert b["default_generation_settings"]["n_ctx"] == 256
    assert b["default_generation_settings"]["params"]["seed"] == 42
    assert b["default_generation_settings"]["params"]["temperature"] == 0.8
    assert b["endpoint_slots"] is True and b["endpoint_props"] is False
    assert_error(post(app, "/props", {}), 501)
    assert post(create_app(tiny_llm, props_endpoint=True), "/props", {}).json() == {"success": True}


def test_apply_template(tiny_model_path):
    template = ("{{ greeting }}|{% for m in messages %}{{ m.role }}:{{ m.content }}|{% endfor %}"
                "{% if tools %}tools={{ tools | length }}|{% endif %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    llm = LLM(tiny_model_path, n_ctx=256, chat_template=template)
    try:
        app = create_app(llm, chat_template_kwargs={"greeting": "hi"})
        msgs = [{"role": "user", "content": "What is today?"}]
        assert post(app, "/apply-template", {"messages": msgs}).json() == {"prompt": "hi|user:What is today?|assistant:"}
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        got = post(app, "/apply-template", {"messages": msgs, "tools": [tool]}).json()["prompt"]
        assert got == "hi|user:What is today?|tools=1|assistant:"
        got = post(app, "/apply-template", {"messages": msgs, "add_generation_prompt": False}).json()["prompt"]
        assert got == "hi|user:What is today?|"
        got = post(app, "/apply-template", {"messages": msgs, "chat_template_kwargs": {"greeting": "yo"}}).json()
        assert got["prompt"].startswith("yo|")
        assert_error(post(app, "/apply-template", {"messages": []}), 400)
        # the chat's prompt length, counted without generating
        r = post(app, "/chat/completions/input_tokens", {"messages": msgs}).json()
        assert r == {"input_tokens": len(llm.chat_tokens(msgs, greeting="hi")), "object": "response.input_tokens"}
        assert post(app, "/v1/chat/completions/input_tokens", {"messages": msgs}).json() == r
        image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}
        assert_error(post(app, "/chat/completions/input_tokens", {"messages": [image]}), 400, "messages")
        assert_error(post(app, "/apply-template", {"messages": msgs, "add_generation_promt": False}), 400)
    finally:
        llm.close()


def test_models_lists_aliases_and_tags(tiny_llm):
    card = call(create_app(tiny_llm, model_alias="code", model_aliases=["code", "fim"], model_tags=["chat"]),
                "GET", "/v1/models").json()["data"][0]
    assert card["id"] == "code" and card["aliases"] == ["code", "fim"] and card["tags"] == ["chat"]
    card = call(create_app(tiny_llm, model_alias="solo"), "GET", "/models").json()["data"][0]
    assert card["aliases"] == ["solo"] and card["tags"] == []


def test_cors_origins_localhost(tiny_llm):
    """llama-server's --cors-origins localhost: loopback origins (any scheme and port) only."""
    app = create_app(tiny_llm, cors_origins=["localhost"])

    def preflight(origin):
        return call(app, "OPTIONS", "/completion", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})

    for origin in ("http://localhost", "http://localhost:8080", "https://127.0.0.1:3000", "http://[::1]"):
        r = preflight(origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    for origin in ("http://evil.com", "http://localhost.evil.com", "http://127.0.0.1.evil.com", "http://notlocalhost"):
        assert "access-control-allow-origin" not in preflight(origin).headers


def test_no_slots_endpoint(tiny_llm):
    assert call(create_app(tiny_llm), "GET", "/slots").status_code == 200
    assert_error(call(create_app(tiny_llm, slots_endpoint=False), "GET", "/slots"), 501)


def test_no_metrics_endpoint(tiny_llm):
    """--no-metrics: /metrics answers 501 as llama-server does without --metrics; /props says so."""
    assert call(create_app(tiny_llm), "GET", "/metrics").status_code == 200
    off = create_app(tiny_llm, metrics_endpoint=False)
    assert "--metrics" in assert_error(call(off, "GET", "/metrics"), 501)["message"]
    assert call(off, "GET", "/props").json()["endpoint_metrics"] is False


def test_slot_actions(tiny_llm, tmp_path):
    assert_error(post(create_app(tiny_llm), "/slots/0?action=erase", {}), 501)
    app = create_app(tiny_llm, slot_save_path=str(tmp_path))
    assert_error(post(app, "/slots/x?action=erase", {}), 400, "id_slot")
    assert_error(post(app, "/slots/9?action=erase", {}), 400, "id_slot")
    assert_error(post(app, "/slots/0?action=explode", {}), 400, "action")
    for name in ("../escape.bin", "a/b.bin", ".hidden", "", None, "x" * 300):
        assert_error(post(app, "/slots/0?action=save", {"filename": name}), 400, "filename")
    assert post(app, "/slots/0?action=erase", {}).status_code == 200
    assert_error(post(app, "/slots/0?action=save", {"filename": "ok.bin"}), 500)    # an empty slot
    assert list(tmp_path.iterdir()) == []

    # erase: the slot's prompt cache is gone, the same prompt is evaluated again
    body = greedy(n_predict=2)
    post(app, "/completion", body)
    again = post(app, "/completion", body).json()["timings"]
    assert again["cache_n"] > 0
    slots = call(app, "GET", "/slots").json()
    for s in slots:
        r = post(app, f"/slots/{s['id']}?action=erase", {})
        assert r.status_code == 200 and r.json() == {"id_slot": s["id"], "n_erased": s["n_cached"]}
    fresh = post(app, "/completion", body).json()
    assert fresh["timings"]["cache_n"] == 0
    assert fresh["content"] == post(app, "/completion", body).json()["content"]


def test_slot_save_restore(tiny_llm, tmp_path):
    """llama-server's slot files: save one slot's prompt cache, restore it into another; the
    same prompt then reuses it.  Bad files are a 400 that leaves the slot empty."""
    app = create_app(tiny_llm, slot_save_path=str(tmp_path))
    body = greedy(n_predict=4)
    for s in call(app, "GET", "/slots").json():
        post(app, f"/slots/{s['id']}?action=erase", {})
    first = post(app, "/completion", body).json()
    src = next(s for s in call(app, "GET", "/slots").json() if s["n_cached"] > 0)
    saved = post(app, f"/slots/{src['id']}?action=save", {"filename": "one.bin"})
    assert saved.status_code == 200, saved.text
    b = saved.json()
    assert b["id_slot"] == src["id"] and b["filename"] == "one.bin" and b["n_saved"] == src["n_cached"]
    assert b["n_written"] == (tmp_path / "one.bin").stat().st_size and b["timings"]["save_ms"] >= 0

    post(app, f"/slots/{src['id']}?action=erase", {})
    dst = 1 - src["id"]
    restored = post(app, f"/slots/{dst}?action=restore", {"filename": "one.bin"})
    assert restored.status_code == 200, restored.text
    assert restored.json()["n_restored"] == src["n_cached"] and restored.json()["id_slot"] == dst
    again = post(app, "/completion", body).json()
    assert again["content"] == first["content"]
    assert again["timings"]["cache_n"] >= first["timings"]["prompt_n"] - 1, again["timings"]

    err = assert_error(post(app, f"/slots/{dst}?action=restore", {"filename": "missing.bin"}), 400)
    assert err["message"].startswith("Unable to restore slot")
    (tmp_path / "junk.bin").write_bytes(b"junk" * 100)
    assert_error(post(app, f"/slots/{dst}?action=restore", {"filename": "junk.bin"}), 400)
    assert call(app, "GET", "/slots").json()[dst]["n_cached"] == 0


# --------------------------------------------------------------------------- /embedding


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    from tiny_bert import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "bert.gguf")


def test_embedding_pooled(bert_path):
    llm = LLM(bert_path, n_ctx=512, embedding=True, pooling="mean")
    try:
        app = create_app(llm)
        r = post(app, "/embedding", {"content": ["hello world", "hi"]})
        assert r.status_code == 200, r.text
        data = r.json()
        assert [d["index"] for d in data] == [0, 1]
        vec = data[0]["embedding"]
        assert len(vec) == 1 and len(vec[0]) == llm.model.n_embd
        assert math.isclose(sum(x * x for x in vec[0]), 1.0, rel_tol=1e-3)
        raw = post(app, "/embeddings", {"input": "hello world", "embd_normalize": -1}).json()[0]["embedding"][0]
        assert not math.isclose(sum(x * x for x in raw), 1.0, rel_tol=1e-3)
        parts = {"content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}
        same = post(app, "/embedding", {"content": ["hello world", parts, [101, 7592, 2088, 102]]}).json()
        assert same[0]["embedding"] == same[1]["embedding"] and len(same) == 3
        assert_error(post(app, "/embedding", {}), 400, "content")
        assert_error(post(app, "/embedding", {"content": [{"content": "text"}]}), 400, "content")
        assert_error(post(app, "/embedding", {"content": [{"content": [{"type": "image_url"}]}]}), 400, "content")
        err = assert_error(post(app, "/embedding", {"content": "hello " * 600}), 400)
        assert "too large" in err["message"]
        assert_error(post(app, "/embedding", {"content": "x", "encoding_format": "base64"}), 400, "encoding_format")
    finally:
        llm.close()


def test_embedding_pooling_none_is_per_token(bert_path):
    llm = LLM(bert_path, n_ctx=512, embedding=True, pooling="none")
    try:
        app = create_app(llm)
        n_tokens = len(llm.tokenize("hello hello hello"))
        r = post(app, "/embeddings", {"input": "hello hello hello"})
        assert r.status_code == 200, r.text
        rows = r.json()[0]["embedding"]
        assert len(rows) == n_tokens and all(len(v) == llm.model.n_embd for v in rows)
        assert all(abs(sum(x * x for x in v) - 1) > 1e-3 for v in rows)      # not normalized
        # OpenAI's route needs one vector per input
        assert_error(post(app, "/v1/embeddings", {"input": "hello"}), 400)
    finally:
        llm.close()


def test_pooling_is_validated(bert_path):
    with pytest.raises(ValueError, match="pooling"):
        LLM(bert_path, embedding=True, pooling="max")


def test_v1_embeddings_take_llama_servers_input_shapes(bert_path):
    """/v1/embeddings takes what llama-server's embeddings routes take (llama_routes.embedding_inputs):
    an empty string (a text: its special tokens remain), ids mixed with texts, {"prompt_string"} and
    {"content": [text parts]} objects, lists of those; too long an input says "too large"."""
    llm = LLM(bert_path, n_ctx=512, embedding=True, pooling="cls")
    try:
        app = create_app(llm)
        parts = {"content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}
        for inp, n in [("", 1), ([12, 34, "string", 56], 1), ({"prompt_string": "string"}, 1), (parts, 1),
                       (["string1", [12, 34, 56]], 2), (["string1", {"prompt_string": "s2"}, parts], 3)]:
            r = post(app, "/v1/embeddings", {"input": inp})
            assert r.status_code == 200, (inp, r.text)
            assert len(r.json()["data"]) == n and r.json()["usage"]["prompt_tokens"] > 0
        data = post(app, "/v1/embeddings", {"input": ["hello world", parts]}).json()["data"]
        assert data[0]["embedding"] == data[1]["embedding"]
        # llama-server counts the tokens as it tokenizes them (special tokens parsed, CLS/SEP added)
        usage = post(app, "/v1/embeddings", {"input": "hello world"}).json()["usage"]
        assert usage["prompt_tokens"] == len(llm.tokenize("hello world", add_special=True, parse_special=True))
        for bad in ({"content": "x"}, [{"content": [{"type": "image_url"}]}], [], 42, None):
            assert_error(post(app, "/v1/embeddings", {"input": bad}), 400, "input")
        err = assert_error(post(app, "/v1/embeddings", {"input": "hello " * 600}), 400)
        assert "too large" in err["message"]
    finally:
        llm.close()


# --------------------------------------------------------------------------- llama-server's ways on the OpenAI routes


def chat_events(response):
    """The JSON objects of an OpenAI-style SSE body (ending with [DONE])."""
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", response.text[-300:]
    return [json.loads(x) for x in lines[:-1]]


ASK = [{"role": "user", "content": "Tell me a story"}]


def test_chat_prompt_longer_than_a_slot_is_exceed_context_size_error(app, tiny_llm):
    """As llama-server (and /completion here): type exceed_context_size_error, with the prompt's
    and the slot's sizes, streamed or not (a stream is refused before it starts)."""
    long = [{"role": "user", "content": "hello " * 400}]
    for stream in (False, True):
        r = post(app, "/v1/chat/completions", {"messages": long, "max_tokens": 2, "stream": stream})
        err = assert_error(r, 400, "messages")
        assert err["type"] == "exceed_context_size_error" and err["code"] == "context_length_exceeded"
        assert err["n_ctx"] == tiny_llm.context.n_ctx_seq and err["n_prompt_tokens"] > 256
        assert "exceeds the available context size" in err["message"]
    assert post(app, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2}).status_code == 200


def test_chat_prompt_controls_follow_llama_server(app):
    """Two assistant messages at the end, add_generation_prompt with continue_final_message, and
    continuing a message with tool calls are refused with llama-server's words; continuing a
    message's reasoning is refused as not supported; the defaults are accepted."""
    two = ASK + [{"role": "assistant", "content": "Once"}, {"role": "assistant", "content": "upon"}]
    err = assert_error(post(app, "/v1/chat/completions", {"messages": two, "max_tokens": 2}), 400, "messages")
    assert err["message"] == "Cannot have 2 or more assistant messages at the end of the list."
    both = {"messages": ASK, "max_tokens": 2, "add_generation_prompt": True, "continue_final_message": True}
    err = assert_error(post(app, "/v1/chat/completions", both), 400, "continue_final_message")
    assert err["message"] == "Cannot set both add_generation_prompt and continue_final_message to true."
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tools = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]}]
    err = assert_error(post(app, "/v1/chat/completions", {"messages": tools, "add_generation_prompt": False,
                                                          "continue_final_message": True}), 400)
    assert err["message"] == "Cannot continue an assistant message that contains tool calls."
    prefill = ASK + [{"role": "assistant", "content": "Once"}]
    err = assert_error(post(app, "/v1/chat/completions", {
        "messages": prefill, "add_generation_prompt": False, "continue_final_message": "reasoning_content"}), 400)
    assert err["code"] == "not_supported"
    err = assert_error(post(app, "/v1/chat/completions", {
        "messages": ASK, "add_generation_prompt": False, "continue_final_message": True}), 400)
    assert "must be the assistant's" in err["message"]
    ok = {"messages": ASK, "max_tokens": 2, "add_generation_prompt": True, "continue_final_message": False}
    assert post(app, "/v1/chat/completions", ok).status_code == 200


def test_chat_continues_a_final_assistant_message(app, tiny_llm):
    """llama-server's default prefill, its explicit continue_final_message and
    add_generation_prompt false: the __verbose object (asked for with verbose) shows the prompt
    the model got, which ends with the assistant's text (text parts joined by blank lines), or
    with no assistant header at all."""
    def verbose_prompt(fields: dict) -> str:
        r = post(app, "/v1/chat/completions", {"max_tokens": 2, "verbose": True, **fields})
        assert r.status_code == 200, r.text
        return r.json()["__verbose"]["prompt"]

    prefill = ASK + [{"role": "assistant", "content": "Once upon"}]
    header = tiny_llm.render_chat(ASK)            # the conversation with the assistant's header opened
    # (the prompt as the model got it: its tokens as text, the BOS token in front)
    assert verbose_prompt({"messages": prefill}).endswith(header + "Once upon")
    explicit = {"messages": prefill, "add_generation_prompt": False, "continue_final_message": True}
    assert verbose_prompt(explicit).endswith(header + "Once upon")
    parts = ASK + [{"role": "assistant", "content": [{"type": "text", "text": "Once"},
                                                      {"type": "text", "text": "upon"}]}]
    assert verbose_prompt({"messages": parts}).endswith(header[-20:] + "Once\n\nupon")
    bare = verbose_prompt({"messages": ASK, "add_generation_prompt": False})
    assert bare.endswith(tiny_llm.render_chat(ASK, add_generation_prompt=False)) and not bare.endswith(header)
    r = post(app, "/v1/chat/completions", {"max_tokens": 2, "messages": ASK})
    assert "__verbose" not in r.json()                          # only when asked for (or --verbose)


def test_streamed_chat_carries_verbose_on_its_first_closing_chunk(app, tiny_llm):
    """verbose on a streamed chat: llama-server's __verbose object rides on the first chunk
    that closes a choice (its finish_reason), with the prompt the model got and the answer's
    text; also when tools make the answer come whole first.  Not on the other chunks."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    for extra in ({}, {"tools": [tool], "tool_choice": "required"}):
        body = {"messages": ASK, "max_tokens": 8, "temperature": 0, "stream": True, "verbose": True, **extra}
        evs = chat_events(post(app, "/v1/chat/completions", body))
        marked = [e for e in evs if "__verbose" in e]
        assert len(marked) == 1 and marked[0]["choices"][0]["finish_reason"] is not None, extra
        assert marked[0]["__verbose"]["prompt"].endswith(tiny_llm.render_chat(ASK))
        if not extra:
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in evs if e["choices"])
            assert marked[0]["__verbose"]["content"] == text
    plain = chat_events(post(app, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2, "stream": True}))
    assert not any("__verbose" in e for e in plain)


def test_chat_stream_timings_per_token(app):
    """timings_per_token: every chunk after the role chunk carries the timings so far (as
    llama-server); the final timings ride on the stream's last chunk (the usage chunk)."""
    body = {"messages": ASK, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    evs = chat_events(post(app, "/v1/chat/completions", {**body, "timings_per_token": True}))
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": None} and "timings" not in evs[0]
    content = [e for e in evs if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert content and all("timings" in e for e in content)
    counts = [e["timings"]["predicted_n"] for e in content]
    assert counts == sorted(counts) and all(e["timings"]["prompt_n"] > 0 for e in content)
    last = evs[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    assert {"prompt_per_second", "predicted_per_second", "predicted_n"} <= set(last["timings"])
    assert last["timings"]["predicted_n"] <= 6
    # without it, only the last chunk has timings
    plain = chat_events(post(app, "/v1/chat/completions", body))
    assert [i for i, e in enumerate(plain) if "timings" in e] == [len(plain) - 1]


def test_completions_route_timings_per_token_and_verbose(app, tiny_llm):
    """/v1/completions as llama-server: timings_per_token puts the timings so far on every
    streamed text chunk (one stream per prompt, counted separately), and verbose adds the
    __verbose object (the prompt the model got) to a non-streamed answer."""
    body = {"prompt": ["Once upon a time", "The sea"], "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "stream": True}
    evs = chat_events(post(app, "/v1/completions", {**body, "timings_per_token": True}))
    text = [e for e in evs if e["choices"] and e["choices"][0]["text"]]
    assert len(text) >= 8 and all("timings" in e for e in text)
    for index in (0, 1):
        counts = [e["timings"]["predicted_n"] for e in text if e["choices"][0]["index"] == index]
        assert counts == sorted(counts) and counts[-1] >= 3
    plain = chat_events(post(app, "/v1/completions", body))
    assert [i for i, e in enumerate(plain) if "timings" in e] == [len(plain) - 1]
    # llama-server's own route, a list of prompts (their streams open one after the other)
    native = events(post(app, "/completion", {"prompt": body["prompt"], "n_predict": 5, "temperature": 0,
                                              "ignore_eos": True, "stream": True, "timings_per_token": True}))
    tokens = [e for e in native if e.get("tokens") and not e["stop"]]
    assert len(tokens) == 10 and all("timings" in e for e in tokens)
    one = {"prompt": "Once upon a time", "max_tokens": 3}
    r = post(app, "/v1/completions", {**one, "verbose": True}).json()
    assert r["__verbose"]["prompt"].endswith("Once upon a time")
    assert r["__verbose"]["tokens_predicted"] == 3 and r["__verbose"]["content"] == r["choices"][0]["text"]
    assert "__verbose" not in post(app, "/v1/completions", one).json()


def test_return_progress_on_every_streaming_route(app):
    """return_progress (llama-server's): the prompt's progress reports come before the answer,
    the first at processed == cache, the last at processed == total; with timings_per_token
    they carry the prompt's timings so far (none evaluated at the first).  On the chat and
    completions routes, /completion and the Responses API (response.in_progress events)."""
    def check(reports: list, with_timings: bool) -> None:
        got = [r["prompt_progress"] for r in reports]
        assert got and got[0]["processed"] == got[0]["cache"] and got[-1]["processed"] == got[-1]["total"] > 0
        assert [g["processed"] for g in got] == sorted(set(g["processed"] for g in got))
        assert all(("timings" in r) == with_timings for r in reports)
        if with_timings:
            assert reports[0]["timings"]["prompt_n"] == 0 and reports[0]["timings"]["prompt_ms"] == 0.0

    base = {"max_tokens": 3, "temperature": 0, "stream": True, "return_progress": True}
    chat = chat_events(post(app, "/v1/chat/completions", {**base, "messages": ASK, "timings_per_token": True}))
    at = [i for i, e in enumerate(chat) if "prompt_progress" in e]
    check([chat[i] for i in at], True)
    assert all(chat[i]["choices"][0]["delta"] == {"role": "assistant", "content": None} for i in at)
    assert not any(e["choices"] and e["choices"][0]["delta"].get("content") for e in chat[:at[-1]])
    cmpl = chat_events(post(app, "/v1/completions", {**base, "prompt": "Once upon a time"}))
    check([e for e in cmpl if "prompt_progress" in e], False)
    native = events(post(app, "/completion", {"prompt": "Once upon a time", "n_predict": 3, "stream": True,
                                              "return_progress": True, "timings_per_token": True}))
    check([e for e in native if "prompt_progress" in e], True)
    assert all("timings" in e for e in native if e.get("tokens"))        # and on every token's event
    r = post(app, "/v1/responses", {"input": "Tell me a story", "max_output_tokens": 3, "stream": True,
                                    "return_progress": True})
    resp = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    progress = [e for e in resp if "prompt_progress" in e]
    check(progress, False)
    assert {e["type"] for e in progress} == {"response.in_progress"}
    plain = chat_events(post(app, "/v1/chat/completions", {**base, "messages": ASK, "return_progress": False}))
    assert not any("prompt_progress" in e for e in plain)


def test_responses_stream_timings_per_token(app):
    """The Responses stream: text deltas carry the timings so far with timings_per_token, and
    response.completed carries the final ones (as llama-server sends them) either way."""
    body = {"input": "Tell me a story", "max_output_tokens": 6, "temperature": 0, "stream": True}

    def data(r):
        assert r.status_code == 200, r.text
        return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]

    evs = data(post(app, "/v1/responses", {**body, "timings_per_token": True}))
    deltas = [e for e in evs if e["type"] == "response.output_text.delta"]
    assert deltas and all("prompt_per_second" in e["timings"] for e in deltas)
    done = evs[-1]
    assert done["type"] == "response.completed" and "predicted_per_second" in done["timings"]
    plain = data(post(app, "/v1/responses", body))
    assert not any("timings" in e for e in plain if e["type"] == "response.output_text.delta")
    assert "timings" in plain[-1]


# --------------------------------------------------------------------------- flags


def _serve_args(*argv):
    from pyllama.cli import build_parser

    return build_parser().parse_args(["serve", "-m", "model.gguf", *argv])


def test_llama_server_flags_map_onto_llm_and_settings(tmp_path, tiny_model_path):
    from pyllama.cli.serve import llama_server_settings, serve_llm_kwargs

    args = _serve_args("--temp", "0.5", "-s", "42", "--top-k", "5", "--no-slots", "--no-jinja", "-ub", "64",
                       "-fa", "off", "-kvu", "--swa-full", "--pooling", "last", "--reasoning-format", "none",
                       "--reasoning-budget", "0", "--reasoning", "off", "--chat-template-kwargs", '{"x": 1}',
                       "--slot-save-path", str(tmp_path), "--props", "--cache-ram", "100", "-cb", "--metrics",
                       "--no-cache-idle-slots", "--no-ui", "--embedding", "-ctk", "q8_0", "-ctv", "q8_0",
                       "--cors-origins", "https://a.example,https://b.example", "-c", "512", "-np", "2")
    kw = serve_llm_kwargs(args, str(tiny_model_path))
    assert kw["n_ubatch"] == 64 and kw["flash_attn"] == "off" and kw["kv_unified"] is True
    assert kw["swa_full"] is True and kw["pooling"] == "last" and kw["type_k"] == kw["type_v"] == "q8_0"
    assert kw["cache_ram_mib"] == 100 and kw["cache_idle_slots"] is False
    plain = serve_llm_kwargs(_serve_args(), str(tiny_model_path))
    assert plain["cache_ram_mib"] == 8192 and plain["cache_idle_slots"] is True     # llama-server's defaults
    assert plain["slot_prompt_similarity"] == 0.1
    assert serve_llm_kwargs(_serve_args("-sps", "0"), str(tiny_model_path))["slot_prompt_similarity"] == 0.0
    assert serve_llm_kwargs(_serve_args("--slot-prompt-similarity", "0.5"),
                            str(tiny_model_path))["slot_prompt_similarity"] == 0.5
    s = llama_server_settings(args)
    assert s["sampling_defaults"] == {"temperature": 0.5, "seed": 42, "top_k": 5}
    assert s["slots_endpoint"] is False and s["props_endpoint"] is True and s["metrics_endpoint"] is True
    assert llama_server_settings(_serve_args("--no-metrics"))["metrics_endpoint"] is False
    assert s["reasoning_format"] == "none" and s["reasoning_budget"] == 0
    assert s["chat_template_kwargs"] == {"x": 1, "enable_thinking": False}
    assert s["slot_save_path"] == str(tmp_path)
    from pyllama.cli.serve import _cors_origins

    assert _cors_origins(args) == ["https://a.example", "https://b.example"]
    named = llama_server_settings(_serve_args("-a", "tinyllama-2, fim,code", "--tags", "chat,fim,small"))
    assert named["model_alias"] == "code" and named["model_aliases"] == ["code", "fim", "tinyllama-2"]
    assert named["model_tags"] == ["chat", "fim", "small"]
    assert llama_server_settings(_serve_args())["model_alias"] is None
    assert serve_llm_kwargs(_serve_args("--reranking"), str(tiny_model_path))["pooling"] == "rank"
    assert "kv_unified" in serve_llm_kwargs(_serve_args(), str(tiny_model_path))
    assert serve_llm_kwargs(_serve_args("--context-shift"), str(tiny_model_path))["context_shift"] is True
    assert serve_llm_kwargs(_serve_args(), str(tiny_model_path))["context_shift"] is False
    synth = serve_llm_kwargs(_serve_args("-md", "d.gguf", "--spec-synth-rates", "0.5, 0.25"), str(tiny_model_path))
    assert synth["spec_synth_rates"] == [0.5, 0.25] and "spec_synth_len" not in synth
    assert serve_llm_kwargs(_serve_args("--spec-synth-len", "2.5"), str(tiny_model_path))["spec_synth_len"] == 2.5


@pytest.mark.parametrize("argv,message", [
    (["--slot-save-path", "/definitely/not/here"], "not a directory"),
    (["--reranking", "--pooling", "mean"], "rank pooling"),
])
def test_flags_refused_with_a_reason(argv, message, tiny_model_path):
    from pyllama.cli._common import UsageError
    from pyllama.cli.serve import llama_server_settings, serve_llm_kwargs

    args = _serve_args(*argv)
    with pytest.raises(UsageError, match=message):
        serve_llm_kwargs(args, str(tiny_model_path))
        llama_server_settings(args)


@pytest.mark.parametrize("argv", [["-fa", "sometimes"], ["--pooling", "max"], ["--chat-template-kwargs", "[1]"],
                                  ["--reasoning", "maybe"], ["--reasoning-format", "xml"], ["-sps", "1.5"],
                                  ["--slot-prompt-similarity", "nan"]])
def test_bad_flag_values_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        _serve_args(*argv)
    assert exc.value.code == 2


def test_serve_process_with_the_suites_flags(tiny_model_path):
    """The flags llama-server's own test suite starts every server with, on the command line."""
    from server_process import ServerProcess

    server = ServerProcess("-m", str(tiny_model_path), "--temp", "0.8", "--seed", "42", "--no-slots", "--no-jinja",
                           "--ctx-size", "512", "--parallel", "2", "--n-predict", "4", "--batch-size", "32",
                           "-ub", "32", "-t", "1")
    try:
        url = server.wait_ready()
        props = httpx.get(url + "/props", timeout=30).json()
        assert props["default_generation_settings"]["params"]["seed"] == 42
        assert props["default_generation_settings"]["n_ctx"] == 256
        assert httpx.get(url + "/slots", timeout=30).status_code == 501
        r = httpx.post(url + "/completion", json={"prompt": PROMPT, "ignore_eos": True}, timeout=60)
        assert r.json()["timings"]["predicted_n"] == 4
    finally:
        assert server.stop() == 0
