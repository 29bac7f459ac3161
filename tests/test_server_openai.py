"""`pyllama serve` as a real process on a free loopback port, driven by the real `openai`
package and LangChain's `ChatOpenAI`: what a user pointing an existing client at it gets.

Every process a test starts is stopped by that test (or by its module fixture), and every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from server_process import ServerProcess  # noqa: E402
from test_server_app import BAD_INPUTS  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- SmolLM2, 8 slots

ALIAS = "smollm2-test"


@pytest.fixture(scope="module")
def smol_server(smollm2_path):
    server = ServerProcess("-m", str(smollm2_path), "-np", "8", "-c", "16384", "--alias", ALIAS, "-t", "2")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(text):
    return [{"role": "user", "content": text}]


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [ALIAS]


def test_chat_streamed_equals_non_streamed(client):
    kw = dict(model=ALIAS, messages=ask("What is the capital of France?"), max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw)
    assert whole.object == "chat.completion" and whole.model == ALIAS
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    pieces = []
    reasons = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(pieces) == text
    assert reasons[-1] == whole.choices[0].finish_reason


def test_completion_streamed_equals_non_streamed(client):
    kw = dict(model=ALIAS, prompt="The three primary colors are", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw)
    text = whole.choices[0].text
    assert text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == text


def test_stream_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=ALIAS, messages=ask("Say hi"), max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    n_text = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert usage.completion_tokens >= n_text > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_strings(client):
    free = client.completions.create(model=ALIAS, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    assert " 6" in free.choices[0].text, free.choices[0].text      # the model counts on
    r = client.completions.create(model=ALIAS, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 6"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free.choices[0].text.split(" 6")[0]
    chat = client.chat.completions.create(model=ALIAS, messages=ask("Count from 1 to 10."), max_tokens=40,
                                          temperature=0, stop=["5"])
    assert "5" not in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"


def test_response_format_json_schema_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=ALIAS, messages=ask("Invent a person. Answer in JSON."), max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    data = json.loads(r.choices[0].message.content)
    jsonschema.validate(data, schema)
    r = client.chat.completions.create(model=ALIAS, messages=ask('Reply with {"ok": true} in JSON.'),
                                       max_tokens=200, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_logprobs_greedy_picks_the_top_entry(client):
    r = client.chat.completions.create(model=ALIAS, messages=ask("Name a fruit."), max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)
        assert entry.logprob <= 0
    # legacy completions: logprobs=K
    c = client.completions.create(model=ALIAS, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text


def test_n3(client):
    r = client.chat.completions.create(model=ALIAS, messages=ask("Write a word."), max_tokens=6, temperature=1.0,
                                       seed=7, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content is not None for c in r.choices)
    same = client.chat.completions.create(model=ALIAS, messages=ask("Write a word."), max_tokens=6, temperature=0,
                                          n=3)
    assert len({c.message.content for c in same.choices}) == 1
    # streamed n=3: every index gets its text and a finish_reason
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in client.chat.completions.create(model=ALIAS, messages=ask("Write a word."), max_tokens=6,
                                                temperature=0, n=3, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    assert texts[0] == texts[1] == texts[2] == same.choices[0].message.content


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_tools_give_parseable_tool_calls(client, choice):
    r = client.chat.completions.create(model=ALIAS, messages=ask("What's the weather in Paris?"),
                                       tools=[WEATHER, TIME], tool_choice=choice, max_tokens=60, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    calls = c.message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].id
    if isinstance(choice, dict):
        assert calls[0].function.name == "get_weather"
    assert calls[0].function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(calls[0].function.arguments), dict)
    # streamed: the same call arrives as tool_calls deltas
    deltas = []
    reasons = []
    for chunk in client.chat.completions.create(model=ALIAS, messages=ask("What's the weather in Paris?"),
                                                tools=[WEATHER, TIME], tool_choice=choice, max_tokens=60,
                                                temperature=0, stream=True):
        for ch in chunk.choices:
            deltas.extend(ch.delta.tool_calls or ())
            reasons.append(ch.finish_reason)
    assert deltas and deltas[0].function.name == calls[0].function.name
    assert reasons[-1] == "tool_calls"


def test_embeddings(client):
    r = client.embeddings.create(model=ALIAS, input=["a cat", "a dog", "stock markets"])
    vecs = [d.embedding for d in r.data]
    assert len(vecs) == 3 and len(vecs[0]) == 576
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731  (normalized vectors)
    assert dot(vecs[0], vecs[1]) > dot(vecs[0], vecs[2])
    assert r.usage.prompt_tokens > 0
    f = client.embeddings.create(model=ALIAS, input="a cat", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(vecs[0], abs=1e-5)


def test_eight_concurrent_streams_equal_sequential(smol_server, client):
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]
    kw = dict(model=ALIAS, max_tokens=16, temperature=0)
    sequential = [client.chat.completions.create(messages=ask(p), **kw).choices[0].message.content for p in prompts]

    async def one(aclient, p):
        parts = []
        async for chunk in await aclient.chat.completions.create(messages=ask(p), stream=True, **kw):
            for c in chunk.choices:
                parts.append(c.delta.content or "")
        return "".join(parts)

    async def all_at_once():
        aclient = openai.AsyncOpenAI(base_url=smol_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        async with aclient:
            return await asyncio.wait_for(asyncio.gather(*(one(aclient, p) for p in prompts)), 300)

    concurrent = asyncio.run(all_at_once())
    assert concurrent == sequential
    text = httpx.get(smol_server.url + "/metrics", timeout=10).text
    per_decode = float(re.search(r"^llamacpp:n_busy_slots_per_decode (\S+)$", text, re.M).group(1))
    assert per_decode > 1.0, text       # requests really shared decodes


def _first_event(lines):
    """Read up to the first SSE event.  (Keep `lines`: an abandoned iter_lines() generator
    closes the connection, which the server rightly takes as a client that went away.)"""
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("the stream ended before its first event")


def _busy_slots(url):
    return [s for s in httpx.get(url + "/slots", timeout=10).json() if s.get("is_processing")]


def _metric(url, name):
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(rf"^llamacpp:{name} (\S+)$", text, re.M).group(1))


def test_disconnect_mid_stream_frees_the_slot(smol_server, client):
    url = smol_server.url
    body = {"model": ALIAS, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                _first_event(lines)
            assert _busy_slots(url), "the streaming request should hold a slot"
            assert _metric(url, "requests_processing") == 1
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 15
    while _busy_slots(url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _busy_slots(url) == []
    assert _metric(url, "requests_processing") == 0
    r = client.completions.create(model=ALIAS, prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].text


def test_prompt_cache_reports_cached_tokens(smol_server, client):
    system = "You are a helpful assistant. " + " ".join(
        f"Rule {i}: always answer politely and precisely about topic number {i}." for i in range(40))
    first = client.chat.completions.create(
        model=ALIAS, messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hi!"}],
        max_tokens=4, temperature=0)
    second = client.chat.completions.create(
        model=ALIAS, messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hello there!"}],
        max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens > 500
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 500, second.usage
    t1, t2 = first.model_extra["timings"], second.model_extra["timings"]
    assert t2["prompt_n"] < t1["prompt_n"] / 4, (t1, t2)
    assert t2["cache_n"] == cached
    # llama-server's per-request switch: the same prompt again, evaluated afresh
    third = client.chat.completions.create(
        model=ALIAS, messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hello there!"}],
        max_tokens=4, temperature=0, extra_body={"cache_prompt": False})
    assert third.usage.prompt_tokens_details.cached_tokens == 0, third.usage
    assert third.model_extra["timings"]["prompt_n"] == third.usage.prompt_tokens


def test_bad_inputs_against_the_process(smol_server, client):
    with httpx.Client(base_url=smol_server.url, timeout=60) as h:
        for path, content, param, code in BAD_INPUTS:
            r = h.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, content, r.text)
            err = r.json()["error"]
            assert {"message", "type", "param", "code"} <= set(err) and err["type"] == "invalid_request_error"
            if param is not None:
                assert err["param"] == param, (content, err)
            if code is not None:
                assert err["code"] == code, (content, err)
        r = h.post("/v1/chat/completions", json={"messages": ask("word " * 3000), "max_tokens": 2})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded"
        assert re.search(r"\b2048\b", err["message"]) and err["n_ctx"] == 2048 and err["n_prompt_tokens"] > 2048
        r = h.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = h.post("/v1/completions", content=b'{"prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=ALIAS, messages=[{"role": "robot", "content": "x"}])
    assert info.value.status_code == 400 and info.value.param == "messages.0.role"
    assert client.completions.create(model=ALIAS, prompt="Hello", max_tokens=2).choices[0].text is not None


# --------------------------------------------------------------------------- LangChain


def test_langchain_chat_openai(smol_server):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel

    llm = lc.ChatOpenAI(base_url=smol_server.url + "/v1", api_key="unused", model=ALIAS, temperature=0,
                        max_tokens=24, max_retries=0, timeout=120)
    answer = llm.invoke("What is the capital of France?")
    assert isinstance(answer.content, str) and answer.content
    streamed = "".join(chunk.content for chunk in llm.stream("What is the capital of France?"))
    assert streamed == answer.content

    class City(BaseModel):
        name: str
        country: str

    structured = lc.ChatOpenAI(base_url=smol_server.url + "/v1", api_key="unused", model=ALIAS, temperature=0,
                               max_tokens=60, max_retries=0, timeout=120).with_structured_output(City)
    city = structured.invoke("Name a city in Japan and its country, as JSON.")
    assert isinstance(city, City) and city.name and city.country


# --------------------------------------------------------------------------- one slot, no queue, a key; signals


@pytest.fixture(scope="module")
def tiny_server(smollm2_path):
    # SmolLM2 rather than the tiny model: a long answer must still be running while the
    # test fills the queue (the tiny model finishes thousands of tokens in a second or two).
    server = ServerProcess("-m", str(smollm2_path), "-np", "1", "-c", "4096", "--max-queue", "0",
                           "--api-key", "secret", "-t", "1")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_api_key(tiny_server):
    good = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="secret", max_retries=0)
    bad = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401
    r = httpx.post(tiny_server.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(tiny_server.url + "/health", timeout=10).status_code == 200      # open
    assert good.completions.create(model="tiny", prompt="Hello", max_tokens=3).usage.completion_tokens == 3


def test_queue_full_gives_503(tiny_server):
    url = tiny_server.url
    headers = {"Authorization": "Bearer secret"}
    client = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0)
    with httpx.Client(timeout=60, headers=headers) as h:
        long = {"prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True, "temperature": 0}
        with h.stream("POST", url + "/v1/completions", json=long) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            _first_event(lines)
            # 1 slot, queue of 0: the next request is refused at once
            r2 = h.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r2.status_code == 503, r2.text
            assert r2.headers["retry-after"].isdigit()
            assert r2.json()["error"]["type"] == "unavailable_error"
            with pytest.raises(openai.APIStatusError) as info:
                client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
            assert info.value.status_code == 503
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r3 = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=headers, timeout=30)
        if r3.status_code != 503:
            break
        time.sleep(0.1)
    assert r3.status_code == 200, r3.text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_mid_stream(smollm2_path, sig):
    server = ServerProcess("-m", str(smollm2_path), "-np", "2", "-c", "4096", "--host", "0.0.0.0", "-t", "1")
    try:
        url = server.wait_ready().replace("0.0.0.0", "127.0.0.1")
        assert "WARNING" in server.stderr and "--api-key" in server.stderr      # exposed without a key
        with httpx.Client(timeout=30) as h:
            body = {"prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True, "temperature": 0}
            with h.stream("POST", url + "/v1/completions", json=body) as r:
                it = r.iter_lines()
                _first_event(it)
                assert _busy_slots(url)
                t0 = time.monotonic()
                server.proc.send_signal(sig)
                lines = []
                try:    # the stream ends (cut, or closed by the server) without finishing
                    for line in it:
                        lines.append(line)
                except httpx.HTTPError:
                    pass
                assert "data: [DONE]" not in lines
        rc = server.proc.wait(15)
        assert time.monotonic() - t0 < 10
        assert rc == 0, server.stderr[-3000:]
    finally:
        server.stop()
