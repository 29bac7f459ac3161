"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) driven by the real
`anthropic` package: against a `pyllama serve` process on SmolLM2 (with an API key, which
the SDK sends as ``x-api-key``), and in-process for images (the tiny model with the tiny
projector), thinking blocks (a tiny model whose template thinks) and disconnects and
failures mid-stream (a fake LLM).

Every process a test starts is stopped by that test (or by its module fixture), and every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
anthropic = pytest.importorskip("anthropic")

from server_process import ServerProcess  # noqa: E402
from test_server_app import FakeLLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
JPEG = ROOT / "vendor" / "llama.cpp" / "tools" / "mtmd" / "test-1.jpeg"

ALIAS = "smollm2-anthropic"
KEY = "secret"
GREEDY = {"temperature": 0}     # this SDK has no sampling arguments: they go in extra_body


# --------------------------------------------------------------------------- SmolLM2, 2 slots, a key


@pytest.fixture(scope="module")
def smol_server(smollm2_path):
    server = ServerProcess("-m", str(smollm2_path), "-np", "2", "-c", "8192", "--alias", ALIAS, "-t", "2",
                           "--api-key", KEY)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(smol_server):
    return anthropic.Anthropic(base_url=smol_server.url, api_key=KEY, max_retries=0, timeout=120)


def ask(text):
    return [{"role": "user", "content": text}]


COUNT = ask("Count from 1 to 10, separated by commas.")

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "description": "Current time in a timezone",
        "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}


def test_create_shape_and_usage(client):
    m = client.messages.create(model="anything", max_tokens=40, messages=COUNT, extra_body=GREEDY)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == ALIAS
    assert [b.type for b in m.content] == ["text"] and "1, 2, 3" in m.content[0].text
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.output_tokens > 0
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == client.messages.count_tokens(
        model="x", messages=COUNT).input_tokens


