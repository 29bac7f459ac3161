# cython: language_level=3, cdivision=True, embedsignature=True
# cython: freethreading_compatible=False
"""pyllama._core: the Cython layer over llama.h.

Layout (all included into this one extension module):
  _support.pxi   C helpers (their code is in src/cxx): signals/abort, UTF-8 scanning,
                 last-error capture; logging
  _model.pxi     Model, Vocab
  _batch.pxi     Batch (the tokens of one llama_decode)
  _context.pxi   Context, array views of its logits/embeddings
  _sampler.pxi   SamplerChain
  _mtmd.pxi      Multimodal, Bitmap, MediaPrompt (images/audio through llama.cpp's mtmd)
  _request.pxi   GenerationRequest (one request's state and output) and its hook helpers
  _prompt_cache.pxi  PromptCache: slot prompts kept in host memory (llama-server's --cache-ram)
  _engine.pxi    Engine: slots, prompt cache, queue, preemption, the step (continuous batching)
  _engine_memory.pxi  a slot's memory: checked removals, checkpoints on recurrent/hybrid models,
                 slot files, and saving to / loading from the PromptCache
  _speculation.pxi  drafting and verification inside the step
  _engine_sampling.pxi  choosing each request's next token (sampler, hooks, logprobs)

It imports only leaf modules of the package (pyllama.errors, ._cpu, ._media): nothing above it.

Every C pointer has one owner (a cdef class).  Inputs are validated here,
before C sees them: llama.cpp aborts the process on many bad arguments.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset, strlen
from libc.math cimport isfinite

from pyllama._llama cimport *
from pyllama._mtmd cimport *

import logging as _logging
import os as _os
import random as _random
import threading as _threading

# The extension imports only leaf modules of the package (pure Python, importing nothing of
# pyllama themselves): the layers above import the extension, never the other way round.
from pyllama import _cpu, _media
from pyllama.errors import (
    BatchCapacityError,
    ContextLengthError,
    DecodeAborted,
    DecodeError,
    GrammarError,
    InvalidSequenceError,
    InvalidTokenError,
    KVCacheFullError,
    ModelLoadError,
    OutOfMemoryError,
    detach_traceback as _detach_traceback,
)

include "_support.pxi"
include "_model.pxi"
include "_batch.pxi"
include "_context.pxi"
include "_sampler.pxi"
include "_mtmd.pxi"
include "_request.pxi"
include "_prompt_cache.pxi"
include "_engine.pxi"
include "_engine_memory.pxi"
include "_speculation.pxi"
include "_engine_sampling.pxi"


# --------------------------------------------------------------------------
# Module-level functions
# --------------------------------------------------------------------------

__llama_cpp_commit__ = _LLAMA_COMMIT


def system_info() -> str:
    """llama.cpp's one-line system info: CPU features and compiled-in backends.

    Portable builds (CPU backend variants loaded at run time) add
    ``CPU_VARIANT = <name>``: the ggml-cpu library chosen for this machine.
    """
    _ensure_backends_loaded()
    info = llama_print_system_info().decode("utf-8", "replace")
    # llama.cpp only prints backends that report features (BLAS, for one, does not):
    # name every other compiled-in backend too, so "was BLAS built in?" has an answer here.
    cdef size_t i
    for i in range(ggml_backend_reg_count()):
        name = _str(ggml_backend_reg_name(ggml_backend_reg_get(i)))
        if "[" not in name and f"{name} :" not in info and f"{name} = 1" not in info:
            info += f"{name} = 1 | "
    variant = _cpu_variant()
    if variant is not None:
        info += f"CPU_VARIANT = {variant} | "
    return info


_DEV_TYPES = {
    GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
}


cdef dict _device_info(ggml_backend_dev_t dev):
    cdef size_t free_mem = 0, total_mem = 0
    with nogil:
        ggml_backend_dev_memory(dev, &free_mem, &total_mem)
    return {
        "name": _str(ggml_backend_dev_name(dev)),
        "description": _str(ggml_backend_dev_description(dev)),
        "type": _DEV_TYPES.get(<int>ggml_backend_dev_get_type(dev), "unknown"),
        "memory_free": free_mem,
        "memory_total": total_mem,
    }


cdef object _backend_library(ggml_backend_reg_t reg):
    """Path of the shared library a backend was loaded from; None when it is part of _core."""
    cdef char buf[4096]
    if reg == NULL or not pyllama_library_of(<const void *>reg, buf, sizeof(buf)):
        return None
    path = _os.fsdecode(<bytes>buf)
    try:
        if _os.path.samefile(path, __file__):
            return None
    except OSError:
        pass
    return path


cdef object _variant_of(object library):
    """'haswell' for .../libggml-cpu-haswell.so (or ggml-cpu-haswell.dll), else None."""
    if library is None:
        return None
    stem = _os.path.basename(library).split(".")[0]
    if stem.startswith("lib"):
        stem = stem[3:]
    return stem[len("ggml-cpu-"):] if stem.startswith("ggml-cpu-") else None


cdef object _cpu_variant():
    _ensure_backends_loaded()
    cdef size_t i
    cdef ggml_backend_reg_t reg
    for i in range(ggml_backend_reg_count()):
        reg = ggml_backend_reg_get(i)
        if _str(ggml_backend_reg_name(reg)) == "CPU":
            return _variant_of(_backend_library(reg))
    return None


def backends() -> list:
    """Compiled-in (or loaded) backends and the devices each found, with memory.

    Each entry is ``{"name", "devices", "library"}``; ``library`` is the shared library the
    backend was loaded from (portable builds) or None when it is linked into the extension.
    The CPU entry of a portable build also has ``"variant"`` (e.g. ``"haswell"``).
    """
    _ensure_backends_loaded()
    out = []
    cdef size_t i, j
    cdef ggml_backend_reg_t reg
    for i in range(ggml_backend_reg_count()):
        reg = ggml_backend_reg_get(i)
        devices = [_device_info(ggml_backend_reg_dev_get(reg, j)) for j in range(ggml_backend_reg_dev_count(reg))]
        library = _backend_library(reg)
        entry = {"name": _str(ggml_backend_reg_name(reg)), "devices": devices, "library": library}
        variant = _variant_of(library)
        if variant is not None:
            entry["variant"] = variant
        out.append(entry)
    return out


def supports_gpu_offload() -> bool:
    return llama_supports_gpu_offload()


def supports_mmap() -> bool:
    return llama_supports_mmap()


def supports_mlock() -> bool:
    return llama_supports_mlock()


def supports_rpc() -> bool:
    return bool(PYLLAMA_RPC_AVAILABLE)


def max_devices() -> int:
    return llama_max_devices()


def max_parallel_sequences() -> int:
    return llama_max_parallel_sequences()


def chat_builtin_templates() -> list:
    """Names of the chat templates llama.cpp implements itself."""
    cdef int32_t n = llama_chat_builtin_templates(NULL, 0)
    cdef const char ** names = <const char **>calloc(max(n, 1), sizeof(char *))
    if names == NULL:
        raise MemoryError()
    try:
        n = llama_chat_builtin_templates(names, n)
        return [_str(names[i]) for i in range(n)]
    finally:
        free(names)


def apply_builtin_chat_template(template, messages, bint add_assistant=True) -> str:
    """Render chat messages with llama.cpp's built-in template engine.

    `template` is a built-in name ("chatml", "llama3", ...) or a Jinja template
    string that llama.cpp recognises by its markers.  Raises ValueError when
    llama.cpp does not know the template.
    """
    cdef bytes tmpl = _utf8(template, "template")
    cdef list keep = []
    cdef Py_ssize_t n = len(messages), i
    cdef llama_chat_message * msgs = <llama_chat_message *>calloc(max(n, 1), sizeof(llama_chat_message))
    cdef int32_t size, cap
    cdef char * buf = NULL
    if msgs == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            m = messages[i]
            role = _utf8(m["role"], "message role")
            content = _utf8(m["content"], "message content")
            keep.append(role)
            keep.append(content)
            msgs[i].role = PyBytes_AS_STRING(role)
            msgs[i].content = PyBytes_AS_STRING(content)
        cap = 256
        for i in range(n):
            cap += 2 * (len(keep[2 * i]) + len(keep[2 * i + 1])) + 64
        while True:
            buf = <char *>realloc(buf, cap)
            if buf == NULL:
                raise MemoryError()
            size = llama_chat_apply_template(PyBytes_AS_STRING(tmpl), msgs, n, add_assistant, buf, cap)
            if size < 0:
                raise ValueError(f"llama.cpp does not know the chat template {_short(template)!r}; "
                                 f"built-in names: {', '.join(chat_builtin_templates())}")
            if size <= cap:
                return buf[:size].decode("utf-8", "replace")
            cap = size + 1
    finally:
        free(msgs)
        free(buf)


def validate_grammar(Vocab vocab, grammar, root="root") -> None:
    """Parse a GBNF grammar against `vocab`; GrammarError with llama.cpp's message if it fails."""
    cdef llama_sampler * smpl = _make_grammar_sampler(vocab, grammar, root, None, None)
    llama_sampler_free(smpl)


