"""LangChain integration: pyllama models as LangChain LLMs, chat models and embeddings.

Install with ``pip install "pyllama[langchain]"`` (langchain-core 1.x only; langchain-community
is not needed).  The examples of LangChain's "Llama.cpp" page run unchanged except for the
import line::

    from pyllama.integrations.langchain import LlamaCpp      # was: langchain_community.llms

    llm = LlamaCpp(model_path="model.gguf", temperature=0.75, max_tokens=2000, top_p=1,
                   callback_manager=CallbackManager([StreamingStdOutCallbackHandler()]),
                   verbose=True)
    llm.invoke("Question: ...")

Three classes:

* :class:`LlamaCpp` (also :data:`PyLlama`): a ``langchain_core`` ``LLM`` accepting every field
  of langchain-community's ``LlamaCpp``; token streaming, batched ``batch()``, real async.
* :class:`ChatLlamaCpp`: a ``BaseChatModel`` using the model's own chat template, with
  ``bind_tools`` (the tool call enforced by a grammar) and ``with_structured_output``.
* :class:`LlamaCppEmbeddings`: ``Embeddings`` computed in one batched call.

Differences from langchain-community's classes are listed in docs/langchain.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import warnings
from operator import itemgetter
from pathlib import Path
from typing import (Any, AsyncIterator, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence,
                    Tuple, Type, Union)

try:
    from langchain_core.callbacks import (AsyncCallbackManagerForLLMRun, BaseCallbackHandler,
                                          BaseCallbackManager, CallbackManagerForLLMRun)
    from langchain_core.embeddings import Embeddings
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.language_models.llms import LLM
    from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage,
                                         SystemMessage, ToolMessage)
    from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
    from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
    from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, Generation, GenerationChunk
    from langchain_core.outputs import LLMResult
    from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
    from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
    from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "pyllama.integrations.langchain needs langchain-core 1.x: pip install \"pyllama[langchain]\" "
        f"(or pip install \"langchain-core>=1.0,<2\"); import failed with: {_exc}"
    ) from _exc

import pyllama
from pyllama import tools as _tools
from pyllama.errors import GrammarError
from pyllama.sampling import FIELD_NAMES as SAMPLING_FIELDS

__all__ = [
    "LlamaCpp",
    "PyLlama",
    "ChatLlamaCpp",
    "LlamaCppEmbeddings",
    "IgnoredFieldWarning",
]


class IgnoredFieldWarning(UserWarning):
    """A langchain-community LlamaCpp field that pyllama accepts but that has no effect
    (n_parts, lora_base, logits_all, logprobs, device), or an unknown keyword moved into
    model_kwargs."""


#: Fields of langchain-community's classes that no longer mean anything.
_OBSOLETE = {
    "n_parts": "llama.cpp no longer splits models into parts (GGUF is one file)",
    "lora_base": "llama.cpp applies LoRA adapters to the loaded model itself; a separate base model is "
                 "no longer used",
    "logits_all": "pyllama keeps only the logits it samples from",
    "logprobs": "pyllama does not return log-probabilities yet; generation_info['logprobs'] is None",
    "device": "the device is chosen by the build and n_gpu_layers",
}

# Sampling settings taken from the fields on every call (None = pyllama's default).
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repeat_penalty", "last_n_tokens_size", "max_tokens")
_GRAMMAR_KEYS = ("grammar", "grammar_path", "json_schema")


def _warn(message: str, category: type = IgnoredFieldWarning, stacklevel: int = 3) -> None:
    warnings.warn(message, category, stacklevel=stacklevel)


# --------------------------------------------------------------------------------------- common


class _LlamaCppCommon(BaseModel):
    """Fields and loading shared by LlamaCpp and ChatLlamaCpp (those of langchain-community's
    LlamaCpp, same names and defaults unless docs/langchain.md says otherwise)."""

    model_config = ConfigDict(protected_namespaces=(), arbitrary_types_allowed=True)

    client: Any = Field(default=None, exclude=True)
    """The pyllama.LLM doing the work (loaded from the fields, or passed in)."""

    model_path: Optional[Union[str, Path]] = None
    """The GGUF file (or a model name pyllama knows, such as "smollm2")."""

    lora_base: Optional[str] = None
    """Accepted for compatibility; has no effect (warns)."""

    lora_path: Optional[str] = None
    """A LoRA adapter (GGUF) applied to the model."""

    n_ctx: int = 512
    """Token context window (0 = the model's training context)."""

    n_parts: int = -1
    """Accepted for compatibility; has no effect (warns)."""

    seed: int = -1
    """Sampling seed; -1 = random."""

    f16_kv: bool = True
    """Use F16 for the KV cache (already llama.cpp's default; False means F32, deprecated)."""

    logits_all: bool = False
    """Accepted for compatibility; has no effect (warns)."""

    vocab_only: bool = False
    """Load only the vocabulary (tokenize, no generation)."""

    use_mlock: bool = False
    """Force the system to keep the model in RAM."""

    n_threads: Optional[int] = None
    """Threads for generation (None = llama.cpp's choice)."""

    n_batch: Optional[int] = 512
    """Prompt tokens evaluated per llama_decode.  langchain-community defaults to 8, which makes
    prompt evaluation several times slower for no benefit; pyllama uses 512."""

    n_gpu_layers: Optional[int] = None
    """Layers offloaded to the GPU (-1 = all; None = 0)."""

    suffix: Optional[str] = None
    """Text appended to every completion."""

    max_tokens: Optional[int] = 256
    """Most tokens to generate (None or -1: until the model stops or the context is full)."""

    temperature: Optional[float] = 0.8
    top_p: Optional[float] = 0.95
    logprobs: Optional[int] = None
    """Accepted for compatibility; log-probabilities are not returned (warns)."""

    echo: Optional[bool] = False
    """Prepend the prompt to the completion."""

    stop: Optional[List[str]] = Field(default_factory=list)
    """Stop strings for every call (merged with those given per call)."""

    repeat_penalty: Optional[float] = 1.1
    top_k: Optional[int] = 40
    last_n_tokens_size: Optional[int] = 64
    """How many recent tokens the repeat penalty looks at."""

    use_mmap: Optional[bool] = True

    rope_freq_scale: float = 0.0
    """RoPE frequency scale; 0 = the model's own value (langchain-community forced 1.0)."""

    rope_freq_base: float = 0.0
    """RoPE base frequency; 0 = the model's own value (langchain-community forced 10000)."""

    model_kwargs: Dict[str, Any] = Field(default_factory=dict)
    """More keyword arguments for pyllama.LLM (n_ubatch, flash_attn, min_p, type_k, ...)."""

    streaming: bool = True
    """Generate token by token, reporting each piece to the callbacks' on_llm_new_token."""

    grammar_path: Optional[Union[str, Path]] = None
    """A GBNF file constraining the output (e.g. pyllama.grammar_path("json"))."""

    grammar: Optional[str] = None
    """GBNF text constraining the output.  At most one of grammar and grammar_path."""

    _grammar_text: Optional[str] = PrivateAttr(default=None)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def _prepare_kwargs(cls, data: Dict[str, Any]) -> Dict[str, Any]:
        """callback_manager -> callbacks (DeprecationWarning); unknown keywords -> model_kwargs
        (warning).  Warnings point at the caller of the constructor."""
        data = dict(data)
        if "callback_manager" in data:
            manager = data.pop("callback_manager")
            _warn("callback_manager is deprecated (langchain-core 1.x removed it): pass callbacks=[...] "
                  "instead; its handlers were moved into callbacks", DeprecationWarning, stacklevel=4)
            data["callbacks"] = _merge_callbacks(data.get("callbacks"), manager)
        known = set()
        for name, info in cls.model_fields.items():
            known.add(name)
            if info.alias:
                known.add(info.alias)
        extra = [k for k in data if k not in known]
        if extra:
            model_kwargs = dict(data.get("model_kwargs") or {})
            for k in extra:
                if k in model_kwargs:
                    raise ValueError(f"{k!r} given both as a keyword and in model_kwargs")
                model_kwargs[k] = data.pop(k)
            _warn(f"{', '.join(repr(k) for k in extra)} {'is not a field' if len(extra) == 1 else 'are not fields'} "
                  f"of {cls.__name__}; passed to pyllama.LLM through model_kwargs", IgnoredFieldWarning,
                  stacklevel=4)
            data["model_kwargs"] = model_kwargs
        return data

    def _after_init(self) -> None:
        for name, why in _OBSOLETE.items():
            if name in self.model_fields_set and name in type(self).model_fields:
                value = getattr(self, name)
                if value is None and name in ("logprobs", "device", "lora_base"):
                    continue
                _warn(f"{name}={value!r} has no effect: {why}", IgnoredFieldWarning, stacklevel=4)
        if self.grammar is not None and self.grammar_path is not None:
            raise ValueError("Can only pass in one of grammar and grammar_path. Received "
                             f"grammar={self.grammar!r} and grammar_path={self.grammar_path!r}.")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise TypeError(f"grammar must be GBNF text (str), not {type(self.grammar).__name__}")
        if self.client is None and self.model_path is None:
            raise ValueError(f"{type(self).__name__} needs model_path (a .gguf file) or client (a pyllama.LLM)")
        if self.model_path is not None:
            self.model_path = os.fspath(self.model_path)
        text = _check_grammar(self.grammar, self.grammar_path)   # syntax: before anything is loaded
        if self.client is None:
            client = _OwnedLLM(self.model_path, **self._load_kwargs())
            if text is not None:   # llama.cpp's own parser, with the vocabulary just loaded
                try:
                    pyllama._core.validate_grammar(client.vocab, text)
                except BaseException:
                    client.close()
                    raise
            self.client = client
        elif not isinstance(self.client, pyllama.LLM):
            raise TypeError(f"client must be a pyllama.LLM, not {type(self.client).__name__}")
        else:
            _warn_unused_with_client(self)
            if text is not None:
                pyllama._core.validate_grammar(self.client.vocab, text)
            if self.model_path is None:
                self.model_path = self.client.model_path
        self._grammar_text = text

    def _load_kwargs(self) -> Dict[str, Any]:
        kw: Dict[str, Any] = dict(
            n_ctx=self.n_ctx, n_batch=self.n_batch if self.n_batch is not None else 512, n_threads=self.n_threads,
            n_gpu_layers=self.n_gpu_layers if self.n_gpu_layers is not None else 0,
            use_mmap=True if self.use_mmap is None else bool(self.use_mmap), use_mlock=self.use_mlock,
            vocab_only=self.vocab_only, rope_freq_base=self.rope_freq_base, rope_freq_scale=self.rope_freq_scale,
            verbose=bool(getattr(self, "verbose", False)))
        if "f16_kv" in self.model_fields_set:
            kw["f16_kv"] = self.f16_kv
        if self.lora_path is not None:
            kw["lora_path"] = self.lora_path
        for k, v in self.model_kwargs.items():
            kw[k] = v
        return kw

    # -- per call ----------------------------------------------------------------------------

    def _call_params(self, stop: Optional[List[str]], kwargs: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(sampling overrides for pyllama, {echo, suffix}) for one call."""
        kwargs = dict(kwargs)
        extra = {"echo": kwargs.pop("echo", self.echo), "suffix": kwargs.pop("suffix", self.suffix)}
        kwargs.pop("logprobs", None)
        params: Dict[str, Any] = {}
        for name in _SAMPLING_FIELDS:
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if params.get("max_tokens") is not None and params["max_tokens"] <= 0:
            params["max_tokens"] = None
        params["seed"] = None if self.seed is None or self.seed < 0 else self.seed
        stops = list(self.stop or [])
        for s in stop or []:
            if s not in stops:
                stops.append(s)
        if "stop" in kwargs:   # stop given as a generation kwarg
            for s in ([kwargs["stop"]] if isinstance(kwargs["stop"], str) else kwargs["stop"] or []):
                if s not in stops:
                    stops.append(s)
            kwargs.pop("stop")
        if stops:
            params["stop"] = stops
        for k, v in self.model_kwargs.items():   # min_p, mirostat_mode, ... given as model_kwargs
            if k in SAMPLING_FIELDS and k not in ("stop", *_GRAMMAR_KEYS):
                params[k] = v
        if self._grammar_text is not None and not any(kwargs.get(k) is not None for k in _GRAMMAR_KEYS):
            params["grammar"] = self._grammar_text
        params.update(kwargs)
        return params, extra

    @property
    def _default_params(self) -> Dict[str, Any]:
        params = {
            "suffix": self.suffix,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "logprobs": self.logprobs,
            "echo": self.echo,
            "stop_sequences": self.stop,
            "repeat_penalty": self.repeat_penalty,
            "top_k": self.top_k,
        }
        if self.grammar is not None:
            params["grammar"] = self.grammar
        if self.grammar_path is not None:
            params["grammar_path"] = os.fspath(self.grammar_path)
        return params

    @property
    def _identifying_params(self) -> Dict[str, Any]:
        return {"model_path": self.model_path, **self._default_params}

    def get_token_ids(self, text: str) -> List[int]:
        """Token ids of `text` with the model's own tokenizer (BOS included when the model
        adds one, as langchain-community counted)."""
        if getattr(self, "custom_get_token_ids", None) is not None:
            return self.custom_get_token_ids(text)
        return list(self.client.tokenize(text))

    def get_num_tokens(self, text: str) -> int:
        return len(self.get_token_ids(text))

    def close(self) -> None:
        """Free the model now (it is freed anyway when the object is garbage-collected)."""
        if self.client is not None:
            self.client.close()


class _OwnedLLM(pyllama.LLM):
    """The pyllama.LLM a LangChain object loaded for itself: LangChain code never closes its
    models, so this one is freed quietly when it is garbage-collected (no ResourceWarning)."""

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass


#: Fields that only matter when the model is loaded (ignored when client= is given).
_LOAD_FIELDS = ("lora_path", "n_ctx", "f16_kv", "vocab_only", "use_mlock", "n_threads", "n_batch", "n_gpu_layers",
                "use_mmap", "rope_freq_scale", "rope_freq_base", "model_kwargs")


def _warn_unused_with_client(obj: Any, stacklevel: int = 5) -> None:
    unused = [k for k in _LOAD_FIELDS if k in obj.model_fields_set and k in type(obj).model_fields]
    if "model_kwargs" in unused and all(k in SAMPLING_FIELDS for k in obj.model_kwargs):
        unused.remove("model_kwargs")   # sampling settings apply per call, client or not
    if unused:
        _warn(f"{', '.join(unused)} only apply when {type(obj).__name__} loads the model; with client= "
              "they are ignored (load the pyllama.LLM with them instead)", IgnoredFieldWarning, stacklevel=stacklevel)


def _merge_callbacks(callbacks: Any, manager: Any) -> Any:
    """The handlers of a (deprecated) callback_manager added to `callbacks`."""
    if manager is None:
        return callbacks
    if isinstance(manager, BaseCallbackManager):
        new = list(manager.handlers)
    elif isinstance(manager, BaseCallbackHandler):
        new = [manager]
    elif isinstance(manager, (list, tuple)):
        new = list(manager)
    else:
        raise TypeError(f"callback_manager must be a CallbackManager, not {type(manager).__name__}")
    if callbacks is None:
        return new
    if isinstance(callbacks, BaseCallbackManager):
        merged = callbacks.copy()
        for h in new:
            merged.add_handler(h, True)
        return merged
    merged = list(callbacks)
    merged.extend(h for h in new if h not in merged)
    return merged


def _check_grammar(grammar: Optional[str], path: Any) -> Optional[str]:
    """GBNF text of grammar / grammar_path, syntax-checked; None when neither is given."""
    if grammar is None and path is None:
        return None
    from pyllama.grammar import gbnf_syntax_error, load_grammar

    try:
        text = load_grammar(grammar=grammar, grammar_path=path)
    except GrammarError as exc:
        if path is None:
            raise
        raise type(exc)(f"{exc} (in {os.fspath(path)})") from None
    err = gbnf_syntax_error(text)
    if err is not None:
        where = f" in {os.fspath(path)}" if path is not None else ""
        raise GrammarError(f"invalid grammar{where}: {err}")
    return text


def _info(comp: Any) -> Dict[str, Any]:
    return {"finish_reason": comp.finish_reason, "logprobs": None, "usage": comp.usage}


async def _athread_iter(make_iter: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking iterator in a worker thread and yield its items on the event loop.

    The whole iteration happens in that one thread (the items are handed over through an
    asyncio.Queue with loop.call_soon_threadsafe), so the event loop never blocks and the
    iterator is never resumed from two threads.  Closing this async generator early (break,
    cancellation) stops the worker at its next item and closes the iterator, which cancels
    the generation.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stopping = threading.Event()

    def put(item: Tuple[int, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:   # the loop is closed: nobody is listening any more
            stopping.set()

    def work() -> None:
        try:
            it = make_iter()
            try:
                for item in it:
                    if stopping.is_set():
                        break
                    put((0, item))
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
            put((2, exc))
        else:
            put((1, None))

    future = loop.run_in_executor(None, work)
    try:
        while True:
            kind, value = await queue.get()
            if kind == 0:
                yield value
            elif kind == 1:
                break
            else:
                raise value
    finally:
        stopping.set()
        try:
            await future   # the worker has finished (and printed its timings) before we return
        except BaseException:  # noqa: BLE001 - its error, if any, was already raised above
            pass


# --------------------------------------------------------------------------------------- LLM


class LlamaCpp(_LlamaCppCommon, LLM):
    """A GGUF model through pyllama, as a LangChain LLM.

    Accepts every field of langchain-community's ``LlamaCpp`` (``callback_manager`` too, moved
    into ``callbacks`` with a DeprecationWarning)::

        from pyllama.integrations.langchain import LlamaCpp
        llm = LlamaCpp(model_path="model.gguf", temperature=0.75, max_tokens=256)
        llm.invoke("Tell me a joke")

    ``batch()`` runs all prompts in one batched generation; ``ainvoke``/``astream`` run the
    generation in a worker thread and never block the event loop.
    """

    def __init__(self, **data: Any) -> None:
        super().__init__(**self._prepare_kwargs(data))
        self._after_init()

    @property
    def _llm_type(self) -> str:
        return "pyllama"

    # -- sync --------------------------------------------------------------------------------

    def _pieces(self, prompt: str, params: Dict[str, Any], extra: Dict[str, Any],
                info: Dict[str, Any]) -> Iterator[str]:
        """The text of one completion, piece by piece (echo and suffix included); fills `info`."""
        if extra["echo"]:
            yield prompt
        stream = self.client.stream(prompt, **params)
        try:
            for piece in stream:
                yield piece
        finally:
            stream.close()
        if stream.completion is not None:
            info.update(_info(stream.completion))
        if extra["suffix"]:
            yield extra["suffix"]

    def _stream(self, prompt: str, stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        params, extra = self._call_params(stop, kwargs)
        for piece in self._pieces(prompt, params, extra, {}):
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    def _complete(self, prompt: str, stop: Optional[List[str]], run_manager: Optional[CallbackManagerForLLMRun],
                  kwargs: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
        params, extra = self._call_params(stop, kwargs)
        info: Dict[str, Any] = {}
        if self.streaming:
            parts = []
            for piece in self._pieces(prompt, params, extra, info):
                if run_manager is not None:
                    run_manager.on_llm_new_token(piece, chunk=GenerationChunk(text=piece))
                parts.append(piece)
            return "".join(parts), info
        comp = self.client.complete(prompt, **params)
        return _decorate(prompt, comp.text, extra), _info(comp)

    def _call(self, prompt: str, stop: Optional[List[str]] = None,
              run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> str:
        return self._complete(prompt, stop, run_manager, kwargs)[0]

    def _generate(self, prompts: List[str], stop: Optional[List[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        if len(prompts) == 1:
            text, info = self._complete(prompts[0], stop, run_manager, kwargs)
            return LLMResult(generations=[[Generation(text=text, generation_info=info)]],
                             llm_output=self._llm_output([info]))
        params, extra = self._call_params(stop, kwargs)
        comps = self.client.generate(prompts, **params) if prompts else []
        infos = [_info(c) for c in comps]
        gens = [[Generation(text=_decorate(p, c.text, extra), generation_info=i)]
                for p, c, i in zip(prompts, comps, infos)]
        return LLMResult(generations=gens, llm_output=self._llm_output(infos))

    def _llm_output(self, infos: List[Dict[str, Any]]) -> Dict[str, Any]:
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for i in infos:
            for k in usage:
                usage[k] += i.get("usage", {}).get(k, 0)
        return {"token_usage": usage, "model_name": self.model_path}

    # -- async -------------------------------------------------------------------------------

    async def _apieces(self, prompt: str, stop: Optional[List[str]], kwargs: Mapping[str, Any],
                       info: Dict[str, Any]) -> AsyncIterator[str]:
        params, extra = self._call_params(stop, kwargs)
        async for piece in _athread_iter(lambda: self._pieces(prompt, params, extra, info)):
            yield piece

    async def _astream(self, prompt: str, stop: Optional[List[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        async for piece in self._apieces(prompt, stop, kwargs, {}):
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    async def _acomplete(self, prompt: str, stop: Optional[List[str]],
                         run_manager: Optional[AsyncCallbackManagerForLLMRun],
                         kwargs: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
        info: Dict[str, Any] = {}
        parts = []
        async for piece in self._apieces(prompt, stop, kwargs, info):
            if self.streaming and run_manager is not None:
                await run_manager.on_llm_new_token(piece, chunk=GenerationChunk(text=piece))
            parts.append(piece)
        return "".join(parts), info

    async def _acall(self, prompt: str, stop: Optional[List[str]] = None,
                     run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> str:
        return (await self._acomplete(prompt, stop, run_manager, kwargs))[0]

    async def _agenerate(self, prompts: List[str], stop: Optional[List[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        if len(prompts) == 1:
            text, info = await self._acomplete(prompts[0], stop, run_manager, kwargs)
            return LLMResult(generations=[[Generation(text=text, generation_info=info)]],
                             llm_output=self._llm_output([info]))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self._generate(prompts, stop, None, **kwargs))


def _decorate(prompt: str, text: str, extra: Mapping[str, Any]) -> str:
    if extra.get("echo"):
        text = prompt + text
    if extra.get("suffix"):
        text = text + extra["suffix"]
    return text


#: The same class under pyllama's own name.
PyLlama = LlamaCpp


# --------------------------------------------------------------------------------------- chat


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

    def __init__(self, **data: Any) -> None:
        super().__init__(**self._prepare_kwargs(data))
        self._after_init()

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


# --------------------------------------------------------------------------------------- embeddings


class LlamaCppEmbeddings(BaseModel, Embeddings):
    """Embeddings from a GGUF model through pyllama (mean-pooled, L2-normalised by default).

    ``embed_documents`` embeds all texts in one batched call.
    """

    model_config = ConfigDict(protected_namespaces=(), arbitrary_types_allowed=True)

    client: Any = Field(default=None, exclude=True)
    model_path: Optional[Union[str, Path]] = None
    n_ctx: int = 512
    n_parts: int = -1
    seed: int = -1
    f16_kv: bool = False
    logits_all: bool = False
    vocab_only: bool = False
    use_mlock: bool = False
    n_threads: Optional[int] = None
    n_batch: Optional[int] = 512
    """Longest text, in tokens (one text is evaluated in one batch)."""
    n_gpu_layers: Optional[int] = None
    verbose: bool = False
    device: Optional[str] = None
    model_kwargs: Dict[str, Any] = Field(default_factory=dict)
    normalize: bool = True
    """L2-normalise the vectors (llama-cpp-python returned them unnormalised)."""

    def __init__(self, **data: Any) -> None:
        data = _LlamaCppCommon._prepare_kwargs.__func__(type(self), data)
        super().__init__(**data)
        for name, why in _OBSOLETE.items():
            if name in self.model_fields_set and name in type(self).model_fields:
                if getattr(self, name) is None:
                    continue
                _warn(f"{name}={getattr(self, name)!r} has no effect: {why}", IgnoredFieldWarning, stacklevel=3)
        if self.client is None:
            if self.model_path is None:
                raise ValueError("LlamaCppEmbeddings needs model_path (a .gguf file) or client (a pyllama.LLM)")
            kw: Dict[str, Any] = dict(
                n_ctx=self.n_ctx, n_batch=self.n_batch or 512, n_threads=self.n_threads,
                n_gpu_layers=self.n_gpu_layers if self.n_gpu_layers is not None else 0,
                use_mlock=self.use_mlock, vocab_only=self.vocab_only, verbose=self.verbose, embedding=True)
            if "f16_kv" in self.model_fields_set:
                kw["f16_kv"] = self.f16_kv
            kw.update(self.model_kwargs)
            self.client = _OwnedLLM(os.fspath(self.model_path), **kw)
        elif not isinstance(self.client, pyllama.LLM) or not self.client.embedding:
            raise TypeError("client must be a pyllama.LLM loaded with embedding=True")
        else:
            _warn_unused_with_client(self, stacklevel=4)
        if self.model_path is None:
            self.model_path = self.client.model_path

    def embed_documents(self, texts: List[str]) -> List[List[float]]:
        """One vector per text, computed in one batched call."""
        if not texts:
            return []
        return self.client.embed(list(texts), normalize=self.normalize).tolist()

    def embed_query(self, text: str) -> List[float]:
        return self.client.embed([text], normalize=self.normalize)[0].tolist()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
