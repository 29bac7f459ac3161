"""llama-cpp-python's ``llama_cpp.llama_speculative``: draft models for speculative decoding.

The compat ``Llama`` hands ``draft_model=`` to pyllama's engine: ``LlamaPromptLookupDecoding``
becomes its native n-gram speculation (batched, in C); any other ``LlamaDraftModel`` is called
by the engine with the tokens so far, as llama-cpp-python calls it, and its proposal is verified
in the same decode as every other request's tokens (docs/speculative.md).

:meth:`LlamaPromptLookupDecoding.find_candidate_pred_tokens` works (it is pure NumPy and
llama-cpp-python's own tests call it).
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["LlamaDraftModel", "LlamaPromptLookupDecoding"]


class LlamaDraftModel(abc.ABC):
    """A draft model: ``draft(input_ids) -> proposed next token ids``."""

    @abc.abstractmethod
    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        raise NotImplementedError()


class LlamaPromptLookupDecoding(LlamaDraftModel):
    """Prompt lookup decoding (https://github.com/apoorvumang/prompt-lookup-decoding):
    propose the tokens that followed the latest earlier occurrence of the last n-gram."""

    def __init__(self, max_ngram_size: int = 2, num_pred_tokens: int = 10) -> None:
        for name, value in (("max_ngram_size", max_ngram_size), ("num_pred_tokens", num_pred_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.max_ngram_size = max_ngram_size
        self.num_pred_tokens = num_pred_tokens

    def __repr__(self) -> str:
        return (f"LlamaPromptLookupDecoding(max_ngram_size={self.max_ngram_size}, "
                f"num_pred_tokens={self.num_pred_tokens})")

    @staticmethod
    def find_candidate_pred_tokens(input_ids: npt.NDArray[np.intc], max_ngram_size: int,
                                   num_pred_tokens: int) -> npt.NDArray[np.intc]:
        """Up to `num_pred_tokens` tokens that followed the first earlier match of the
        longest (up to `max_ngram_size`) suffix n-gram of `input_ids`; empty if none."""
        ids = np.asarray(input_ids)
        n = ids.shape[0]
        for size in range(min(max_ngram_size, n - 1), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids, (size,))
            matches = np.nonzero(np.all(windows == ids[-size:], axis=1))[0]
            for start in matches + size:
                end = min(start + num_pred_tokens, n)
                if start < end:
                    return ids[start:end]
        return np.array([], dtype=np.intc)

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        return self.find_candidate_pred_tokens(input_ids=input_ids, max_ngram_size=self.max_ngram_size,
                                               num_pred_tokens=self.num_pred_tokens)
