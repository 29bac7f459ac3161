"""Chat completions of the compat ``Llama``: a conversation becomes a prompt (through a
``chat_handler``, a named ``chat_format``, or the GGUF's own template run by pyllama, with
tools and ``response_format``), runs as a completion, and comes back in llama-cpp-python's
chat shapes (OpenAI-shaped dicts, streamed chunks, tool calls, or the ``openai`` package's
types).

:class:`_ChatMixin` is a base class of :class:`pyllama.compat.llama.Llama`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Union

from pyllama.compat._llama_completion import _finish, _unsupported
from pyllama.compat._llama_hooks import LogitsProcessorList
from pyllama.compat.llama_types import (
    ChatCompletionFunction,
    ChatCompletionRequestFunctionCall,
    ChatCompletionRequestMessage,
    ChatCompletionRequestResponseFormat,
    ChatCompletionTool,
    ChatCompletionToolChoiceOption,
    CompletionLogprobs,
    CreateChatCompletionResponse,
    CreateChatCompletionStreamResponse,
)


class _ChatMixin:
    """``create_chat_completion`` / ``create_chat_completion_openai_v1`` and their helpers."""

    def create_chat_completion(
        self,
        messages: List[ChatCompletionRequestMessage],
        functions: Optional[List[ChatCompletionFunction]] = None,
        function_call: Optional[ChatCompletionRequestFunctionCall] = None,
        tools: Optional[List[ChatCompletionTool]] = None,
        tool_choice: Optional[ChatCompletionToolChoiceOption] = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: Optional[Union[str, List[str]]] = [],
        seed: Optional[int] = None,
        response_format: Optional[ChatCompletionRequestResponseFormat] = None,
        max_tokens: Optional[int] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        grammar: Optional[Any] = None,
        logit_bias: Optional[Dict[int, float]] = None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
    ) -> Union[CreateChatCompletionResponse, Iterator[CreateChatCompletionStreamResponse]]:
        """Answer a conversation: llama-cpp-python's chat completion dict (or chunks with
        ``stream=True``).  The prompt comes from ``chat_handler`` when given, else from the
        ``chat_format`` (``"chat_template.default"``, the default when the GGUF has a template,
        is the model's own template, run by pyllama).  ``response_format`` takes
        ``{"type": "json_object"[, "schema": {...}]}`` and OpenAI's ``{"type": "json_schema",
        "json_schema": {"schema": {...}}}``; ``tools``/``functions`` give OpenAI tool calls."""
        kwargs = dict(
            messages=messages, functions=functions, function_call=function_call, tools=tools,
            tool_choice=tool_choice, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            typical_p=typical_p, logprobs=logprobs, top_logprobs=top_logprobs, stream=stream, stop=stop, seed=seed,
            response_format=response_format, max_tokens=max_tokens, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, tfs_z=tfs_z,
            mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
            logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias)
        handler = self.chat_handler
        if handler is not None and getattr(handler, "clip_model_path", None) is None:
            return handler(llama=self, **kwargs)          # llama-cpp-python's handler protocol
        if handler is None and self.chat_format in self._chat_handlers:
            return self._chat_handlers[self.chat_format](llama=self, **kwargs)
        return self._chat(**kwargs)

    def _chat(self, *, messages, functions, function_call, tools, tool_choice, temperature, top_p, top_k, min_p,
              typical_p, logprobs, top_logprobs, stream, stop, seed, response_format, max_tokens, presence_penalty,
              frequency_penalty, repeat_penalty, tfs_z, mirostat_mode, mirostat_tau, mirostat_eta, model,
              logits_processor, grammar, logit_bias) -> Any:
        # Legacy functions / function_call become tools / tool_choice, as llama-cpp-python does.
        legacy = functions is not None and tools is None
        if functions is not None and tools is None:
            tools = [{"type": "function", "function": f} for f in functions]
        if function_call is not None and tool_choice is None:
            if function_call in ("none", "auto"):
                tool_choice = function_call
            elif isinstance(function_call, dict) and "name" in function_call:
                tool_choice = {"type": "function", "function": {"name": function_call["name"]}}
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                        repeat_penalty=repeat_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                        mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, seed=seed, logit_bias=logit_bias)
        json_schema = _schema_of_response_format(response_format) if response_format is not None else None
        if json_schema is not None:
            grammar = None      # as llama-cpp-python: the response format wins over a grammar
            if response_format.get("type") == "json_object" and "schema" in response_format:
                # llama-cpp-python falls back to any JSON object when a schema cannot be converted.
                from pyllama.grammar import json_schema_to_gbnf

                try:
                    json_schema_to_gbnf(json_schema)
                except (ValueError, TypeError):
                    json_schema = {"type": "object"}
        lp = (top_logprobs or 0) if logprobs else None
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)

        from pyllama.compat.llama_chat_format import TOOL_CALLING_CHAT_FORMATS

        # The tool-calling formats (chatml-function-calling, functionary...) are served by the
        # model's own template and pyllama's tool calling (instructor's examples name them).
        if self.chat_format == "chat_template.default" or self.chat_format in TOOL_CALLING_CHAT_FORMATS \
                or self.chat_handler is not None:
            if tools and tool_choice != "none":
                return self._tool_chat(messages, tools, tool_choice, legacy, stream, stop, max_tokens, model,
                                       logits_processor, grammar, sampling, lp)
            prepare = getattr(self.chat_handler, "prepare_messages", None)
            if prepare is not None:
                messages = prepare(messages)
            prompt = self.llm.chat_prompt(messages)
            media = None if isinstance(prompt, list) else prompt
            completion = self._create_completion(
                prompt=prompt if media is None else "", max_tokens=-1 if max_tokens is None else max_tokens,
                stop=stop, stream=stream, model=model, logits_processor=logits_processor, grammar=grammar,
                logprobs=lp, _json_schema=json_schema, _media=media, **sampling)
            return _completion_to_chat(completion if stream else next(completion), stream)

        from pyllama.compat import llama_chat_format

        formatter = llama_chat_format.get_chat_format(self.chat_format)
        result = formatter(messages=messages, functions=functions, function_call=function_call, tools=tools,
                           tool_choice=tool_choice)
        tokens = self.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        if result.stop is not None:
            stop = stop + (result.stop if isinstance(result.stop, list) else [result.stop])
        tool = None
        if isinstance(tool_choice, dict) and tools:
            name = tool_choice["function"]["name"]
            tool = next((t for t in tools if t["function"]["name"] == name), None)
            if tool is None:
                raise ValueError(f"Tool choice '{name}' not found in tools.")
            json_schema = tool["function"].get("parameters") or {"type": "object"}
            grammar = None
        completion = self._create_completion(
            prompt=tokens, max_tokens=-1 if max_tokens is None else max_tokens, stop=stop, stream=stream,
            model=model, logits_processor=logits_processor, grammar=grammar, logprobs=lp,
            _json_schema=json_schema, **sampling)
        if tool is not None:
            return _completion_to_chat_function(tool["function"]["name"], completion if stream else next(completion),
                                                stream)
        return _completion_to_chat(completion if stream else next(completion), stream)

    def _tool_chat(self, messages, tools, tool_choice, legacy, stream, stop, max_tokens, model, logits_processor,
                   grammar, sampling, lp) -> Any:
        """Tools with the GGUF's template: pyllama's tool calling (calls parsed, or forced by a grammar)."""
        from pyllama import tools as tools_mod

        overrides = self._sampling(**{k: v for k, v in sampling.items() if k != "tfs_z"})
        overrides["stop"] = [s for s in stop if s] or None
        if grammar is not None:
            overrides["grammar"] = _unsupported(grammar)
        # pyllama's tool calling as a plan (prompt with the tools shown, grammar of a forced call,
        # parser), run as any other request of the engine.
        plan = tools_mod.plan_tool_chat(
            self.llm, messages, tools=tools, tool_choice=tool_choice or "auto",
            logprobs=True if lp is not None else None, top_logprobs=lp or None,
            logits_processors=list(logits_processor) if logits_processor else None, **overrides)
        if plan.tools is None:
            comp = self.llm.chat(plan.messages, **{**plan.options, "max_tokens": max_tokens or -1})
        else:
            n_prompt = len(plan.prompt)
            if n_prompt >= self._n_ctx:
                raise ValueError(f"Requested tokens ({n_prompt}) exceed context window of {self._n_ctx}")
            if max_tokens is None or max_tokens <= 0:
                max_tokens = self._n_ctx - n_prompt
            options = dict(plan.options, max_tokens=min(max_tokens, self._n_ctx - n_prompt))
            comp = plan.finish(self.llm.complete(plan.prompt, **options))
        cid = f"chatcmpl-{uuid.uuid4()}"
        created = int(time.time())
        model_name = model if model is not None else self.model_path
        calls = comp.tool_calls or None
        message: Dict[str, Any] = {"role": "assistant", "content": comp.content if calls else comp.text}
        if calls:
            message["tool_calls"] = calls
            if legacy:
                message["function_call"] = dict(calls[0]["function"])
        finish = "tool_calls" if calls else _finish(comp.finish_reason)
        logprobs = _chat_logprobs(comp) if lp is not None else None
        n_gen = len(comp.tokens)
        if not stream:
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
                    "usage": {"prompt_tokens": comp.prompt_tokens, "completion_tokens": n_gen,
                              "total_tokens": comp.prompt_tokens + n_gen}}

        def chunks() -> Iterator[Any]:
            base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name}
            yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
            if message.get("content"):
                yield {**base, "choices": [{"index": 0, "delta": {"content": message["content"]},
                                            "logprobs": logprobs, "finish_reason": None}]}
            if calls:
                delta = {"role": None, "content": None,
                         "tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                if legacy:
                    delta["function_call"] = dict(calls[0]["function"])
                yield {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
            yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]}

        return chunks()

    def create_chat_completion_openai_v1(self, *args: Any, **kwargs: Any) -> Any:
        """create_chat_completion() returning the ``openai`` package's ChatCompletion (or an
        iterator of ChatCompletionChunk with stream=True)."""
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError:
            raise ImportError("To use create_chat_completion_openai_v1, you must install the openai package. "
                              "You can install it with `pip install openai`.") from None
        stream = kwargs.get("stream", False)
        assert isinstance(stream, bool)
        if stream:
            return (ChatCompletionChunk.model_validate(chunk) for chunk in self.create_chat_completion(*args, **kwargs))
        return ChatCompletion.model_validate(self.create_chat_completion(*args, **kwargs))


# ---- result shapes ---------------------------------------------------------------------------

def _schema_of_response_format(fmt: Any) -> Any:
    """The JSON schema a response_format asks for ({} means any JSON object), or None."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        schema = fmt.get("schema")
        return schema if schema is not None else {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema", fmt.get("schema"))
        if schema is None:
            raise ValueError("response_format json_schema needs a 'schema'")
        return schema
    if kind in (None, "text"):
        return None
    raise ValueError(f"unknown response_format type {kind!r} (use 'text', 'json_object' or 'json_schema')")


def _chat_logprobs_of_completion(logprobs: Optional[CompletionLogprobs]) -> Any:
    if logprobs is None:
        return None
    return {
        "content": [
            {"token": token, "bytes": None, "logprob": logprob,
             "top_logprobs": [{"token": t, "logprob": l, "bytes": None} for t, l in (top or {}).items()]}
            for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"])
        ],
        "refusal": None,
    }


def _chat_logprobs(comp: Any) -> Any:
    if comp.logprobs is None:
        return None
    return {"content": [t.to_openai() for t in comp.logprobs], "refusal": None}


def _completion_to_chat(completion_or_chunks: Any, stream: bool) -> Any:
    if not stream:
        c = completion_or_chunks
        return {
            "id": "chat" + c["id"],
            "object": "chat.completion",
            "created": c["created"],
            "model": c["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c["choices"][0]["text"]},
                         "logprobs": _chat_logprobs_of_completion(c["choices"][0]["logprobs"]),
                         "finish_reason": c["choices"][0]["finish_reason"]}],
            "usage": c["usage"],
        }

    def chunks() -> Iterator[Any]:
        for i, chunk in enumerate(completion_or_chunks):
            base = {"id": "chat" + chunk["id"], "model": chunk["model"], "created": chunk["created"],
                    "object": "chat.completion.chunk"}
            if i == 0:
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                            "finish_reason": None}]}
            choice = chunk["choices"][0]
            yield {**base, "choices": [{
                "index": 0,
                "delta": {"content": choice["text"]} if choice["finish_reason"] is None else {},
                "logprobs": _chat_logprobs_of_completion(choice["logprobs"]),
                "finish_reason": choice["finish_reason"]}]}

    return chunks()