def test_max_tokens_is_required_and_honoured(client):
    m = client.messages.create(model="x", max_tokens=5, messages=COUNT, extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 5
    with pytest.raises(anthropic.BadRequestError) as info:
        client.post("/v1/messages", body={"model": "x", "messages": COUNT}, cast_to=object)
    assert info.value.status_code == 400 and "max_tokens" in info.value.api_message
    assert info.value.body["type"] == "error" and info.value.type == "invalid_request_error"


def test_stream_equals_create(client):
    kw = dict(model="x", max_tokens=24, messages=ask("What is the capital of France?"), extra_body=GREEDY)
    whole = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == whole.content[0].text
    assert final.content[0].text == whole.content[0].text and final.id.startswith("msg_")
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    assert (final.usage.input_tokens + final.usage.cache_read_input_tokens
            == whole.usage.input_tokens + whole.usage.cache_read_input_tokens)
    # stream=True: the raw events, in Anthropic's order
    events = list(client.messages.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    start = events[0].message
    assert start.content == [] and start.stop_reason is None and start.model == ALIAS
    assert start.usage.input_tokens == client.messages.count_tokens(model="x", messages=kw["messages"]).input_tokens
    assert events[1].index == 0 and events[1].content_block.type == "text"
    assert all(e.delta.type == "text_delta" and e.index == 0 for e in events[2:-3])
    assert events[-2].delta.stop_reason == whole.stop_reason and events[-2].usage.output_tokens > 0


def test_sse_framing(smol_server):
    """`event:` and `data:` lines, the event's name equal to its data's type."""
    body = {"model": "x", "max_tokens": 6, "messages": COUNT, "stream": True, "temperature": 0}
    with httpx.Client(timeout=60, headers={"x-api-key": KEY}) as h:
        r = h.post(smol_server.url + "/v1/messages", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b]
    for b in blocks:
        name, data = b.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == name[7:]
    assert blocks[-1] == 'event: message_stop\ndata: {"type":"message_stop"}'
    assert "[DONE]" not in r.text


def test_stop_sequences(client):
    m = client.messages.create(model="x", max_tokens=40, messages=COUNT, stop_sequences=["7", "5"],
                               extra_body=GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "5"     # the first one reached
    text = m.content[0].text
    assert text.startswith("1, 2") and "5" not in text and "7" not in text
    with client.messages.stream(model="x", max_tokens=40, messages=COUNT, stop_sequences=["7", "5"],
                                extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "5" and final.content[0].text == text


def test_sampling_fields_reach_the_sampler(client):
    greedy = client.messages.create(model="x", max_tokens=16, messages=ask("Write a word."), extra_body=GREEDY)
    top1 = client.messages.create(model="x", max_tokens=16, messages=ask("Write a word."),
                                  extra_body={"temperature": 1.0, "top_k": 1, "top_p": 0.9})
    assert top1.content[0].text == greedy.content[0].text


def test_system_as_string_and_as_blocks(client):
    system = "You are a pirate. Answer like a pirate."
    a = client.messages.create(model="x", max_tokens=8, system=system, messages=ask("Hello"), extra_body=GREEDY)
    b = client.messages.create(model="x", max_tokens=8, system=[{"type": "text", "text": system}],
                               messages=ask("Hello"), extra_body=GREEDY)
    plain = client.messages.create(model="x", max_tokens=8, messages=ask("Hello"), extra_body=GREEDY)
    assert a.content[0].text == b.content[0].text != plain.content[0].text
    # (SmolLM2's template puts in a system prompt of its own when there is none)
    n = client.messages.count_tokens(model="x", system=system, messages=ask("Hello")).input_tokens
    assert client.messages.count_tokens(model="x", system=system + " Arr!", messages=ask("Hello")).input_tokens > n


def test_text_blocks_and_conversation(client):
    blocks = client.messages.create(model="x", max_tokens=12, extra_body=GREEDY, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": " 2 + 2?"}]}])
    assert blocks.content and blocks.content[0].type == "text"
    turns = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"},
             {"role": "user", "content": "How are you?"}]
    assert client.messages.count_tokens(model="x", messages=turns).input_tokens > \
        client.messages.count_tokens(model="x", messages=turns[2:]).input_tokens
    assert client.messages.create(model="x", max_tokens=8, messages=turns, extra_body=GREEDY).content


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_weather"}, {"type": "any"}])
def test_forced_tool_use(client, choice):
    kw = dict(model="x", max_tokens=40, messages=ask("What's the weather in Paris?"), tools=[WEATHER, TIME],
              tool_choice=choice, extra_body=GREEDY)
    m = client.messages.create(**kw)
    assert m.stop_reason == "tool_use", m
    uses = [b for b in m.content if b.type == "tool_use"]
    assert uses and uses[0].id and isinstance(uses[0].input, dict)
    assert uses[0].name == "get_weather" if choice["type"] == "tool" else uses[0].name in ("get_weather", "get_time")
    if uses[0].name == "get_weather":
        assert uses[0].input == {"city": "Paris"}
    # streamed: content_block_start (tool_use) + input_json_delta, accumulated by the SDK
    with client.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.index for s in starts] == list(range(len(starts)))
    assert starts[-1].content_block.type == "tool_use" and starts[-1].content_block.name == uses[0].name
    assert final.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(u.name, u.input) for u in uses]


def test_tool_result_round_equals_the_chat_route(smol_server, client):
    """A tool_use / tool_result history is the same prompt as OpenAI's tool_calls / tool
    messages on /v1/chat/completions: the same greedy answer and prompt size."""
    history = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "Sunny, 25 degrees Celsius"}]}]
    m = client.messages.create(model="x", max_tokens=24, messages=history, tools=[WEATHER],
                               tool_choice={"type": "none"}, extra_body=GREEDY)
    assert m.content and m.content[0].type == "text" and m.stop_reason in ("end_turn", "max_tokens")
    openai_messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."}], "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny, 25 degrees Celsius"}]
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as h:
        r = h.post(smol_server.url + "/v1/chat/completions",
                   json={"messages": openai_messages, "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    chat = r.json()
    assert m.content[0].text == chat["choices"][0]["message"]["content"]
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == chat["usage"]["prompt_tokens"]
    # the result's text (here as text blocks) is in the prompt, and so are the tools
    longer = json.loads(json.dumps(history))
    longer[2]["content"][0]["content"] = [{"type": "text", "text": "Sunny, 25 degrees Celsius, light wind"}]
    n = client.messages.count_tokens(model="x", messages=history, tools=[WEATHER]).input_tokens
    assert client.messages.count_tokens(model="x", messages=longer, tools=[WEATHER]).input_tokens > n
    assert client.messages.count_tokens(model="x", messages=history).input_tokens < n


def test_bad_requests_are_anthropic_400s(smol_server, client):
    cases = [
        ({"model": "x", "max_tokens": 8}, "messages"),
        ({"model": "x", "max_tokens": 8, "messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"model": "x", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "video"),
        ({"model": "x", "max_tokens": 8, "messages": COUNT, "temprature": 0}, "did you mean 'temperature'"),
        ({"model": "x", "max_tokens": 8, "messages": COUNT, "tool_choice": {"type": "tool", "name": "nope"}},
         "nope"),
        ({"model": "x", "max_tokens": 8, "messages": COUNT, "stop_sequences": [""]}, "stop sequences"),
        ({"model": "x", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}]}, "base64"),
    ]
    with httpx.Client(base_url=smol_server.url, timeout=60, headers={"x-api-key": KEY}) as h:
        for body, words in cases:
            for path in ("/v1/messages", "/v1/messages/count_tokens"):
                r = h.post(path, json=body)
                assert r.status_code == 400, (path, body, r.text)
                got = r.json()
                assert got["type"] == "error" and got["error"]["type"] == "invalid_request_error", got
                assert words in got["error"]["message"], (body, got)
        r = h.post("/v1/messages", content=b'{"max_tokens": ', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["type"] == "error"
    jpeg = base64.b64encode(JPEG.read_bytes()).decode()
    image = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": jpeg}},
        {"type": "text", "text": "What is this?"}]}]
    with pytest.raises(anthropic.BadRequestError, match="--mmproj"):
        client.messages.create(model="x", max_tokens=4, messages=image)
    with pytest.raises(anthropic.BadRequestError, match="--mmproj"):
        client.messages.count_tokens(model="x", messages=image)
    assert client.messages.create(model="x", max_tokens=2, messages=COUNT).content      # still answers