# The process's one RPC registry: endpoint -> the names of its devices.  ggml keeps a
# registration (and its devices) for the life of the process, and registering the same
# endpoint twice would list its devices twice; the lock makes "probe, add, register" happen
# once per endpoint even when threads race.  pyllama.llm registers through it as well.
_rpc_servers = {}
_rpc_lock = _threading.Lock()


def rpc_add_server(endpoint) -> list:
    """Register a remote ggml RPC server (host:port); returns the names of its devices.

    Once per process per endpoint: a later call with the same endpoint returns the device
    names of the first registration without contacting the server again (thread-safe).
    Raises OSError when the server cannot be reached.
    """
    if not PYLLAMA_RPC_AVAILABLE:
        raise RuntimeError("this pyllama was built without the RPC backend (GGML_RPC=OFF)")
    cdef bytes ep = _check_endpoint(endpoint)
    cdef ggml_backend_reg_t reg
    cdef const char * ep_c = ep
    with _rpc_lock:
        names = _rpc_servers.get(endpoint)
        if names is None:
            # Probe first: ggml's RPC client blocks forever on a server that never answers and
            # aborts on a malformed answer; our own handshake has a timeout and fails cleanly.
            _rpc_probe(endpoint)
            with nogil:
                reg = ggml_backend_rpc_add_server(ep_c)
            _check(reg != NULL, OSError, f"cannot connect to RPC server {endpoint}")
            # Make its devices visible to model loading and backends().
            ggml_backend_register(reg)
            names = [_str(ggml_backend_dev_name(ggml_backend_reg_dev_get(reg, j)))
                     for j in range(ggml_backend_reg_dev_count(reg))]
            _rpc_servers[endpoint] = names
        return list(names)


