"""ChatLlamaCpp: a GGUF model through pyllama as a LangChain chat model (the model's own chat
template), with tool calling (:mod:`pyllama.tools`) and structured output."""

from __future__ import annotations

import asyncio
import json
from operator import itemgetter
from typing import (Any, AsyncIterator, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence,
                    Tuple, Type, Union)

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage,
                                     SystemMessage, ToolMessage)
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel

from pyllama import tools as _tools
from pyllama.integrations.langchain._common import _GRAMMAR_KEYS, _athread_iter, _info, _LlamaCppCommon

__all__ = ["ChatLlamaCpp"]


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, Mapping) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def _message_dict(message: BaseMessage) -> Dict[str, Any]:
    """A LangChain message as the {"role", "content", ...} dict chat templates expect."""
    content = _text_of(message.content)
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": content}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": content}
    if isinstance(message, AIMessage):
        d: Dict[str, Any] = {"role": "assistant", "content": content}
        if message.tool_calls:
            d["tool_calls"] = [{"id": tc.get("id"), "type": "function",
                                "function": {"name": tc["name"], "arguments": tc["args"]}}
                               for tc in message.tool_calls]
        return d
    if isinstance(message, ToolMessage):
        d = {"role": "tool", "content": content, "tool_call_id": message.tool_call_id}
        if message.name:
            d["name"] = message.name
        return d
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": content}
    raise TypeError(f"unsupported message type {type(message).__name__}")


