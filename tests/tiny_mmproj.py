"""Tiny random-weight multimodal projector ("mmproj") GGUF files for fast unit tests.

llama.cpp's mtmd library (vendor/llama.cpp/tools/mtmd) pairs a text model with a
separate "mmproj" GGUF that holds a vision encoder plus a projector mapping image
features into the text model's embedding space.  Real projectors are hundreds of
megabytes; this module writes a LLaVA-1.5-style one ("clip.projector_type" =
"mlp", clip.cpp's PROJECTOR_TYPE_MLP, graph in tools/mtmd/models/llava.cpp) that
is about 120 KB of seeded noise, so the multimodal code paths (load,
tokenize with an image marker, encode, decode the embeddings) run in milliseconds
next to tiny_model.make_tiny_llama.  Everything is deterministic for a given seed.

    from tiny_model import make_tiny_llama
    from tiny_mmproj import make_tiny_mmproj, expected_image_tokens
    model = make_tiny_llama(tmp_path / "tiny.gguf")
    mmproj = make_tiny_mmproj(tmp_path / "mmproj.gguf")   # 16 image tokens of width 64

What it builds (ggml shapes are the numpy shapes reversed):

    v.patch_embd.weight      conv kernel, numpy (n_embd, 3, patch, patch), no bias
    v.class_embd             (n_embd,)                       CLIP's [CLS] token
    v.position_embd.weight   (n_patches + 1, n_embd)
    v.pre_ln.{weight,bias}   (n_embd,)
    v.blk.N.ln1 / ln2        (n_embd,) weight + bias
    v.blk.N.attn_{q,k,v,out} (n_embd, n_embd) weight + (n_embd,) bias
    v.blk.N.ffn_up           (n_ff, n_embd) + (n_ff,)
    v.blk.N.ffn_down         (n_embd, n_ff) + (n_embd,)
    mm.0.{weight,bias}       (n_embd_proj, n_embd), (n_embd_proj,)
    mm.2.{weight,bias}       (n_embd_text, n_embd_proj), (n_embd_text,)

How clip.cpp treats it:

  * Images go through mtmd's fixed-size preprocessor (no
    clip.vision.image_grid_pinpoints, so no llava-1.6 tiling): resized/padded to
    image_size x image_size and normalised with image_mean/image_std.
  * The graph prepends the class token, adds position embeddings, applies
    pre_ln, then runs blocks 0 .. n_layer-2: like LLaVA, which takes the
    penultimate layer's features, clip_graph_llava stops one block short of
    n_layer when no clip.vision.feature_layer is given (so the last block's
    weights are loaded but unused, and n_layer=1 runs no block at all).
    v.post_ln is optional and off by default (LLaVA does not use it).
  * The class token's row is dropped before the projector ("patches" input
    starts at 1 when v.class_embd exists), so an image gives exactly
    (image_size // patch_size) ** 2 tokens (clip_n_output_tokens: unchanged
    n_patches for PROJECTOR_TYPE_MLP); see expected_image_tokens().
  * Projector: mm.2(gelu(mm.0(x))).  mm.2.weight's output size is what
    clip_n_mmproj_embd() reports, and mtmd_init_from_file refuses a projector
    whose size differs from the text model's n_embd ("mismatch between text
    model ... and mmproj") -- make_mismatched_mmproj writes such a file.

Metadata clip.cpp requires (a missing one makes clip_init fail; a wrongly
typed one trips a GGML_ASSERT in gguf_get_val_*, i.e. aborts the process, so the
types below matter): clip.has_vision_encoder (bool), clip.projector_type (str),
clip.vision.{embedding_length, feed_forward_length, block_count,
projection_dim, attention.head_count, image_size, patch_size} (uint32),
clip.vision.attention.layer_norm_epsilon (float32), clip.vision.image_mean /
image_std (float32 arrays of 3).  clip.use_gelu is written explicitly (false:
the FFN uses quick-GELU like OpenAI CLIP; the projector always uses GELU).

Weights: norms are ones (biases zeros); the encoder's matrices, embeddings and
biases are normal * 0.02 (so different images give clearly different features:
the patch embedding dominates the position embedding), and the projector's
matrices are normal / sqrt(fan_in) so the image embeddings have a spread
(std around 0.5) comparable to the tiny text model's token embeddings and
actually steer its output.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np

import gguf
from gguf import GGUFWriter

from tiny_model import _write_atomic, finish_gguf, make_tiny_llama

__all__ = [
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_PATCH_SIZE",
    "EXPECTED_IMAGE_TOKENS",
    "TINY_LLAMA_N_EMBD",
    "expected_image_tokens",
    "make_mismatched_mmproj",
    "make_tiny_mmproj",
]

# The text width the projector must produce by default: make_tiny_llama's n_embd.
TINY_LLAMA_N_EMBD: int = inspect.signature(make_tiny_llama).parameters["n_embd"].default

# OpenAI CLIP's normalisation (what LLaVA-1.5's mmproj files carry).
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_IMAGE_SIZE = 32
DEFAULT_PATCH_SIZE = 8


def expected_image_tokens(image_size: int = DEFAULT_IMAGE_SIZE, patch_size: int = DEFAULT_PATCH_SIZE) -> int:
    """Image tokens one image becomes with make_tiny_mmproj(image_size=..., patch_size=...).

    As clip.cpp computes it for PROJECTOR_TYPE_MLP: every image is resized to
    image_size x image_size, n_patches = (image_size // patch_size) ** 2, and the
    class token is not emitted.  Independent of the input image's size.
    """
    return (image_size // patch_size) ** 2


EXPECTED_IMAGE_TOKENS: int = expected_image_tokens()  # 16 for the defaults


def vision_block(p: str, n_embd: int, n_ff: int, mat, vec) -> list:
    """One CLIP-style encoder block's tensors as clip.cpp loads them (LayerNorms as ones and
    zeros; `mat(rows, cols)` and `vec(n)` make the random matrices and biases)."""
    return [
        (f"{p}.ln1.weight", np.ones(n_embd, dtype=np.float32)),
        (f"{p}.ln1.bias", np.zeros(n_embd, dtype=np.float32)),
        (f"{p}.attn_q.weight", mat(n_embd, n_embd)),
        (f"{p}.attn_q.bias", vec(n_embd)),
        (f"{p}.attn_k.weight", mat(n_embd, n_embd)),
        (f"{p}.attn_k.bias", vec(n_embd)),
        (f"{p}.attn_v.weight", mat(n_embd, n_embd)),
        (f"{p}.attn_v.bias", vec(n_embd)),
        (f"{p}.attn_out.weight", mat(n_embd, n_embd)),
        (f"{p}.attn_out.bias", vec(n_embd)),
        (f"{p}.ln2.weight", np.ones(n_embd, dtype=np.float32)),
        (f"{p}.ln2.bias", np.zeros(n_embd, dtype=np.float32)),
        # ne = {n_embd, n_ff}: ffn_down's ne[0] is n_ff, so clip.cpp's legacy
        # "ffn up/down are swapped" fix-up does not fire (unless n_ff == n_embd,
        # where it is harmless: both shapes are square).
        (f"{p}.ffn_up.weight", mat(n_ff, n_embd)),
        (f"{p}.ffn_up.bias", vec(n_ff)),
        (f"{p}.ffn_down.weight", mat(n_embd, n_ff)),
        (f"{p}.ffn_down.bias", vec(n_embd)),
    ]


def make_tiny_mmproj(
    path: str | os.PathLike[str],
    *,
    n_embd_text: int = TINY_LLAMA_N_EMBD,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    patch_size: int = DEFAULT_PATCH_SIZE,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_ff: int = 64,
    n_embd_proj: int | None = None,
    class_embedding: bool = True,
    post_ln: bool = False,
    use_gelu: bool = False,
    eps: float = 1e-5,
    dtype: str = "f32",
    scale: float = 0.02,
    proj_scale: float | None = None,
    image_mean: tuple[float, float, float] = CLIP_IMAGE_MEAN,
    image_std: tuple[float, float, float] = CLIP_IMAGE_STD,
    name: str = "tiny-mmproj",
) -> Path:
    """Write a tiny random LLaVA-style (projector type "mlp") mmproj GGUF and return its path.

    n_embd_text   output width of the projector (mm.2); must equal the text model's
                  n_embd for mtmd to accept the pair (default: make_tiny_llama's).
    image_size, patch_size   image_size must be a multiple of patch_size; one image
                  gives expected_image_tokens(image_size, patch_size) tokens.
    n_embd, n_layer, n_head, n_ff   the vision transformer (n_embd % n_head == 0).
                  Only blocks 0 .. n_layer-2 run (LLaVA's penultimate-layer features).
    n_embd_proj   hidden width of the projector MLP (mm.0's output); default n_embd_text.
    class_embedding  include CLIP's [CLS] token (v.class_embd); clip.cpp drops its
                  output row either way, so the token count does not change.
    post_ln       include v.post_ln (applied after the last block that runs).
    use_gelu      clip.use_gelu: FFN activation GELU instead of quick-GELU.
    dtype         "f32" or "f16" for the 2-D matrices and the patch-embedding kernel;
                  norms, biases and embeddings stay f32.
    scale         std of the encoder's random weights; proj_scale: std of the
                  projector's (default 1/sqrt(fan_in) per matrix).
    """
    if dtype not in ("f32", "f16"):
        raise ValueError("dtype must be 'f32' or 'f16'")
    if patch_size <= 0 or image_size <= 0 or image_size % patch_size:
        raise ValueError("image_size must be a positive multiple of patch_size")
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    if n_layer < 1:
        raise ValueError("n_layer must be >= 1")
    n_proj = n_embd_text if n_embd_proj is None else n_embd_proj
    n_patches = expected_image_tokens(image_size, patch_size)
    n_pos = n_patches + (1 if class_embedding else 0)

    rng = np.random.default_rng(seed)
    mat_dtype = np.float32 if dtype == "f32" else np.float16

    def noise(shape, s: float) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(s)

    def mat(rows: int, cols: int, s: float | None = None) -> np.ndarray:
        # numpy shape (rows, cols) == ggml ne = {cols, rows}: maps cols -> rows
        return noise((rows, cols), scale if s is None else s).astype(mat_dtype)

    def vec(n: int) -> np.ndarray:
        return noise((n,), scale)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    def pscale(fan_in: int) -> float:
        return proj_scale if proj_scale is not None else 1.0 / float(np.sqrt(fan_in))

    tensors: list[tuple[str, np.ndarray]] = []
    # ggml_conv_2d kernel: ne = {patch, patch, 3 channels, n_embd}
    tensors.append(("v.patch_embd.weight", noise((n_embd, 3, patch_size, patch_size), scale).astype(mat_dtype)))
    if class_embedding:
        tensors.append(("v.class_embd", vec(n_embd)))
    tensors.append(("v.position_embd.weight", noise((n_pos, n_embd), scale)))
    tensors.append(("v.pre_ln.weight", ones(n_embd)))
    tensors.append(("v.pre_ln.bias", zeros(n_embd)))
    for i in range(n_layer):
        tensors += vision_block(f"v.blk.{i}", n_embd, n_ff, mat, vec)
    if post_ln:
        tensors.append(("v.post_ln.weight", ones(n_embd)))
        tensors.append(("v.post_ln.bias", zeros(n_embd)))
    tensors += [
        ("mm.0.weight", mat(n_proj, n_embd, pscale(n_embd))),
        ("mm.0.bias", zeros(n_proj)),
        ("mm.2.weight", mat(n_embd_text, n_proj, pscale(n_proj))),
        ("mm.2.bias", zeros(n_embd_text)),
    ]

    def write(tmp: Path) -> None:
        w = GGUFWriter(str(tmp), "clip")  # general.architecture = "clip"
        w.add_name(name)
        w.add_description("tiny random LLaVA-style (mlp) projector for unit tests")
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        w.add_string("clip.projector_type", "mlp")
        w.add_bool("clip.has_vision_encoder", True)
        w.add_bool("clip.has_audio_encoder", False)
        w.add_bool("clip.has_llava_projector", True)  # legacy key real files carry; clip.cpp ignores it
        w.add_bool("clip.use_gelu", use_gelu)
        # every integer hparam must be UINT32: clip.cpp reads them with gguf_get_val_u32,
        # which asserts (aborts) on any other type
        w.add_uint32("clip.vision.image_size", image_size)
        w.add_uint32("clip.vision.patch_size", patch_size)
        w.add_uint32("clip.vision.embedding_length", n_embd)
        w.add_uint32("clip.vision.feed_forward_length", n_ff)
        w.add_uint32("clip.vision.block_count", n_layer)
        w.add_uint32("clip.vision.projection_dim", n_embd_text)  # required key, unused by "mlp"
        w.add_uint32("clip.vision.attention.head_count", n_head)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", eps)
        w.add_array("clip.vision.image_mean", [float(x) for x in image_mean])  # float32 array
        w.add_array("clip.vision.image_std", [float(x) for x in image_std])
        finish_gguf(w, tensors)

    return _write_atomic(Path(path), write)


def make_mismatched_mmproj(path: str | os.PathLike[str], n_embd_text: int = TINY_LLAMA_N_EMBD) -> Path:
    """A valid tiny projector whose output width (2 * n_embd_text) does not match a text
    model of width `n_embd_text`: mtmd_init_from_file must refuse the pair."""
    return make_tiny_mmproj(path, n_embd_text=2 * n_embd_text)


if __name__ == "__main__":  # python tests/tiny_mmproj.py OUT.gguf
    import sys

    out = make_tiny_mmproj(sys.argv[1] if len(sys.argv) > 1 else "tiny-mmproj.gguf")
    print(out, out.stat().st_size, "bytes,", EXPECTED_IMAGE_TOKENS, "image tokens")
