"""The module-level functions of llama-cpp-python's ``llama_cpp.llama_cpp`` that libraries
call to read a model's vocabulary (outlines' ``LlamaCppTokenizer``, llguidance's
``lltokenizer_from_vocab``), plus the constants and capability queries they and LangChain read.

llama-cpp-python hands out raw ctypes pointers (``Llama.model``, ``llama_model_get_vocab``).
pyllama never does: C pointers stay inside ``pyllama._core``.  Here a model is an opaque
:class:`_ModelHandle` (what the compat ``Llama.model`` returns: ``model_handle(llm)``) and a
vocabulary an opaque :class:`_VocabHandle`; the functions below accept those (and, for
convenience, a ``pyllama.LLM``, a compat ``Llama``, a ``pyllama._core.Model`` or ``Vocab``).
Anything else -- an integer address, a ctypes pointer -- is a TypeError that says so.

Functions that fill a caller's buffer in C (``llama_token_to_piece``, ``llama_tokenize``,
``llama_detokenize``, ``llama_model_desc``, ``llama_model_meta_val_str``) really write into it:
the buffer may be a ctypes array (``(ctypes.c_char * n)()``, ``ctypes.create_string_buffer``,
``(ctypes.c_int32 * n)()``), a ctypes pointer, a bytearray or a writable memoryview.  They keep
llama.cpp's return conventions: the number of bytes/tokens written, or minus the size needed
when the buffer is too small (nothing is written then).

The C functions themselves (``_lib``) are not available: code that takes their addresses
(llguidance) cannot run on pyllama.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any, List, Optional, Union

from pyllama import _core

# --------------------------------------------------------------------------- ctypes type names
# Names llama-cpp-python exports for annotations and buffers (llguidance annotates with
# llama_cpp.llama_vocab_p, evaluated when its module is imported).

llama_token = ctypes.c_int32
llama_token_p = ctypes.POINTER(ctypes.c_int32)
llama_pos = ctypes.c_int32
llama_seq_id = ctypes.c_int32


class _ModelHandle:
    """An opaque stand-in for llama-cpp-python's ``llama_model_p``: a loaded pyllama model.

    Made by :func:`model_handle`; the low-level functions here accept it.  It keeps the model
    (and the LLM that owns it) alive and exposes nothing else; it is not a C pointer.
    """

    __slots__ = ("_model", "_owner", "__weakref__")

    def __init__(self, model: "_core.Model", owner: Any = None) -> None:
        if not isinstance(model, _core.Model):
            raise TypeError(f"_ModelHandle wraps a pyllama._core.Model, not {type(model).__name__}")
        self._model = model
        self._owner = owner

    def __repr__(self) -> str:
        return f"<llama_model handle: {self._model.description}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ModelHandle) and other._model is self._model

    def __hash__(self) -> int:
        return hash(id(self._model))


class _VocabHandle:
    """An opaque stand-in for llama-cpp-python's ``llama_vocab_p``: a model's vocabulary."""

    __slots__ = ("_vocab", "_model", "__weakref__")

    def __init__(self, vocab: "_core.Vocab", model: Optional[_ModelHandle] = None) -> None:
        if not isinstance(vocab, _core.Vocab):
            raise TypeError(f"_VocabHandle wraps a pyllama._core.Vocab, not {type(vocab).__name__}")
        self._vocab = vocab
        self._model = model

    def __repr__(self) -> str:
        return f"<llama_vocab handle: {self._vocab.type}, {self._vocab.n_tokens} tokens>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _VocabHandle) and other._vocab is self._vocab

    def __hash__(self) -> int:
        return hash(id(self._vocab))


# Type names for annotations (llama-cpp-python's are NewType(int)).
llama_model_p = _ModelHandle
llama_vocab_p = _VocabHandle


class _Unavailable:
    """Stands for llama-cpp-python's ctypes library object (``llama_cpp.llama_cpp._lib``)."""

    def __getattr__(self, name: str) -> Any:
        raise NotImplementedError(
            f"llama_cpp._lib.{name}: pyllama's llama_cpp compatibility layer has no raw C functions "
            "(no ctypes library, no pointers); use the Llama class or the functions of this module")

    def __repr__(self) -> str:
        return "<pyllama: no ctypes library>"


