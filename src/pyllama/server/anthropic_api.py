"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens (issue 28).

As llama-server does (``server_chat_convert_anthropic_to_oai``), a Messages request is
converted into the chat route's request: the same sampling fields, tools, image parts,
admission and backend calls as /v1/chat/completions.  Only the shapes differ: Anthropic's
content blocks in and out, its stop reasons, its named SSE events and its error object
``{"type": "error", "error": {"type": ..., "message": ...}}`` on these routes.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import json
import logging
import secrets
from typing import (TYPE_CHECKING, Annotated, Any, AsyncGenerator, Awaitable, Callable, Dict, Iterator, List, Literal,
                    Optional, Union)

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pyllama.server import protocol as P
from pyllama.server import schemas as S
from pyllama.server.app import ClientGone, SSEResponse, _closer, _iterate, _open_streams, unless_disconnected
from pyllama.server.backend import StartedStream, as_api_errors
from pyllama.server.errors import NO_PROJECTOR, SERVER, APIError, bad_request, error_event, pydantic_errors_to_api_error

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pyllama.llm import LLM, Completion
    from pyllama.server.app import ServerState

logger = logging.getLogger("pyllama.server")

# --------------------------------------------------------------------------- request bodies


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Block(_Strict):
    # Prompt-caching hints: accepted; the server's prompt cache needs none (it reuses the
    # longest common prefix of any earlier request by itself).
    cache_control: Optional[Dict[str, Any]] = None


class TextBlock(_Block):
    type: Literal["text"]
    text: str
    citations: Optional[List[Dict[str, Any]]] = None


class Base64Source(_Strict):
    type: Literal["base64"]
    media_type: str
    data: str


class URLSource(_Strict):
    type: Literal["url"]
    url: str


