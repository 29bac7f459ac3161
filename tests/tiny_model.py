"""Tiny random-weight GGUF models for fast unit tests, and deliberately broken files.

The models use llama.cpp's "llama" architecture and a real tokenizer copied from
one of upstream's vocab-only GGUF files (vendor/llama.cpp/models/ggml-vocab-*.gguf),
so tokenization behaves exactly like the real thing while the weights are a few
megabytes of seeded noise.  Everything is deterministic for a given seed.

    from tiny_model import make_tiny_llama
    path = make_tiny_llama(tmp_path / "tiny.gguf")

Weights: norms are ones, every matrix is normal * 0.02, except output.weight
(normal * `output_scale`) so that logits spread enough for greedy decoding to be
robust against float rounding.  Rows of output.weight for control tokens
(<s>, </s>, ...) are zero by default, so random generation does not stop at
once on an end-of-generation token (tests that want EOG can use a logit bias).
"""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import gguf
from gguf import GGUFReader, GGUFValueType, GGUFWriter  # noqa: F401 (GGUFReader: for callers)

ROOT = Path(__file__).resolve().parent.parent
VOCAB_DIR = ROOT / "vendor" / "llama.cpp" / "models"
DEFAULT_VOCAB = VOCAB_DIR / "ggml-vocab-llama-spm.gguf"

# token_type values (llama.cpp's llama_token_type / gguf.TokenType)
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

__all__ = [
    "DEFAULT_VOCAB",
    "VOCAB_DIR",
    "make_garbage_gguf",
    "make_tensor_past_eof",
    "make_tiny_llama",
    "make_truncated",
    "make_vocab_with_tokens",
    "make_unknown_arch",
    "read_tokenizer_kv",
]


_SCALAR_FMT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


