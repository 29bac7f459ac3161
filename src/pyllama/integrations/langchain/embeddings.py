"""LlamaCppEmbeddings: embeddings from a GGUF model through pyllama as LangChain ``Embeddings``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field

import pyllama
from pyllama.integrations.langchain._common import (_LlamaCppCommon, _OwnedLLM, _warn_obsolete,
                                                    _warn_unused_with_client)

__all__ = ["LlamaCppEmbeddings"]


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
        _warn_obsolete(self, stacklevel=4)
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
