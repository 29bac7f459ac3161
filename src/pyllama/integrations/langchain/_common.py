"""What LlamaCpp, ChatLlamaCpp and LlamaCppEmbeddings share: langchain-community's fields,
loading the pyllama.LLM, per-call settings, warnings, and running a blocking iterator for
async callers.  Private to :mod:`pyllama.integrations.langchain`."""

from __future__ import annotations

import asyncio
import os
import threading
import warnings
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

import pyllama
from pyllama.errors import GrammarError
from pyllama.sampling import FIELD_NAMES as SAMPLING_FIELDS

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


def _warn_obsolete(obj: Any, stacklevel: int) -> None:
    """An IgnoredFieldWarning for each obsolete field the caller set (None counts as unset
    for the Optional ones)."""
    for name, why in _OBSOLETE.items():
        if name in obj.model_fields_set and name in type(obj).model_fields:
            value = getattr(obj, name)
            if value is None and name in ("logprobs", "device", "lora_base"):
                continue
            _warn(f"{name}={value!r} has no effect: {why}", IgnoredFieldWarning, stacklevel=stacklevel)


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

    def __init__(self, **data: Any) -> None:
        super().__init__(**self._prepare_kwargs(data))
        self._after_init()

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
        _warn_obsolete(self, stacklevel=5)
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