class ImageBlock(_Block):
    type: Literal["image"]
    source: Annotated[Union[Base64Source, URLSource], Field(discriminator="type")]


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: Dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[List[Annotated[Union[TextBlock, ImageBlock], Field(discriminator="type")]], str, None] = None
    is_error: Optional[bool] = None


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: str
    signature: Optional[str] = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[Union[TextBlock, ImageBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock,
                               RedactedThinkingBlock], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["user", "assistant"]
    # (the list first: pydantic reports a union's branches in order, and the first is shown)
    content: Union[List[ContentBlock], str]


class Tool(_Strict):
    # the chat route's limits on a function name (S.FunctionDefinition)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: Optional[str] = None
    input_schema: Dict[str, Any]
    type: Optional[Literal["custom"]] = None
    cache_control: Optional[Dict[str, Any]] = None


class ToolChoiceAuto(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: Optional[bool] = None


class ToolChoiceAny(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: Optional[bool] = None


class ToolChoiceTool(_Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: Optional[bool] = None


class ToolChoiceNone(_Strict):
    type: Literal["none"]


ToolChoice = Annotated[Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone],
                       Field(discriminator="type")]


class ThinkingConfig(BaseModel):
    """``thinking``: "enabled" with a budget of thinking tokens, "disabled", or "adaptive"
    (the template's own default).  Other keys Anthropic may add are kept and change nothing."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Optional[int] = Field(default=None, ge=0, le=S.INT32_MAX)


class MessagesRequest(_Strict):
    """The body of /v1/messages (and of /v1/messages/count_tokens, where max_tokens and the
    sampling fields may be left out)."""

    model: Optional[str] = None          # one model per server: accepted, not checked
    messages: List[Message]     # required; may be empty (answered as llama-server does: see chat_messages)
    system: Union[List[TextBlock], str, None] = None
    max_tokens: Optional[int] = Field(default=None, ge=1, le=S.INT32_MAX)
    stop_sequences: Optional[List[str]] = None
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0, le=S.INT32_MAX)
    stream: bool = False
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[ThinkingConfig] = None
    # Anthropic fields that change nothing here
    cache_control: Optional[Dict[str, Any]] = None
    metadata: Optional[Dict[str, Any]] = None
    service_tier: Optional[str] = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: Optional[List[str]]) -> Optional[List[str]]:
        for s in v or ():
            if not s:
                raise ValueError("stop sequences must not be empty")
        if v and len(v) > S.MAX_STOP_STRINGS:
            raise ValueError(f"at most {S.MAX_STOP_STRINGS} stop sequences are allowed, got {len(v)}")
        if v and sum(len(s) for s in v) > S.MAX_STOP_CHARS:
            raise ValueError(f"stop sequences may have at most {S.MAX_STOP_CHARS} characters together")
        return v

    def check(self) -> None:
        """Cross-field checks (raise APIError naming the field)."""
        names = [t.name for t in self.tools or ()]
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceTool) and choice.name not in names:
            raise bad_request(f"tool_choice names the tool {choice.name!r}, which is not in tools "
                              f"({', '.join(names) or 'none given'})", param="tool_choice.name")
        if isinstance(choice, ToolChoiceAny) and not names:
            raise bad_request("tool_choice {\"type\": \"any\"} needs tools", param="tool_choice")


_FIELDS = sorted(MessagesRequest.model_fields)
#: Discriminator values, which pydantic puts into an error's location between a block and
#: its field (``messages.0.content.0.text.text``): dropped, so the location names fields only.
_TAGS = frozenset({"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking", "base64", "url",
                   "auto", "any", "tool", "none"})
_TAGGED = ("source", "tool_choice")      # the tagged fields that are not list items


def _without_tags(errors: List[dict]) -> List[dict]:
    out = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        # a tag is never last (an error about the tag itself stops at the block)
        kept = [p for k, p in enumerate(loc) if not (
            p in _TAGS and 0 < k < len(loc) - 1 and (isinstance(loc[k - 1], int) or loc[k - 1] in _TAGGED))]
        out.append(dict(e, loc=tuple(kept)))
    return out


def parse_request(raw: bytes) -> MessagesRequest:
    """The request body, or a 400 naming the first problem (and the closest field name for
    an unknown one)."""
    try:
        body = MessagesRequest.model_validate_json(raw)
    except ValidationError as exc:
        err = pydantic_errors_to_api_error(_without_tags(exc.errors()))
        if err.code == "unknown_field" and err.param and "." not in err.param:
            close = difflib.get_close_matches(err.param, _FIELDS, n=1, cutoff=0.6)
            if close:
                err.message += f" (did you mean '{close[0]}'?)"
        raise err from None
    body.check()
    return body


# --------------------------------------------------------------------------- Anthropic -> chat


def _image_part(block: ImageBlock, where: str) -> dict:
    src = block.source
    if isinstance(src, URLSource):
        # the chat route's rule: a client's images come as data, never fetched or read here
        raise bad_request("image sources of type 'url' are not supported (the server fetches nothing): send the "
                          "image as {\"type\": \"base64\", \"media_type\": ..., \"data\": ...}",
                          param=f"{where}.source")
    return {"type": "image_url", "image_url": {"url": f"data:{src.media_type};base64,{src.data}"}}


def _tool_result_content(block: ToolResultBlock, where: str) -> Union[str, list]:
    if block.content is None:
        return ""
    if isinstance(block.content, str):
        return block.content
    return [{"type": "text", "text": b.text} if isinstance(b, TextBlock) else _image_part(b, f"{where}.content.{k}")
            for k, b in enumerate(block.content)]


def chat_messages(req: MessagesRequest) -> List[dict]:
    """The conversation in the chat route's (OpenAI's) message shape.

    A message's ``tool_use`` blocks become its ``tool_calls``; ``tool_result`` blocks become
    ``tool`` messages, placed before the rest of their message (they answer the calls of
    the assistant message before it); ``thinking`` becomes ``reasoning_content``.  An empty
    ``messages`` list becomes one empty user message."""
    out: List[dict] = []
    if isinstance(req.system, str):
        out.append({"role": "system", "content": req.system})
    elif req.system:
        out.append({"role": "system", "content": [{"type": "text", "text": b.text} for b in req.system]})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts: List[dict] = []
        calls: List[dict] = []
        thinking: List[str] = []
        for j, b in enumerate(m.content):
            where = f"messages.{i}.content.{j}"
            if isinstance(b, TextBlock):
                parts.append({"type": "text", "text": b.text})
            elif isinstance(b, ImageBlock):
                parts.append(_image_part(b, where))
            elif isinstance(b, ToolUseBlock):
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
            elif isinstance(b, ToolResultBlock):
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _tool_result_content(b, where)})
            elif isinstance(b, ThinkingBlock):
                thinking.append(b.thinking)
            # redacted_thinking: opaque data of another model, nothing to show this one
        if parts or calls or thinking:
            msg: dict = {"role": m.role, "content": parts or ""}
            if calls:
                msg["tool_calls"] = calls
            if thinking:
                msg["reasoning_content"] = "".join(thinking)
            out.append(msg)
    if not req.messages:
        # llama-server answers an empty list (its template sees no message); pyllama's chat
        # needs one, so the conversation is one empty user turn: the model starts from nothing
        out.append({"role": "user", "content": ""})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, ToolChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def to_chat_request(req: MessagesRequest) -> S.ChatCompletionRequest:
    """The chat route's request for `req` (its checks run on the result as well)."""
    body: dict = {"messages": chat_messages(req), "stream": req.stream}
    if req.max_tokens is not None:
        body["max_tokens"] = req.max_tokens
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if req.stop_sequences:
        body["stop"] = list(req.stop_sequences)
    if req.thinking is not None:
        # llama-server's mapping (a budget of 0 is no thinking: the template is told so too)
        if req.thinking.type == "enabled" and req.thinking.budget_tokens is not None:
            body["thinking_budget_tokens"] = req.thinking.budget_tokens
        elif req.thinking.type == "disabled":
            body["thinking_budget_tokens"] = 0
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                           "parameters": t.input_schema}} for t in req.tools]
        if req.tool_choice is not None:
            body["tool_choice"] = _tool_choice(req.tool_choice)
            if getattr(req.tool_choice, "disable_parallel_tool_use", None):
                body["parallel_tool_calls"] = False
    try:
        chat = S.ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise pydantic_errors_to_api_error(exc.errors()) from None
    chat.check()
    return chat