_lib = _Unavailable()


def model_handle(obj: Any) -> _ModelHandle:
    """The handle of a pyllama model: `obj` is a ``pyllama.LLM``, a compat ``Llama``, a
    ``pyllama._core.Model`` or already a handle.  (What the compat ``Llama.model`` returns.)"""
    if isinstance(obj, _ModelHandle):
        return obj
    if isinstance(obj, _core.Model):
        return _ModelHandle(obj)
    for attr in ("_llm", "llm"):  # the compat Llama holds its pyllama.LLM
        inner = getattr(obj, attr, None)
        model = getattr(inner, "model", None) if inner is not None else None
        if isinstance(model, _core.Model):
            return _ModelHandle(model, obj)
    model = getattr(obj, "model", None)  # a pyllama.LLM, or a Llama whose .model is a handle
    if isinstance(model, _ModelHandle):
        return model
    if isinstance(model, _core.Model):
        return _ModelHandle(model, obj)
    raise TypeError(_not_a_handle("model", obj))


def _not_a_handle(what: str, obj: Any) -> str:
    if isinstance(obj, (int, ctypes.c_void_p, ctypes._Pointer)) or type(obj).__name__.endswith("_p"):  # type: ignore[attr-defined]
        return (f"a raw llama_{what} pointer ({type(obj).__name__}) is not supported: pyllama keeps C pointers "
                f"inside its extension; pass Llama.model / llama_model_get_vocab(Llama.model) handles")
    return (f"expected a llama_{what} handle (from Llama.model / llama_model_get_vocab), "
            f"not {type(obj).__name__}")


def _model(obj: Any) -> "_core.Model":
    if isinstance(obj, _ModelHandle):
        return obj._model
    if isinstance(obj, _VocabHandle) and obj._model is not None:
        return obj._model._model
    return model_handle(obj)._model


def _vocab(obj: Any) -> "_core.Vocab":
    if isinstance(obj, _VocabHandle):
        return obj._vocab
    if isinstance(obj, _core.Vocab):
        return obj
    try:
        return _model(obj).vocab
    except TypeError:
        raise TypeError(_not_a_handle("vocab", obj)) from None


# --------------------------------------------------------------------------- buffers


def _writable_size(buf: Any) -> Optional[int]:
    """How many bytes `buf` holds, when it knows (None for a bare pointer)."""
    if isinstance(buf, ctypes.Array):
        return ctypes.sizeof(buf)
    if isinstance(buf, (bytearray, memoryview)):
        return memoryview(buf).nbytes
    return None


def _write(buf: Any, data: bytes, length: int, what: str) -> None:
    """Copy `data` to the start of `buf` as C would, refusing to overrun a sized buffer."""
    n = len(data)
    if n == 0:
        return
    size = _writable_size(buf)
    if size is not None and size < min(n, length):
        raise ValueError(f"{what}: the buffer holds {size} bytes but length says {length}")
    if isinstance(buf, (bytearray, memoryview)):
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise TypeError(f"{what}: the buffer is read-only")
        view[:n] = data
        return
    if isinstance(buf, (ctypes.Array, ctypes._Pointer, ctypes.c_char_p, ctypes.c_void_p)):  # type: ignore[attr-defined]
        ctypes.memmove(buf, data, n)
        return
    raise TypeError(f"{what}: expected a ctypes buffer (ctypes.create_string_buffer(n) or (ctypes.c_char * n)()), "
                    f"a bytearray or a writable memoryview, not {type(buf).__name__}")


def _check_length(length: Any, what: str) -> int:
    if isinstance(length, ctypes._SimpleCData):  # type: ignore[attr-defined]
        length = length.value
    if not isinstance(length, int) or isinstance(length, bool):
        raise TypeError(f"{what} must be an int, not {type(length).__name__}")
    return length


def _int(value: Any) -> int:
    return int(value.value) if isinstance(value, ctypes._SimpleCData) else int(value)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- system


def llama_backend_init() -> None:
    """Nothing to do: pyllama initialises llama.cpp's backends when it is imported."""


def llama_backend_free() -> None:
    """Nothing to do: pyllama frees llama.cpp's backends at exit."""


