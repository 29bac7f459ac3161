"""What a compat ``Llama`` hands out where llama-cpp-python hands out ctypes objects: the
stand-ins for its raw handles (``Llama.ctx``, ``._ctx``, ``.batch``, ... raise
:class:`CHandleError`), :class:`LlamaState` (a sequence's tokens instead of llama.cpp's KV
bytes) and the plain ``context_params``/``model_params`` records.

Re-exported by :mod:`pyllama.compat.llama`, their public home.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pyllama.compat._llama_constants import DOCS

if TYPE_CHECKING:  # pragma: no cover
    from pyllama.compat.llama import Llama


class CHandleError(AttributeError, NotImplementedError):
    """A llama-cpp-python ctypes handle (``Llama.ctx``, ``.model``, ...) was asked for:
    pyllama has none.  An AttributeError, so ``hasattr(llm, "ctx")`` is False."""


class _NoCHandle:
    """A class attribute that raises CHandleError on instances."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        raise CHandleError(
            f"Llama.{self.name} is a ctypes pointer in llama-cpp-python; pyllama has no ctypes handles (its "
            f"llama.cpp objects live in a Cython extension). Use Llama's methods, or Llama.llm (the "
            f"pyllama.LLM underneath) and its .model/.context; see {DOCS}")


class _ContextWrapper:
    """``Llama._ctx``: in llama-cpp-python a Python wrapper whose ``.ctx`` is the C pointer.
    Here ``.ctx`` is an opaque, non-None token (there is a context: the LLM's), and every other
    attribute raises CHandleError instead of pretending to be llama.cpp's context."""

    __slots__ = ("ctx",)

    def __init__(self, llama: "Llama") -> None:
        self.ctx = ("pyllama-context", id(llama))

    def __getattr__(self, name: str) -> Any:
        raise CHandleError(
            f"Llama._ctx.{name}: llama-cpp-python's context wrapper calls ctypes functions; pyllama has no ctypes "
            f"layer. Use Llama's methods (reset(), n_ctx(), ...) or Llama.llm; see {DOCS}")


# ---- state ------------------------------------------------------------------------------

_STATE_MAGIC = b"PYLS1\0"


class LlamaState:
    """What ``Llama.save_state()`` returns (picklable).  Fields as llama-cpp-python's:
    ``input_ids`` (n_ctx int32), ``scores`` (empty: pyllama keeps no logits), ``n_tokens``,
    ``llama_state`` (bytes) and ``llama_state_size``, ``seed``.

    In pyllama a sequence's state is its token ids: the engine re-creates the KV cells from
    them through its prompt cache.  ``llama_state`` holds them (a small header and int32 ids)."""

    def __init__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single], n_tokens: int,
                 llama_state: bytes, llama_state_size: int, seed: int):
        self.input_ids = input_ids
        self.scores = scores
        self.n_tokens = n_tokens
        self.llama_state = llama_state
        self.llama_state_size = llama_state_size
        self.seed = seed

    def __repr__(self) -> str:
        return f"<LlamaState n_tokens={self.n_tokens} seed={self.seed}>"


# ---- settings -----------------------------------------------------------------------------

class _Settings:
    """``Llama.context_params`` / ``Llama.model_params``: plain attributes with
    llama-cpp-python's field names (read them; writing changes nothing)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({inner})"


class _ContextParams(_Settings):
    pass


class _ModelParams(_Settings):
    pass
