"""``llama_cpp._internals``: llama-cpp-python's thin ctypes wrappers (LlamaModel, LlamaContext,
LlamaBatch, LlamaSampler, ...).  pyllama has no ctypes layer, so these names exist (code that
imports the module, as llama-cpp-python's own tests do, keeps working) but constructing one
raises :class:`~pyllama.compat.llama.CHandleError` with a pointer to what to use instead."""

from __future__ import annotations

from typing import Any

from pyllama.compat.llama import DOCS, CHandleError

__all__ = ["LlamaModel", "LlamaContext", "LlamaBatch", "LlamaTokenDataArray", "LlamaSampler",
           "LlamaSamplingParams", "LlamaSamplingContext", "CustomSampler"]


class _CtypesWrapper:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise CHandleError(
            f"llama_cpp._internals.{type(self).__name__} wraps llama.cpp's ctypes pointers; pyllama has no ctypes "
            f"layer. Use Llama (pyllama.compat) or pyllama's own low-level API (pyllama.Model, Context, Engine); "
            f"see {DOCS}")


class LlamaModel(_CtypesWrapper):
    pass


class LlamaContext(_CtypesWrapper):
    pass


class LlamaBatch(_CtypesWrapper):
    pass


class LlamaTokenDataArray(_CtypesWrapper):
    pass


class LlamaSampler(_CtypesWrapper):
    pass


class LlamaSamplingParams(_CtypesWrapper):
    pass


class LlamaSamplingContext(_CtypesWrapper):
    pass


class CustomSampler(_CtypesWrapper):
    pass