def llama_time_us() -> int:
    return int(time.monotonic() * 1_000_000)


def llama_max_devices() -> int:
    return int(_core.max_devices())


def llama_supports_mmap() -> bool:
    return bool(_core.supports_mmap())


def llama_supports_mlock() -> bool:
    return bool(_core.supports_mlock())


def llama_supports_gpu_offload() -> bool:
    return bool(_core.supports_gpu_offload())


def llama_supports_rpc() -> bool:
    return bool(_core.supports_rpc())


def llama_print_system_info() -> bytes:
    """llama.cpp's system info line, as bytes (llama-cpp-python returns the C string)."""
    return _core.system_info().encode("utf-8")


# --------------------------------------------------------------------------- model


def llama_model_get_vocab(model: Any) -> _VocabHandle:
    """The vocabulary handle of a model handle (``Llama.model``)."""
    handle = model_handle(model)
    return _VocabHandle(handle._model.vocab, handle)


def llama_model_n_ctx_train(model: Any) -> int:
    return int(_model(model).n_ctx_train)


def llama_model_n_embd(model: Any) -> int:
    return int(_model(model).n_embd)


def llama_model_n_layer(model: Any) -> int:
    return int(_model(model).n_layer)


def llama_model_n_head(model: Any) -> int:
    return int(_model(model).n_head)


def llama_model_n_head_kv(model: Any) -> int:
    return int(_model(model).n_head_kv)


def llama_model_size(model: Any) -> int:
    return int(_model(model).size)


def llama_model_n_params(model: Any) -> int:
    return int(_model(model).n_params)


def llama_model_has_encoder(model: Any) -> bool:
    return bool(_model(model).has_encoder)


# Deprecated llama.h names that llama-cpp-python still exports.
llama_n_ctx_train = llama_model_n_ctx_train
llama_n_embd = llama_model_n_embd
llama_n_layer = llama_model_n_layer
llama_n_head = llama_model_n_head


def llama_model_desc(model: Any, buf: Any, buf_size: int) -> int:
    """Write the model's description (NUL-terminated, truncated to fit) into `buf`; returns
    the description's full length, as snprintf does."""
    text = _model(model).description.encode("utf-8")
    size = _check_length(buf_size, "buf_size")
    if size > 0:
        _write(buf, text[: size - 1] + b"\0", size, "llama_model_desc")
    return len(text)


def llama_model_meta_val_str(model: Any, key: Union[bytes, str], buf: Any, buf_size: int) -> int:
    """Write the metadata value of `key` (NUL-terminated, truncated to fit) into `buf`;
    returns its full length, or -1 when the model has no such key."""
    name = key.decode("utf-8") if isinstance(key, (bytes, bytearray)) else str(key)
    value = _model(model).meta(name)
    if value is None:
        return -1
    data = value.encode("utf-8")
    size = _check_length(buf_size, "buf_size")
    if size > 0:
        _write(buf, data[: size - 1] + b"\0", size, "llama_model_meta_val_str")
    return len(data)


def llama_model_meta_count(model: Any) -> int:
    return len(_model(model).metadata)


def llama_model_chat_template(model: Any, name: Optional[Union[bytes, str]] = None) -> Optional[bytes]:
    """The model's chat template (or the one called `name`) as bytes, None when it has none."""
    if isinstance(name, (bytes, bytearray)):
        name = name.decode("utf-8")
    template = _model(model).chat_template(name)
    return None if template is None else template.encode("utf-8")


# --------------------------------------------------------------------------- vocabulary

_VOCAB_TYPE_IDS = {"none": 0, "spm": 1, "bpe": 2, "wpm": 3, "ugm": 4, "rwkv": 5, "plamo2": 6}


def llama_vocab_type(vocab: Any) -> int:
    """LLAMA_VOCAB_TYPE_* of the vocabulary (LLAMA_VOCAB_TYPE_NONE when pyllama does not know it)."""
    return _VOCAB_TYPE_IDS.get(_vocab(vocab).type, 0)


def llama_vocab_n_tokens(vocab: Any) -> int:
    return int(_vocab(vocab).n_tokens)


# llama-cpp-python 0.3.x: llama_n_vocab takes the vocab (llama.h's deprecated alias).
llama_n_vocab = llama_vocab_n_tokens


