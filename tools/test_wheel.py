#!/usr/bin/env python3
"""Smoke test for an installed pyllama wheel (cibuildwheel's test-command, build_wheel.sh).

Runs against whatever `import pyllama` finds, with nothing but the wheel and its runtime
dependencies: no compiler, no source tree, no `gguf` package, no network.  It

1. imports pyllama and prints version, llama.cpp commit, build_info(), system_info(), backends();
2. writes a tiny random-weight llama GGUF (a byte-level SentencePiece vocabulary, built
   here with the standard library and numpy) and generates a few tokens from it, greedily,
   twice, checking that both runs agree;
3. with --model NAME_OR_PATH (or when SmolLM2 is already in pyllama's model cache and
   --real-model is given) also generates from a real model.

Portable builds (build_info()["portable"]) must report the CPU variant ggml picked:
`CPU_VARIANT = ...` in system_info() and "variant" in the CPU entry of backends().

With --expect-cuda (scripts/build_wheel.sh --cuda): CUDA is compiled in, `python -m pyllama info`
reports the GPU status, every CUDA library the process mapped comes from NVIDIA's runtime wheels
in site-packages (not from a toolkit), and, when there is no GPU, the status reads "CUDA compiled
in, no CUDA device found" and `n_gpu_layers=-1` warns and generates on the CPU.

Usage:  python tools/test_wheel.py [--real-model] [--model PATH] [--expect-portable] [--expect-cuda]
Exit status 0 on success; any failure raises.
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- tiny GGUF
# GGUF v3 metadata value types (see ggml/include/gguf.h).
_U32, _I32, _F32, _BOOL, _STR, _ARR = 4, 5, 6, 7, 8, 9
_ALIGN = 32


def _s(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, value) -> bytes:
    out = _s(key) + struct.pack("<I", vtype)
    if vtype == _STR:
        return out + _s(value)
    if vtype == _ARR:
        elem_type, items = value
        out += struct.pack("<IQ", elem_type, len(items))
        if elem_type == _STR:
            return out + b"".join(_s(x) for x in items)
        fmt = {_F32: "<f", _I32: "<i", _U32: "<I"}[elem_type]
        return out + b"".join(struct.pack(fmt, x) for x in items)
    fmt = {_U32: "<I", _I32: "<i", _F32: "<f", _BOOL: "<?"}[vtype]
    return out + struct.pack(fmt, value)


def write_tiny_llama(path: Path, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                     n_head_kv: int = 2, n_ff: int = 128, seed: int = 0) -> Path:
    """A ~1 MB llama-architecture GGUF with a byte-fallback SentencePiece vocabulary."""
    # Vocabulary: <unk> <s> </s>, the 256 byte tokens, then a few word pieces.
    words = ["\u2581", *[chr(c) for c in range(ord("a"), ord("z") + 1)],
             *["\u2581" + w for w in ("the", "a", "is", "of", "and", "hello", "world", "wheel", "test")]]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *words]
    types = [2, 3, 3, *[6] * 256, *[1] * len(words)]          # UNKNOWN, CONTROL, BYTE, NORMAL
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *[-float(i) for i in range(len(words))]]
    n_vocab = len(tokens)
    head_dim = n_embd // n_head

    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)  # ggml ne = {cols, rows}

    output = mat(n_vocab, n_embd, 0.5)
    output[:3] = 0.0  # control tokens never win, so greedy generation does not stop at once
    tensors = [("token_embd.weight", mat(n_vocab, n_embd, 1.0)),
               ("output_norm.weight", np.ones(n_embd, np.float32)),
               ("output.weight", output)]
    for i in range(n_layer):
        p = f"blk.{i}"
        tensors += [(f"{p}.attn_norm.weight", np.ones(n_embd, np.float32)),
                    (f"{p}.attn_q.weight", mat(n_embd, n_embd)),
                    (f"{p}.attn_k.weight", mat(n_head_kv * head_dim, n_embd)),
                    (f"{p}.attn_v.weight", mat(n_head_kv * head_dim, n_embd)),
                    (f"{p}.attn_output.weight", mat(n_embd, n_embd)),
                    (f"{p}.ffn_norm.weight", np.ones(n_embd, np.float32)),
                    (f"{p}.ffn_gate.weight", mat(n_ff, n_embd)),
                    (f"{p}.ffn_up.weight", mat(n_ff, n_embd)),
                    (f"{p}.ffn_down.weight", mat(n_embd, n_ff))]

    kvs = [
        _kv("general.architecture", _STR, "llama"),
        _kv("general.name", _STR, "pyllama-wheel-smoke-test"),
        _kv("general.alignment", _U32, _ALIGN),
        _kv("llama.context_length", _U32, 256),
        _kv("llama.embedding_length", _U32, n_embd),
        _kv("llama.block_count", _U32, n_layer),
        _kv("llama.feed_forward_length", _U32, n_ff),
        _kv("llama.attention.head_count", _U32, n_head),
        _kv("llama.attention.head_count_kv", _U32, n_head_kv),
        _kv("llama.rope.dimension_count", _U32, head_dim),
        _kv("llama.attention.layer_norm_rms_epsilon", _F32, 1e-5),
        _kv("llama.vocab_size", _U32, n_vocab),
        _kv("tokenizer.ggml.model", _STR, "llama"),
        _kv("tokenizer.ggml.tokens", _ARR, (_STR, tokens)),
        _kv("tokenizer.ggml.scores", _ARR, (_F32, scores)),
        _kv("tokenizer.ggml.token_type", _ARR, (_I32, types)),
        _kv("tokenizer.ggml.unknown_token_id", _U32, 0),
        _kv("tokenizer.ggml.bos_token_id", _U32, 1),
        _kv("tokenizer.ggml.eos_token_id", _U32, 2),
    ]
    infos, blobs, offset = [], [], 0
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr, dtype="<f4")
        dims = arr.shape[::-1]  # ggml lists the innermost dimension first
        infos.append(_s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", 0, offset))  # type 0 = F32
        data = arr.tobytes()
        pad = (-len(data)) % _ALIGN
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)
    header += b"\0" * ((-len(header)) % _ALIGN)
    path.write_bytes(header + b"".join(blobs))
    return path


# ----------------------------------------------------------------------------- checks
def check_import(expect_portable: bool) -> None:
    import pyllama

    info = pyllama.build_info()
    sysinfo = pyllama.system_info()
    backends = pyllama.backends()
    print(f"pyllama {pyllama.__version__} from {os.path.dirname(pyllama.__file__)}")
    print(f"llama.cpp {pyllama.__llama_cpp_commit__}; portable={info['portable']}")
    print(f"system_info: {sysinfo}")
    for b in backends:
        devs = ", ".join(d["description"] or d["name"] for d in b["devices"]) or "no devices"
        extra = f" variant={b['variant']}" if "variant" in b else ""
        lib = f" [{os.path.basename(b['library'])}]" if b.get("library") else ""
        print(f"backend {b['name']}{extra}{lib}: {devs}")
    assert "CPU" in {b["name"] for b in backends}, f"no CPU backend: {backends}"
    if expect_portable or info["portable"]:
        assert info["portable"], "expected a portable build (PYLLAMA_PORTABLE=ON)"
        assert "CPU_VARIANT = " in sysinfo, f"portable build does not report its CPU variant: {sysinfo}"
        cpu = next(b for b in backends if b["name"] == "CPU")
        assert cpu.get("variant"), f"CPU backend has no variant: {cpu}"


def check_cuda(model_path: str) -> None:
    """--expect-cuda: see the module docstring."""
    import warnings

    import pyllama
    from pyllama import LLM, gpu

    status = gpu.gpu_status()
    print(f"gpu_status: {status.summary}; cuda_architectures: {pyllama.build_info().get('cuda_architectures')}")
    assert "CUDA" in status.compiled, f"not a CUDA build: {status}"
    info = subprocess.run([sys.executable, "-m", "pyllama", "info"], capture_output=True, text=True,
                          timeout=300, check=True).stdout
    assert status.summary in info, f"`pyllama info` does not report {status.summary!r}:\n{info}"
    # Which CUDA libraries did the loader map, and from where?
    with open("/proc/self/maps") as f:
        mapped = sorted({ln.split(None, 5)[5].strip() for ln in f
                         if len(ln.split(None, 5)) == 6 and re.search(r"/lib(cudart|cublas|cublasLt)\.so", ln)})
    for path in mapped:
        print(f"mapped: {path}")
    stray = [p for p in mapped if f"{os.sep}nvidia{os.sep}" not in p or "-packages" not in p]
    assert not stray, f"CUDA libraries loaded from outside NVIDIA's runtime wheels: {stray}"
    if "CUDA" in {b["name"] for b in pyllama.backends()}:  # the backend loaded: it needs libcudart
        assert any("libcudart.so" in p for p in mapped), f"CUDA backend without libcudart mapped: {mapped}"
    if status.available:
        return
    assert status.summary == "CUDA compiled in, no CUDA device found", status.summary
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = LLM(model_path, n_ctx=256, n_gpu_layers=-1, seed=0)
    try:
        text = llm.invoke("hello world", max_tokens=4, temperature=0.0)
    finally:
        llm.close()
    messages = [str(w.message) for w in caught]
    assert any("runs on the CPU" in m for m in messages), f"n_gpu_layers=-1 did not warn: {messages}"
    assert text, "generated nothing with n_gpu_layers=-1"
    print(f"n_gpu_layers=-1 without a GPU: warned ({next(m for m in messages if 'runs on the CPU' in m)!r}), "
          f"generated {text!r} on the CPU")


def generate(model_path: str, prompt: str, n_tokens: int) -> str:
    from pyllama import LLM

    t0 = time.perf_counter()
    llm = LLM(model_path, n_ctx=256, n_threads=min(4, os.cpu_count() or 1), seed=0)
    try:
        texts = [llm.invoke(prompt, max_tokens=n_tokens, temperature=0.0) for _ in range(2)]
    finally:
        close = getattr(llm, "close", None)
        if close:
            close()
    assert texts[0] == texts[1], f"greedy generation is not deterministic: {texts!r}"
    assert texts[0], "generated nothing"
    print(f"{os.path.basename(model_path)}: {prompt!r} -> {texts[0]!r} ({time.perf_counter() - t0:.2f} s)")
    return texts[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect-portable", action="store_true",
                        help="fail unless this is a portable build that reports its CPU variant")
    parser.add_argument("--expect-cuda", action="store_true",
                        help="fail unless CUDA is compiled in and its libraries come from NVIDIA's wheels")
    parser.add_argument("--model", help="also generate from this GGUF path or known model name")
    parser.add_argument("--real-model", action="store_true",
                        help="also generate from SmolLM2 when it is already cached (never downloads)")
    args = parser.parse_args(argv)

    # Never test the source tree by accident: the wheel is what must work.
    here = Path(__file__).resolve().parent.parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (here, here / "src")]

    check_import(args.expect_portable)
    with tempfile.TemporaryDirectory(prefix="pyllama-smoke-") as tmp:
        tiny = str(write_tiny_llama(Path(tmp) / "tiny.gguf"))
        generate(tiny, "hello world", 8)
        if args.expect_cuda:
            check_cuda(tiny)

    model = args.model
    if model is None and args.real_model:
        os.environ.setdefault("PYLLAMA_OFFLINE", "1")
        try:
            from pyllama.models import fetch_model

            model = str(fetch_model("smollm2"))
        except Exception as e:  # not cached: the tiny model already covered the wheel
            print(f"SmolLM2 not cached, skipped ({type(e).__name__}: {e})")
    if model is not None:
        generate(model, "The capital of France is", 16)
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