def rpc_start_server(endpoint, *, int threads=0, cache_dir=None, devices=None) -> None:
    """Run ggml's RPC server on `endpoint` in this thread until the process ends.

    threads=0 computes on as many threads as a Context does by default (the physical cores,
    capped by CPU affinity and the cgroup CPU quota).
    """
    if not PYLLAMA_RPC_AVAILABLE:
        raise RuntimeError("this pyllama was built without the RPC backend (GGML_RPC=OFF)")
    _ensure_backends_loaded()
    cdef bytes ep = _check_endpoint(endpoint)
    cdef bytes cache = _utf8(_os.fspath(cache_dir), "cache_dir") if cache_dir is not None else None
    cdef const char * cache_c = PyBytes_AS_STRING(cache) if cache is not None else NULL
    cdef size_t n_threads = threads if threads > 0 else _cpu.default_threads()
    cdef list names = list(devices) if devices else []
    cdef ggml_backend_dev_t * devs = NULL
    cdef size_t n_devs = 0, i
    cdef ggml_backend_dev_t dev
    cdef const char * ep_c
    try:
        if names:
            devs = <ggml_backend_dev_t *>calloc(len(names), sizeof(ggml_backend_dev_t))
            for name in names:
                b = _utf8(name, "device name")
                dev = ggml_backend_dev_by_name(PyBytes_AS_STRING(b))
                if dev == NULL:
                    raise ValueError(f"unknown device {name!r}; available: {[d['name'] for b_ in backends() for d in b_['devices']]}")
                devs[n_devs] = dev
                n_devs += 1
        else:
            # Default: the best device of each kind (GPU first, else CPU), as ggml's rpc-server does.
            devs = <ggml_backend_dev_t *>calloc(ggml_backend_dev_count() + 1, sizeof(ggml_backend_dev_t))
            for i in range(ggml_backend_dev_count()):
                dev = ggml_backend_dev_get(i)
                if ggml_backend_dev_get_type(dev) in (GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU):
                    devs[n_devs] = dev
                    n_devs += 1
            if n_devs == 0:
                for i in range(ggml_backend_dev_count()):
                    dev = ggml_backend_dev_get(i)
                    if ggml_backend_dev_get_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU:
                        devs[n_devs] = dev
                        n_devs += 1
                        break
        ep_c = ep
        with nogil:
            ggml_backend_rpc_start_server(ep_c, cache_c, n_threads, n_devs, devs)
    finally:
        free(devs)
