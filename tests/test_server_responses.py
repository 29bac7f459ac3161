"""OpenAI's Responses API (``POST /v1/responses``) driven by the real `openai` package.

The mechanics (the Responses -> chat conversion, the Response object, the event stream,
errors, disconnects) run in-process on the tiny random model, or on a stand-in LLM where a
shape must be exact (tool calls, a stream that fails); what needs sensible text (an answer,
a tool call, a JSON schema) runs against a `pyllama serve` process on SmolLM2, as
llama-server's own tests/unit/test_compat_oai_responses.py does on its tiny model.
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
openai = pytest.importorskip("openai")

from pyllama.server.app import create_app  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from test_server_app import FakeLLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JPEG = ROOT / "vendor" / "llama.cpp" / "tools" / "mtmd" / "test-1.jpeg"

#: The event types of a streamed text answer, in order (the deltas repeat).
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done", "response.completed"]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def with_client(app, fn):
    """Run ``await fn(client, http)``: an `openai.AsyncOpenAI` and an httpx client, both
    talking to `app` in-process."""
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http,
                                        max_retries=0)
            return await fn(client, http)
    return run(main())


def sse_events(text):
    """(event name, data) of each event of a Responses stream, checking that every event's
    ``event:`` line names the ``type`` of its data."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"], block
        events.append(data)
    return events


def collapse(types):
    """The event types with runs of the same type shown once (the deltas)."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


# --------------------------------------------------------------------------- the tiny model, in-process


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_path):
    from pyllama import LLM

    llm = LLM(tiny_model_path, n_ctx=1024, n_parallel=2, kv_unified=False, n_threads=1)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def app(tiny_llm):
    return create_app(tiny_llm, model_alias="tiny")


def test_response_is_the_chat_answer_with_instructions_as_system(app):
    async def main(client, http):
        r = await client.responses.create(model="tiny", instructions="You are terse.", input="Hello there",
                                          max_output_tokens=6, temperature=0)
        chat = await client.chat.completions.create(
            model="tiny", max_tokens=6, temperature=0,
            messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}])
        bare = await client.responses.create(model="tiny", input="Hello there", max_output_tokens=6, temperature=0)
        return r, chat, bare

    r, chat, bare = with_client(app, main)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.instructions == "You are terse." and r.max_output_tokens == 6
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert [p.type for p in msg.content] == ["output_text"]
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # the random model runs to max_output_tokens: OpenAI calls that incomplete
    assert (r.status == "incomplete") == (chat.choices[0].finish_reason == "length")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and msg.status == "incomplete"
    # the instructions are in the prompt
    assert bare.usage.input_tokens < r.usage.input_tokens
    assert bare.instructions is None


def test_max_output_tokens_bounds_the_answer(app):
    async def main(client, http):
        return [await client.responses.create(model="tiny", input="Count", max_output_tokens=n, temperature=0,
                                              extra_body={"ignore_eos": True}) for n in (3, 7)]

    short, longer = with_client(app, main)
    assert short.usage.output_tokens == 3 and longer.usage.output_tokens == 7
    assert short.status == longer.status == "incomplete"
    assert short.incomplete_details.reason == "max_output_tokens"
    assert longer.output_text.startswith(short.output_text)


def test_stream_events_shape_and_text(app):
    kw = dict(model="tiny", input=[{"role": "user", "content": "Tell me a story"}], max_output_tokens=10,
              temperature=0)

    async def main(client, http):
        whole = await client.responses.create(**kw)
        events = [e async for e in await client.responses.create(stream=True, **kw)]
        async with client.responses.stream(**kw) as s:      # the SDK's accumulating helper
            final = await s.get_final_response()
        raw = await http.post("/v1/responses", json={**kw, "stream": True})
        return whole, events, final, raw

    whole, events, final, raw = with_client(app, main)
    types = [e.type for e in events]
    assert collapse(types) == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, completed = events[0].response, events[-1].response
    assert created.id == completed.id and created.id.startswith("resp_") and created.status == "in_progress"
    item_id = events[2].item.id
    assert item_id.startswith("msg_")
    assert all(e.item_id == item_id for e in events if hasattr(e, "item_id"))
    assert events[-2].item.id == item_id == completed.output[0].id
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == completed.output_text == whole.output_text == final.output_text and text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text
    assert completed.usage.output_tokens == whole.usage.output_tokens
    assert completed.usage.input_tokens == whole.usage.input_tokens
    assert completed.status == whole.status
    # on the wire: `event: TYPE` + `data: {...}` pairs, no chat-style [DONE]
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    assert [e["type"] for e in sse_events(raw.text)] == types
    assert "[DONE]" not in raw.text


def test_input_items_mean_the_chat_messages(app):
    """Messages with input_text parts, an earlier answer (output_text), a function call and
    its output become the chat conversation llama-server's converter makes of them."""
    call = {"id": "call_7", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "tea"}'}}
    items = [
        {"role": "developer", "content": "Answer briefly."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Find tea."}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Looking it up.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_7", "name": "lookup", "arguments": '{"q": "tea"}'},
        {"type": "function_call_output", "call_id": "call_7", "output": "Green tea, 3 EUR."},
    ]
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Find tea."}]},
        {"role": "assistant", "content": "Looking it up.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_7", "content": "Green tea, 3 EUR."},
    ]

    async def main(client, http):
        r = await client.responses.create(model="tiny", input=items, max_output_tokens=5, temperature=0)
        chat = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
        # llama-server answers /responses too
        plain = await http.post("/responses", json={"input": items, "max_output_tokens": 5, "temperature": 0})
        return r, chat, plain

    r, chat, plain = with_client(app, main)
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == chat.choices[0].message.content
    assert plain.status_code == 200, plain.text
    assert plain.json()["output"][0]["content"][0]["text"] == r.output_text