def _read_kv_section(path: str | os.PathLike[str]) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    """Every metadata key/value of a (little-endian, v2/v3) GGUF file.

    A small dedicated parser: gguf.GGUFReader takes seconds on a 32k-token vocabulary
    (and far longer on 150k), this takes milliseconds.  Strings are returned as bytes.
    """
    data = memoryview(Path(path).read_bytes())
    if bytes(data[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    pos = 24

    def read_str() -> bytes:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        s = bytes(data[pos:pos + n])
        pos += n
        return s

    def read_val(vtype: GGUFValueType) -> Any:
        nonlocal pos
        if vtype == GGUFValueType.STRING:
            return read_str()
        fmt = _SCALAR_FMT[vtype]
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    out = []
    for _ in range(n_kv):
        key = read_str().decode("utf-8")
        (t,) = struct.unpack_from("<I", data, pos)
        pos += 4
        vtype = GGUFValueType(t)
        sub = None
        if vtype == GGUFValueType.ARRAY:
            sub_t, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            sub = GGUFValueType(sub_t)
            if sub == GGUFValueType.ARRAY:
                raise ValueError(f"{path}: nested arrays are not supported ({key})")
            if sub == GGUFValueType.STRING:
                value: Any = [read_str() for _ in range(n)]
            else:
                fmt = _SCALAR_FMT[sub]
                size = struct.calcsize(fmt)
                arr = np.frombuffer(data, dtype=np.dtype(fmt), count=n, offset=pos)
                pos += n * size
                value = arr.tolist()
        else:
            value = read_val(vtype)
        out.append((key, value, vtype, sub))
    return out


@functools.lru_cache(maxsize=16)
def _tokenizer_kv_cached(path: str, mtime_ns: int, size: int):
    return tuple((k, v, t, s) for k, v, t, s in _read_kv_section(path) if k.startswith("tokenizer."))


def read_tokenizer_kv(vocab_from: str | os.PathLike[str]) -> list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    """All ``tokenizer.*`` key/value pairs of a GGUF file as (key, value, type, array-subtype).

    String values (and string array items) are bytes.  Cached per file (treat as read-only).
    """
    p = Path(vocab_from).resolve()
    st = p.stat()
    return list(_tokenizer_kv_cached(str(p), st.st_mtime_ns, st.st_size))


def _write_atomic(path: Path, writer_fn) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer_fn(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def finish_gguf(w: "gguf.GGUFWriter", tensors) -> None:
    """Add the (name, array) tensors and write header, metadata and tensors; close the writer."""
    for tname, arr in tensors:
        w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_vocab_and_extra_kv(w: "gguf.GGUFWriter", tok_kv, chat_template: str | None,
                           extra_kv: Mapping[str, Any] | None) -> None:
    """The copied tokenizer keys (chat_template replacing the vocabulary file's own), then the
    caller's extra metadata: str/bool/int/float values (ints as UINT32 when non-negative,
    INT32 otherwise)."""
    for key, value, vtype, sub in tok_kv:
        if key == "tokenizer.chat_template" and chat_template is not None:
            continue
        if vtype == GGUFValueType.ARRAY and len(value) == 0:
            continue  # the writer refuses empty arrays; llama.cpp treats them as absent
        w.add_key_value(key, value, vtype, sub)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            (w.add_uint32 if value >= 0 else w.add_int32)(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            raise TypeError(f"extra_kv[{key!r}]: unsupported type {type(value).__name__}")


def make_tiny_llama(
    path: str | os.PathLike[str],
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    seed: int = 0,
    vocab_from: str | os.PathLike[str] = DEFAULT_VOCAB,
    dtype: str = "f32",
    output_scale: float = 0.5,
    zero_control_logits: bool = True,
    tie_embeddings: bool = False,
    rms_eps: float = 1e-5,
    rope_freq_base: float = 10000.0,
    chat_template: str | None = None,
    name: str = "tiny-llama",
    extra_kv: Mapping[str, Any] | None = None,
    arch: str = "llama",
    norm_dtype: str = "f32",
) -> Path:
    """Write a tiny random llama-architecture GGUF model and return its path.

    vocab_from   a GGUF whose ``tokenizer.*`` keys are copied (default: llama SPM, 32000 tokens).
    dtype        "f32" or "f16" for the matrices (norms stay f32, as llama.cpp expects).
    tie_embeddings  omit output.weight (llama.cpp then reuses token_embd.weight).
    chat_template   stored as tokenizer.chat_template (overrides the vocab file's one).
    extra_kv     more metadata: str/bool/int/float values (ints are written as UINT32
                 when non-negative, INT32 otherwise).
    arch         general.architecture (and the prefix of the hyper-parameter keys);
                 anything but "llama" makes a file llama.cpp should refuse.
    norm_dtype   "f32" (default) or "f16" for the norm weights; "f16" makes a model llama.cpp
                 loads and then aborts on at the first decode (pyllama's pre-check refuses it).
    """
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    if dtype not in ("f32", "f16"):
        raise ValueError("dtype must be 'f32' or 'f16'")
    if norm_dtype not in ("f32", "f16"):
        raise ValueError("norm_dtype must be 'f32' or 'f16'")
    head_dim = n_embd // n_head
    tok_kv = read_tokenizer_kv(vocab_from)
    tokens = next(v for k, v, *_ in tok_kv if k == "tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    token_types = next((v for k, v, *_ in tok_kv if k == "tokenizer.ggml.token_type"), None)

    rng = np.random.default_rng(seed)
    mat_dtype = np.float32 if dtype == "f32" else np.float16

    def mat(rows: int, cols: int, scale: float = 0.02) -> np.ndarray:
        # numpy shape (rows, cols) == ggml ne = {cols, rows}
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(mat_dtype)

    def norm(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32 if norm_dtype == "f32" else np.float16)

    tensors: list[tuple[str, np.ndarray]] = []
    tensors.append(("token_embd.weight", mat(n_vocab, n_embd, 1.0)))
    tensors.append(("output_norm.weight", norm(n_embd)))
    if not tie_embeddings:
        out = rng.standard_normal((n_vocab, n_embd), dtype=np.float32) * output_scale
        if zero_control_logits and token_types is not None:
            control = np.asarray(token_types) == TOKEN_TYPE_CONTROL
            out[control] = 0.0
        tensors.append(("output.weight", out.astype(mat_dtype)))
    for i in range(n_layer):
        p = f"blk.{i}"
        tensors += [
            (f"{p}.attn_norm.weight", norm(n_embd)),
            (f"{p}.attn_q.weight", mat(n_head * head_dim, n_embd)),
            (f"{p}.attn_k.weight", mat(n_head_kv * head_dim, n_embd)),
            (f"{p}.attn_v.weight", mat(n_head_kv * head_dim, n_embd)),
            (f"{p}.attn_output.weight", mat(n_embd, n_head * head_dim)),
            (f"{p}.ffn_norm.weight", norm(n_embd)),
            (f"{p}.ffn_gate.weight", mat(n_ff, n_embd)),
            (f"{p}.ffn_up.weight", mat(n_ff, n_embd)),
            (f"{p}.ffn_down.weight", mat(n_embd, n_ff)),
        ]

    def write(tmp: Path) -> None:
        w = GGUFWriter(str(tmp), arch)
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        w.add_context_length(n_ctx_train)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(rope_freq_base)
        w.add_layer_norm_rms_eps(rms_eps)
        w.add_vocab_size(n_vocab)
        add_vocab_and_extra_kv(w, tok_kv, chat_template, extra_kv)
        finish_gguf(w, tensors)

    return _write_atomic(Path(path), write)


def make_vocab_with_tokens(
    path: str | os.PathLike[str],
    added: Any,
    *,
    vocab_from: str | os.PathLike[str] = DEFAULT_VOCAB,
    chat_template: str | None = None,
    extra_kv: Mapping[str, Any] | None = None,
) -> Path:
    """Write a vocab-only GGUF: `vocab_from`'s tokenizer with tokens appended.

    added   a list of token texts (control tokens) or of (text, token_type) pairs,
            token_type being TOKEN_TYPE_CONTROL or TOKEN_TYPE_USER_DEFINED.
    extra_kv  more tokenizer keys, e.g. {"tokenizer.ggml.bos_token_id": 32000}
            (ints are written as UINT32; str and bool as such).

    Use it as ``make_tiny_llama(..., vocab_from=path)`` for a model whose vocabulary
    has, say, ChatML's ``<|im_start|>`` / ``<|im_end|>`` as control tokens.
    """
    items = [(a, TOKEN_TYPE_CONTROL) if isinstance(a, str) else (a[0], int(a[1])) for a in added]
    tok_kv = read_tokenizer_kv(vocab_from)

    def write(tmp: Path) -> None:
        w = GGUFWriter(str(tmp), "llama")
        overrides = dict(extra_kv or {})
        for key, value, vtype, sub in tok_kv:
            if key in overrides or (key == "tokenizer.chat_template" and chat_template is not None):
                continue
            if key == "tokenizer.ggml.tokens":
                value = list(value) + [t.encode("utf-8") for t, _ in items]
            elif key == "tokenizer.ggml.scores":
                value = list(value) + [0.0] * len(items)
            elif key == "tokenizer.ggml.token_type":
                value = list(value) + [tt for _, tt in items]
            if vtype == GGUFValueType.ARRAY and len(value) == 0:
                continue
            w.add_key_value(key, value, vtype, sub)
        if chat_template is not None:
            w.add_chat_template(chat_template)
        for key, value in overrides.items():
            if isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
            elif isinstance(value, str):
                w.add_string(key, value)
            else:
                raise TypeError(f"extra_kv[{key!r}]: unsupported type {type(value).__name__}")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()

    return _write_atomic(Path(path), write)


# --------------------------------------------------------------------------- broken files
# For the hardening tests: each must make Model() raise a Python exception, never abort.


def make_truncated(src: str | os.PathLike[str], dst: str | os.PathLike[str], n_bytes: int) -> Path:
    """Copy the first `n_bytes` of `src` to `dst` (negative: all but the last -n_bytes)."""
    data = Path(src).read_bytes()
    data = data[:n_bytes]
    dst = Path(dst)
    dst.write_bytes(data)
    return dst


def make_garbage_gguf(dst: str | os.PathLike[str], n_bytes: int = 4096, seed: int = 0) -> Path:
    """The "GGUF" magic followed by random bytes."""
    rng = np.random.default_rng(seed)
    dst = Path(dst)
    dst.write_bytes(b"GGUF" + rng.integers(0, 256, size=n_bytes, dtype=np.uint8).tobytes())
    return dst


def make_unknown_arch(dst: str | os.PathLike[str], **kwargs: Any) -> Path:
    """A well-formed tiny model whose general.architecture is "nosucharch"."""
    kwargs.setdefault("n_layer", 1)
    return make_tiny_llama(dst, arch="nosucharch", **kwargs)


def make_tensor_past_eof(dst: str | os.PathLike[str], **kwargs: Any) -> Path:
    """A tiny model with an intact header whose last tensor's data runs past the end of
    the file (the data section is cut short), which llama.cpp reports as "tensor data
    is not within the file bounds"."""
    kwargs.setdefault("n_layer", 1)
    dst = Path(dst)
    make_tiny_llama(dst, **kwargs)
    # The last tensor written (blk.N.ffn_down, n_embd * n_ff elements) ends the file,
    # followed by at most alignment-1 bytes of padding; the header (with the 32k-token
    # vocabulary) is hundreds of kilobytes, so cutting a little keeps it intact.
    size = dst.stat().st_size
    with open(dst, "r+b") as f:
        f.truncate(size - 256)
    return dst


if __name__ == "__main__":  # python tests/tiny_model.py OUT.gguf
    import sys

    out = make_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")
    print(out, out.stat().st_size)