def prompt_size(llm: "LLM", messages: List[dict], kw: dict) -> int:
    """Tokens of the prompt that LLM.chat(messages, **kw) evaluates (tools, template
    variables and all): the same one preparation it runs (blocking: call it in a worker thread)."""
    from pyllama import _requests as rq

    call = rq.prepare_chat(llm, messages, **dict(kw, allow_files=False))
    return len(call.prompt)


# --------------------------------------------------------------------------- chat -> Anthropic


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def stop_reason(comp: Optional["Completion"], stops: List[str], detokenize: Callable[[list], str],
                finished: Optional[str] = None) -> tuple:
    """(stop_reason, stop_sequence) of an answer: end_turn, max_tokens, stop_sequence (with
    the stop sequence that ended it) or tool_use."""
    reason = comp.finish_reason if comp is not None else finished
    if comp is not None and comp.tool_calls:
        return "tool_use", None
    if reason == "length":
        return "max_tokens", None
    if reason == "stop" and stops:
        return "stop_sequence", _matched_stop(comp, stops, detokenize)
    return "end_turn", None


def _matched_stop(comp: Optional["Completion"], stops: List[str], detokenize: Callable[[list], str]) -> Optional[str]:
    """Which stop sequence ended the answer: the library cuts the text where the earliest
    one starts (the first listed of those starting there), and keeps its tokens."""
    if len(stops) == 1:
        return stops[0]
    if comp is None:
        return None
    generated = detokenize(list(comp.tokens))
    found = [(generated.find(s), k) for k, s in enumerate(stops) if s in generated]
    return stops[min(found)[1]] if found else None


def usage(comp: "Completion") -> dict:
    """Anthropic's usage: input_tokens are the prompt tokens evaluated for this answer, and
    cache_read_input_tokens those reused from the prompt cache (as llama-server reports)."""
    prompt = int(comp.prompt_tokens)
    cached = min(int(comp.timings.cached_n), prompt)
    return {"input_tokens": prompt - cached, "cache_read_input_tokens": cached, "output_tokens": len(comp.tokens)}


def tool_use_blocks(comp: "Completion") -> List[dict]:
    blocks = []
    for call in comp.tool_calls or ():
        fn = call.get("function", {})
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = None
        blocks.append({"type": "tool_use", "id": call.get("id") or f"toolu_{secrets.token_hex(12)}",
                       "name": fn.get("name", ""), "input": args if isinstance(args, dict) else {}})
    return blocks


def message_body(comp: "Completion", rid: str, model: str, stops: List[str],
                 detokenize: Callable[[list], str]) -> dict:
    """The whole answer of /v1/messages (runs in a worker thread: may detokenize): a
    reasoning model's thinking, the text, the tool calls, each block only when not empty."""
    msg = P.response_message(comp)
    content: List[dict] = []
    if msg.reasoning_content:
        # local models sign nothing: the signature is empty (as llama-server's)
        content.append({"type": "thinking", "thinking": msg.reasoning_content, "signature": ""})
    if msg.content:
        content.append({"type": "text", "text": msg.content})
    content.extend(tool_use_blocks(comp))
    reason, sequence = stop_reason(comp, stops, detokenize)
    return {"id": rid, "type": "message", "role": "assistant", "content": content, "model": model,
            "stop_reason": reason, "stop_sequence": sequence, "usage": usage(comp)}