class ChatLlamaCpp(_LlamaCppCommon, BaseChatModel):
    """A GGUF model through pyllama, as a LangChain chat model (the model's own chat template).

    Same fields as :class:`LlamaCpp`.  ``bind_tools(tools, tool_choice=...)``: with
    ``tool_choice`` set to a tool's name, ``"any"``/``"required"``/``True``, the reply is forced
    by a grammar to be a call of that tool (of one of the tools) and comes back as an AIMessage
    with ``tool_calls``; with ``"auto"``/None the model may answer in text or with a tool call
    (in its template's format, or JSON).  Tool calling is pyllama's own (:mod:`pyllama.tools`,
    shared with ``LLM.chat`` and the server).  ``with_structured_output(schema)`` constrains the
    reply to the schema's JSON (``method="json_schema"``, the default) and returns a validated
    pydantic instance (or a dict).

    ``streaming`` defaults to False here; ``stream()``/``astream()`` always stream.
    """

    streaming: bool = False

    @property
    def _llm_type(self) -> str:
        return "pyllama-chat"

    # -- requests ----------------------------------------------------------------------------

    def _chat_request(self, messages: List[BaseMessage], stop: Optional[List[str]], kwargs: Mapping[str, Any]
                      ) -> Tuple[List[Dict[str, Any]], Dict[str, Any], Optional[List[Dict[str, Any]]], Any]:
        """(message dicts, keyword arguments for the call, the tools or None, the tool_choice
        in pyllama.tools' terms).  With tools, the call goes through pyllama.tools.chat_with_tools."""
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None)
        choice = _tool_choice(kwargs.pop("tool_choice", None))
        kwargs.pop("ls_structured_output_format", None)
        kwargs.pop("stream", None)
        for k in ("echo", "suffix"):
            kwargs.pop(k, None)
        params, _ = self._call_params(stop, kwargs)
        msgs = [_message_dict(m) for m in messages]
        if "response_format" in params:
            params.pop("grammar", None)
        if not tools:
            return msgs, params, None, None
        tools = _tools.validate_tools([convert_to_openai_tool(t) for t in tools])
        choice = _tools.normalize_tool_choice(choice, tools)
        if choice == "none":   # the tools are not shown; earlier calls and results still render
            msgs, _ = _tools.prepare_messages(self.client, msgs, None)
            return msgs, params, None, None
        if choice != "auto":   # the tool call grammar replaces the model's own grammar
            for k in _GRAMMAR_KEYS:
                params.pop(k, None)
        return msgs, params, tools, choice

    def _message(self, comp: Any, tools: Optional[List[Dict[str, Any]]], choice: Any) -> AIMessage:
        meta = {"finish_reason": comp.finish_reason, "model_name": self.model_path}
        usage = {"input_tokens": comp.prompt_tokens, "output_tokens": len(comp.tokens),
                 "total_tokens": comp.prompt_tokens + len(comp.tokens)}
        if tools is None:
            return AIMessage(content=comp.text, response_metadata=meta, usage_metadata=usage)
        calls = getattr(comp, "tool_calls", None)
        content = getattr(comp, "content", None) or ""
        if calls:
            return AIMessage(content=content, response_metadata=meta, usage_metadata=usage, tool_calls=[
                tool_call(name=c["function"]["name"], args=json.loads(c["function"]["arguments"]), id=c["id"])
                for c in calls])
        if choice != "auto":   # a forced call that did not finish
            return AIMessage(content="", invalid_tool_calls=[invalid_tool_call(
                name=None, args=comp.text, id=_tools.new_call_id(),
                error=f"the tool call was cut off (finish_reason={comp.finish_reason!r}); raise max_tokens")],
                response_metadata=meta, usage_metadata=usage)
        return AIMessage(content=content, response_metadata=meta, usage_metadata=usage)

    def _answer(self, msgs: List[Dict[str, Any]], params: Dict[str, Any], tools: Optional[List[Dict[str, Any]]],
                choice: Any) -> Any:
        if tools is None:
            return self.client.chat(msgs, **params)
        return _tools.chat_with_tools(self.client, msgs, tools=tools, tool_choice=choice, **params)

    # -- sync --------------------------------------------------------------------------------

    def _generate(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        msgs, params, tools, choice = self._chat_request(messages, stop, kwargs)
        comp = self._answer(msgs, params, tools, choice)
        message = self._message(comp, tools, choice)
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=_info(comp))])

    def _chunks(self, messages: List[BaseMessage], stop: Optional[List[str]],
                kwargs: Mapping[str, Any]) -> Iterator[ChatGenerationChunk]:
        msgs, params, tools, choice = self._chat_request(messages, stop, kwargs)
        if tools is not None:   # a reply that may be a tool call comes whole
            comp = self._answer(msgs, params, tools, choice)
            yield _as_chunk(self._message(comp, tools, choice), comp)
            return
        stream = self.client.chat(msgs, stream=True, **params)
        try:
            for piece in stream:
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        finally:
            stream.close()
        comp = stream.completion
        if comp is not None:
            last = self._message(comp, None, None)
            yield _as_chunk(AIMessage(content="", response_metadata=last.response_metadata,
                                      usage_metadata=last.usage_metadata), comp)

    def _stream(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, stop, kwargs):
            if run_manager is not None and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # -- async -------------------------------------------------------------------------------

    async def _astream(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in _athread_iter(lambda: self._chunks(messages, stop, kwargs)):
            if run_manager is not None and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _agenerate(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self._generate(messages, stop, None, **kwargs))

    # -- tools and structured output ---------------------------------------------------------

    def bind_tools(self, tools: Sequence[Union[Dict[str, Any], Type, Callable, Any]], *,
                   tool_choice: Optional[Union[str, bool, Dict[str, Any]]] = None,
                   **kwargs: Any) -> Runnable:
        """Bind tools (pydantic classes, functions, BaseTools or OpenAI tool dicts).

        tool_choice: None/"auto" (the model may call a tool), "none", "any"/"required"/True (a
        call of one of the tools is forced by a grammar), a tool's name or
        {"type": "function", "function": {"name": ...}} (a call of that tool is forced).
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        _tools.normalize_tool_choice(_tool_choice(tool_choice), _tools.validate_tools(formatted))   # check now
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: Union[Dict[str, Any], Type], *, include_raw: bool = False,
                               method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
                               strict: Optional[bool] = None, **kwargs: Any) -> Runnable:
        """Replies parsed into `schema` (a pydantic class -> a validated instance; a JSON
        schema, TypedDict or OpenAI tool dict -> a dict).

        method="json_schema" (default): the reply is constrained by a grammar made from the
        JSON schema.  "function_calling": through bind_tools with the call forced.
        "json_mode": any JSON object.
        """
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        is_pydantic = isinstance(schema, type) and issubclass(schema, BaseModel)
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name,
                                  ls_structured_output_format={"kwargs": {"method": method}, "schema": schema})
            parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            fmt: Dict[str, Any] = {"kwargs": {"method": method}, "schema": schema}
            if method == "json_mode":
                llm = self.bind(response_format={"type": "json_object"}, ls_structured_output_format=fmt)
            else:
                js = schema.model_json_schema() if is_pydantic else convert_to_json_schema(schema)
                llm = self.bind(json_schema=js, ls_structured_output_format=fmt)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', not {method!r}")
        if include_raw:
            parser_assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
            parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
            return RunnableMap(raw=llm) | parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return llm | parser


def _tool_choice(choice: Any) -> Any:
    """LangChain's tool_choice in pyllama.tools' terms: None/False/"auto" -> "auto",
    True/"any"/"required" -> "required"; "none", names and dicts as they are."""
    if choice is None or choice is False or choice == "auto":
        return "auto"
    if choice is True or choice in ("any", "required"):
        return "required"
    return choice


def _as_chunk(message: AIMessage, comp: Any) -> ChatGenerationChunk:
    chunk = AIMessageChunk(
        content=message.content, response_metadata=message.response_metadata,
        usage_metadata=message.usage_metadata,
        tool_call_chunks=[tool_call_chunk(name=tc["name"], args=json.dumps(tc["args"]), id=tc["id"], index=i)
                          for i, tc in enumerate(message.tool_calls)],
        invalid_tool_calls=list(message.invalid_tool_calls))
    return ChatGenerationChunk(message=chunk, generation_info=_info(comp))