def test_logprobs_on_request(app):
    async def main(client, http):
        r = await client.responses.create(model="tiny", input="Hi", max_output_tokens=4, temperature=0,
                                          top_logprobs=2, include=["message.output_text.logprobs"])
        plain = await client.responses.create(model="tiny", input="Hi", max_output_tokens=4, temperature=0)
        return r, plain

    r, plain = with_client(app, main)
    lps = r.output[0].content[0].logprobs
    assert len(lps) == r.usage.output_tokens == 4
    assert "".join(e.token for e in lps) == r.output_text
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in lps)
    assert plain.output[0].content[0].logprobs == []


def _assert_400(r, param=None, *, contains=None):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if contains is not None:
        assert contains in err["message"], err
    return err


BAD = [
    ({}, "input", "required"),
    ({"input": 5}, "input", "list of input items"),
    ({"input": []}, "input", "empty"),
    ({"input": [{"type": "magic"}]}, "input.0", "function_call"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role", None),
    ({"input": [{"role": "user", "content": [{"type": "input_txt", "text": "x"}]}]}, "input.0.content.0",
     "input_text"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input.0.content.0",
     "input_file"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input.0.content.0",
     "image_url"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input.0.arguments", None),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0", "stored"),
    ({"input": "x", "max_output_token": 5}, "max_output_token", "did you mean 'max_output_tokens'"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "does not keep"),
    ({"input": "x", "n": 2}, "n", None),
    ({"input": "x", "temperature": 5}, "temperature", None),
    ({"input": "x", "max_output_tokens": -5}, "max_output_tokens", None),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools.0.name", None),
    ({"input": "x", "tool_choice": "required"}, "tool_choice", "tools"),
    ({"input": "x", "tool_choice": {"type": "function", "name": "g"},
      "tools": [{"type": "function", "name": "f"}]}, "tool_choice", "'g'"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", None),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format", "json_schema"),
    ({"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]}, None, "--mmproj"),
]


@pytest.mark.parametrize("body,param,contains", BAD)
def test_bad_request_is_a_400_naming_the_field(app, body, param, contains):
    async def main(client, http):
        return await http.post("/v1/responses", json=body)

    _assert_400(with_client(app, main), param, contains=contains)


def test_bad_request_raises_the_sdks_error_and_the_server_goes_on(app):
    async def main(client, http):
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(model="tiny", input="x", previous_response_id="resp_123")
        bad_json = await http.post("/v1/responses", content=b"{not json", headers={"content-type": "application/json"})
        ok = await client.responses.create(model="tiny", input="x", max_output_tokens=2)
        return info.value, bad_json, ok

    err, bad_json, ok = with_client(app, main)
    assert err.status_code == 400 and "previous_response_id" in str(err)
    assert _assert_400(bad_json)["code"] == "invalid_json"
    assert ok.usage.output_tokens == 2


# --------------------------------------------------------------------------- stand-in LLMs: exact shapes


CALL = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


class ToolLLM(FakeLLM):
    """Answers every chat with one tool call, and records what it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    async def achat(self, messages, **kw):
        self.calls.append((messages, kw))
        t = SimpleNamespace(prompt_n=3, prompt_ms=1.0, cached_n=0, predicted_n=2, predicted_ms=2.0)
        return SimpleNamespace(text='{"name": ...}', content=None, tool_calls=[CALL], tokens=[1, 2],
                               finish_reason="tool_calls", prompt_tokens=3, timings=t, logprobs=None)


def test_function_tools_become_chat_tools_and_calls_function_call_items():
    llm = ToolLLM()
    kw = dict(model="x", input="Weather in Paris?", tools=[WEATHER, {"type": "web_search"}],
              tool_choice={"type": "function", "name": "get_weather"})

    async def main(client, http):
        r = await client.responses.create(**kw)
        events = [e async for e in await client.responses.create(stream=True, **kw)]
        async with client.responses.stream(**kw) as s:
            final = await s.get_final_response()
        # hosted tools only: nothing to choose from, a plain chat (not a 400 for tool_choice)
        await client.responses.create(model="x", input="x", tools=[{"type": "web_search"}], tool_choice="auto")
        return r, events, final

    r, events, final = with_client(create_app(llm), main)
    assert "tools" not in llm.calls[-1][1] and "tool_choice" not in llm.calls[-1][1]
    messages, chat_kw = llm.calls[0]
    # the flat Responses tool -> a chat tool; the hosted tool is skipped (as llama-server skips it)
    assert chat_kw["tools"] == [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    assert chat_kw["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert messages == [{"role": "user", "content": "Weather in Paris?"}]
    assert [o.type for o in r.output] == ["function_call"]
    fc = r.output[0]
    assert (fc.call_id, fc.id, fc.name, fc.arguments, fc.status) == ("call_abc", "fc_abc", "get_weather",
                                                                      '{"city": "Paris"}', "completed")
    assert r.status == "completed" and r.output_text == ""
    assert [t.name for t in r.tools] == ["get_weather"]
    assert r.tool_choice.name == "get_weather"
    types = [e.type for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert events[2].item.arguments == "" and events[3].delta == fc.arguments
    assert events[4].arguments == fc.arguments and events[4].name == "get_weather"
    assert events[-1].response.output[0].call_id == "call_abc"
    assert final.output[0].arguments == fc.arguments      # the SDK's helper put the deltas together


def test_text_format_json_schema_becomes_the_response_format():
    llm = ToolLLM()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

    async def main(client, http):
        await client.responses.create(model="x", input="x", text={
            "format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
        await client.responses.create(model="x", input="x", text={"format": {"type": "json_object"}})
        # llama-server's sampling fields pass through as in a chat request
        await client.responses.create(model="x", input="x", max_output_tokens=9,
                                      extra_body={"min_p": 0.1, "top_k": 5, "seed": 3})

    with_client(create_app(llm), main)
    rf = [kw.get("response_format") for _, kw in llm.calls]
    assert rf[0] == {"type": "json_schema", "json_schema": {"schema": schema}}
    assert rf[1] == {"type": "json_object"} and rf[2] is None
    last = llm.calls[2][1]
    assert (last["max_tokens"], last["min_p"], last["top_k"], last["seed"]) == (9, 0.1, 5, 3)


class FailingLLM(FakeLLM):
    """A stream that fails after its first piece."""

    def astream_chat(self, messages, **kw):
        async def gen():
            yield SimpleNamespace(index=0, text="Hel", token_ids=[1], logprobs=None, finish_reason=None)
            raise RuntimeError("the engine broke")
        return gen()


def test_a_stream_that_fails_after_it_started_ends_with_an_error_event():
    async def main(client, http):
        raw = await http.post("/v1/responses", json={"input": "x", "stream": True})
        with pytest.raises(openai.APIError, match="the engine broke"):
            async for _ in await client.responses.create(model="x", input="x", stream=True):
                pass
        return raw

    raw = with_client(create_app(FailingLLM()), main)
    events = sse_events(raw.text)
    assert [e["type"] for e in events][-2:] == ["response.output_text.delta", "error"]
    err = events[-1]
    assert err["error"]["type"] == "server_error" and "the engine broke" in err["message"]


def test_client_disconnect_mid_stream_cancels_the_request():
    class EndlessLLM(FakeLLM):
        def astream_chat(self, messages, **kw):
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
        body = json.dumps({"input": "x", "stream": True}).encode()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/responses", "raw_path": b"/v1/responses",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                                      (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        sent_body = False
        gone = asyncio.Event()
        sent = []

        async def receive():
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        call = asyncio.ensure_future(app(scope, receive, send))
        for _ in range(300):
            if any(b"output_text.delta" in m.get("body", b"") for m in sent):
                break
            await asyncio.sleep(0.01)
        assert llm.started == 1 and backend.in_flight == 1
        gone.set()                                  # the client leaves
        await asyncio.wait_for(call, 5)
        assert llm.cancelled == 1
        assert backend.in_flight == 0
    run(main())


# --------------------------------------------------------------------------- a reasoning model (tiny)

#: ChatML whose generation prompt skips the thinking when enable_thinking is false.
THINKS = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
          "{% endif %}")
#: Makes the random model think, then answer.
THINK_GRAMMAR = 'root ::= "<think>" " hello" [a-z ]{2,12} "</think>" [a-z ]{2,12}'


@pytest.fixture(scope="module")
def think_llm(vocab_dir, tmp_path_factory):
    from tiny_model import TOKEN_TYPE_USER_DEFINED, make_tiny_llama, make_vocab_with_tokens

    from pyllama import LLM

    d = tmp_path_factory.mktemp("think")
    vocab = make_vocab_with_tokens(d / "vocab.gguf", [("<think>", TOKEN_TYPE_USER_DEFINED),
                                                      ("</think>", TOKEN_TYPE_USER_DEFINED), "<|im_start|>",
                                                      "<|im_end|>"])
    llm = LLM(make_tiny_llama(d / "model.gguf", vocab_from=vocab, chat_template=THINKS), n_ctx=1024, n_threads=1,
              n_parallel=1, temperature=0)
    yield llm
    llm.close()


def test_reasoning_model_thinking_is_a_reasoning_item(think_llm):
    question = [{"role": "user", "content": "What is two plus two?"}]
    lib = think_llm.chat(question, max_tokens=30, grammar=THINK_GRAMMAR)
    assert lib.reasoning and lib.text
    kw = dict(model="x", input=question, max_output_tokens=30, extra_body={"grammar": THINK_GRAMMAR})

    async def main(client, http):
        r = await client.responses.create(**kw)
        events = [e async for e in await client.responses.create(stream=True, **kw)]
        async with client.responses.stream(**kw) as s:
            final = await s.get_final_response()
        off = await client.responses.create(model="x", input=question, max_output_tokens=2,
                                            reasoning={"effort": "none"})
        # llama-server's chat fields for reasoning models work here too
        kwargs_off = await client.responses.create(model="x", input=question, max_output_tokens=2, extra_body={
            "chat_template_kwargs": {"enable_thinking": False}})
        raw = await client.responses.create(**dict(kw, extra_body={"grammar": THINK_GRAMMAR,
                                                                   "reasoning_format": "none"}))
        bad = await http.post("/v1/responses", json={"input": "x", "reasoning_format": "sometimes"})
        # the whole turn sent back: its reasoning and message items are one assistant message
        again = question + [o.model_dump(exclude_none=True) for o in r.output] + [
            {"role": "user", "content": "And three plus three?"}]
        follow = await client.responses.create(model="x", input=again, max_output_tokens=2)
        chat = await client.chat.completions.create(model="x", max_tokens=2, messages=question + [
            {"role": "assistant", "content": lib.text}, {"role": "user", "content": "And three plus three?"}])
        return r, events, final, off, follow, chat, kwargs_off, raw, bad

    r, events, final, off, follow, chat, kwargs_off, raw, bad = with_client(create_app(think_llm), main)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    thinking = r.output[0]
    assert thinking.id.startswith("rs_") and thinking.content[0].type == "reasoning_text"
    assert thinking.content[0].text == lib.reasoning and r.output_text == lib.text
    assert collapse([e.type for e in events]) == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.output_item.done", *TEXT_EVENTS[2:]]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == lib.reasoning
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == lib.text
    assert {e.output_index for e in events if e.type.startswith("response.output_text")} == {1}
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.output_text == lib.text
    # reasoning.effort "none" turns the thinking off (as the chat's reasoning_effort does)
    assert off.usage.input_tokens == kwargs_off.usage.input_tokens == len(
        think_llm.chat_tokens(question, enable_thinking=False)) != r.usage.input_tokens
    assert [o.type for o in raw.output] == ["message"] and raw.output_text.startswith("<think>")
    _assert_400(bad, "reasoning_format")
    assert follow.usage.input_tokens == chat.usage.prompt_tokens


# --------------------------------------------------------------------------- images (tiny projector)


def test_input_image_is_the_chats_image_part(tmp_path):
    from tiny_mmproj import make_tiny_mmproj
    from tiny_model import make_tiny_llama

    from pyllama import LLM

    url = "data:image/jpeg;base64," + base64.b64encode(JPEG.read_bytes()).decode()
    text, proj = make_tiny_llama(tmp_path / "text.gguf"), make_tiny_mmproj(tmp_path / "mmproj.gguf")
    with LLM(str(text), mmproj_path=str(proj), n_ctx=1024, n_parallel=1, n_threads=1, chat_template="chatml") as llm:
        async def main(client, http):
            r = await client.responses.create(model="x", max_output_tokens=4, temperature=0, input=[
                {"role": "user", "content": [{"type": "input_image", "image_url": url, "detail": "auto"},
                                             {"type": "input_text", "text": "What is this?"}]}])
            chat = await client.chat.completions.create(model="x", max_tokens=4, temperature=0, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is this?"}]}])
            no_image = await client.responses.create(model="x", max_output_tokens=4, temperature=0, input=[
                {"role": "user", "content": [{"type": "input_text", "text": "What is this?"}]}])
            refused = await http.post("/v1/responses", json={"input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": JPEG.as_uri()}]}]})
            return r, chat, no_image, refused

        r, chat, no_image, refused = with_client(create_app(llm), main)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens > no_image.usage.input_tokens
    _assert_400(refused)          # a client may not make the server read its files


# --------------------------------------------------------------------------- SmolLM2 behind `pyllama serve`


ALIAS = "smollm2-test"


@pytest.fixture(scope="module")
def smol(smollm2_path):
    server = ServerProcess("-m", str(smollm2_path), "-np", "2", "-c", "4096", "--alias", ALIAS, "-t", "2")
    try:
        server.wait_ready()
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        server.stop()


def test_smol_answers_and_streams_the_same(smol):
    kw = dict(model=ALIAS, input=[{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": "What is the capital of France?"}],
              max_output_tokens=24, temperature=0)
    r = smol.responses.create(**kw)
    assert "Paris" in r.output_text and r.model == ALIAS
    assert r.output[0].id.startswith("msg_")
    deltas = []
    completed = None
    for event in smol.responses.create(stream=True, **kw):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
    assert "".join(deltas) == completed.output_text == r.output_text
    assert completed.usage.output_tokens == r.usage.output_tokens


def test_smol_calls_a_tool_and_reads_its_output(smol):
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = smol.responses.create(model=ALIAS, input=question, tools=[WEATHER], tool_choice="required",
                              max_output_tokens=60, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    assert isinstance(json.loads(calls[0].arguments), dict)
    # the next turn: the call and its output go back as items (as OpenAI's docs show), and
    # the model reads them as the chat route reads the same conversation
    result = "Sunny, 24 degrees Celsius."
    follow = question + [o.model_dump(exclude_none=True) for o in r.output] + [
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": result}]
    answer = smol.responses.create(model=ALIAS, input=follow, tools=[WEATHER], max_output_tokens=40, temperature=0)
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    call = {"id": calls[0].call_id, "type": "function",
            "function": {"name": calls[0].name, "arguments": calls[0].arguments}}
    chat = smol.chat.completions.create(model=ALIAS, tools=[chat_tool], max_tokens=40, temperature=0, messages=[
        *question, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": calls[0].call_id, "content": result}])
    assert answer.usage.input_tokens == chat.usage.prompt_tokens > r.usage.input_tokens
    msg = chat.choices[0].message
    if msg.tool_calls:
        assert [(o.name, o.arguments) for o in answer.output] == [(t.function.name, t.function.arguments)
                                                                  for t in msg.tool_calls]
    else:
        assert answer.output_text == msg.content


def test_smol_json_schema_output_validates(smol):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = smol.responses.create(model=ALIAS, input="Invent a person. Answer in JSON.", max_output_tokens=60,
                              temperature=0, text={"format": {"type": "json_schema", "name": "person",
                                                              "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"