def _completion_to_chat_function(tool_name: str, completion_or_chunks: Any, stream: bool) -> Any:
    """A completion constrained to one tool's arguments, as a tool call (llama-cpp-python's shape)."""
    if not stream:
        c = completion_or_chunks
        args = c["choices"][0]["text"]
        return {
            "id": "chat" + c["id"],
            "object": "chat.completion",
            "created": c["created"],
            "model": c["model"],
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": None,
                                     "function_call": {"name": tool_name, "arguments": args},
                                     "tool_calls": [{"id": "call__0_" + tool_name + "_" + c["id"], "type": "function",
                                                     "function": {"name": tool_name, "arguments": args}}]},
                         "logprobs": _chat_logprobs_of_completion(c["choices"][0]["logprobs"]),
                         "finish_reason": "tool_calls"}],
            "usage": c["usage"],
        }

    def chunks() -> Iterator[Any]:
        first = True
        base: Dict[str, Any] = {}
        tool_id = ""
        for chunk in completion_or_chunks:
            if chunk["choices"][0]["finish_reason"] is not None:
                continue
            if first:
                base = {"id": "chat" + chunk["id"], "object": "chat.completion.chunk", "created": chunk["created"],
                        "model": chunk["model"]}
                tool_id = "call__0_" + tool_name + "_" + chunk["id"]
                yield {**base, "choices": [{"index": 0, "finish_reason": None, "logprobs": None,
                                            "delta": {"role": "assistant", "content": None, "function_call": None,
                                                      "tool_calls": None}}]}
                first = False
            text = chunk["choices"][0]["text"]
            yield {**base, "choices": [{
                "index": 0, "finish_reason": None,
                "logprobs": _chat_logprobs_of_completion(chunk["choices"][0]["logprobs"]),
                "delta": {"role": None, "content": None, "function_call": {"name": tool_name, "arguments": text},
                          "tool_calls": [{"index": 0, "id": tool_id, "type": "function",
                                          "function": {"name": tool_name, "arguments": text}}]}}]}
        if base:
            yield {**base, "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                                        "delta": {"role": None, "content": None, "function_call": None,
                                                  "tool_calls": None}}]}

    return chunks()
