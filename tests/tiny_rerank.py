"""Tiny rerankers beyond tests/tiny_bert.py's: one whose GGUF carries a rerank prompt
template (``tokenizer.chat_template.rerank``, as Qwen3-Reranker's does), and one that says
pooling type "rank" but has no classification head.

    from tiny_rerank import make_tiny_reranker_with_template, make_headless_ranker
    path = make_tiny_reranker_with_template(tmp_path / "t.gguf", "[CLS]{query}[SEP]{document}[SEP]")

The template is added to tiny_bert's file by rewriting its header (add_string_kv): the tensor
data is copied as it is, only the metadata grows.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
from tiny_bert import make_tiny_bert, make_tiny_reranker
from tiny_model import _write_atomic

__all__ = ["add_string_kv", "make_headless_ranker", "make_tiny_reranker_with_template"]

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def add_string_kv(src: str | os.PathLike[str], dst: str | os.PathLike[str], key: str, value: str) -> Path:
    """Copy the GGUF `src` to `dst` with one more string metadata entry `key` = `value`.

    The key/value section grows, the tensor infos follow it unchanged, and the data section
    (whose tensor offsets are relative to its own start) is re-aligned to general.alignment."""
    data = Path(src).read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{src}: not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    pos = 24
    alignment = 32

    def read_str(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", data, pos)
        return data[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

    for _ in range(n_kv):
        name, pos = read_str(pos)
        if name == key:
            raise ValueError(f"{src} already has {key}")
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == _ARRAY:
            sub, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(n):
                pos = read_str(pos)[1] if sub == _STRING else pos + _SCALAR_SIZES[sub]
        elif vtype == _STRING:
            pos = read_str(pos)[1]
        else:
            if name == "general.alignment" and vtype == _UINT32:
                (alignment,) = struct.unpack_from("<I", data, pos)
            pos += _SCALAR_SIZES[vtype]
    kv_end = pos
    for _ in range(n_tensors):
        pos = read_str(pos)[1]
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * n_dims + 4 + 8
    infos_end = pos
    data_start = -(-infos_end // alignment) * alignment

    head = (data[:4] + struct.pack("<IQQ", version, n_tensors, n_kv + 1) + data[24:kv_end]
            + _gguf_str(key) + struct.pack("<I", _STRING) + _gguf_str(value) + data[kv_end:infos_end])
    head += b"\0" * (-len(head) % alignment)

    def write(tmp: Path) -> None:
        tmp.write_bytes(head + data[data_start:])

    return _write_atomic(Path(dst), write)


def make_tiny_reranker_with_template(path: str | os.PathLike[str], template: str, **kwargs) -> Path:
    """tiny_bert's reranker with ``tokenizer.chat_template.rerank`` = `template` (``{query}``
    and ``{document}`` mark where the pair goes)."""
    path = Path(path)
    plain = make_tiny_reranker(path.with_name(path.stem + "-plain.gguf"), **kwargs)
    return add_string_kv(plain, path, "tokenizer.chat_template.rerank", template)


def make_headless_ranker(path: str | os.PathLike[str], **kwargs) -> Path:
    """A BERT whose GGUF says pooling type "rank" but that has no classification head (llama.cpp
    then "ranks" with the first float of the CLS embedding)."""
    return make_tiny_bert(path, pooling=gguf.PoolingType.RANK, name="tiny-headless-ranker", **kwargs)