def test_empty_messages_are_answered(smol_server, client):
    """As llama-server: an empty messages list is answered (here as one empty user turn),
    streamed or not, and counted; a request without messages stays a 400."""
    m = client.messages.create(model="x", max_tokens=4, messages=[], extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.usage.output_tokens > 0
    n = client.messages.count_tokens(model="x", messages=[]).input_tokens
    assert n == m.usage.input_tokens + m.usage.cache_read_input_tokens > 0
    with client.messages.stream(model="x", max_tokens=4, messages=[], extra_body=GREEDY) as stream:
        assert stream.get_final_message().usage.output_tokens > 0
    with_system = client.messages.count_tokens(model="x", system="Be brief.", messages=[]).input_tokens
    assert with_system > 0
    with httpx.Client(base_url=smol_server.url, timeout=60, headers={"x-api-key": KEY}) as h:
        r = h.post("/v1/messages", json={"model": "x", "max_tokens": 4})
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_empty_messages_become_one_empty_user_turn():
    from pyllama.server.anthropic_api import MessagesRequest, chat_messages

    assert chat_messages(MessagesRequest(messages=[])) == [{"role": "user", "content": ""}]
    assert chat_messages(MessagesRequest(messages=[], system="s")) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": ""}]


def test_api_key_headers(smol_server):
    wrong = anthropic.Anthropic(base_url=smol_server.url, api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model="x", max_tokens=2, messages=COUNT)
    body = {"model": "x", "max_tokens": 2, "messages": COUNT}
    with httpx.Client(base_url=smol_server.url, timeout=60) as h:
        assert h.post("/v1/messages", json=body).status_code == 401
        assert h.post("/v1/messages", json=body, headers={"x-api-key": KEY}).status_code == 200
        assert h.post("/v1/messages", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert h.post("/v1/messages/count_tokens", json=body, headers={"x-api-key": "no"}).status_code == 401


# --------------------------------------------------------------------------- in-process: images, thinking


def _serve_in_process(llm, run):
    """`run(client)` with the real anthropic client against the in-process app."""
    httpx2 = pytest.importorskip("httpx2")
    from pyllama.server.app import create_app

    async def main():
        app = create_app(llm)
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as http:
            client = anthropic.AsyncAnthropic(base_url="http://test", api_key="x", http_client=http, max_retries=0)
            return await run(client)

    return asyncio.run(asyncio.wait_for(main(), 120))


def test_base64_image_is_the_chat_routes_image_part(tmp_path):
    from tiny_mmproj import make_tiny_mmproj
    from tiny_model import make_tiny_llama

    from pyllama import LLM

    text, proj = make_tiny_llama(tmp_path / "text.gguf"), make_tiny_mmproj(tmp_path / "mmproj.gguf")
    data = base64.b64encode(JPEG.read_bytes()).decode()
    openai_chat = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + data}},
        {"type": "text", "text": "What is in this image?"}]}]
    messages = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": data}},
        {"type": "text", "text": "What is in this image?"}]}]
    with LLM(str(text), mmproj_path=str(proj), n_ctx=1024, n_parallel=2, kv_unified=False, n_threads=1,
             chat_template="chatml") as llm:
        want = llm.chat(openai_chat, max_tokens=6, temperature=0)
        n_prompt = len(llm.chat_prompt(openai_chat))

        async def run(client):
            m = await client.messages.create(model="x", max_tokens=6, messages=messages, extra_body=GREEDY)
            return m, await client.messages.count_tokens(model="x", messages=messages)

        m, n = _serve_in_process(llm, run)
    assert m.content[0].text == want.text and m.usage.output_tokens == 6
    assert n.input_tokens == n_prompt == m.usage.input_tokens + m.usage.cache_read_input_tokens