def sse_event(name: str, data: dict) -> bytes:
    """One server-sent event as Anthropic sends them: its name, then its JSON."""
    return (b"event: " + name.encode() + b"\ndata: "
            + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n")


def _message_start(rid: str, model: str, usage_obj: dict) -> bytes:
    return sse_event("message_start", {"type": "message_start", "message": {
        "id": rid, "type": "message", "role": "assistant", "content": [], "model": model, "stop_reason": None,
        "stop_sequence": None, "usage": usage_obj}})


def _block_start(index: int, block: dict) -> bytes:
    return sse_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def _block_delta(index: int, delta: dict) -> bytes:
    return sse_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def _block_stop(index: int) -> bytes:
    return sse_event("content_block_stop", {"type": "content_block_stop", "index": index})


#: The content_block_start of each kind of streamed block.
_EMPTY = {"text": {"type": "text", "text": ""}, "thinking": {"type": "thinking", "thinking": "", "signature": ""}}
#: Sent before a thinking block closes (Anthropic's clients expect one; a local model signs nothing).
_EMPTY_SIGNATURE = {"type": "signature_delta", "signature": ""}


class _Blocks:
    """The content blocks of a streamed answer as its pieces arrive: a block opens with its
    first piece (so an empty answer has none, as the whole answer has none) and closes when
    a piece of another kind comes or the answer ends."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: Optional[str] = None

    def add(self, kind: str, delta: dict) -> Iterator[bytes]:
        if kind != self.kind:
            yield from self.close()
            self.index += 1
            self.kind = kind
            yield _block_start(self.index, _EMPTY[kind])
        yield _block_delta(self.index, delta)

    def close(self) -> Iterator[bytes]:
        if self.kind == "thinking":
            yield _block_delta(self.index, _EMPTY_SIGNATURE)
        if self.kind is not None:
            yield _block_stop(self.index)
        self.kind = None


def _message_end(reason: str, sequence: Optional[str], usage_obj: dict) -> Iterator[bytes]:
    # usage on message_delta is cumulative: it replaces message_start's counts
    yield sse_event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                      "usage": usage_obj})
    yield sse_event("message_stop", {"type": "message_stop"})


def events_from_completion(comp: "Completion", rid: str, model: str, stops: List[str],
                           detokenize: Callable[[list], str]) -> List[bytes]:
    """A whole answer (tool calls are parsed from the whole text) as the events of a stream;
    runs in a worker thread."""
    body = message_body(comp, rid, model, stops, detokenize)
    events = [_message_start(rid, model, dict(body["usage"], output_tokens=0))]
    for index, block in enumerate(body["content"]):
        if block["type"] == "thinking":
            events.append(_block_start(index, _EMPTY["thinking"]))
            events.append(_block_delta(index, {"type": "thinking_delta", "thinking": block["thinking"]}))
            events.append(_block_delta(index, _EMPTY_SIGNATURE))
        elif block["type"] == "text":
            events.append(_block_start(index, _EMPTY["text"]))
            events.append(_block_delta(index, {"type": "text_delta", "text": block["text"]}))
        else:
            events.append(_block_start(index, dict(block, input={})))
            events.append(_block_delta(index, {"type": "input_json_delta",
                                               "partial_json": json.dumps(block["input"], ensure_ascii=False)}))
        events.append(_block_stop(index))
    events.extend(_message_end(body["stop_reason"], body["stop_sequence"], body["usage"]))
    return events


# --------------------------------------------------------------------------- errors

#: HTTP status -> Anthropic's error type.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                529: "overloaded_error"}


def error_body(err: APIError) -> dict:
    """Anthropic's error object for `err`."""
    kind = _ERROR_TYPES.get(err.status) or ("api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


async def _error_events(exc: BaseException) -> AsyncGenerator[bytes, None]:
    """How a stream that fails after it started ends: Anthropic's ``error`` event."""
    err = error_event(exc)
    if err.status >= 500 and err.status != 503:
        logger.error("a stream failed after it started: %s: %s", type(exc).__name__, exc)
    yield sse_event("error", error_body(err))


def _anthropic_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Errors of these routes in Anthropic's shape (the app's handlers give OpenAI's)."""

    @functools.wraps(handler)
    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientGone:
            raise
        except APIError as err:
            return error_response(err)
        except Exception as exc:  # noqa: BLE001  (a bug of ours: 500, in this API's shape)
            logger.exception("error while answering %s %s", request.method, request.url.path)
            return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type=SERVER))

    return route


