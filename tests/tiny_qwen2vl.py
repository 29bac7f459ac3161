"""Tiny random-weight Qwen2-VL pair (text model + "qwen2vl_merger" mmproj) for M-RoPE tests.

Qwen2-VL's text model uses M-RoPE (llama.cpp's LLM_ARCH_QWEN2VL, rope type
LLAMA_ROPE_TYPE_MROPE): every token carries 4 positions, sections (t, y, x, z).  A
text token at p has (p, p, p, p); libmtmd gives image token i of an nx x ny grid
starting at p0 the position (t, y, x, z) = (p0, p0 + i / nx, p0 + i % nx, 0)
(mtmd_image_tokens_get_decoder_pos, set_position_mrope_2d), so the chunk has
n_tokens = nx * ny embeddings but advances the position by only n_pos = max(nx, ny)
(mtmd_image_tokens_get_n_pos).  The KV cache stores t as the cell's position (so
llama_memory_seq_pos_max right after an image chunk is p0) plus (x, y), which the
causal mask uses between cells of equal t; llama_decode requires a later text token's
position to be > seq_pos_max (M-RoPE allows forward jumps).  Real Qwen2-VL files are
gigabytes; this module writes a ~17 MB text model (make_tiny_llama's 32000-token
SPM vocabulary) and a ~220 KB projector of seeded noise, so that the
n_tokens != n_pos code paths run in milliseconds.  Deterministic for a given seed.

    from tiny_qwen2vl import make_tiny_qwen2vl, make_tiny_qwen2vl_mmproj, expected_grid
    text = make_tiny_qwen2vl(tmp_path / "qwen2vl.gguf")
    proj = make_tiny_qwen2vl_mmproj(tmp_path / "qwen2vl-mmproj.gguf")
    expected_grid(64, 32)   # (4, 2): a 64x32 image is 8 tokens at 4 positions

Text model (general.architecture "qwen2vl", src/models/qwen2vl.cpp), ggml shapes
are the numpy shapes reversed:

    token_embd.weight        (n_vocab, n_embd)      normal * 1.0
    output_norm.weight       (n_embd,)              ones
    output.weight            (n_vocab, n_embd)      normal * output_scale (0.5), control rows 0
    blk.N.attn_norm.weight   (n_embd,)
    blk.N.attn_{q,k,v}.weight / .bias   q: (n_embd, n_embd), k/v: (n_head_kv*head_dim, n_embd)
                             (the biases are what makes it "qwen2-style"; llama.cpp
                             treats them as optional, we always write them)
    blk.N.attn_output.weight (n_embd, n_embd)
    blk.N.ffn_norm / ffn_gate / ffn_up / ffn_down   SwiGLU like llama

  The layer matrices are normal * `scale` = 0.2 (make_tiny_llama uses 0.02).  With
  0.02 the attention is nearly uniform and the next token is a function of the last
  token alone, so wrong positions would go unnoticed: decoding the text after the
  test image one position late changes the greedy continuation from its 2nd token
  and the first logits by ~0.3-1.2 with 0.2, but by ~1e-5 (same tokens) with 0.02.
  A red and a blue test image also give different continuations.

  Hyper-parameters as llama.cpp reads them: the usual qwen2vl.* keys plus
  qwen2vl.rope.dimension_sections, an INT32 array of exactly 4 (get_key_or_arr
  with n=4, required: a missing key or another length fails the load).  ggml's
  M-RoPE assigns rotary pair i (0 <= i < head_dim/2) to section (i % sum) --
  t for the first s0, y for the next s1, x for the next s2 -- so the sum must be
  head_dim/2 for every pair to get exactly one section (Qwen2-VL 7B: head_dim 128,
  [16, 24, 24, 0]; here head_dim 16 -> [2, 3, 3, 0], the same proportions).
  rope.dimension_count must equal head_dim (the graph asserts n_rot == head_dim).

Projector (clip.projector_type "qwen2vl_merger", PROJECTOR_TYPE_QWEN2VL; graph in
tools/mtmd/models/qwen2vl.cpp):

    v.patch_embd.weight      (n_embd, 3, patch, patch)  frame 0 of the conv3d kernel
    v.patch_embd.weight.1    (n_embd, 3, patch, patch)  frame 1 (a still image goes
                             through both kernels and the results are added)
    v.blk.N.ln1 / ln2        (n_embd,) weight + bias (LayerNorm: Qwen2-VL, not 2.5)
    v.blk.N.attn_{q,k,v,out} (n_embd, n_embd) weight + (n_embd,) bias (biases required:
                             the graph adds them unconditionally)
    v.blk.N.ffn_up           (n_ff, n_embd) + (n_ff,)
    v.blk.N.ffn_down         (n_embd, n_ff) + (n_embd,)
    v.post_ln.{weight,bias}  (n_embd,)   Qwen2-VL's merger.ln_q (applied before merging)
    mm.0.{weight,bias}       (n_hidden, 4*n_embd), (n_hidden,)  n_hidden = 4*n_embd
    mm.2.{weight,bias}       (n_embd_text, n_hidden), (n_embd_text,)

  No v.patch_embd.bias, v.class_embd or v.position_embd: the graph asserts the
  first two are absent (positions come from a 2-D M-RoPE inside the encoder, with
  d_head/4 dims per section, so n_embd/n_head must be a multiple of 4).
  The spatial merge is 2x2: every 2x2 block of patches becomes one token of width
  4*n_embd, which mm.0 -> GELU -> mm.2 maps to the text width.

How clip.cpp / mtmd preprocess an image for this projector (mtmd_image_preprocessor_dyn_size):

  * No fixed size.  With align = 2 * patch_size, the image is resized (bicubic,
    aspect preserved) to w = max(align, round(W / align) * align), likewise h;
    if w*h is below min_pixels = 8 tokens * (2*patch)^2 it is scaled up
    (ceil to align), if above max_pixels = 4096 tokens * (2*patch)^2 scaled down
    (floor).  The 8 / 4096 token limits are hard-coded for Qwen2-VL (not
    metadata); mtmd_context_params.image_min_tokens / image_max_tokens override them.
  * nx = w / patch / 2, ny = h / patch / 2 (clip_n_output_tokens_x/_y);
    n_tokens = nx * ny, n_pos = max(nx, ny).  expected_grid() computes this with
    the same float32 arithmetic as img_tool::calc_size_preserved_ratio.
  * With the defaults (patch 8, align 16, min 2048 pixels) TEST_IMAGE_SIZE
    64x32 stays 64x32 (exactly 8 tokens, the minimum): nx=4, ny=2, 8 tokens, 4
    positions.  A 32x32 image is scaled up to 48x48: 3x3 = 9 tokens, 3 positions.
  * mtmd wraps the image in the text "<|vision_start|>" ... "<|vision_end|>"
    (tokenized as plain text by the SPM vocabulary here).

Metadata types matter (clip.cpp reads with gguf_get_val_u32 / _f32 / _bool, which
abort the process on another type): integers UINT32, eps FLOAT32, image_mean /
image_std FLOAT32 arrays of 3, clip.use_gelu BOOL (false: the encoder's FFN uses
quick-GELU like Qwen2-VL's vision tower; the merger always uses GELU).

Warm-up: mtmd_context_params.warmup (default true) only reserves the compute graph
(for Qwen2-VL a 46x46-token image: 92x92 patches whatever patch_size is), without
computing it; with this tiny encoder that costs no measurable time or memory
(~0.07 s and ~47 MB RSS for a whole tests/native/mtmd_reference run either way).
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import gguf
from gguf import GGUFWriter

from tiny_mmproj import vision_block
from tiny_model import (
    DEFAULT_VOCAB,
    TOKEN_TYPE_CONTROL,
    _write_atomic,
    add_vocab_and_extra_kv,
    finish_gguf,
    read_tokenizer_kv,
)

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_PATCH_SIZE",
    "DEFAULT_ROPE_SECTIONS",
    "QWEN2VL_IMAGE_MAX_TOKENS",
    "QWEN2VL_IMAGE_MIN_TOKENS",
    "SPATIAL_MERGE",
    "TEST_IMAGE_SIZE",
    "TEST_IMAGE_GRID",
    "TINY_QWEN2VL_N_EMBD",
    "expected_grid",
    "expected_image_n_pos",
    "expected_image_tokens",
    "make_tiny_qwen2vl",
    "make_tiny_qwen2vl_mmproj",
]

# OpenAI CLIP's normalisation, which Qwen2-VL's image processor uses as well.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_PATCH_SIZE = 8
# clip.vision.image_size: required by clip.cpp but unused by the dynamic-size preprocessing
# of Qwen2-VL (real files carry 560 or so); kept a multiple of 2 * patch_size.
DEFAULT_IMAGE_SIZE = 64
SPATIAL_MERGE = 2  # clip.cpp's default n_merge for Qwen2-VL; its graph hard-codes 2x2 anyway
# hparams.set_limit_image_tokens(8, 4096) in clip.cpp (PROJECTOR_TYPE_QWEN2VL)
QWEN2VL_IMAGE_MIN_TOKENS = 8
QWEN2VL_IMAGE_MAX_TOKENS = 4096
# Qwen2-VL 7B's mrope_section [16, 24, 24] scaled to head_dim 16 (sum = head_dim / 2)
DEFAULT_ROPE_SECTIONS = (2, 3, 3, 0)

# A non-square image that keeps its size: 4 x 2 tokens (8 tokens, 4 positions).
TEST_IMAGE_SIZE = (64, 32)


def _calc_size_preserved_ratio(width: int, height: int, align: int, min_pixels: int,
                               max_pixels: int) -> tuple[int, int]:
    """img_tool::calc_size_preserved_ratio (tools/mtmd/mtmd-image.cpp), longest_edge = 0,
    in the same float32 arithmetic."""
    f32 = np.float32
    fa = f32(align)

    def round_by(x) -> int:  # std::round: half away from zero (x > 0 here)
        return int(math.floor(float(f32(x) / fa) + 0.5)) * align

    def ceil_by(x) -> int:
        return int(math.ceil(float(f32(x) / fa))) * align

    def floor_by(x) -> int:
        return int(math.floor(float(f32(x) / fa))) * align

    if width <= 0 or height <= 0:
        return 0, 0
    w_bar = max(align, round_by(width))
    h_bar = max(align, round_by(height))
    if max_pixels > 0 and h_bar * w_bar > max_pixels:
        beta = np.sqrt(f32(f32(height) * f32(width)) / f32(max_pixels))
        h_bar = max(align, floor_by(f32(height) / beta))
        w_bar = max(align, floor_by(f32(width) / beta))
    elif min_pixels > 0 and h_bar * w_bar < min_pixels:
        beta = np.sqrt(f32(min_pixels) / f32(f32(height) * f32(width)))
        h_bar = ceil_by(f32(height) * beta)
        w_bar = ceil_by(f32(width) * beta)
    return w_bar, h_bar


def expected_grid(
    width: int,
    height: int,
    *,
    patch_size: int = DEFAULT_PATCH_SIZE,
    min_tokens: int = QWEN2VL_IMAGE_MIN_TOKENS,
    max_tokens: int = QWEN2VL_IMAGE_MAX_TOKENS,
) -> tuple[int, int]:
    """(nx, ny): the token grid mtmd makes of a width x height image with
    make_tiny_qwen2vl_mmproj(patch_size=...).

    As clip.cpp computes it for PROJECTOR_TYPE_QWEN2VL: smart-resize to multiples of
    2 * patch_size within [min_tokens, max_tokens] tokens (defaults: clip.cpp's 8 and
    4096; pass mtmd_context_params.image_min_tokens / image_max_tokens when those are
    set), then one token per 2x2 patches.  The chunk has nx * ny tokens and
    max(nx, ny) positions.
    """
    align = patch_size * SPATIAL_MERGE
    area = align * align
    w, h = _calc_size_preserved_ratio(width, height, align, min_tokens * area, max_tokens * area)
    return (w // patch_size) // 2, (h // patch_size) // 2


def expected_image_tokens(width: int, height: int, **kwargs: Any) -> int:
    """n_tokens of the image chunk (nx * ny); keyword arguments as for expected_grid."""
    nx, ny = expected_grid(width, height, **kwargs)
    return nx * ny


def expected_image_n_pos(width: int, height: int, **kwargs: Any) -> int:
    """n_pos of the image chunk (max(nx, ny)); keyword arguments as for expected_grid."""
    nx, ny = expected_grid(width, height, **kwargs)
    return max(nx, ny)


TEST_IMAGE_GRID: tuple[int, int] = expected_grid(*TEST_IMAGE_SIZE)  # (4, 2)


def make_tiny_qwen2vl(
    path: str | os.PathLike[str],
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    seed: int = 0,
    rope_sections: tuple[int, int, int, int] | None = None,
    vocab_from: str | os.PathLike[str] = DEFAULT_VOCAB,
    dtype: str = "f32",
    output_scale: float = 0.5,
    scale: float = 0.2,
    bias_scale: float = 0.02,
    zero_control_logits: bool = True,
    rms_eps: float = 1e-6,
    rope_freq_base: float = 1000000.0,
    chat_template: str | None = None,
    name: str = "tiny-qwen2vl",
    extra_kv: Mapping[str, Any] | None = None,
) -> Path:
    """Write a tiny random Qwen2-VL text model (general.architecture "qwen2vl") and return its path.

    Same conventions as tiny_model.make_tiny_llama (vocabulary copied from `vocab_from`,
    token embeddings normal * 1, output.weight normal * `output_scale` with control-token
    rows zeroed, norms ones, no chat template unless given), plus q/k/v biases (normal *
    `bias_scale`) and qwen2vl.rope.dimension_sections; the layer matrices are normal *
    `scale` (0.2, ten times make_tiny_llama's, so that positions and images change the
    greedy tokens; see the module docstring).

    rope_sections  4 ints summing to head_dim / 2 (head_dim = n_embd // n_head); default
                   DEFAULT_ROPE_SECTIONS for head_dim 16, else Qwen2-VL's 1/4, 3/8, 3/8 split.
    extra_kv       more metadata: str/bool/int/float (ints UINT32 if >= 0, else INT32).
    """
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    if dtype not in ("f32", "f16"):
        raise ValueError("dtype must be 'f32' or 'f16'")
    head_dim = n_embd // n_head
    if head_dim % 2:
        raise ValueError("head_dim (n_embd // n_head) must be even")
    half = head_dim // 2
    if rope_sections is None:
        if half == sum(DEFAULT_ROPE_SECTIONS):
            rope_sections = DEFAULT_ROPE_SECTIONS
        else:
            s0 = half // 4
            s1 = (half - s0) // 2
            rope_sections = (s0, s1, half - s0 - s1, 0)
    rope_sections = tuple(int(s) for s in rope_sections)
    if len(rope_sections) != 4 or min(rope_sections) < 0 or sum(rope_sections) > head_dim:
        raise ValueError("rope_sections: 4 non-negative ints with a sum <= head_dim (normally head_dim / 2)")
    n_embd_kv = n_head_kv * head_dim

    tok_kv = read_tokenizer_kv(vocab_from)
    tokens = next(v for k, v, *_ in tok_kv if k == "tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    token_types = next((v for k, v, *_ in tok_kv if k == "tokenizer.ggml.token_type"), None)

    rng = np.random.default_rng(seed)
    mat_dtype = np.float32 if dtype == "f32" else np.float16

    def mat(rows: int, cols: int, s: float | None = None) -> np.ndarray:
        # numpy shape (rows, cols) == ggml ne = {cols, rows}
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (scale if s is None else s)).astype(mat_dtype)

    def vec(n: int, s: float) -> np.ndarray:
        return rng.standard_normal(n, dtype=np.float32) * np.float32(s)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    tensors: list[tuple[str, np.ndarray]] = []
    tensors.append(("token_embd.weight", mat(n_vocab, n_embd, 1.0)))
    tensors.append(("output_norm.weight", ones(n_embd)))
    out = rng.standard_normal((n_vocab, n_embd), dtype=np.float32) * output_scale
    if zero_control_logits and token_types is not None:
        out[np.asarray(token_types) == TOKEN_TYPE_CONTROL] = 0.0
    tensors.append(("output.weight", out.astype(mat_dtype)))
    for i in range(n_layer):
        p = f"blk.{i}"
        tensors += [
            (f"{p}.attn_norm.weight", ones(n_embd)),
            (f"{p}.attn_q.weight", mat(n_embd, n_embd)),
            (f"{p}.attn_q.bias", vec(n_embd, bias_scale)),
            (f"{p}.attn_k.weight", mat(n_embd_kv, n_embd)),
            (f"{p}.attn_k.bias", vec(n_embd_kv, bias_scale)),
            (f"{p}.attn_v.weight", mat(n_embd_kv, n_embd)),
            (f"{p}.attn_v.bias", vec(n_embd_kv, bias_scale)),
            (f"{p}.attn_output.weight", mat(n_embd, n_embd)),
            (f"{p}.ffn_norm.weight", ones(n_embd)),
            (f"{p}.ffn_gate.weight", mat(n_ff, n_embd)),
            (f"{p}.ffn_up.weight", mat(n_ff, n_embd)),
            (f"{p}.ffn_down.weight", mat(n_embd, n_ff)),
        ]

    def write(tmp: Path) -> None:
        w = GGUFWriter(str(tmp), "qwen2vl")
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
        # INT32 array of 4 (llama_model_loader::get_key_or_arr accepts INT32/UINT32 arrays)
        w.add_array("qwen2vl.rope.dimension_sections", list(rope_sections))
        w.add_vocab_size(n_vocab)
        add_vocab_and_extra_kv(w, tok_kv, chat_template, extra_kv)
        finish_gguf(w, tensors)

    return _write_atomic(Path(path), write)


# The text width the projector must produce by default: make_tiny_qwen2vl's n_embd.
TINY_QWEN2VL_N_EMBD: int = inspect.signature(make_tiny_qwen2vl).parameters["n_embd"].default


def make_tiny_qwen2vl_mmproj(
    path: str | os.PathLike[str],
    *,
    n_embd_text: int = TINY_QWEN2VL_N_EMBD,
    image_size: int = DEFAULT_IMAGE_SIZE,
    patch_size: int = DEFAULT_PATCH_SIZE,
    seed: int = 0,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_ff: int = 64,
    n_hidden: int | None = None,
    post_ln: bool = True,
    use_gelu: bool = False,
    eps: float = 1e-6,
    dtype: str = "f32",
    scale: float = 0.02,
    proj_scale: float | None = None,
    image_mean: tuple[float, float, float] = CLIP_IMAGE_MEAN,
    image_std: tuple[float, float, float] = CLIP_IMAGE_STD,
    name: str = "tiny-qwen2vl-mmproj",
) -> Path:
    """Write a tiny random Qwen2-VL projector (projector type "qwen2vl_merger") and return its path.

    n_embd_text   output width (mm.2); must equal the text model's n_embd (default:
                  make_tiny_qwen2vl's) or mtmd_init_from_file refuses the pair.
    image_size    clip.vision.image_size (required key, unused by the dynamic resize).
    patch_size    the grid of an image is expected_grid(W, H, patch_size=patch_size).
    n_embd, n_layer, n_head, n_ff   the vision transformer; n_embd // n_head must be a
                  multiple of 4 (the encoder's 2-D M-RoPE uses d_head/4 per section).
    n_hidden      the merger MLP's hidden width (default 4 * n_embd, as in Qwen2-VL).
    post_ln       write v.post_ln (Qwen2-VL's merger.ln_q).
    use_gelu      clip.use_gelu: encoder FFN uses GELU instead of quick-GELU.
    dtype         "f32" or "f16" for the 2-D matrices and the patch kernels.
    scale         std of the encoder's random weights; proj_scale: std of the merger's
                  (default 1/sqrt(fan_in) per matrix, so image embeddings steer the model).
    """
    if dtype not in ("f32", "f16"):
        raise ValueError("dtype must be 'f32' or 'f16'")
    if patch_size <= 0 or image_size <= 0 or image_size % (patch_size * SPATIAL_MERGE):
        raise ValueError("image_size must be a positive multiple of 2 * patch_size")
    if n_embd % n_head or (n_embd // n_head) % 4:
        raise ValueError("n_embd // n_head must be a multiple of 4")
    if n_layer < 1:
        raise ValueError("n_layer must be >= 1")
    n_merged = n_embd * SPATIAL_MERGE * SPATIAL_MERGE
    n_hid = n_merged if n_hidden is None else n_hidden

    rng = np.random.default_rng(seed)
    mat_dtype = np.float32 if dtype == "f32" else np.float16

    def noise(shape, s: float) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(s)

    def mat(rows: int, cols: int, s: float | None = None) -> np.ndarray:
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
    # ggml_conv_2d kernels: ne = {patch, patch, 3 channels, n_embd}; two temporal frames
    tensors.append(("v.patch_embd.weight", noise((n_embd, 3, patch_size, patch_size), scale).astype(mat_dtype)))
    tensors.append(("v.patch_embd.weight.1", noise((n_embd, 3, patch_size, patch_size), scale).astype(mat_dtype)))
    for i in range(n_layer):
        tensors += vision_block(f"v.blk.{i}", n_embd, n_ff, mat, vec)
    if post_ln:
        tensors.append(("v.post_ln.weight", ones(n_embd)))
        tensors.append(("v.post_ln.bias", zeros(n_embd)))
    tensors += [
        ("mm.0.weight", mat(n_hid, n_merged, pscale(n_merged))),
        ("mm.0.bias", zeros(n_hid)),
        ("mm.2.weight", mat(n_embd_text, n_hid, pscale(n_hid))),
        ("mm.2.bias", zeros(n_embd_text)),
    ]

    def write(tmp: Path) -> None:
        w = GGUFWriter(str(tmp), "clip")  # general.architecture = "clip"
        w.add_name(name)
        w.add_description("tiny random Qwen2-VL (qwen2vl_merger) projector for unit tests")
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        w.add_string("clip.projector_type", "qwen2vl_merger")
        w.add_bool("clip.has_vision_encoder", True)
        w.add_bool("clip.has_audio_encoder", False)
        w.add_bool("clip.use_gelu", use_gelu)
        # integers must be UINT32 (gguf_get_val_u32 aborts on any other type)
        w.add_uint32("clip.vision.image_size", image_size)
        w.add_uint32("clip.vision.patch_size", patch_size)
        w.add_uint32("clip.vision.embedding_length", n_embd)
        w.add_uint32("clip.vision.feed_forward_length", n_ff)
        w.add_uint32("clip.vision.block_count", n_layer)
        w.add_uint32("clip.vision.projection_dim", n_embd_text)
        w.add_uint32("clip.vision.attention.head_count", n_head)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", eps)
        w.add_array("clip.vision.image_mean", [float(x) for x in image_mean])  # float32 array
        w.add_array("clip.vision.image_std", [float(x) for x in image_std])
        finish_gguf(w, tensors)

    return _write_atomic(Path(path), write)


if __name__ == "__main__":  # python tests/tiny_qwen2vl.py OUTDIR
    import sys

    outdir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    text = make_tiny_qwen2vl(outdir / "tiny-qwen2vl.gguf")
    proj = make_tiny_qwen2vl_mmproj(outdir / "tiny-qwen2vl-mmproj.gguf")
    print(text, text.stat().st_size, "bytes")
    print(proj, proj.stat().st_size, "bytes")
    nx, ny = TEST_IMAGE_GRID
    print(f"test image {TEST_IMAGE_SIZE[0]}x{TEST_IMAGE_SIZE[1]}: grid nx={nx} ny={ny}, "
          f"{nx * ny} image tokens, {max(nx, ny)} positions")
