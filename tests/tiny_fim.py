"""Tiny random-weight fill-in-the-middle models: tests/tiny_model.py's llama with FIM tokens
appended to its vocabulary (as control tokens, under Qwen2.5-Coder's names, which llama.cpp's
vocabulary loader recognises by their text).

    from tiny_fim import make_tiny_fim_llama
    path = make_tiny_fim_llama(tmp_path / "fim.gguf")                      # PRE SUF MID PAD REP SEP
    path = make_tiny_fim_llama(tmp_path / "fim3.gguf", repo_tokens=False)  # PRE SUF MID only
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tiny_model import DEFAULT_VOCAB, make_tiny_llama, make_vocab_with_tokens

__all__ = ["FIM_TOKENS", "REPO_TOKENS", "make_tiny_fim_llama"]

#: The FIM tokens every infill model has (prefix, suffix, middle) and the padding one.
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>")
#: Repository-level FIM (FIM_REP, FIM_SEP).
REPO_TOKENS = ("<|repo_name|>", "<|file_sep|>")


def make_tiny_fim_llama(path: str | os.PathLike[str], *, repo_tokens: bool = True,
                        vocab_from: str | os.PathLike[str] = DEFAULT_VOCAB, **kwargs: Any) -> Path:
    """Write a tiny llama GGUF whose vocabulary ends with the FIM tokens (ids n_vocab-6 ...
    n_vocab-1 with `repo_tokens`, else the last four) and return its path.  `kwargs` go to
    make_tiny_llama (n_ctx_train, seed ...)."""
    path = Path(path)
    added = list(FIM_TOKENS) + (list(REPO_TOKENS) if repo_tokens else [])
    vocab = make_vocab_with_tokens(path.with_name(path.stem + "-vocab.gguf"), added, vocab_from=vocab_from)
    return make_tiny_llama(path, vocab_from=vocab, name="tiny-fim", **kwargs)
