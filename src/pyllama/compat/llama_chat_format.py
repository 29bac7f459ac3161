"""llama-cpp-python's ``llama_cpp.llama_chat_format``: chat formats, chat handlers, and the
multimodal chat handlers, on pyllama.

* Named chat formats (``format_chatml``, ``format_llama2``, ...) build exactly the prompt
  strings llama-cpp-python 0.3.36 builds; :func:`get_chat_format` returns one by name.
* :class:`Jinja2ChatFormatter` renders a Hugging Face chat template in pyllama's template
  sandbox (:class:`pyllama.chat.ChatFormatter`: transformers' environment, with limits).
* :func:`chat_formatter_to_chat_completion_handler` turns a formatter into a chat completion
  handler: it only renders, tokenizes and calls ``llama.create_completion`` (the compat
  ``Llama``'s, which runs on pyllama's engine), then reshapes the result into a chat
  completion.  There is no generation loop here.
* The multimodal handlers (:class:`Llava15ChatHandler` and its siblings) are descriptions
  for the compat ``Llama``: the projector file (``clip_model_path``), the chat template to
  render with (:attr:`MultimodalChatHandler.chat_template`) and how to prepare the messages
  (:meth:`MultimodalChatHandler.prepare_messages`).  The ``Llama`` loads the model with
  ``mmproj_path=handler.clip_model_path`` and answers through ``LLM.chat``, which
  tokenizes images with llama.cpp's mtmd.
* Tool-calling formats (``chatml-function-calling``, ``functionary*``) are not chat formats
  here: tool calls go through ``create_chat_completion(tools=...)`` with the model's own chat
  template (pyllama's tool calling).  :data:`TOOL_CALLING_CHAT_FORMATS` names them.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import sys
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

from pyllama.compat import llama_grammar

if TYPE_CHECKING:  # pragma: no cover
    from pyllama.compat.llama import Llama

logger = logging.getLogger("pyllama")

__all__ = [
    "CHATML_CHAT_TEMPLATE",
    "CHATML_BOS_TOKEN",
    "CHATML_EOS_TOKEN",
    "MISTRAL_INSTRUCT_CHAT_TEMPLATE",
    "MISTRAL_INSTRUCT_BOS_TOKEN",
    "MISTRAL_INSTRUCT_EOS_TOKEN",
    "MIXTRAL_INSTRUCT_CHAT_TEMPLATE",
    "LLAMA3_INSTRUCT_CHAT_TEMPLATE",
    "TOOL_CALLING_CHAT_FORMATS",
    "LlamaChatCompletionHandler",
    "LlamaChatCompletionHandlerNotFoundException",
    "LlamaChatCompletionHandlerRegistry",
    "get_chat_completion_handler",
    "register_chat_completion_handler",
    "ChatFormatterResponse",
    "ChatFormatter",
    "Jinja2ChatFormatter",
    "chat_formatter_to_chat_completion_handler",
    "hf_autotokenizer_to_chat_formatter",
    "hf_autotokenizer_to_chat_completion_handler",
    "hf_tokenizer_config_to_chat_formatter",
    "hf_tokenizer_config_to_chat_completion_handler",
    "guess_chat_format_from_gguf_metadata",
    "register_chat_format",
    "get_chat_format",
    "chat_format_names",
    "ClipModelNotFoundError",
    "MultimodalChatHandler",
    "Llava15ChatHandler",
    "Llava16ChatHandler",
    "ObsidianChatHandler",
    "MoondreamChatHandler",
    "NanoLlavaChatHandler",
    "Llama3VisionAlphaChatHandler",
    "Llama3VisionAlpha",
    "MiniCPMv26ChatHandler",
    "Qwen25VLChatHandler",
    "MTMDChatHandler",
    "Gemma4ChatHandler",
]

### Common chat templates and special tokens (llama-cpp-python's constants) ###

# Source: https://huggingface.co/teknium/OpenHermes-2.5-Mistral-7B/blob/main/tokenizer_config.json
CHATML_CHAT_TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
CHATML_BOS_TOKEN = "<s>"
CHATML_EOS_TOKEN = "<|im_end|>"

# Source: https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.1/blob/main/tokenizer_config.json
MISTRAL_INSTRUCT_CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
MISTRAL_INSTRUCT_BOS_TOKEN = "<s>"
MISTRAL_INSTRUCT_EOS_TOKEN = "</s>"

# Source: https://huggingface.co/mistralai/Mixtral-8x7B-Instruct-v0.1/blob/main/tokenizer_config.json
MIXTRAL_INSTRUCT_CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"

# Source: https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct/blob/main/tokenizer_config.json
LLAMA3_INSTRUCT_CHAT_TEMPLATE = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"

#: llama-cpp-python's tool-calling chat handlers.  pyllama does tool calling with the model's
#: own chat template (``create_chat_completion(tools=...)``), so the compat ``Llama`` treats
#: these names as "the model's own template"; :func:`get_chat_format` refuses them.
TOOL_CALLING_CHAT_FORMATS = frozenset({"chatml-function-calling", "functionary", "functionary-v1", "functionary-v2"})

_TOOL_CALLING_HINT = (
    "pyllama has no separate {name!r} chat format: tool calling goes through "
    "create_chat_completion(tools=..., tool_choice=...) with the model's own chat template "
    "(Llama(..., chat_format={name!r}) is accepted and means exactly that)"
)


### Chat completion handlers ###


class LlamaChatCompletionHandler(Protocol):
    """A chat completion handler: called with ``llama=`` (the compat ``Llama``),
    ``messages=`` and the OpenAI/llama-cpp-python parameters; returns a chat completion
    dict, or an iterator of chunk dicts when ``stream=True``."""

    def __call__(self, *, llama: "Llama", messages: List[Dict[str, Any]], **kwargs: Any) -> Any: ...


class LlamaChatCompletionHandlerNotFoundException(ValueError):
    """No chat handler of that name (a ValueError here; a bare Exception in llama-cpp-python)."""


class LlamaChatCompletionHandlerRegistry:
    """The process-wide table of named chat completion handlers (one instance, as in
    llama-cpp-python: ``LlamaChatCompletionHandlerRegistry()`` always returns it)."""

    _instance: Optional["LlamaChatCompletionHandlerRegistry"] = None
    _chat_handlers: Dict[str, LlamaChatCompletionHandler] = {}

    def __new__(cls) -> "LlamaChatCompletionHandlerRegistry":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def register_chat_completion_handler(self, name: str, chat_handler: LlamaChatCompletionHandler,
                                         overwrite: bool = False) -> None:
        if not overwrite and name in self._chat_handlers:
            raise ValueError(
                f"Formatter with name '{name}' is already registered. Use `overwrite=True` to overwrite it."
            )
        self._chat_handlers[name] = chat_handler

    def unregister_chat_handler(self, name: str) -> None:
        if name in self._chat_handlers:
            del self._chat_handlers[name]
        else:
            raise ValueError(f"No formatter registered under the name '{name}'.")

    def get_chat_completion_handler_by_name(self, name: str) -> LlamaChatCompletionHandler:
        try:
            return self._chat_handlers[name]
        except KeyError:
            if name in TOOL_CALLING_CHAT_FORMATS:
                raise LlamaChatCompletionHandlerNotFoundException(_TOOL_CALLING_HINT.format(name=name)) from None
            raise LlamaChatCompletionHandlerNotFoundException(
                f"Invalid chat handler: {name} (valid formats: {list(self._chat_handlers.keys())})"
            ) from None


def get_chat_completion_handler(name: str) -> LlamaChatCompletionHandler:
    """The chat completion handler registered as `name`
    (LlamaChatCompletionHandlerNotFoundException, a ValueError, if none)."""
    return LlamaChatCompletionHandlerRegistry().get_chat_completion_handler_by_name(name)


def register_chat_completion_handler(name: str) -> Callable[[Any], Any]:
    """Decorator: register a chat completion handler under `name`."""

    def decorator(f: LlamaChatCompletionHandler) -> LlamaChatCompletionHandler:
        LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(name, f)
        return f

    return decorator


### Chat formatters ###


@dataclasses.dataclass
class ChatFormatterResponse:
    """What a chat format makes of a conversation: the prompt text, the stop string(s) the
    format needs, optional stopping criteria, and whether the prompt already holds the
    special tokens (BOS) so that the tokenizer must not add them."""

    prompt: str
    stop: Optional[Union[str, List[str]]] = None
    stopping_criteria: Optional[Any] = None
    added_special: bool = False


class ChatFormatter(Protocol):
    """A chat format: ``formatter(messages=[...], **kwargs) -> ChatFormatterResponse``."""

    def __call__(self, *, messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse: ...


def _stopping_criteria_list(criteria: List[Callable[..., bool]]) -> Any:
    """llama-cpp-python's ``StoppingCriteriaList`` from the compat ``Llama`` module when it
    is there, else a plain list of the same callables."""
    try:
        from pyllama.compat.llama import StoppingCriteriaList  # type: ignore[attr-defined]
    except ImportError:
        return list(criteria)
    return StoppingCriteriaList(criteria)


class Jinja2ChatFormatter(ChatFormatter):
    """A chat format from a Jinja chat template (a GGUF's ``tokenizer.chat_template`` or a
    Hugging Face ``tokenizer_config.json``'s).

    The template renders in pyllama's sandbox, configured as transformers'
    ``apply_chat_template`` (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, the
    ``{% generation %}`` tag, ``tojson``, ``raise_exception``, ``strftime_now``), within
    pyllama's render limits.  Rendering variables are llama-cpp-python's: ``messages``,
    ``bos_token``, ``eos_token``, ``add_generation_prompt``, ``functions``,
    ``function_call``, ``tools``, ``tool_choice`` and any extra keyword argument.
    A template that does not compile raises :class:`pyllama.chat.ChatTemplateError` (a
    ValueError) here, not at the first render.
    """

    def __init__(
        self,
        template: str,
        eos_token: str,
        bos_token: str,
        add_generation_prompt: bool = True,
        stop_token_ids: Optional[List[int]] = None,
    ) -> None:
        from pyllama.chat import ChatFormatter as _PyllamaFormatter

        self.template = template
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.add_generation_prompt = add_generation_prompt
        self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else None
        # fallback=None: a template that fails raises instead of silently rendering another one.
        self._formatter = _PyllamaFormatter(template, bos_token=bos_token, eos_token=eos_token, fallback=None)

    @staticmethod
    def strftime_now(f: str) -> str:
        return datetime.now().strftime(f)

    @staticmethod
    def tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
               separators: Optional[Tuple[str, str]] = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def __call__(
        self,
        *,
        messages: List[Dict[str, Any]],
        functions: Optional[List[Dict[str, Any]]] = None,
        function_call: Optional[Any] = None,
        tools: Optional[List[Dict[str, Any]]] = None,
        tool_choice: Optional[Any] = None,
        **kwargs: Any,
    ) -> ChatFormatterResponse:
        # llama-cpp-python lets an assistant message carrying only tool_calls omit content;
        # pyllama's renderer wants the key (None is allowed for assistants).
        messages = [dict(m, content=None) if isinstance(m, Mapping) and "content" not in m
                    and m.get("role") == "assistant" else m for m in messages]
        prompt = self._formatter.render(
            messages,
            add_generation_prompt=self.add_generation_prompt,
            tools=tools,
            functions=functions,
            function_call=function_call,
            tool_choice=tool_choice,
            **kwargs,
        )
        stopping_criteria = None
        if self.stop_token_ids is not None:
            stop_ids = self.stop_token_ids

            def stop_on_last_token(tokens: Any, logits: Any) -> bool:
                return len(tokens) > 0 and int(tokens[-1]) in stop_ids

            stopping_criteria = _stopping_criteria_list([stop_on_last_token])
        return ChatFormatterResponse(prompt=prompt, stop=[self.eos_token], stopping_criteria=stopping_criteria,
                                     added_special=True)

    def to_chat_handler(self) -> LlamaChatCompletionHandler:
        return chat_formatter_to_chat_completion_handler(self)


### Completion -> chat completion (llama-cpp-python's response shapes) ###


def _convert_text_completion_logprobs_to_chat(logprobs: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    if logprobs is None:
        return None
    return {
        "content": [
            {
                "token": token,
                "bytes": None,
                "logprob": logprob,
                "top_logprobs": [
                    {"token": top_token, "logprob": top_logprob, "bytes": None}
                    for top_token, top_logprob in (top_logprobs or {}).items()
                ],
            }
            for token, logprob, top_logprobs in zip(
                logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]
            )
        ],
        "refusal": None,
    }


def _convert_text_completion_to_chat(completion: Mapping[str, Any]) -> Dict[str, Any]:
    choice = completion["choices"][0]
    return {
        "id": "chat" + completion["id"],
        "object": "chat.completion",
        "created": completion["created"],
        "model": completion["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": choice["text"]},
                "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                "finish_reason": choice["finish_reason"],
            }
        ],
        "usage": completion["usage"],
    }


def _convert_text_completion_chunks_to_chat(chunks: Iterator[Mapping[str, Any]]) -> Iterator[Dict[str, Any]]:
    for i, chunk in enumerate(chunks):
        choice = chunk["choices"][0]
        if i == 0:
            yield {
                "id": "chat" + chunk["id"],
                "model": chunk["model"],
                "created": chunk["created"],
                "object": "chat.completion.chunk",
                "choices": [
                    {"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}
                ],
            }
        yield {
            "id": "chat" + chunk["id"],
            "model": chunk["model"],
            "created": chunk["created"],
            "object": "chat.completion.chunk",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": choice["text"]} if choice["finish_reason"] is None else {},
                    "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                    "finish_reason": choice["finish_reason"],
                }
            ],
        }


def _convert_completion_to_chat(completion_or_chunks: Any, stream: bool = False) -> Any:
    if stream:
        return _convert_text_completion_chunks_to_chat(completion_or_chunks)
    return _convert_text_completion_to_chat(completion_or_chunks)


def _tool_call_delta(tool_name: str, tool_id: str, arguments: str) -> Dict[str, Any]:
    return {
        "role": None,
        "content": None,
        "function_call": {"name": tool_name, "arguments": arguments},
        "tool_calls": [
            {"index": 0, "id": tool_id, "type": "function", "function": {"name": tool_name, "arguments": arguments}}
        ],
    }


def _convert_completion_to_chat_function(tool_name: str, completion_or_chunks: Any, stream: bool) -> Any:
    """A completion constrained to one tool's arguments, as llama-cpp-python's tool-call shapes."""
    if not stream:
        completion = completion_or_chunks
        tool_id = "call_" + "_0_" + tool_name + "_" + completion["id"]
        arguments = completion["choices"][0]["text"]
        return {
            "id": "chat" + completion["id"],
            "object": "chat.completion",
            "created": completion["created"],
            "model": completion["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "function_call": {"name": tool_name, "arguments": arguments},
                        "tool_calls": [
                            {"id": tool_id, "type": "function", "function": {"name": tool_name, "arguments": arguments}}
                        ],
                    },
                    "logprobs": _convert_text_completion_logprobs_to_chat(completion["choices"][0]["logprobs"]),
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": completion["usage"],
        }

    def stream_tool_call(chunks: Iterator[Mapping[str, Any]]) -> Iterator[Dict[str, Any]]:
        first: Optional[Mapping[str, Any]] = None
        tool_id = ""
        for chunk in chunks:
            choice = chunk["choices"][0]
            if first is None:
                first = chunk
                tool_id = "call_" + "_0_" + tool_name + "_" + chunk["id"]
                yield {
                    "id": "chat" + chunk["id"],
                    "object": "chat.completion.chunk",
                    "created": chunk["created"],
                    "model": chunk["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": None,
                            "logprobs": None,
                            "delta": {"role": "assistant", "content": None, "function_call": None, "tool_calls": None},
                        }
                    ],
                }
            yield {
                "id": "chat" + chunk["id"],
                "object": "chat.completion.chunk",
                "created": chunk["created"],
                "model": chunk["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": None,
                        "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                        "delta": _tool_call_delta(tool_name, tool_id, choice["text"]),
                    }
                ],
            }
        if first is not None:
            yield {
                "id": "chat" + first["id"],
                "object": "chat.completion.chunk",
                "created": first["created"],
                "model": first["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "tool_calls",
                        "logprobs": None,
                        "delta": {"role": None, "content": None, "function_call": None, "tool_calls": None},
                    }
                ],
            }

    return stream_tool_call(completion_or_chunks)


### Grammars for response_format and tool_choice ###


def _grammar_for_json(verbose: bool = False) -> llama_grammar.LlamaGrammar:
    return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=verbose)


def _grammar_for_json_schema(schema: str, verbose: bool = False,
                             fallback_to_json: bool = True) -> llama_grammar.LlamaGrammar:
    try:
        return llama_grammar.LlamaGrammar.from_json_schema(schema, verbose=verbose)
    except Exception:
        if fallback_to_json:
            return _grammar_for_json(verbose=verbose)
        raise


def _grammar_for_response_format(response_format: Mapping[str, Any],
                                 verbose: bool = False) -> Optional[llama_grammar.LlamaGrammar]:
    """The grammar a response_format asks for: llama-cpp-python's ``{"type": "json_object"
    [, "schema": {...}]}`` and, unlike llama-cpp-python (which ignores it), OpenAI's
    ``{"type": "json_schema", "json_schema": {"schema": {...}}}``."""
    kind = response_format.get("type")
    if kind == "json_object":
        if "schema" in response_format:
            return _grammar_for_json_schema(json.dumps(response_format["schema"]), verbose=verbose)
        return _grammar_for_json(verbose=verbose)
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec.get("schema_")) if isinstance(spec, Mapping) else None
        if schema is None:
            return _grammar_for_json(verbose=verbose)
        # A schema pyllama cannot express is the caller's error here, not silently plain JSON.
        return _grammar_for_json_schema(json.dumps(schema), verbose=verbose, fallback_to_json=False)
    return None


def _tools_from_functions(functions: Optional[List[Dict[str, Any]]], tools: Any) -> Any:
    if functions is not None:
        return [{"type": "function", "function": function} for function in functions]
    return tools


def _tool_choice_from_function_call(function_call: Any, tool_choice: Any) -> Any:
    if function_call is not None:
        if isinstance(function_call, str) and function_call in ("none", "auto"):
            tool_choice = function_call
        if isinstance(function_call, dict) and "name" in function_call:
            tool_choice = {"type": "function", "function": {"name": function_call["name"]}}
    return tool_choice


def chat_formatter_to_chat_completion_handler(chat_formatter: ChatFormatter) -> LlamaChatCompletionHandler:
    """A chat completion handler from a chat format, as llama-cpp-python builds it: render
    the messages, tokenize the prompt (``llama.tokenize(..., add_bos=not added_special,
    special=True)``), add the format's stop strings, constrain to JSON for
    ``response_format`` and to the arguments of a tool named by ``tool_choice``, then
    ``llama.create_completion(prompt=tokens, ...)`` reshaped as a chat completion."""

    def chat_completion_handler(
        *,
        llama: "Llama",
        messages: List[Dict[str, Any]],
        functions: Optional[List[Dict[str, Any]]] = None,
        function_call: Optional[Any] = None,
        tools: Optional[List[Dict[str, Any]]] = None,
        tool_choice: Optional[Any] = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: Optional[Union[str, List[str]]] = [],
        seed: Optional[int] = None,
        response_format: Optional[Mapping[str, Any]] = None,
        max_tokens: Optional[int] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.1,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        logits_processor: Optional[Any] = None,
        grammar: Optional[llama_grammar.LlamaGrammar] = None,
        logit_bias: Optional[Dict[str, float]] = None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
        **kwargs: Any,
    ) -> Any:
        result = chat_formatter(messages=messages, functions=functions, function_call=function_call,
                                tools=tools, tool_choice=tool_choice, **kwargs)
        prompt = llama.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        if result.stop is not None:
            stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
            rstop = result.stop if isinstance(result.stop, list) else [result.stop]
            stop = stop + rstop
        stopping_criteria = result.stopping_criteria
        verbose = bool(getattr(llama, "verbose", False))

        if response_format is not None:
            format_grammar = _grammar_for_response_format(response_format, verbose=verbose)
            if format_grammar is not None:
                grammar = format_grammar

        tools = _tools_from_functions(functions, tools)
        tool_choice = _tool_choice_from_function_call(function_call, tool_choice)
        tool = None
        if tool_choice is not None and isinstance(tool_choice, dict) and tools is not None:
            name = tool_choice["function"]["name"]
            tool = next((t for t in tools if t["function"]["name"] == name), None)
            if tool is None:
                raise ValueError(f"Tool choice '{name}' not found in tools.")
            schema = tool["function"].get("parameters", {})
            try:
                grammar = llama_grammar.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=verbose)
            except Exception as e:  # llama-cpp-python falls back to any JSON object
                if verbose:
                    print(str(e), file=sys.stderr)
                grammar = llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=verbose)

        completion_or_chunks = llama.create_completion(
            prompt=prompt,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            typical_p=typical_p,
            logprobs=top_logprobs if logprobs else None,
            stream=stream,
            stop=stop,
            seed=seed,
            max_tokens=max_tokens,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repeat_penalty=repeat_penalty,
            tfs_z=tfs_z,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            model=model,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            grammar=grammar,
            logit_bias=logit_bias,
        )
        if tool is not None:
            return _convert_completion_to_chat_function(tool["function"]["name"], completion_or_chunks, stream)
        return _convert_completion_to_chat(completion_or_chunks, stream=stream)

    chat_completion_handler.chat_formatter = chat_formatter  # type: ignore[attr-defined]
    return chat_completion_handler


def hf_autotokenizer_to_chat_formatter(pretrained_model_name_or_path: Union[str, "os.PathLike[str]"]) -> ChatFormatter:
    """A chat format that renders with transformers' ``AutoTokenizer.apply_chat_template``
    (needs ``transformers``)."""
    from transformers import AutoTokenizer  # type: ignore

    tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path)

    def format_autotokenizer(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
        tokenizer.use_default_system_prompt = False
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        if not isinstance(prompt, str):
            raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, not a str")
        return ChatFormatterResponse(prompt=prompt, stop=tokenizer.eos_token, added_special=True)

    return format_autotokenizer


def hf_autotokenizer_to_chat_completion_handler(
    pretrained_model_name_or_path: Union[str, "os.PathLike[str]"],
) -> LlamaChatCompletionHandler:
    return chat_formatter_to_chat_completion_handler(hf_autotokenizer_to_chat_formatter(pretrained_model_name_or_path))


def hf_tokenizer_config_to_chat_formatter(tokenizer_config: Dict[str, Any],
                                          add_generation_prompt: bool = True) -> ChatFormatter:
    """A chat format from a Hugging Face ``tokenizer_config.json`` (as a dict), rendered in
    pyllama's sandbox.  As in llama-cpp-python, the generation prompt is an empty assistant
    message appended to the conversation, and the stops are the EOS and BOS texts."""
    if not isinstance(tokenizer_config, dict):
        raise TypeError(f"tokenizer_config must be a dict, not {type(tokenizer_config).__name__}")
    for key in ("chat_template", "bos_token", "eos_token"):
        if not isinstance(tokenizer_config.get(key), str):
            raise ValueError(f"tokenizer_config needs a string {key!r}")
    from pyllama.chat import ChatFormatter as _PyllamaFormatter

    bos_token = tokenizer_config["bos_token"]
    eos_token = tokenizer_config["eos_token"]
    formatter = _PyllamaFormatter(tokenizer_config["chat_template"], bos_token=bos_token, eos_token=eos_token,
                                  fallback=None)

    def format_tokenizer_config(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
        if add_generation_prompt:
            messages = [*messages, {"role": "assistant", "content": ""}]
        prompt = formatter.render(messages, add_generation_prompt=False, **kwargs)
        return ChatFormatterResponse(prompt=prompt, stop=[eos_token, bos_token], added_special=True)

    return format_tokenizer_config


def hf_tokenizer_config_to_chat_completion_handler(tokenizer_config: Dict[str, Any],
                                                   add_generation_prompt: bool = True) -> LlamaChatCompletionHandler:
    return chat_formatter_to_chat_completion_handler(
        hf_tokenizer_config_to_chat_formatter(tokenizer_config, add_generation_prompt=add_generation_prompt))


def guess_chat_format_from_gguf_metadata(metadata: Mapping[str, str]) -> Optional[str]:
    """The chat format name whose template a GGUF carries verbatim (chatml,
    mistral-instruct, llama-3), else None (then the GGUF's own template is used)."""
    template = metadata.get("tokenizer.chat_template")
    if template is None:
        return None
    if template == CHATML_CHAT_TEMPLATE:
        return "chatml"
    if template in (MISTRAL_INSTRUCT_CHAT_TEMPLATE, MIXTRAL_INSTRUCT_CHAT_TEMPLATE):
        return "mistral-instruct"
    if template == LLAMA3_INSTRUCT_CHAT_TEMPLATE:
        return "llama-3"
    return None


### Prompt-building helpers (llama-cpp-python's, same outputs) ###


def _get_system_message(messages: Sequence[Mapping[str, Any]]) -> str:
    """The first system message's content ("" if none)."""
    for message in messages:
        if message["role"] == "system":
            return message["content"] or ""
    return ""


def _map_roles(messages: Sequence[Mapping[str, Any]], role_map: Mapping[str, str]) -> List[Tuple[str, Optional[str]]]:
    """(mapped role, content) for the messages whose role is in `role_map`; content that is
    not a string (a list of parts, None) becomes None, as in llama-cpp-python."""
    output: List[Tuple[str, Optional[str]]] = []
    for message in messages:
        role = message["role"]
        if role in role_map:
            content = message["content"] if isinstance(message["content"], str) else None
            output.append((role_map[role], content))
    return output


def _format_llama2(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str, sep2: str) -> str:
    seps = [sep, sep2]
    ret = system_message + sep
    for i, (role, message) in enumerate(messages):
        if system_message and i == 0:
            ret += (message or "") + seps[i % 2]
        elif message:
            ret += role + message + " " + seps[i % 2]
        else:
            ret += role + " "
    return ret


def _format_add_colon_single(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str) -> str:
    ret = system_message + sep
    for role, message in messages:
        ret += role + ": " + message + sep if message else role + ":"
    return ret


def _format_add_colon_two(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str, sep2: str) -> str:
    seps = [sep, sep2]
    ret = system_message + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


def _format_no_colon_single(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str) -> str:
    ret = system_message
    for role, message in messages:
        ret += role + message + sep if message else role
    return ret


def _format_add_colon_space_single(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str) -> str:
    ret = system_message + sep
    for role, message in messages:
        ret += role + ": " + message + sep if message else role + ": "  # must end with a space
    return ret


def _format_chatml(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str) -> str:
    ret = "" if system_message == "" else system_message + sep + "\n"
    for role, message in messages:
        ret += role + "\n" + message + sep + "\n" if message else role + "\n"
    return ret


def _format_chatglm3(system_message: str, messages: List[Tuple[str, Optional[str]]], sep: str) -> str:
    ret = system_message or ""
    for role, message in messages:
        ret += role + "\n" + " " + message if message else role
    return ret


### Named chat formats ###

_CHAT_FORMATS: Dict[str, ChatFormatter] = {}


def register_chat_format(name: str) -> Callable[[Any], Any]:
    """Decorator: register a chat format under `name`, both as a formatter
    (:func:`get_chat_format`) and as a chat completion handler
    (:func:`get_chat_completion_handler`), as llama-cpp-python does.  A name registered
    twice raises ValueError."""

    def decorator(f: ChatFormatter) -> ChatFormatter:
        LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(
            name, chat_formatter_to_chat_completion_handler(f))
        _CHAT_FORMATS[name] = f
        return f

    return decorator


def chat_format_names() -> List[str]:
    """The names :func:`get_chat_format` knows, sorted."""
    return sorted(_CHAT_FORMATS)


def get_chat_format(name: str) -> ChatFormatter:
    """The chat format registered as `name` (``format_chatml`` for ``"chatml"``, ...).

    ValueError for an unknown name (the message lists the known ones) and for the
    tool-calling handlers' names (:data:`TOOL_CALLING_CHAT_FORMATS`), which pyllama serves
    with the model's own template instead.  (pyllama's addition: llama-cpp-python only has
    :func:`get_chat_completion_handler`.)
    """
    if not isinstance(name, str):
        raise TypeError(f"chat format name must be a str, not {type(name).__name__}")
    try:
        return _CHAT_FORMATS[name]
    except KeyError:
        pass
    if name in TOOL_CALLING_CHAT_FORMATS:
        raise ValueError(_TOOL_CALLING_HINT.format(name=name))
    raise ValueError(f"unknown chat format {name!r}; known chat formats: {', '.join(chat_format_names())} "
                     "(or leave chat_format=None to use the model's own chat template)")


# see https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/tokenization_llama.py
# system prompt is "embedded" in the first message
@register_chat_format("llama-2")
def format_llama2(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _system_template = "[INST] <<SYS>>\n{system_message}\n<</SYS>>"
    _roles = dict(user="<s>[INST]", assistant="[/INST]")
    _messages = _map_roles(messages, _roles)
    system_message = _get_system_message(messages)
    if system_message:
        system_message = _system_template.format(system_message=system_message)
    _prompt = _format_llama2(system_message, _messages, " ", "</s>") + "[/INST]"
    return ChatFormatterResponse(prompt=_prompt)


# https://github.com/meta-llama/llama3/blob/main/llama/tokenizer.py#L202-L229
@register_chat_format("llama-3")
def format_llama3(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(
        system="<|start_header_id|>system<|end_header_id|>\n\n",
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    _sep = "<|eot_id|>"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single("", _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


@register_chat_format("alpaca")
def format_alpaca(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="### Instruction", assistant="### Response")
    system_message = _get_system_message(messages)
    _messages = _map_roles(messages, _roles)
    _prompt = _format_add_colon_two(system_message, _messages, "\n\n", "</s>")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("qwen")
def format_qwen(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="<|im_start|>user", assistant="<|im_start|>assistant")
    system_message = _get_system_message(messages) or "You are a helpful assistant."
    system_message = "<|im_start|>system\n{system_message}".format(system_message=system_message)
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatml(system_message, _messages, "<|im_end|>")
    return ChatFormatterResponse(prompt=_prompt, stop="<|endoftext|>")


@register_chat_format("vicuna")
def format_vicuna(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                      "gives helpful, detailed, and polite answers to the user's questions.")
    _roles = dict(user="USER", assistant="ASSISTANT")
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_two(system_message, _messages, " ", "</s>")
    return ChatFormatterResponse(prompt=_prompt)


# llama-cpp-python names this function `format`; keep that name importable too.
format = format_vicuna  # noqa: A001


@register_chat_format("oasst_llama")
def format_oasst_llama(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _system_template = "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n"
    _roles = dict(user="<|prompter|>", assistant="<|assistant|>")
    system_message = _system_template.format(system_message=_get_system_message(messages))
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single(system_message, _messages, "</s>")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("baichuan-2")
def format_baichuan2(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="<reserved_106>", assistant="<reserved_107>")
    system_message = _get_system_message(messages)
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single(system_message, _messages, "")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("baichuan")
def format_baichuan(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="<reserved_102>", assistant="<reserved_103>")
    system_message = _get_system_message(messages)
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single(system_message, _messages, "")
    return ChatFormatterResponse(prompt=_prompt)


_OPENBUDDY_SYSTEM_MESSAGE = """You are a helpful, respectful and honest INTP-T AI Assistant named Buddy. You are talking to a human User.
Always answer as helpfully and logically as possible, while being safe. Your answers should not include any harmful, political, religious, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.
If a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.
You can speak fluently in many languages, for example: English, Chinese.
You cannot access the internet, but you have vast knowledge, cutoff: 2021-09.
You are trained by OpenBuddy team, (https://openbuddy.ai, https://github.com/OpenBuddy/OpenBuddy), you are based on LLaMA and Falcon transformers model, not related to GPT or OpenAI.

"""


@register_chat_format("openbuddy")
def format_openbuddy(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="User", assistant="Assistant")
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_single(_OPENBUDDY_SYSTEM_MESSAGE, _messages, "\n")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("redpajama-incite")
def format_redpajama_incite(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = _get_system_message(messages)
    _roles = dict(user="<human>", assistant="<bot>")
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_single(system_message, _messages, "\n")
    return ChatFormatterResponse(prompt=_prompt, stop="<human>")


@register_chat_format("snoozy")
def format_snoozy(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    default_system_message = ("The prompt below is a question to answer, a task to complete, or a conversation "
                              "to respond to; decide which and write an appropriate response.")
    # llama-cpp-python builds "### Instruction:\n{system}" and then uses the bare system
    # message instead; the prompt below is what it actually sends.
    system_message = _get_system_message(messages) or default_system_message
    _roles = dict(user="### Prompt", assistant="### Response")
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_single(system_message, _messages, "\n")
    return ChatFormatterResponse(prompt=_prompt, stop="###")


@register_chat_format("phind")
def format_phind(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="### User Message", assistant="### Assistant")
    _system_message = "### System Prompt\nYou are an intelligent programming assistant."
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_single(_system_message, _messages, "\n\n")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("intel")
def format_intel(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="### User:", assistant="### Assistant:")
    # llama-cpp-python sends the placeholder literally (it never formats it in).
    _system_message = "### System:\n{system_message}"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_add_colon_single(_system_message, _messages, "\n")
    return ChatFormatterResponse(prompt=_prompt)


_OPEN_ORCA_SYSTEM_MESSAGE = (
    "You are a helpful assistant. Please answer truthfully and write out your "
    "thinking step by step to be sure you get the right answer. If you make a mistake or encounter "
    "an error in your thinking, say so out loud and attempt to correct it. If you don't know or "
    "aren't sure about something, say so clearly. You will act as a professional logician, mathematician, "
    "and physicist. You will also act as the most appropriate type of expert to answer any particular "
    "question or solve the relevant problem; state which expert type your are, if so. Also think of "
    "any particular named expert that would be ideal to answer the relevant question or solve the "
    "relevant problem; name and act as them, if appropriate."
)


@register_chat_format("open-orca")
def format_open_orca(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    roles = ("User", "Assistant")
    # llama-cpp-python maps the roles "User"/"Assistant" (capitalised) only, so OpenAI-style
    # "user"/"assistant" messages are left out of the prompt; kept as it is.
    _messages = _map_roles(messages, dict(zip(roles, roles)))
    _messages.append((roles[1], None))
    _prompt = _format_add_colon_space_single(_OPEN_ORCA_SYSTEM_MESSAGE, _messages, "<|end_of_turn|>\n")
    return ChatFormatterResponse(prompt=_prompt, stop="User")


@register_chat_format("mistrallite")
def format_mistrallite(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _roles = dict(user="<|prompter|>", assistant="</s>\n<|assistant|>")
    system_message = "<|system|>{system_message}</s>".format(system_message=_get_system_message(messages))
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single(system_message, _messages, " ")
    return ChatFormatterResponse(prompt=_prompt)


@register_chat_format("zephyr")
def format_zephyr(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = "<|system|>\n{system_message}".format(system_message=_get_system_message(messages))
    _roles = dict(user="<|user|>\n", assistant="<|assistant|>\n")
    _sep = "</s>"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatml(system_message, _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


@register_chat_format("pygmalion")
def format_pygmalion(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = "<|system|>{system_message}".format(system_message=_get_system_message(messages))
    _roles = dict(user="<|user|>", assistant="<|model|>")
    _sep = "\n"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatml(system_message, _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


@register_chat_format("chatml")
def format_chatml(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = "<|im_start|>system\n{system_message}".format(system_message=_get_system_message(messages))
    _roles = dict(user="<|im_start|>user", assistant="<|im_start|>assistant")
    _sep = "<|im_end|>"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatml(system_message, _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


@register_chat_format("mistral-instruct")
def format_mistral_instruct(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    eos = "</s>"
    prompt = ""
    for message in messages:
        if message["role"] == "user" and message["content"] is not None and isinstance(message["content"], str):
            prompt += "[INST] " + message["content"]
        elif message["role"] == "assistant" and message["content"] is not None:
            prompt += " [/INST]" + message["content"] + eos
    prompt += " [/INST]"
    return ChatFormatterResponse(prompt=prompt, stop=eos)


@register_chat_format("chatglm3")
def format_chatglm3(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = "<|system|>\n{system_message}".format(system_message=_get_system_message(messages))
    _roles = dict(user="<|user|>", assistant="<|assistant|>")
    _sep = "</s>"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatglm3(system_message, _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


@register_chat_format("openchat")
def format_openchat(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    system_message = "{system_message}<|end_of_turn|>".format(system_message=_get_system_message(messages))
    _roles = dict(user="GPT4 Correct User: ", assistant="<|end_of_turn|>GPT4 Correct Assistant: ")
    _sep = "<|end_of_turn|>"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_chatml(system_message, _messages, _sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


# https://huggingface.co/collections/IlyaGusev/saiga2-saigamistral-6505d4ccc3d1e53166b636cd
@register_chat_format("saiga")
def format_saiga(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    _message_template = "<s>{role}\n{content}</s>"
    _roles = dict(user="user", bot="bot", system="system")
    _messages = _map_roles(messages, _roles)
    _prompt = ""
    for role, content in _messages:
        if content:
            _prompt += _message_template.format(role=role, content=content)
        else:
            _prompt += f"<s>{role}\n"
    _prompt += "<s>bot"
    return ChatFormatterResponse(prompt=_prompt.strip())


# https://huggingface.co/collections/google/gemma-release-65d5efbccdbb8c4202ec078b
@register_chat_format("gemma")
def format_gemma(messages: List[Dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    if _get_system_message(messages) != "":
        logger.debug("`role='system'` messages are not allowed on Google's Gemma models.")
    _roles = dict(user="<start_of_turn>user\n", assistant="<start_of_turn>model\n")
    _sep = "<end_of_turn>\n"
    _messages = _map_roles(messages, _roles)
    _messages.append((_roles["assistant"], None))
    _prompt = _format_no_colon_single(system_message="", messages=_messages, sep=_sep)
    return ChatFormatterResponse(prompt=_prompt, stop=_sep)


### Multimodal chat handlers ###


class ClipModelNotFoundError(FileNotFoundError, ValueError):
    """The projector file given as ``clip_model_path`` does not exist.  Both a
    FileNotFoundError and, as llama-cpp-python raises, a ValueError."""


#: How pyllama's LLM.chat marks where an image was taken out of a conversation before the
#: template renders it (pyllama.multimodal.chat_media_prompt): templates that treat images
#: and text differently recognise the image placeholders by this prefix.
_MEDIA_MARKER_PREFIX = "<__pyllama_media_"


class MultimodalChatHandler:
    """The common base of the multimodal chat handlers: what the compat ``Llama`` needs to
    answer conversations with images through ``LLM.chat``.

    * :attr:`clip_model_path` -- the projector (mmproj) GGUF; load the model with
      ``mmproj_path=handler.clip_model_path``.
    * :attr:`chat_template` -- the Jinja template to render with
      (``LLM(..., chat_template=handler.chat_template)``), or None for the GGUF's own.
    * :meth:`prepare_messages` -- the conversation as that template expects it (the
      handler's default system message added, images placed where the format puts them).

    Handlers do not generate: calling one (``handler(llama=..., messages=...)``) asks
    ``llama.create_chat_completion`` of the ``Llama`` built with it.
    """

    #: The Jinja chat template of the format, as llama-cpp-python writes it (None: the GGUF's own).
    CHAT_FORMAT: Optional[str] = None
    #: System message added when a conversation has none (None: add nothing).
    DEFAULT_SYSTEM_MESSAGE: Optional[str] = None
    #: Whether the format puts a message's images before its text (CHAT_FORMAT renders all
    #: image parts first); pyllama renders parts in order, so prepare_messages moves them.
    IMAGES_FIRST: bool = False
    #: A pyllama-side variant of CHAT_FORMAT, for formats whose image and text parts get
    #: different surroundings (None: CHAT_FORMAT itself).
    _PYLLAMA_CHAT_FORMAT: Optional[str] = None

    def __init__(self, clip_model_path: Union[str, "os.PathLike[str]"], verbose: bool = True) -> None:
        if not isinstance(clip_model_path, (str, os.PathLike)):
            raise TypeError(f"clip_model_path must be a path (str), not {type(clip_model_path).__name__}")
        path = os.fspath(clip_model_path)
        if not os.path.exists(path):
            raise ClipModelNotFoundError(errno.ENOENT, f"Clip model path does not exist: {path}", path)
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "clip_model_path is a directory, not a GGUF file", path)
        self.clip_model_path = path
        self.verbose = verbose

    def __repr__(self) -> str:
        return f"{type(self).__name__}(clip_model_path={self.clip_model_path!r})"

    @property
    def chat_template(self) -> Optional[str]:
        """The Jinja template ``LLM`` should render conversations with (None: the model's own)."""
        return self._PYLLAMA_CHAT_FORMAT or self.CHAT_FORMAT

    @property
    def chat_format(self) -> Optional[str]:
        """Alias of :attr:`chat_template` (the "chat format" hint for the Llama class)."""
        return self.chat_template

    def prepare_messages(self, messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """The messages as this format renders them: the default system message first when
        there is no system message, and (for formats that show images before text) each
        message's image parts moved before its other parts.  The input is not modified."""
        out = [dict(m) for m in messages]
        if self.DEFAULT_SYSTEM_MESSAGE is not None and _get_system_message(out) == "":
            out.insert(0, {"role": "system", "content": self.DEFAULT_SYSTEM_MESSAGE})
        if self.IMAGES_FIRST:
            for m in out:
                content = m.get("content")
                if isinstance(content, (list, tuple)):
                    images = [p for p in content if isinstance(p, Mapping) and p.get("type") == "image_url"]
                    others = [p for p in content if not (isinstance(p, Mapping) and p.get("type") == "image_url")]
                    m["content"] = images + others
        return out

    @staticmethod
    def get_image_urls(messages: Sequence[Mapping[str, Any]]) -> List[str]:
        """The image URLs of the user messages, in order (llama-cpp-python's helper)."""
        image_urls: List[str] = []
        for message in messages:
            if message["role"] != "user" or message["content"] is None or isinstance(message["content"], str):
                continue
            for content in message["content"]:
                if isinstance(content, dict) and content.get("type") == "image_url":
                    url = content["image_url"]
                    image_urls.append(url["url"] if isinstance(url, dict) and "url" in url else url)
        return image_urls

    def __call__(self, *, llama: "Llama", messages: List[Dict[str, Any]], **kwargs: Any) -> Any:
        if getattr(llama, "chat_handler", None) is not self:
            raise ValueError(f"this {type(self).__name__} answers only through the Llama it was given to "
                             "(Llama(model_path, chat_handler=handler)); that Llama has another chat handler")
        return llama.create_chat_completion(messages=messages, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: Optional[str],
        local_dir: Union[str, "os.PathLike[str]", None] = None,
        local_dir_use_symlinks: Union[bool, str] = "auto",
        cache_dir: Union[str, "os.PathLike[str]", None] = None,
        *,
        revision: Optional[str] = None,
        token: Union[str, bool, None] = None,
        progress: Optional[bool] = None,
        **kwargs: Any,
    ) -> "MultimodalChatHandler":
        """A handler whose projector is downloaded from the Hugging Face Hub: the one file of
        `repo_id` matching `filename` (a name or glob such as ``"*mmproj*"``), through
        huggingface_hub's cache (``pip install 'pyllama[hf]'``).  Other keyword arguments
        go to the handler (``verbose``).  Errors are pyllama.models' (HubRepoNotFoundError,
        HubFileNotFoundError, HubAmbiguousFileError -- a ValueError -- HubOfflineError)."""
        from pyllama import models

        del local_dir_use_symlinks  # accepted for llama-cpp-python code; huggingface_hub ignores it too
        if not filename:
            raise ValueError("filename is required: a name or glob of the projector file, e.g. '*mmproj*'")
        path = models.fetch_from_hub(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                     local_dir=local_dir, token=token, progress=progress)
        return cls(clip_model_path=os.fspath(path), **kwargs)


class Llava15ChatHandler(MultimodalChatHandler):
    DEFAULT_SYSTEM_MESSAGE: Optional[str] = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if message.role == 'system' %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% if message.role == 'user' %}"
        "{% if message.content is string %}"
        "\nUSER: {{ message.content }}"
        "{% endif %}"
        "{% if message.content is iterable %}"
        "\nUSER: "
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' and content.image_url is string %}"
        "{{ content.image_url }}"
        "{% endif %}"
        "{% if content.type == 'image_url' and content.image_url is mapping %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "{% endif %}"
        "{% if message.role == 'assistant' and message.content is not none %}"
        "\nASSISTANT: {{ message.content }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "\nASSISTANT: "
        "{% endif %}"
    )


class ObsidianChatHandler(Llava15ChatHandler):
    # ChatML with ### as the separator.
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        # System message
        "{% if message.role == 'system' %}"
        "<|im_start|>system\n"
        "{{ message.content }}\n"
        "###\n"
        "{% endif %}"
        # User message
        "{% if message.role == 'user' %}"
        "<|im_start|>user\n"
        "{% if message.content is string %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% if message.content is iterable %}"
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' and content.image_url is string %}"
        "{{ content.image_url }}"
        "{% endif %}"
        "{% if content.type == 'image_url' and content.image_url is mapping %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "###\n"
        "{% endif %}"
        # Assistant message
        "{% if message.role == 'assistant' %}"
        "<|im_start|>assistant\n"
        "{{ message.content }}"
        "###\n"
        "{% endif %}"
        "{% endfor %}"
        # Generation prompt
        "{% if add_generation_prompt %}"
        "<|im_start|>assistant\n"
        "{% endif %}"
    )


class MoondreamChatHandler(Llava15ChatHandler):
    # f"<image>\n\n{chat_history}Question: {question}\n\nAnswer:"
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if message.role == 'user' %}"
        "{% if message.content is iterable %}"
        # <image>
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' %}"
        "{% if content.image_url is string %}"
        "{{ content.image_url }}\n\n"
        "{% endif %}"
        "{% if content.image_url is mapping %}"
        "{{ content.image_url.url }}\n\n"
        "{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        # Question:
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "Question: {{ content.text }}\n\n"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        # Question:
        "{% if message.content is string %}"
        "Question: {{ message.content }}\n\n"
        "{% endif %}"
        "{% endif %}"
        # Answer:
        "{% if message.role == 'assistant' %}"
        "Answer:{{ message.content }}\n\n"
        "{% endif %}"
        "{% endfor %}"
        # Generation prompt
        "{% if add_generation_prompt %}"
        "Answer:"
        "{% endif %}"
    )
    _PYLLAMA_CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if message.role == 'user' %}"
        "{% if message.content is iterable %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' and content.text.startswith('" + _MEDIA_MARKER_PREFIX + "') %}"
        "{{ content.text }}\n\n"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' and not content.text.startswith('" + _MEDIA_MARKER_PREFIX + "') %}"
        "Question: {{ content.text }}\n\n"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "{% if message.content is string %}"
        "Question: {{ message.content }}\n\n"
        "{% endif %}"
        "{% endif %}"
        "{% if message.role == 'assistant' %}"
        "Answer:{{ message.content }}\n\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "Answer:"
        "{% endif %}"
    )


class Llava16ChatHandler(Llava15ChatHandler):
    DEFAULT_SYSTEM_MESSAGE = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions. "
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if message.role == 'system' %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% if message.role == 'user' %}"
        "{% if message.content is iterable %}"
        # <image>
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' %}"
        "{% if content.image_url is string %}"
        "{{ content.image_url }}\n"
        "{% endif %}"
        "{% if content.image_url is mapping %}"
        "{{ content.image_url.url }}\n"
        "{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        # Question:
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        # Question:
        "{% if message.content is string %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% endif %}"
        # Answer:
        "{% if message.role == 'assistant' %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% endfor %}"
        # Generation prompt
        "{% if add_generation_prompt %}"
        "Answer:"
        "{% endif %}"
    )
    _PYLLAMA_CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if message.role == 'system' %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% if message.role == 'user' %}"
        "{% if message.content is iterable %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' and content.text.startswith('" + _MEDIA_MARKER_PREFIX + "') %}"
        "{{ content.text }}\n"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' and not content.text.startswith('" + _MEDIA_MARKER_PREFIX + "') %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "{% if message.content is string %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% endif %}"
        "{% if message.role == 'assistant' %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "Answer:"
        "{% endif %}"
    )


class NanoLlavaChatHandler(Llava15ChatHandler):
    # ChatML without "\n" after <|im_end|>.
    DEFAULT_SYSTEM_MESSAGE = "Answer the question"
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        # System message
        "{% if message.role == 'system' %}"
        "<|im_start|>system\n"
        "{{ message.content }}"
        "<|im_end|>"
        "{% endif %}"
        # User message
        "{% if message.role == 'user' %}"
        "<|im_start|>user\n"
        "{% if message.content is string %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% if message.content is iterable %}"
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' and content.image_url is string %}"
        "{{ content.image_url }}"
        "{% endif %}"
        "{% if content.type == 'image_url' and content.image_url is mapping %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "<|im_end|>"
        "{% endif %}"
        # Assistant message
        "{% if message.role == 'assistant' %}"
        "<|im_start|>assistant\n"
        "{{ message.content }}"
        "<|im_end|>"
        "{% endif %}"
        "{% endfor %}"
        # Generation prompt
        "{% if add_generation_prompt %}"
        "<|im_start|>assistant\n"
        "{% endif %}"
    )


class Llama3VisionAlphaChatHandler(Llava15ChatHandler):
    # prompt = f"<|start_header_id|>user<|end_header_id|>\n\n<image>{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    DEFAULT_SYSTEM_MESSAGE = None
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "<|start_header_id|>"
        "{% if message.role == 'user' %}"
        "user<|end_header_id|>\n\n"
        "{% if message.content is iterable %}"
        # <image>
        "{% for content in message.content %}"
        "{% if content.type == 'image_url' %}"
        "{% if content.image_url is string %}"
        "{{ content.image_url }}"
        "{% endif %}"
        "{% if content.image_url is mapping %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        # Question:
        "{% for content in message.content %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        # Question:
        "{% if message.content is string %}"
        "{{ message.content }}"
        "{% endif %}"
        "{% endif %}"
        # Answer:
        "{% if message.role == 'assistant' %}"
        "assistant<|end_header_id|>\n\n"
        "{{ message.content }}"
        "{% endif %}"
        "<|eot_id|>"
        "{% endfor %}"
        # Generation prompt
        "{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"
    )


# alias, as in llama-cpp-python
Llama3VisionAlpha = Llama3VisionAlphaChatHandler


class MiniCPMv26ChatHandler(Llava15ChatHandler):
    DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
    IMAGES_FIRST = True
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is iterable %}"
        "{% for content in message['content'] %}"
        "{% if content.type == 'image_url' %}"
        "{% if content.image_url is string %}"
        "{{ content.image_url }}"
        "{% endif %}"
        "{% if content.image_url is mapping %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        "{% for content in message['content'] %}"
        "{% if content.type == 'text' %}"
        "{{ content.text }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}"
        "{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "<|im_start|>assistant\n"
        "{% endif %}"
    )


class Qwen25VLChatHandler(Llava15ChatHandler):
    DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
    IMAGES_FIRST = False  # parts in order
    CHAT_FORMAT = (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\n"
        "{{ self.DEFAULT_SYSTEM_MESSAGE }}<|im_end|>\n"
        "{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}<|im_end|>\n"
        "{% else %}"
        "{% for content in message['content'] %}"
        "{% if content['type'] == 'image_url' %}"
        "{% if content.image_url is string %}"
        "{{ content.image_url }}"
        "{% else %}"
        "{{ content.image_url.url }}"
        "{% endif %}"
        "{% elif content['type'] == 'text' %}"
        "{{ content['text'] }}"
        "{% endif %}"
        "{% endfor %}"
        "<|im_end|>\n"
        "{% endif %}"
        "{% endfor %}"
        "<|im_start|>assistant\n"
    )


class MTMDChatHandler(MultimodalChatHandler):
    """Images with the model's own chat template (llama-cpp-python's generic mtmd handler).
    ``use_gpu`` is recorded; pyllama's projector follows the model's GPU offload."""

    def __init__(self, clip_model_path: Union[str, "os.PathLike[str]"], verbose: bool = True,
                 use_gpu: bool = True) -> None:
        super().__init__(clip_model_path, verbose=verbose)
        self.use_gpu = use_gpu


class Gemma4ChatHandler(MTMDChatHandler):
    pass
