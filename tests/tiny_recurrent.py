"""Tiny random-weight recurrent and hybrid GGUF models for fast unit tests.

Their KV memory cannot drop a suffix of a sequence (llama_memory_seq_rm(seq, p0 > 0, -1)
fails): a recurrent state holds a summary of every token seen, not one cell per token.
The engine's prompt cache, preemption, n > 1 forks and speculation must cope with that.

    from tiny_recurrent import make_tiny_mamba, make_tiny_lfm2
    path = make_tiny_mamba(tmp_path / "mamba.gguf")     # arch "mamba": recurrent
    path = make_tiny_lfm2(tmp_path / "lfm2.gguf")       # arch "lfm2": hybrid (short
                                                         # convolutions + attention)

The vocabulary is tests/tiny_model.py's (a real tokenizer copied from upstream's vocab-only
GGUF files).  The weights are seeded noise, scaled so that the recurrent path matters: the
greedy next token depends on the history, not only on the last token (a state that still
holds removed tokens changes the text), and greedy output is not one repeated token.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

import gguf
from gguf import GGUFValueType, GGUFWriter
from tiny_model import DEFAULT_VOCAB, TOKEN_TYPE_CONTROL, _write_atomic, finish_gguf, read_tokenizer_kv

__all__ = ["make_tiny_lfm2", "make_tiny_mamba"]


def _vocab(vocab_from: str | os.PathLike[str]):
    tok_kv = read_tokenizer_kv(vocab_from)
    tokens = next(v for k, v, *_ in tok_kv if k == "tokenizer.ggml.tokens")
    token_types = next((v for k, v, *_ in tok_kv if k == "tokenizer.ggml.token_type"), None)
    return tok_kv, len(tokens), token_types


def _output(rng: np.random.Generator, n_vocab: int, n_embd: int, scale: float, token_types) -> np.ndarray:
    """output.weight; control tokens (</s>, ...) get zero rows so that random text does not stop at once."""
    out = rng.standard_normal((n_vocab, n_embd), dtype=np.float32) * scale
    if token_types is not None:
        out[np.asarray(token_types) == TOKEN_TYPE_CONTROL] = 0.0
    return out


def _add_common(w: GGUFWriter, name: str, n_ctx_train: int, n_embd: int, n_layer: int, n_vocab: int,
                rms_eps: float, tok_kv) -> None:
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_vocab_size(n_vocab)
    for key, value, vtype, sub in tok_kv:
        if vtype == GGUFValueType.ARRAY and len(value) == 0:
            continue  # the writer refuses empty arrays; llama.cpp treats them as absent
        w.add_key_value(key, value, vtype, sub)


def make_tiny_mamba(
    path: str | os.PathLike[str],
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    d_state: int = 16,
    d_conv: int = 4,
    n_ctx_train: int = 1024,
    seed: int = 0,
    vocab_from: str | os.PathLike[str] = DEFAULT_VOCAB,
    output_scale: float = 0.5,
    ssm_scale: float = 0.25,
    rms_eps: float = 1e-5,
    name: str = "tiny-mamba",
) -> Path:
    """Write a tiny random Mamba (v1, llama.cpp arch "mamba") GGUF model and return its path.

    ssm_scale   the scale of the SSM's projections: large enough that the state (the
                history) shifts the logits as much as the current token's embedding does.
    """
    d_inner = 2 * n_embd                    # llama.cpp supports an expansion factor of 2 only
    dt_rank = math.ceil(n_embd / 16)
    tok_kv, n_vocab, token_types = _vocab(vocab_from)
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        # numpy shape (rows, cols) == ggml ne = {cols, rows}
        return rng.standard_normal((rows, cols), dtype=np.float32) * scale

    tensors: list[tuple[str, np.ndarray]] = [
        ("token_embd.weight", mat(n_vocab, n_embd, 1.0)),
        ("output_norm.weight", np.ones(n_embd, dtype=np.float32)),
        ("output.weight", _output(rng, n_vocab, n_embd, output_scale, token_types)),
    ]
    for i in range(n_layer):
        p = f"blk.{i}"
        # A = -exp(A_log) as in the conversion script: decay rates between ~0.4 and ~3 per
        # step, so the state remembers a few tokens back, not just the last one.
        a_log = rng.uniform(-1.0, 1.0, size=(d_inner, d_state)).astype(np.float32)
        tensors += [
            (f"{p}.attn_norm.weight", np.ones(n_embd, dtype=np.float32)),
            (f"{p}.ssm_in.weight", mat(2 * d_inner, n_embd, ssm_scale)),
            (f"{p}.ssm_conv1d.weight", mat(d_inner, d_conv, 0.5)),
            (f"{p}.ssm_conv1d.bias", mat(1, d_inner, 0.1).reshape(d_inner)),
            (f"{p}.ssm_x.weight", mat(dt_rank + 2 * d_state, d_inner, ssm_scale)),
            (f"{p}.ssm_dt.weight", mat(d_inner, dt_rank, ssm_scale)),
            (f"{p}.ssm_dt.bias", np.full(d_inner, -1.0, dtype=np.float32)),
            (f"{p}.ssm_a", -np.exp(a_log)),
            (f"{p}.ssm_d", np.ones(d_inner, dtype=np.float32)),
            (f"{p}.ssm_out.weight", mat(n_embd, d_inner, ssm_scale)),
        ]

    def write(tmp: Path) -> None:
        w = GGUFWriter(str(tmp), "mamba")
        _add_common(w, name, n_ctx_train, n_embd, n_layer, n_vocab, rms_eps, tok_kv)
        w.add_feed_forward_length(0)        # as convert_hf_to_gguf.py writes Mamba models
        w.add_head_count(0)
        w.add_ssm_conv_kernel(d_conv)
        w.add_ssm_inner_size(d_inner)
        w.add_ssm_state_size(d_state)
        w.add_ssm_time_step_rank(dt_rank)
        finish_gguf(w, tensors)

    return _write_atomic(Path(path), write)


def make_tiny_lfm2(
    path: str | os.PathLike[str],
    *,
    n_embd: int = 64,
    layers: Sequence[str] = ("conv", "attn", "conv"),
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    l_cache: int = 3,
    n_ctx_train: int = 1024,
    seed: int = 0,
    vocab_from: str | os.PathLike[str] = DEFAULT_VOCAB,
    output_scale: float = 0.5,
    conv_scale: float = 0.25,
    rms_eps: float = 1e-5,
    name: str = "tiny-lfm2",
) -> Path:
    """Write a tiny random LFM2 (llama.cpp arch "lfm2") GGUF model and return its path: a
    hybrid whose "conv" layers keep a short-convolution state (the recurrent part of its
    memory) and whose "attn" layers keep a KV cache.

    layers      the kind of each layer, "conv" or "attn" (head_count_kv 0 marks a conv layer).
    l_cache     the short convolution's length (its state holds l_cache - 1 inputs).
    """
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, n_head of n_head_kv")
    if any(kind not in ("conv", "attn") for kind in layers):
        raise ValueError("layers must be 'conv' or 'attn'")
    head_dim = n_embd // n_head
    tok_kv, n_vocab, token_types = _vocab(vocab_from)
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) * scale

    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    tensors: list[tuple[str, np.ndarray]] = [
        ("token_embd.weight", mat(n_vocab, n_embd, 1.0)),
        ("token_embd_norm.weight", ones(n_embd)),     # LFM2's output norm has this (historical) name
        ("output.weight", _output(rng, n_vocab, n_embd, output_scale, token_types)),
    ]
    for i, kind in enumerate(layers):
        p = f"blk.{i}"
        tensors += [
            (f"{p}.attn_norm.weight", ones(n_embd)),
            (f"{p}.ffn_norm.weight", ones(n_embd)),
            (f"{p}.ffn_gate.weight", mat(n_ff, n_embd, 0.05)),
            (f"{p}.ffn_up.weight", mat(n_ff, n_embd, 0.05)),
            (f"{p}.ffn_down.weight", mat(n_embd, n_ff, 0.05)),
        ]
        if kind == "attn":
            tensors += [
                (f"{p}.attn_q_norm.weight", ones(head_dim)),
                (f"{p}.attn_k_norm.weight", ones(head_dim)),
                (f"{p}.attn_q.weight", mat(n_embd, n_embd, 0.3)),
                (f"{p}.attn_k.weight", mat(n_head_kv * head_dim, n_embd, 0.3)),
                (f"{p}.attn_v.weight", mat(n_head_kv * head_dim, n_embd, 0.3)),
                (f"{p}.attn_output.weight", mat(n_embd, n_embd, 0.3)),
            ]
        else:
            tensors += [
                (f"{p}.shortconv.conv.weight", mat(n_embd, l_cache, 1.0)),
                (f"{p}.shortconv.in_proj.weight", mat(3 * n_embd, n_embd, conv_scale)),
                (f"{p}.shortconv.out_proj.weight", mat(n_embd, n_embd, conv_scale)),
            ]

    def write(tmp: Path) -> None:
        w = GGUFWriter(str(tmp), "lfm2")
        _add_common(w, name, n_ctx_train, n_embd, len(layers), n_vocab, rms_eps, tok_kv)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv([n_head_kv if kind == "attn" else 0 for kind in layers])
        w.add_rope_freq_base(10000.0)
        w.add_shortconv_l_cache(l_cache)
        finish_gguf(w, tensors)

    return _write_atomic(Path(path), write)


if __name__ == "__main__":  # python tests/tiny_recurrent.py OUT_DIR
    import sys

    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for fn, fname in ((make_tiny_mamba, "tiny-mamba.gguf"), (make_tiny_lfm2, "tiny-lfm2.gguf")):
        out = fn(out_dir / fname)
        print(out, out.stat().st_size)