#: ChatML whose generation prompt opens the thinking (QwQ / R1 style), unless the template is
#: told enable_thinking=false; the tiny random model then "thinks" until a budget ends it.
OPENS_THINKING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}")


def test_thinking_blocks(vocab_dir, tmp_path):
    from tiny_model import TOKEN_TYPE_USER_DEFINED, make_tiny_llama, make_vocab_with_tokens

    from pyllama import LLM

    vocab = make_vocab_with_tokens(tmp_path / "vocab.gguf", [("<think>", TOKEN_TYPE_USER_DEFINED),
                                                             ("</think>", TOKEN_TYPE_USER_DEFINED),
                                                             "<|im_start|>", "<|im_end|>"])
    path = make_tiny_llama(tmp_path / "think.gguf", vocab_from=vocab, chat_template=OPENS_THINKING)
    messages = ask("What is two plus two?")
    with LLM(path, n_ctx=1024, n_parallel=2, kv_unified=False, n_threads=1) as llm:
        lib = llm.chat(messages, max_tokens=12, reasoning_budget=3, temperature=0)
        assert lib.reasoning and lib.text
        kw = dict(model="x", max_tokens=12, messages=messages, extra_body=GREEDY)

        async def run(client):
            m = await client.messages.create(thinking={"type": "enabled", "budget_tokens": 3}, **kw)
            async with client.messages.stream(thinking={"type": "enabled", "budget_tokens": 3}, **kw) as stream:
                events = [e async for e in stream]
                final = await stream.get_final_message()
            off = await client.messages.create(thinking={"type": "disabled"}, **kw)
            counts = [(await client.messages.count_tokens(model="x", messages=messages, thinking=t)).input_tokens
                      for t in ({"type": "enabled", "budget_tokens": 3}, {"type": "disabled"})]
            return m, events, final, off, counts

        m, events, final, off, counts = _serve_in_process(llm, run)
        n_off = len(llm.chat_tokens(messages, enable_thinking=False))
        assert counts == [len(llm.chat_tokens(messages)), n_off] and counts[0] != n_off
    # the thinking first (signed with an empty signature, as llama-server), then the answer
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == lib.reasoning and m.content[0].signature == "" and m.content[1].text == lib.text
    assert [(b.type, getattr(b, "thinking", None), getattr(b, "text", None)) for b in final.content] == \
        [(b.type, getattr(b, "thinking", None), getattr(b, "text", None)) for b in m.content]
    starts = [(e.index, e.content_block.type) for e in events if e.type == "content_block_start"]
    assert starts == [(0, "thinking"), (1, "text")]
    deltas = [(e.index, e.delta.type) for e in events if e.type == "content_block_delta"]
    assert (0, "thinking_delta") in deltas and deltas.index((0, "signature_delta")) < deltas.index((1, "text_delta"))
    # thinking disabled: the template closes the thinking, the answer has no thinking block
    assert [b.type for b in off.content] == ["text"] and off.usage.input_tokens + off.usage.cache_read_input_tokens \
        == n_off


