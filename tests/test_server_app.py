"""The server's app in-process (httpx.ASGITransport): request validation, error objects,
authentication, CORS, the body limit, admission (slots + queue), /health while loading,
/metrics and /slots shapes.  Fast: a fake LLM for the admission tests, the tiny random
model for the rest.  The real `pyllama serve` process, the `openai` SDK and LangChain are
in tests/test_server_openai.py."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from pyllama.server.app import create_app  # noqa: E402


def test_import_pyllama_does_not_import_fastapi():
    code = ("import sys, pyllama; import pyllama.llm; "
            "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client', 'pyllama.server') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def assert_error(r, status, param=None, type_="invalid_request_error"):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    if type_ is not None:
        assert err["type"] == type_, err
    if param is not None:
        assert err["param"] == param, err
    return err


# --------------------------------------------------------------------------- a fake LLM (admission)


class FakeLLM:
    """Just enough of LLM for the server: async completions that wait for `release`."""

    model_path = "/models/fake.gguf"
    n_parallel = 1
    embedding = False

    def __init__(self) -> None:
        self.vocab = SimpleNamespace(n_tokens=100)
        self.release = asyncio.Event()
        self.started = 0
        self.cancelled = 0

    async def acomplete(self, prompt, **kw):
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        timings = SimpleNamespace(prompt_n=3, prompt_ms=1.0, cached_n=0, predicted_n=2, predicted_ms=2.0)
        return SimpleNamespace(text=" ok", tokens=[1, 2], finish_reason="length", prompt_tokens=3, timings=timings)

    async def achat(self, messages, **kw):
        return await self.acomplete("", **kw)

    def slots(self):
        return [{"id": 0, "busy": self.started > self.cancelled}]

    def metrics(self):
        return {"prompt_tokens_total": 7, "tokens_predicted_total": 11, "prompt_seconds_total": 0.5,
                "tokens_predicted_seconds_total": 1.0, "n_decode_total": 4, "n_busy_slots_total": 6,
                "requests_processing": 1, "requests_deferred": 0, "prompt_tokens_cached_total": 3,
                "n_tokens_max": 40, "spec_decode_num_draft_tokens_total": 5}


def test_queue_full_gives_503_with_retry_after_and_recovers():
    async def main():
        llm = FakeLLM()
        app = create_app(llm, max_queue=1, retry_after_s=2)
        async with _client(app) as c:
            body = {"prompt": "x", "max_tokens": 2}
            first = [asyncio.ensure_future(c.post("/v1/completions", json=body)) for _ in range(2)]
            for _ in range(200):               # both admitted (1 slot + 1 queued)
                if llm.started == 2:
                    break
                await asyncio.sleep(0.01)
            assert llm.started == 2
            r = await c.post("/v1/completions", json=body)
            err = assert_error(r, 503, type_="unavailable_error")
            assert err["code"] == "queue_full"
            assert r.headers["retry-after"] == "2"
            llm.release.set()
            done = await asyncio.gather(*first)
            assert [d.status_code for d in done] == [200, 200]
            r = await c.post("/v1/completions", json=body)     # room again
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == " ok"
    run(main())


def test_health_is_503_while_loading_then_200():
    async def main():
        gate = threading.Event()

        def loader():
            gate.wait(30)
            return FakeLLM()

        app = create_app(loader=loader, api_keys=["k"])
        async with app.router.lifespan_context(app):
            async with _client(app) as c:
                r = await c.get("/health")
                err = assert_error(r, 503, type_="unavailable_error")
                assert err["message"] == "Loading model"
                r = await c.get("/v1/models", headers={"Authorization": "Bearer k"})
                assert r.status_code == 503
                gate.set()
                for _ in range(300):
                    r = await c.get("/health")
                    if r.status_code == 200:
                        break
                    await asyncio.sleep(0.01)
                assert r.json() == {"status": "ok"}
                r = await c.get("/v1/models", headers={"Authorization": "Bearer k"})
                assert r.json()["data"][0]["id"] == "fake.gguf"
    run(main())


def test_metrics_use_llama_server_names_and_types():
    async def main():
        app = create_app(FakeLLM())
        async with _client(app) as c:
            r = await c.get("/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            # llama-server's header: when the counters started (Unix seconds), in its spelling
            assert abs(int(r.headers["Process-Start-Time-Unix"]) - time.time()) < 600
            assert b"Process-Start-Time-Unix" in [name for name, _ in r.headers.raw]
            text = r.text
            for name, kind, value in [("prompt_tokens_total", "counter", 7.0),
                                      ("tokens_predicted_total", "counter", 11.0),
                                      ("prompt_seconds_total", "counter", 0.5),
                                      ("tokens_predicted_seconds_total", "counter", 1.0),
                                      ("n_decode_total", "counter", 4.0),
                                      ("requests_processing", "gauge", 1.0),
                                      ("requests_deferred", "gauge", 0.0),
                                      ("n_busy_slots_per_decode", "gauge", 1.5),
                                      ("predicted_tokens_seconds", "gauge", 11.0),
                                      ("prompt_tokens_cached_total", "counter", 3.0),
                                      # a counter without _total, as llama-server writes it
                                      ("n_tokens_max", "counter", 40.0),
                                      ("spec_decode_num_draft_tokens_total", "counter", 5.0)]:
                assert f"# TYPE llamacpp:{name} {kind}\n" in text, (name, text)
                assert f"\nllamacpp:{name} {value}\n" in text, (name, text)
            # every sample is named as its TYPE line (how llama-server's suite parses the text);
            # a counter the LLM does not report is left out, not made up
            types = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
            samples = [line.split()[0] for line in text.splitlines() if line and not line.startswith("#")]
            assert samples and all(name in types for name in samples), text
            assert "spec_decode_num_drafts_total" not in text
            r = await c.get("/slots")
            assert r.json()[0]["id"] == 0 and "is_processing" in r.json()[0]
    run(main())


def test_create_app_rejects_unknown_settings():
    with pytest.raises(TypeError, match="max_queue"):
        create_app(FakeLLM(), max_queu=3)
    with pytest.raises(TypeError):
        create_app()


# --------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_path):
    from pyllama import LLM

    llm = LLM(tiny_model_path, n_ctx=512, n_parallel=2, kv_unified=False, embedding=True)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def app(tiny_llm):
    return create_app(tiny_llm, api_keys=["secret"], cors_origins=["https://ui.example"], max_body_bytes=4096)


AUTH = {"Authorization": "Bearer secret"}


def _post(app, path, body=None, *, content=None, headers=None):
    async def main():
        async with _client(app) as c:
            h = dict(AUTH)
            h.update(headers or {})
            if content is not None:
                h.setdefault("content-type", "application/json")
                return await c.post(path, content=content, headers=h)
            return await c.post(path, json=body, headers=h)
    return run(main())


def _get(app, path, headers=None):
    async def main():
        async with _client(app) as c:
            return await c.get(path, headers=headers if headers is not None else AUTH)
    return run(main())


def _still_answers(app):
    r = _post(app, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_completion_shape_and_usage(app, tiny_model_path):
    r = _post(app, "/v1/completions", {"prompt": "Hello world", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == tiny_model_path.name              # no alias: the file's name
    assert body["choices"][0]["finish_reason"] == "length"
    u = body["usage"]
    assert u["completion_tokens"] == 4 and u["total_tokens"] == u["prompt_tokens"] + 4
    assert "cached_tokens" in u["prompt_tokens_details"]
    assert {"prompt_n", "predicted_n", "cache_n", "predicted_per_second"} <= set(body["timings"])


def test_completion_prompt_forms(app, tiny_llm):
    ids = tiny_llm.tokenize("Hello world")
    base = {"max_tokens": 3, "temperature": 0}
    by_text = _post(app, "/v1/completions", {**base, "prompt": "Hello world"}).json()
    by_ids = _post(app, "/v1/completions", {**base, "prompt": ids}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    many = _post(app, "/v1/completions", {**base, "prompt": ["Hello world", "Once upon"]}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["choices"][0]["text"] == by_text["choices"][0]["text"]
    lists = _post(app, "/v1/completions", {**base, "prompt": [ids, ids]}).json()
    assert [c["text"] for c in lists["choices"]] == [by_text["choices"][0]["text"]] * 2
    echo = _post(app, "/v1/completions", {**base, "prompt": "Hello world", "echo": True}).json()
    assert echo["choices"][0]["text"] == "Hello world" + by_text["choices"][0]["text"]


def _sse(text):
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", text[-500:]
    return [json.loads(e) for e in events[:-1]]


def test_completion_stream_equals_non_stream(app):
    body = {"prompt": "Hello world", "max_tokens": 6, "temperature": 0}
    whole = _post(app, "/v1/completions", body).json()["choices"][0]["text"]
    r = _post(app, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r.text)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_chat_stream_equals_non_stream(app):
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 5, "temperature": 0}
    whole = _post(app, "/v1/chat/completions", body).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["role"] == "assistant"
    chunks = _sse(_post(app, "/v1/chat/completions", {**body, "stream": True}).text)
    # the role chunk's content is null, as llama-server and OpenAI send it (not "": some
    # clients, llama-server's test client among them, refuse empty content deltas)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["choices"][0]["delta"].get("content") != "" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert "usage" not in chunks[-1]            # not asked for


def test_tokenize_detokenize_embeddings(app, tiny_llm):
    r = _post(app, "/tokenize", {"content": "Hello world", "with_pieces": True})
    pieces = r.json()["tokens"]
    ids = [p["id"] for p in pieces]
    assert ids == tiny_llm.tokenize("Hello world", add_special=False)
    assert _post(app, "/detokenize", {"tokens": ids}).json()["content"].strip() == "Hello world"
    r = _post(app, "/v1/embeddings", {"input": ["Hello", "world"]})
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1] and len(data[0]["embedding"]) == tiny_llm.model.n_embd
    r64 = _post(app, "/v1/embeddings", {"input": "Hello", "encoding_format": "base64"})
    import numpy as np

    vec = np.frombuffer(base64.b64decode(r64.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, data[0]["embedding"], atol=1e-5)
    assert r64.json()["usage"]["prompt_tokens"] > 0


#: (path, body, param, code): every bad request of the issue's list that answers 400; also
#: run against a real `pyllama serve` process by tests/test_server_openai.py.
BAD_INPUTS = [
    ("/v1/chat/completions", '{"messages": [', None, "invalid_json"),
    ("/v1/chat/completions", "[1, 2]", None, None),
    ("/v1/chat/completions", "{}", "messages", "missing_field"),
    ("/v1/chat/completions", '{"messages": []}', "messages", None),
    ("/v1/chat/completions", '{"messages": "hi"}', "messages", None),
    ("/v1/chat/completions", '{"messages": [{"role": "robot", "content": "x"}]}', "messages.0.role", None),
    ("/v1/chat/completions", '{"messages": [{"content": "x"}]}', "messages.0.role", "missing_field"),
    ("/v1/chat/completions", '{"messages": [{"role": "user"}]}', "messages.0", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
     "temperature", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "temperature": 3}',
     "temperature", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}',
     "max_tokens", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "n": 0}', "n", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, '
                             '"logprobs": true}', "top_logprobs", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "stop": [""]}', "stop", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "temprature": 0.1}',
     "temprature", "unknown_field"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999999": 1}}',
     "logit_bias", "invalid_token"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "grammar": "root ::= ("}',
     "grammar", "invalid_grammar"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "response_format": '
                             '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}}',
     "response_format", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}',
     "response_format.type", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "tool_choice": '
                             '{"type": "function", "function": {"name": "nope"}}, "tools": [{"type": "function", '
                             '"function": {"name": "get_weather", "parameters": {"type": "object"}}}]}',
     "tool_choice", None),
    ("/v1/completions", '{"prompt": "x", "xtc_probability": 1.5}', "xtc_probability", None),
    ("/v1/completions", '{"prompt": "x", "dry_multiplier": -1}', "dry_multiplier", None),
    ("/v1/completions", '{"prompt": "x", "dry_sequence_breakers": []}', "dry_sequence_breakers", None),
    ("/v1/completions", '{"prompt": "x", "dry_multiplier": 0.5, "dry_sequence_breakers": [""]}', None, None),
    ("/v1/completions", '{"prompt": "x", "dynatemp_range": -0.5}', "dynatemp_range", None),
    ("/v1/completions", '{"prompt": [5, 99999999]}', "prompt", "invalid_token"),
    ("/v1/completions", '{"prompt": [-1]}', "prompt", "invalid_token"),
    ("/v1/completions", '{"prompt": []}', "prompt", None),
    ("/v1/completions", '{"prompt": 42}', "prompt", None),
    ("/v1/completions", '{"prompt": "x", "seed": 1e30}', "seed", None),
    ("/v1/embeddings", '{"input": {"content": "x"}}', "input", None),     # ("" is a text, as in llama-server)
    ("/detokenize", '{"tokens": [99999999]}', "tokens", "invalid_token"),
    # issue 29: numbers past their C limits, odd logit_bias keys, NaN, tool_choice without tools,
    # a stop list over its cap
    ("/v1/completions", '{"prompt": "x", "max_tokens": 1000000000000}', "max_tokens", "invalid_value"),
    ("/v1/completions", '{"prompt": "x", "top_k": 2147483648}', "top_k", "invalid_value"),
    ("/v1/completions", '{"prompt": "x", "dry_penalty_last_n": 2147483648}', "dry_penalty_last_n", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": '
                             '2147483648}', "max_completion_tokens", None),
    ("/v1/completions", '{"prompt": "x", "logit_bias": {"1_0": 1}}', "logit_bias", None),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', None, "invalid_json"),
    ("/v1/completions", '{"prompt": "x", "temperature": 1e999}', "temperature", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}',
     "tool_choice", None),
    ("/v1/completions", '{"prompt": "x", "stop": [' + ", ".join(f'"s{i}"' for i in range(65)) + "]}", "stop", None),
    ("/tokenize", '{"content": "\\ud800"}', "content", None),
]


@pytest.mark.parametrize("path,content,param,code", BAD_INPUTS)
def test_bad_input_is_400_with_openai_error(app, path, content, param, code):
    err = assert_error(_post(app, path, content=content), 400, param)
    if code is not None:
        assert err["code"] == code, err
    _still_answers(app)


def test_prompt_longer_than_a_slot_names_both_numbers(app, tiny_llm):
    r = _post(app, "/v1/completions", {"prompt": "hello " * 400, "max_tokens": 2})
    err = assert_error(r, 400)
    assert err["code"] == "context_length_exceeded"
    n_prompt = len(tiny_llm.tokenize("hello " * 400))
    assert str(n_prompt) in err["message"], err
    assert "256" in err["message"], err            # 512 KV cells over 2 slots
    _still_answers(app)


def test_llama_server_sampler_fields_reach_the_chain(app, tiny_llm):
    """top_n_sigma, XTC, dynamic temperature and DRY under llama-server's field names become
    the matching SamplingParams (dry_base < 1 means the default, as in llama-server)."""
    from pyllama import LLM

    built = []
    original = LLM._request

    def spy(self, *args, **kwargs):
        req = original(self, *args, **kwargs)
        built.append(req.sampler)
        return req

    tiny_llm._request = spy.__get__(tiny_llm)
    try:
        body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0.7, "top_n_sigma": 1.5, "xtc_probability": 0.5,
                "xtc_threshold": 0.25, "dynatemp_range": 0.5, "dynatemp_exponent": 2.0, "dry_multiplier": 0.75,
                "dry_base": 0.5, "dry_allowed_length": 3, "dry_penalty_last_n": 32, "dry_sequence_breakers": ["##"]}
        r = _post(app, "/v1/completions", body)
        assert r.status_code == 200, r.text
    finally:
        del tiny_llm._request
    (chain,) = built
    assert chain.names == ["dry", "top-n-sigma", "top-k", "top-p", "min-p", "xtc", "temp-ext", "dist"]
    params = dict(chain.stage_params)
    assert params["dry"] == {"multiplier": 0.75, "base": 1.75, "allowed_length": 3, "last_n": 32,
                             "seq_breakers": ["##"]}
    assert params["top-n-sigma"] == {"n": 1.5}
    assert params["xtc"]["p"] == 0.5 and params["xtc"]["t"] == 0.25
    assert params["temp-ext"]["delta"] == 0.5 and params["temp-ext"]["exponent"] == 2.0


def test_auth_cors_404_405_413(app):
    r = _get(app, "/v1/models", headers={})
    assert_error(r, 401, type_="authentication_error")
    r = _get(app, "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, type_="authentication_error")
    assert _get(app, "/health", headers={}).status_code == 200        # no key needed
    assert _get(app, "/v1/models").status_code == 200
    assert_error(_get(app, "/v2/nothing"), 404, type_="not_found_error")
    assert_error(_get(app, "/v1/chat/completions"), 405)
    r = _post(app, "/v1/completions", content='{"prompt": "' + "x" * 5000 + '"}')
    err = assert_error(r, 413)
    assert "4096" in err["message"]

    async def preflight():
        async with _client(app) as c:
            return await c.options("/v1/chat/completions", headers={
                "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
    r = run(preflight())
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://ui.example"
    _still_answers(app)


def test_n_beyond_the_slots_is_400(app):
    body = {"messages": [{"role": "user", "content": "x"}], "n": 3, "max_tokens": 2}
    err = assert_error(_post(app, "/v1/chat/completions", body), 400, "n")
    assert "2" in err["message"]
    r = _post(app, "/v1/chat/completions", {**body, "n": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["message"]["content"] == choices[1]["message"]["content"]
    _still_answers(app)


def test_tool_calls_shape_streamed_and_not():
    """The server's side of tool calling (the library's Completion.tool_calls -> OpenAI's
    message.tool_calls / tool_calls deltas), with a stand-in LLM."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}

    class ToolLLM(FakeLLM):
        async def achat(self, messages, **kw):
            assert kw["tools"][0]["function"]["name"] == "get_weather" and kw["tool_choice"] == "required"
            t = SimpleNamespace(prompt_n=3, prompt_ms=1.0, cached_n=0, predicted_n=2, predicted_ms=2.0)
            return SimpleNamespace(text='{"name": ...}', content=None, tool_calls=[call], tokens=[1, 2],
                                   finish_reason="tool_calls", prompt_tokens=3, timings=t, logprobs=None)

    body = {"messages": [{"role": "user", "content": "weather?"}], "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}

    async def main():
        async with _client(create_app(ToolLLM())) as c:
            r = (await c.post("/v1/chat/completions", json=body)).json()
            choice = r["choices"][0]
            assert choice["finish_reason"] == "tool_calls"
            assert choice["message"]["tool_calls"] == [call] and choice["message"]["content"] is None
            s = await c.post("/v1/chat/completions", json={**body, "stream": True})
            chunks = _sse(s.text)
            deltas = [d for ch in chunks for d in ch["choices"][0]["delta"].get("tool_calls", [])] if chunks else []
            assert deltas == [dict(call, index=0)]
            assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    run(main())


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_request(stream):
    """A client that goes away cancels its LLM call (the awaiting task, or the async stream),
    and its place in slots + queue is given back."""

    class EndlessLLM(FakeLLM):
        def astream(self, prompt, **kw):
            llm = self

            async def gen():
                llm.started += 1
                try:
                    while True:
                        await asyncio.sleep(0.01)
                        yield SimpleNamespace(index=0, text="x", token_ids=[1], logprobs=None, finish_reason=None)
                finally:
                    llm.cancelled += 1
            return gen()

    async def main():
        llm = EndlessLLM()
        app = create_app(llm)
        backend = app.state.pyllama.backend
        body = json.dumps({"prompt": "x", "stream": stream}).encode()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                                      (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        sent_body = False
        gone = asyncio.Event()

        async def receive():
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            pass

        call = asyncio.ensure_future(app(scope, receive, send))
        for _ in range(300):
            if llm.started:
                break
            await asyncio.sleep(0.01)
        assert llm.started == 1 and backend.in_flight == 1
        await asyncio.sleep(0.1)
        gone.set()                                  # the client leaves
        await asyncio.wait_for(call, 5)
        assert llm.cancelled == 1
        assert backend.in_flight == 0
    run(main())


def test_timings_report_speculation_as_llama_server_does(tiny_model_path):
    """`timings.draft_n` / `draft_n_accepted` (llama-server's names) with LLM(spec_type=...)."""
    from pyllama import LLM

    # spec_cost_model=False: draft whatever a drafted token costs on this machine (the test
    # is about the report; the cost model may rightly decline to draft on a slow runner).
    with LLM(tiny_model_path, n_ctx=1024, n_parallel=1, spec_type="ngram-simple", spec_ngram_size_n=1,
             n_threads=1, spec_cost_model=False) as llm:
        app = create_app(llm)
        head = "Once upon a time"       # a prompt that repeats its start: the n-gram lookup drafts
        prompt = head + llm.complete(head, max_tokens=40, temperature=0).text + head
        r = _post(app, "/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        t = r.json()["timings"]
        assert t["draft_n"] > 0 and 0 <= t["draft_n_accepted"] <= t["draft_n"]
        want = llm.complete(prompt, max_tokens=24, temperature=0, speculative=False).text
        assert r.json()["choices"][0]["text"] == want
