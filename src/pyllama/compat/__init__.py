"""llama-cpp-python's API on pyllama: ``Llama`` and its companions, written for code that
imports ``llama_cpp`` (LangChain's LlamaCpp, LlamaIndex, outlines, instructor, ...).

    from pyllama.compat import Llama
    # or, to run such code unchanged:
    import pyllama; pyllama.install_as_llama_cpp()
    from llama_cpp import Llama

The target is llama-cpp-python 0.3.36 (``__version__`` below says so: libraries compare it).
docs/compat.md and :data:`pyllama.compat.llama.DIFFERENCES` list what differs.
"""

from __future__ import annotations

import importlib
from typing import Any

from pyllama.compat import llama_types
from pyllama.compat._install import install_as_llama_cpp
from pyllama.compat.llama import (
    DIFFERENCES,
    LLAMA_DEFAULT_SEED,
    LLAMA_SPLIT_MODE_LAYER,
    LLAMA_SPLIT_MODE_NONE,
    LLAMA_SPLIT_MODE_ROW,
    CHandleError,
    Llama,
    LlamaState,
    LogitsProcessor,
    LogitsProcessorList,
    MinTokensLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from pyllama.compat.llama_cache import BaseLlamaCache, LlamaCache, LlamaDiskCache, LlamaRAMCache

#: The llama-cpp-python release this layer follows (not pyllama's version).
__version__ = "0.3.36"

# Sibling modules written separately, imported on first use (`pyllama.compat.llama_grammar`,
# `from pyllama.compat import LlamaGrammar`): importing this package stays cheap and works
# even where one of them cannot be imported.
_SUBMODULES = ("llama", "llama_types", "llama_cache", "llama_grammar", "llama_chat_format", "llama_tokenizer",
               "llama_speculative", "_internals")
_LAZY = {
    "LlamaGrammar": ("llama_grammar", "LlamaGrammar"),
    "LlamaTokenizer": ("llama_tokenizer", "LlamaTokenizer"),
    "BaseLlamaTokenizer": ("llama_tokenizer", "BaseLlamaTokenizer"),
    "LlamaDraftModel": ("llama_speculative", "LlamaDraftModel"),
    "LlamaPromptLookupDecoding": ("llama_speculative", "LlamaPromptLookupDecoding"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "llama_cpp":   # llama_cpp.llama_cpp: the low-level functions
        return importlib.import_module(f"{__name__}._lowlevel")
    if not name.startswith("__") and hasattr(llama_types, name):
        # llama_cpp re-exports its types at the top level (from llama_cpp import
        # ChatCompletionRequestUserMessage): llama.py star-imports llama_types there.
        return getattr(llama_types, name)
    if not name.startswith("__"):
        # llama_cpp's top level also exports the low-level functions (llama_token_to_piece, ...).
        try:
            lowlevel = importlib.import_module(f"{__name__}._lowlevel")
        except ImportError:
            lowlevel = None
        if lowlevel is not None and hasattr(lowlevel, name):
            return getattr(lowlevel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Llama", "LlamaState", "LlamaGrammar", "LlamaCache", "LlamaRAMCache", "LlamaDiskCache", "BaseLlamaCache",
    "LogitsProcessor", "LogitsProcessorList", "StoppingCriteria", "StoppingCriteriaList", "MinTokensLogitsProcessor",
    "CHandleError", "DIFFERENCES", "LLAMA_DEFAULT_SEED", "LLAMA_SPLIT_MODE_NONE", "LLAMA_SPLIT_MODE_LAYER",
    "LLAMA_SPLIT_MODE_ROW", "llama_types", "install_as_llama_cpp", "__version__",
]
