#!/usr/bin/env python3
"""Two tiny random-weight llama models that stand in for the GPU tier's test models where the
real ones cannot travel (a lent GPU machine: nothing fetched there, at most 64 MiB carried).

    python scripts/make_tier_models.py OUT_DIR

Writes OUT_DIR/tiny-llama-f32.gguf (F32 matrices, separate output head) and
OUT_DIR/tiny-llama-f16-tied.gguf (F16 matrices, tied embeddings): two code paths of the
backend, a ChatML template for the server test, llama.cpp's SPM vocabulary (32,000 tokens).
gpu_tests/conftest.py uses them when PYLLAMA_GPU_TIER_MODELS names OUT_DIR.
Needs the `gguf` package and the vendored vocabulary files (scripts/vendor_llama_cpp.py --with vocab).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny_model import make_tiny_llama  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    make_tiny_llama(out / "tiny-llama-f32.gguf", n_embd=128, n_layer=4, n_head=4, n_head_kv=2, n_ff=256,
                    n_ctx_train=4096, chat_template=CHATML, seed=1)
    make_tiny_llama(out / "tiny-llama-f16-tied.gguf", n_embd=128, n_layer=6, n_head=4, n_head_kv=1, n_ff=384,
                    n_ctx_train=4096, dtype="f16", tie_embeddings=True, chat_template=CHATML, seed=2)
    for f in sorted(out.glob("*.gguf")):
        print(f"{f}: {f.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