def llama_vocab_get_text(vocab: Any, token: int) -> bytes:
    """The token's text in the vocabulary (bytes, as llama-cpp-python returns the C string;
    text that is not valid UTF-8 comes back with U+FFFD in its place)."""
    return _vocab(vocab).token_text(_int(token)).encode("utf-8")


def llama_vocab_get_score(vocab: Any, token: int) -> float:
    return float(_vocab(vocab).token_score(_int(token)))


def llama_vocab_get_attr(vocab: Any, token: int) -> int:
    return int(_vocab(vocab).token_attr(_int(token)))


def llama_vocab_is_eog(vocab: Any, token: int) -> bool:
    return bool(_vocab(vocab).is_eog(_int(token)))


def llama_vocab_is_control(vocab: Any, token: int) -> bool:
    return bool(_vocab(vocab).is_control(_int(token)))


def llama_vocab_bos(vocab: Any) -> int:
    return int(_vocab(vocab).bos)


def llama_vocab_eos(vocab: Any) -> int:
    return int(_vocab(vocab).eos)


def llama_vocab_eot(vocab: Any) -> int:
    return int(_vocab(vocab).eot)


def llama_vocab_sep(vocab: Any) -> int:
    return int(_vocab(vocab).sep)


def llama_vocab_nl(vocab: Any) -> int:
    return int(_vocab(vocab).nl)


def llama_vocab_pad(vocab: Any) -> int:
    return int(_vocab(vocab).pad)


def llama_vocab_mask(vocab: Any) -> int:
    return int(_vocab(vocab).mask)


def llama_vocab_cls(vocab: Any) -> int:
    """llama.h's deprecated llama_vocab_cls: the BOS token."""
    return int(_vocab(vocab).bos)


def llama_vocab_get_add_bos(vocab: Any) -> bool:
    return bool(_vocab(vocab).add_bos)


def llama_vocab_get_add_eos(vocab: Any) -> bool:
    return bool(_vocab(vocab).add_eos)


def llama_vocab_fim_pre(vocab: Any) -> int:
    return int(_vocab(vocab).fim_pre)


def llama_vocab_fim_suf(vocab: Any) -> int:
    return int(_vocab(vocab).fim_suf)


def llama_vocab_fim_mid(vocab: Any) -> int:
    return int(_vocab(vocab).fim_mid)


def llama_vocab_fim_pad(vocab: Any) -> int:
    return int(_vocab(vocab).fim_pad)


def llama_vocab_fim_rep(vocab: Any) -> int:
    return int(_vocab(vocab).fim_rep)


def llama_vocab_fim_sep(vocab: Any) -> int:
    return int(_vocab(vocab).fim_sep)


# Deprecated llama.h names (taking the vocab) that llama-cpp-python 0.3.x exports.
llama_token_get_text = llama_vocab_get_text
llama_token_get_score = llama_vocab_get_score
llama_token_get_attr = llama_vocab_get_attr
llama_token_is_eog = llama_vocab_is_eog
llama_token_is_control = llama_vocab_is_control
llama_token_bos = llama_vocab_bos
llama_token_eos = llama_vocab_eos
llama_token_eot = llama_vocab_eot
llama_token_cls = llama_vocab_cls
llama_token_sep = llama_vocab_sep
llama_token_nl = llama_vocab_nl
llama_token_pad = llama_vocab_pad
llama_add_bos_token = llama_vocab_get_add_bos
llama_add_eos_token = llama_vocab_get_add_eos
llama_token_fim_pre = llama_vocab_fim_pre
llama_token_fim_suf = llama_vocab_fim_suf
llama_token_fim_mid = llama_vocab_fim_mid
llama_token_fim_pad = llama_vocab_fim_pad
llama_token_fim_rep = llama_vocab_fim_rep
llama_token_fim_sep = llama_vocab_fim_sep


# --------------------------------------------------------------------------- tokenization