# --------------------------------------------------------------------------- routes


def add_routes(app: "FastAPI", state: "ServerState") -> None:
    """Register this module's routes on `app`."""
    cfg = state.settings

    def prepared(body: MessagesRequest) -> tuple:
        """(chat messages, LLM.chat keyword arguments) of a Messages request."""
        chat = to_chat_request(body)
        return P.chat_messages(chat), P.chat_kwargs(chat, cfg, int(state.llm.vocab.n_tokens))

    @app.post("/v1/messages")
    @_anthropic_errors
    async def create_message(request: Request) -> Response:
        body = parse_request(await request.body())
        if body.max_tokens is None:
            raise bad_request("'max_tokens' is required", param="max_tokens", code="missing_field")
        backend = state.ready_backend()
        llm = state.llm
        messages, kw = prepared(body)
        stops = list(body.stop_sequences or ())
        rid, model = new_message_id(), state.model_id
        if not body.stream or "tools" in kw:
            # (tool calls are parsed from the whole answer: streamed, it is sent as events after)
            with backend.admit():
                comp = await unless_disconnected(request, backend.chat(messages, **kw))
            if not body.stream:
                return JSONResponse(await asyncio.to_thread(message_body, comp, rid, model, stops, llm.detokenize))
            events = await asyncio.to_thread(events_from_completion, comp, rid, model, stops, llm.detokenize)
            return SSEResponse(_iterate(events))
        ticket = backend.acquire()
        # message_start reports the prompt's size before the answer has one: counted beside it
        counting = asyncio.ensure_future(asyncio.to_thread(prompt_size, llm, messages, kw))
        try:
            tasks = await _open_streams(request, ticket, [backend.stream_chat(messages, **kw)])
        except BaseException:
            counting.cancel()
            raise
        close = _closer(ticket, tasks)

        async def cleanup() -> None:
            counting.cancel()
            await close()

        return SSEResponse(_stream_events(tasks[0], counting, rid, model, stops, llm), cleanup=cleanup)

    @app.post("/v1/messages/count_tokens")
    @_anthropic_errors
    async def count_message_tokens(request: Request) -> Response:
        body = parse_request(await request.body())
        state.ready_backend()
        llm = state.llm
        messages, kw = prepared(body)
        from pyllama.multimodal import has_media

        if has_media(messages) and llm.multimodal is None:
            raise bad_request(NO_PROJECTOR, param="messages")
        with as_api_errors("messages"):
            n = await asyncio.to_thread(prompt_size, llm, messages, kw)
        return JSONResponse({"input_tokens": n})


async def _stream_events(task: "asyncio.Task", counting: "asyncio.Future", rid: str, model: str, stops: List[str],
                         llm: "LLM") -> AsyncGenerator[bytes, None]:
    """A streamed answer: message_start, a thinking block (reasoning models) and a text block
    as their pieces come, message_delta with the stop reason and usage, message_stop."""
    stream: StartedStream = task.result()
    try:
        try:
            n_prompt = await counting
        except Exception:  # noqa: BLE001  (the generation counts it too: message_delta has it)
            n_prompt = 0
        yield _message_start(rid, model, {"input_tokens": n_prompt, "cache_read_input_tokens": 0,
                                          "output_tokens": 0})
        blocks = _Blocks()
        finished: Optional[str] = None
        async for piece in stream:
            reasoning = getattr(piece, "reasoning", None)
            if reasoning:
                for event in blocks.add("thinking", {"type": "thinking_delta", "thinking": reasoning}):
                    yield event
            if piece.text:
                for event in blocks.add("text", {"type": "text_delta", "text": piece.text}):
                    yield event
            if piece.finish_reason is not None:
                finished = piece.finish_reason
        for event in blocks.close():
            yield event
        comps = stream.completions or []
        comp = comps[0] if comps else None
        reason, sequence = await asyncio.to_thread(stop_reason, comp, stops, llm.detokenize, finished)
        final = usage(comp) if comp is not None else {"output_tokens": 0}
        for event in _message_end(reason, sequence, final):
            yield event
    except Exception as exc:  # noqa: BLE001  (sent to the client, which already has a 200)
        async for e in _error_events(exc):
            yield e
    finally:
        await stream.aclose()
