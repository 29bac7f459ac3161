"""Chat completion handlers and chat formatters, as llama-cpp-python defines them: the
process-wide registry of named handlers, the formatter protocol and its response,
:class:`Jinja2ChatFormatter` (a Jinja chat template rendered in pyllama's sandbox), the
Hugging Face formatters, and :func:`chat_formatter_to_chat_completion_handler`, which turns a
formatter into a handler (render, tokenize, constrain for ``response_format``/``tool_choice``,
``llama.create_completion``, reshape as a chat completion).

Re-exported by :mod:`pyllama.compat.llama_chat_format`, their public home.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Protocol,
    Tuple,
    Union,
)

from pyllama.compat import llama_grammar
from pyllama.compat._chat_format_responses import (
    _convert_completion_to_chat,
    _convert_completion_to_chat_function,
)

if TYPE_CHECKING:  # pragma: no cover
    from pyllama.compat.llama import Llama

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
    """llama-cpp-python's ``StoppingCriteriaList`` (``llama_cpp.llama``'s, defined in
    ``_llama_hooks``) when it can be imported, else a plain list of the same callables."""
    try:
        from pyllama.compat._llama_hooks import StoppingCriteriaList
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