def llama_token_to_piece(vocab: Any, token: int, buf: Any, length: int, lstrip: int, special: bool) -> int:
    """Write the bytes of `token` into `buf` (no NUL); returns how many were written, or
    minus the size needed when `length` is too small (then nothing is written).  `lstrip`
    removes up to that many leading spaces; `special` renders control tokens' text."""
    length = _check_length(length, "length")
    piece = _vocab(vocab).token_to_piece(_int(token), special=bool(special), lstrip=max(_int(lstrip), 0))
    if len(piece) > length:
        return -len(piece)
    _write(buf, piece, length, "llama_token_to_piece")
    return len(piece)


def _token_ids(tokens: Any, n_tokens: int) -> List[int]:
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if isinstance(tokens, ctypes.Array) or isinstance(tokens, ctypes._Pointer):  # type: ignore[attr-defined]
        return [int(tokens[i]) for i in range(n_tokens)]
    seq = list(tokens)
    if len(seq) < n_tokens:
        raise ValueError(f"n_tokens is {n_tokens} but only {len(seq)} tokens were given")
    return [int(t) for t in seq[:n_tokens]]


def llama_tokenize(vocab: Any, text: Union[bytes, str], text_len: int, tokens: Any, n_tokens_max: int,
                   add_special: bool, parse_special: bool) -> int:
    """Tokenize the first `text_len` bytes of `text` into the int32 array `tokens`; returns
    the number of tokens, or minus the number needed when `n_tokens_max` is too small."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    text_len = _check_length(text_len, "text_len")
    n_tokens_max = _check_length(n_tokens_max, "n_tokens_max")
    ids = _vocab(vocab).tokenize(data[: max(text_len, 0)], add_special=bool(add_special),
                                 parse_special=bool(parse_special))
    if len(ids) > n_tokens_max:
        return -len(ids)
    if ids:
        if isinstance(tokens, list):
            tokens[: len(ids)] = ids
        else:
            array = (ctypes.c_int32 * len(ids))(*ids)
            _write(tokens, bytes(array), n_tokens_max * ctypes.sizeof(ctypes.c_int32), "llama_tokenize")
    return len(ids)


def llama_detokenize(vocab: Any, tokens: Any, n_tokens: int, text: Any, text_len_max: int,
                     remove_special: bool, unparse_special: bool) -> int:
    """Write the text of `tokens[:n_tokens]` into `text` (no NUL); returns its length in
    bytes, or minus the size needed when `text_len_max` is too small."""
    text_len_max = _check_length(text_len_max, "text_len_max")
    ids = _token_ids(tokens, _check_length(n_tokens, "n_tokens"))
    data = _vocab(vocab).detokenize_bytes(ids, remove_special=bool(remove_special),
                                          unparse_special=bool(unparse_special))
    if len(data) > text_len_max:
        return -len(data)
    _write(text, data, text_len_max, "llama_detokenize")
    return len(data)


# --------------------------------------------------------------------------- constants
# llama-cpp-python 0.3.36's llama_cpp.llama_cpp constants (llama.h / ggml.h enums).

LLAMA_MAX_DEVICES = llama_max_devices()
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q4_1 = 3
GGML_TYPE_Q5_0 = 6
GGML_TYPE_Q5_1 = 7
GGML_TYPE_Q8_0 = 8
GGML_TYPE_Q8_1 = 9
GGML_TYPE_Q2_K = 10
GGML_TYPE_Q3_K = 11
GGML_TYPE_Q4_K = 12
GGML_TYPE_Q5_K = 13
GGML_TYPE_Q6_K = 14
GGML_TYPE_Q8_K = 15
GGML_TYPE_IQ2_XXS = 16
GGML_TYPE_IQ2_XS = 17
GGML_TYPE_IQ3_XXS = 18
GGML_TYPE_IQ1_S = 19
GGML_TYPE_IQ4_NL = 20
GGML_TYPE_IQ3_S = 21
GGML_TYPE_IQ2_S = 22
GGML_TYPE_IQ4_XS = 23
GGML_TYPE_I8 = 24
GGML_TYPE_I16 = 25
GGML_TYPE_I32 = 26
GGML_TYPE_I64 = 27
GGML_TYPE_F64 = 28
GGML_TYPE_IQ1_M = 29
GGML_TYPE_MXFP4 = 39
GGML_TYPE_NVFP4 = 40
GGML_TYPE_Q1_0 = 41
GGML_TYPE_Q2_0 = 42
GGML_TYPE_COUNT = 43
LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_TOKEN_NULL = -1
LLAMA_FILE_MAGIC_GGLA = 0x67676C61
LLAMA_FILE_MAGIC_GGSN = 0x6767736E
LLAMA_FILE_MAGIC_GGSQ = 0x67677371
LLAMA_SESSION_MAGIC = LLAMA_FILE_MAGIC_GGSN
LLAMA_SESSION_VERSION = 10
LLAMA_STATE_SEQ_MAGIC = LLAMA_FILE_MAGIC_GGSQ
LLAMA_STATE_SEQ_VERSION = 3
LLAMA_VOCAB_TYPE_NONE = 0
LLAMA_VOCAB_TYPE_SPM = 1
LLAMA_VOCAB_TYPE_BPE = 2
LLAMA_VOCAB_TYPE_WPM = 3
LLAMA_VOCAB_TYPE_UGM = 4
LLAMA_VOCAB_TYPE_RWKV = 5
LLAMA_VOCAB_TYPE_PLAMO2 = 6
LLAMA_VOCAB_TYPE_TEST = 7
LLAMA_VOCAB_PRE_TYPE_DEFAULT = 0
LLAMA_VOCAB_PRE_TYPE_LLAMA3 = 1
LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM = 2
LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER = 3
LLAMA_VOCAB_PRE_TYPE_FALCON = 4
LLAMA_VOCAB_PRE_TYPE_MPT = 5
LLAMA_VOCAB_PRE_TYPE_STARCODER = 6
LLAMA_VOCAB_PRE_TYPE_GPT2 = 7
LLAMA_VOCAB_PRE_TYPE_REFACT = 8
LLAMA_VOCAB_PRE_TYPE_COMMAND_R = 9
LLAMA_VOCAB_PRE_TYPE_STABLELM2 = 10
LLAMA_VOCAB_PRE_TYPE_QWEN2 = 11
LLAMA_VOCAB_PRE_TYPE_OLMO = 12
LLAMA_VOCAB_PRE_TYPE_DBRX = 13
LLAMA_VOCAB_PRE_TYPE_SMAUG = 14
LLAMA_VOCAB_PRE_TYPE_PORO = 15
LLAMA_VOCAB_PRE_TYPE_CHATGLM3 = 16
LLAMA_VOCAB_PRE_TYPE_CHATGLM4 = 17
LLAMA_VOCAB_PRE_TYPE_VIKING = 18
LLAMA_VOCAB_PRE_TYPE_JAIS = 19
LLAMA_VOCAB_PRE_TYPE_TEKKEN = 20
LLAMA_VOCAB_PRE_TYPE_SMOLLM = 21
LLAMA_VOCAB_PRE_TYPE_CODESHELL = 22
LLAMA_VOCAB_PRE_TYPE_BLOOM = 23
LLAMA_VOCAB_PRE_TYPE_GPT3_FINNISH = 24
LLAMA_VOCAB_PRE_TYPE_EXAONE = 25
LLAMA_VOCAB_PRE_TYPE_CHAMELEON = 26
LLAMA_VOCAB_PRE_TYPE_MINERVA = 27
LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM = 28
LLAMA_VOCAB_PRE_TYPE_GPT4O = 29
LLAMA_VOCAB_PRE_TYPE_SUPERBPE = 30
LLAMA_VOCAB_PRE_TYPE_TRILLION = 31
LLAMA_VOCAB_PRE_TYPE_BAILINGMOE = 32
LLAMA_VOCAB_PRE_TYPE_LLAMA4 = 33
LLAMA_VOCAB_PRE_TYPE_PIXTRAL = 34
LLAMA_VOCAB_PRE_TYPE_SEED_CODER = 35
LLAMA_ROPE_TYPE_NONE = -1
LLAMA_ROPE_TYPE_NORM = 0
LLAMA_ROPE_TYPE_NEOX = GGML_ROPE_TYPE_NEOX = 2
LLAMA_ROPE_TYPE_MROPE = GGML_ROPE_TYPE_MROPE = 8
LLAMA_ROPE_TYPE_IMROPE = GGML_ROPE_TYPE_IMROPE = 40
LLAMA_ROPE_TYPE_VISION = GGML_ROPE_TYPE_VISION = 24
LLAMA_TOKEN_TYPE_UNDEFINED = 0
LLAMA_TOKEN_TYPE_NORMAL = 1
LLAMA_TOKEN_TYPE_UNKNOWN = 2
LLAMA_TOKEN_TYPE_CONTROL = 3
LLAMA_TOKEN_TYPE_USER_DEFINED = 4
LLAMA_TOKEN_TYPE_UNUSED = 5
LLAMA_TOKEN_TYPE_BYTE = 6
LLAMA_TOKEN_ATTR_UNDEFINED = 0
LLAMA_TOKEN_ATTR_UNKNOWN = 1 << 0
LLAMA_TOKEN_ATTR_UNUSED = 1 << 1
LLAMA_TOKEN_ATTR_NORMAL = 1 << 2
LLAMA_TOKEN_ATTR_CONTROL = 1 << 3
LLAMA_TOKEN_ATTR_USER_DEFINED = 1 << 4
LLAMA_TOKEN_ATTR_BYTE = 1 << 5
LLAMA_TOKEN_ATTR_NORMALIZED = 1 << 6
LLAMA_TOKEN_ATTR_LSTRIP = 1 << 7
LLAMA_TOKEN_ATTR_RSTRIP = 1 << 8
LLAMA_TOKEN_ATTR_SINGLE_WORD = 1 << 9
LLAMA_FTYPE_ALL_F32 = 0
LLAMA_FTYPE_MOSTLY_F16 = 1
LLAMA_FTYPE_MOSTLY_Q4_0 = 2
LLAMA_FTYPE_MOSTLY_Q4_1 = 3
LLAMA_FTYPE_MOSTLY_Q8_0 = 7
LLAMA_FTYPE_MOSTLY_Q5_0 = 8
LLAMA_FTYPE_MOSTLY_Q5_1 = 9
LLAMA_FTYPE_MOSTLY_Q2_K = 10
LLAMA_FTYPE_MOSTLY_Q3_K_S = 11
LLAMA_FTYPE_MOSTLY_Q3_K_M = 12
LLAMA_FTYPE_MOSTLY_Q3_K_L = 13
LLAMA_FTYPE_MOSTLY_Q4_K_S = 14
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15
LLAMA_FTYPE_MOSTLY_Q5_K_S = 16
LLAMA_FTYPE_MOSTLY_Q5_K_M = 17
LLAMA_FTYPE_MOSTLY_Q6_K = 18
LLAMA_FTYPE_MOSTLY_IQ2_XXS = 19
LLAMA_FTYPE_MOSTLY_IQ2_XS = 20
LLAMA_FTYPE_MOSTLY_Q2_K_S = 21
LLAMA_FTYPE_MOSTLY_IQ3_XS = 22
LLAMA_FTYPE_MOSTLY_IQ3_XXS = 23
LLAMA_FTYPE_MOSTLY_IQ1_S = 24
LLAMA_FTYPE_MOSTLY_IQ4_NL = 25
LLAMA_FTYPE_MOSTLY_IQ3_S = 26
LLAMA_FTYPE_MOSTLY_IQ3_M = 27
LLAMA_FTYPE_MOSTLY_IQ2_S = 28
LLAMA_FTYPE_MOSTLY_IQ2_M = 29
LLAMA_FTYPE_MOSTLY_IQ4_XS = 30
LLAMA_FTYPE_MOSTLY_IQ1_M = 31
LLAMA_FTYPE_MOSTLY_BF16 = 32
LLAMA_FTYPE_MOSTLY_TQ1_0 = 36
LLAMA_FTYPE_MOSTLY_TQ2_0 = 37
LLAMA_FTYPE_MOSTLY_MXFP4_MOE = 38
LLAMA_FTYPE_MOSTLY_NVFP4 = 39
LLAMA_FTYPE_MOSTLY_Q1_0 = 40
LLAMA_FTYPE_MOSTLY_Q2_0 = 41
LLAMA_FTYPE_GUESSED = 1024
LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED = -1
LLAMA_ROPE_SCALING_TYPE_NONE = 0
LLAMA_ROPE_SCALING_TYPE_LINEAR = 1
LLAMA_ROPE_SCALING_TYPE_YARN = 2
LLAMA_ROPE_SCALING_TYPE_LONGROPE = 3
LLAMA_ROPE_SCALING_TYPE_MAX_VALUE = LLAMA_ROPE_SCALING_TYPE_LONGROPE
LLAMA_POOLING_TYPE_UNSPECIFIED = -1
LLAMA_POOLING_TYPE_NONE = 0
LLAMA_POOLING_TYPE_MEAN = 1
LLAMA_POOLING_TYPE_CLS = 2
LLAMA_POOLING_TYPE_LAST = 3
LLAMA_POOLING_TYPE_RANK = 4
LLAMA_ATTENTION_TYPE_UNSPECIFIED = -1
LLAMA_ATTENTION_TYPE_CAUSAL = 0
LLAMA_ATTENTION_TYPE_NON_CAUSAL = 1
LLAMA_FLASH_ATTN_TYPE_AUTO = -1
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0
LLAMA_FLASH_ATTN_TYPE_ENABLED = 1
LLAMA_SPLIT_MODE_NONE = 0
LLAMA_SPLIT_MODE_LAYER = 1
LLAMA_SPLIT_MODE_ROW = 2
LLAMA_SPLIT_MODE_TENSOR = 3
LLAMA_LOAD_MODE_AUTO = -1
LLAMA_LOAD_MODE_NONE = 0
LLAMA_LOAD_MODE_MMAP = 1
LLAMA_LOAD_MODE_MLOCK = 2
LLAMA_LOAD_MODE_MMAP_MLOCK = 3
LLAMA_LOAD_MODE_DIRECT_IO = 4
LLAMA_LAZY_MODE_OFF = 0
LLAMA_LAZY_MODE_AUTO = 1
LLAMA_LAZY_MODE_ON = 2
LLAMA_CONTEXT_TYPE_DEFAULT = 0
LLAMA_CONTEXT_TYPE_MTP = 1
LLAMA_KV_OVERRIDE_TYPE_INT = 0
LLAMA_KV_OVERRIDE_TYPE_FLOAT = 1
LLAMA_KV_OVERRIDE_TYPE_BOOL = 2
LLAMA_KV_OVERRIDE_TYPE_STR = 3
LLAMA_MODEL_META_KEY_SAMPLING_SEQUENCE = 0
LLAMA_MODEL_META_KEY_SAMPLING_TOP_K = 1
LLAMA_MODEL_META_KEY_SAMPLING_TOP_P = 2
LLAMA_MODEL_META_KEY_SAMPLING_MIN_P = 3
LLAMA_MODEL_META_KEY_SAMPLING_XTC_PROBABILITY = 4
LLAMA_MODEL_META_KEY_SAMPLING_XTC_THRESHOLD = 5
LLAMA_MODEL_META_KEY_SAMPLING_TEMP = 6
LLAMA_MODEL_META_KEY_SAMPLING_PENALTY_LAST_N = 7
LLAMA_MODEL_META_KEY_SAMPLING_PENALTY_REPEAT = 8
LLAMA_MODEL_META_KEY_SAMPLING_MIROSTAT = 9
LLAMA_MODEL_META_KEY_SAMPLING_MIROSTAT_TAU = 10
LLAMA_MODEL_META_KEY_SAMPLING_MIROSTAT_ETA = 11
LLAMA_PROCESS_TYPE_ENCODE = 0
LLAMA_PROCESS_TYPE_DECODE = 1
GGML_NUMA_STRATEGY_DISABLED = 0
GGML_NUMA_STRATEGY_DISTRIBUTE = 1
GGML_NUMA_STRATEGY_ISOLATE = 2
GGML_NUMA_STRATEGY_NUMACTL = 3
GGML_NUMA_STRATEGY_MIRROR = 4
GGML_NUMA_STRATEGY_COUNT = 5
LLAMA_STATE_SEQ_FLAGS_NONE = 0
LLAMA_STATE_SEQ_FLAGS_SWA_ONLY = 1
LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY = 1
LLAMA_STATE_SEQ_FLAGS_ON_DEVICE = 2

__all__ = [name for name in list(globals()) if name.startswith(("llama_", "LLAMA_", "GGML_"))] + [
    "model_handle",
]
