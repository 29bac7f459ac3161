"""Tiny random-weight BERT GGUF models (encoders: no KV memory) for fast unit tests.

The models use llama.cpp's "bert" architecture (the family of bge, all-MiniLM, ...) with the
real WordPiece tokenizer of upstream's vendor/llama.cpp/models/ggml-vocab-bert-bge.gguf and a
few hundred kilobytes of seeded noise as weights.  Deterministic for a given seed.

    from tiny_bert import make_tiny_bert, make_tiny_reranker
    path = make_tiny_bert(tmp_path / "bert.gguf")              # pools as the file says (CLS)
    path = make_tiny_reranker(tmp_path / "rerank.gguf")        # rank pooling, classifier head

Tensor names and shapes follow llama.cpp's loader (src/models/bert.cpp, load_arch_tensors):
token_embd, token_types, position_embd, token_embd_norm (weight+bias); per layer attn_q/k/v
(weight+bias), attn_output (weight+bias), attn_output_norm, ffn_up, ffn_down (weight+bias),
layer_output_norm; the reranker adds the classification head ``cls`` ({n_embd, n_embd} + bias,
then tanh) and ``cls.output`` ({n_embd, n_cls_out} + bias).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

import gguf
from gguf import GGUFValueType, GGUFWriter
from tiny_model import VOCAB_DIR, _write_atomic, finish_gguf, read_tokenizer_kv

BERT_VOCAB = VOCAB_DIR / "ggml-vocab-bert-bge.gguf"

__all__ = ["BERT_VOCAB", "make_tiny_bert", "make_tiny_reranker"]


def make_tiny_bert(
    path: str | os.PathLike[str],
    *,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_ff: int = 64,
    n_ctx_train: int = 512,
    seed: int = 0,
    pooling: gguf.PoolingType = gguf.PoolingType.CLS,
    classifier_labels: Sequence[str] | None = None,
    norm_eps: float = 1e-12,
    name: str = "tiny-bert",
) -> Path:
    """Write a tiny random BERT GGUF and return its path.

    pooling            the file's {arch}.pooling_type (what llama.cpp uses when the context
                       leaves pooling unspecified): CLS by default, as bge does.
    classifier_labels  add a classification head (cls, cls.output) with one output per label
                       ({arch}.classifier.output_labels): a reranker when pooling is RANK.
    """
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    tok_kv = read_tokenizer_kv(BERT_VOCAB)
    n_vocab = len(next(v for k, v, *_ in tok_kv if k == "tokenizer.ggml.tokens"))
    n_token_types = next(v for k, v, *_ in tok_kv if k == "tokenizer.ggml.token_type_count")
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, scale: float = 0.05) -> np.ndarray:
        # numpy shape (rows, cols) == ggml ne = {cols, rows}
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(np.float32)

    def vec(n: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(n, dtype=np.float32) * scale).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    tensors: list[tuple[str, np.ndarray]] = [
        ("token_embd.weight", mat(n_vocab, n_embd, 1.0)),
        ("token_types.weight", mat(n_token_types, n_embd, 0.1)),
        ("position_embd.weight", mat(n_ctx_train, n_embd, 0.1)),
        ("token_embd_norm.weight", ones(n_embd)),
        ("token_embd_norm.bias", vec(n_embd)),
    ]
    for i in range(n_layer):
        p = f"blk.{i}"
        tensors += [
            (f"{p}.attn_q.weight", mat(n_embd, n_embd)), (f"{p}.attn_q.bias", vec(n_embd)),
            (f"{p}.attn_k.weight", mat(n_embd, n_embd)), (f"{p}.attn_k.bias", vec(n_embd)),
            (f"{p}.attn_v.weight", mat(n_embd, n_embd)), (f"{p}.attn_v.bias", vec(n_embd)),
            (f"{p}.attn_output.weight", mat(n_embd, n_embd)), (f"{p}.attn_output.bias", vec(n_embd)),
            (f"{p}.attn_output_norm.weight", ones(n_embd)), (f"{p}.attn_output_norm.bias", vec(n_embd)),
            (f"{p}.ffn_up.weight", mat(n_ff, n_embd)), (f"{p}.ffn_up.bias", vec(n_ff)),
            (f"{p}.ffn_down.weight", mat(n_embd, n_ff)), (f"{p}.ffn_down.bias", vec(n_embd)),
            (f"{p}.layer_output_norm.weight", ones(n_embd)), (f"{p}.layer_output_norm.bias", vec(n_embd)),
        ]
    if classifier_labels:
        n_cls_out = len(classifier_labels)
        tensors += [
            ("cls.weight", mat(n_embd, n_embd, 0.5)), ("cls.bias", vec(n_embd)),
            ("cls.output.weight", mat(n_cls_out, n_embd, 0.5)), ("cls.output.bias", vec(n_cls_out)),
        ]

    def write(tmp: Path) -> None:
        w = GGUFWriter(str(tmp), "bert")
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_context_length(n_ctx_train)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_layer_norm_eps(norm_eps)
        w.add_causal_attention(False)
        w.add_pooling_type(pooling)
        if classifier_labels:
            w.add_classifier_output_labels(list(classifier_labels))
        for key, value, vtype, sub in tok_kv:
            if vtype == GGUFValueType.ARRAY and len(value) == 0:
                continue  # the writer refuses empty arrays; llama.cpp treats them as absent
            w.add_key_value(key, value, vtype, sub)
        finish_gguf(w, tensors)

    return _write_atomic(Path(path), write)


def make_tiny_reranker(path: str | os.PathLike[str], *, seed: int = 1, n_labels: int = 1, **kwargs) -> Path:
    """A tiny BERT reranker: rank pooling and a classification head with `n_labels` outputs
    (one relevance score per (query, document) pair when n_labels is 1)."""
    labels = ["LABEL_0"] if n_labels == 1 else [f"LABEL_{i}" for i in range(n_labels)]
    return make_tiny_bert(path, seed=seed, pooling=gguf.PoolingType.RANK, classifier_labels=labels,
                          name="tiny-reranker", **kwargs)