# --------------------------------------------------------------------------- a fake LLM: disconnects, failures


class _StreamingLLM(FakeLLM):
    """Streams 'x' pieces: forever, or failing after `fail_after` of them."""

    multimodal = None

    def __init__(self, fail_after=None):
        super().__init__()
        self.fail_after = fail_after

    def detokenize(self, tokens):
        return ""

    def astream_chat(self, messages, **kw):
        llm = self

        async def gen():
            llm.started += 1
            try:
                k = 0
                while True:
                    await asyncio.sleep(0.01)
                    if llm.fail_after is not None and k == llm.fail_after:
                        raise RuntimeError("the engine broke")
                    k += 1
                    yield SimpleNamespace(index=0, text="x", token_ids=[1], logprobs=None, finish_reason=None)
            finally:
                llm.cancelled += 1
        return gen()


def _request(app, body: dict, disconnect: asyncio.Event, sent: list):
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/messages", "raw_path": b"/v1/messages",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                                  (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    given = False

    async def receive():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    return app(scope, receive, send)


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_request(stream):
    from pyllama.server.app import create_app

    class EndlessChat(_StreamingLLM):
        async def achat(self, messages, **kw):
            return await self.acomplete("", **kw)       # waits for `release`, which never comes

    async def main():
        llm = EndlessChat()
        app = create_app(llm)
        backend = app.state.pyllama.backend
        gone = asyncio.Event()
        sent: list = []
        call = asyncio.ensure_future(_request(app, {"max_tokens": 100, "messages": COUNT, "stream": stream},
                                              gone, sent))
        for _ in range(300):
            if llm.started:
                break
            await asyncio.sleep(0.01)
        assert llm.started == 1 and backend.in_flight == 1
        await asyncio.sleep(0.1)
        gone.set()                                  # the client leaves
        await asyncio.wait_for(call, 5)
        assert llm.cancelled == 1 and backend.in_flight == 0
        if stream:
            body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
            assert body.startswith(b"event: message_start\n") and b"text_delta" in body
    asyncio.run(asyncio.wait_for(main(), 60))


def test_failure_mid_stream_is_an_error_event():
    from pyllama.server.app import create_app

    async def main():
        llm = _StreamingLLM(fail_after=3)
        app = create_app(llm)
        sent: list = []
        await asyncio.wait_for(_request(app, {"max_tokens": 100, "messages": COUNT, "stream": True},
                                        asyncio.Event(), sent), 10)
        assert sent[0]["status"] == 200
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
        assert app.state.pyllama.backend.in_flight == 0 and llm.cancelled == 1
        return body

    body = asyncio.run(asyncio.wait_for(main(), 60))
    last = [b for b in body.split("\n\n") if b][-1]
    name, data = last.split("\n")
    assert name == "event: error"
    err = json.loads(data[6:])
    assert err == {"type": "error", "error": {"type": "api_error", "message": err["error"]["message"]}}
    assert "the engine broke" in err["error"]["message"]
    assert body.count("text_delta") == 3 and "message_stop" not in body
