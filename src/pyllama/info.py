"""Facts about a GGUF model and about this pyllama build, as plain dicts: what
``pyllama info`` prints and what a server (or a bug report) can show."""

from __future__ import annotations

import os
import sys


def model_info(path: str) -> dict:
    """Facts about a GGUF model, loaded with its weights memory-mapped."""
    from pyllama import Model

    with Model(path) as m:
        vocab = m.vocab
        template = m.chat_template()
        meta = m.metadata
        builtin = None
        if template is None:
            try:
                from pyllama.chat import guess_builtin_template

                builtin = guess_builtin_template(m)
            except Exception:  # noqa: BLE001
                builtin = None
        info = {
            "path": os.path.abspath(path),
            "name": meta.get("general.name"),
            "architecture": m.architecture,
            "description": m.description,
            "n_params": m.n_params,
            "ftype": m.ftype,
            "file_size": os.path.getsize(path),
            "tensor_size": m.size,
            "n_ctx_train": m.n_ctx_train,
            "n_embd": m.n_embd,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_head_kv": m.n_head_kv,
            "vocab_type": vocab.type,
            "n_vocab": vocab.n_tokens,
            "bos": vocab.token_text(vocab.bos) if vocab.bos >= 0 else None,
            "eos": vocab.token_text(vocab.eos) if vocab.eos >= 0 else None,
            "chat_template": template,
            "chat_template_fallback": builtin,
            "license": meta.get("general.license"),
        }
    return info


def build_summary() -> dict:
    """How this pyllama was built and what it can use: versions, backends and devices,
    optional features, build options, and the known-model cache."""
    import pyllama
    from pyllama import _core, _cpu, gpu
    from pyllama import models

    try:
        build = pyllama.build_info()
    except Exception as exc:  # noqa: BLE001  (an older/odd build without _build_config)
        build = {"error": str(exc)}
    cache = models.models_dir()
    return {
        "version": pyllama.__version__,
        "llama_cpp_commit": pyllama.__llama_cpp_commit__,
        "python": sys.version.split()[0],
        "package_dir": os.path.dirname(os.path.abspath(pyllama.__file__)),
        "system_info": pyllama.system_info().strip(),
        "backends": pyllama.backends(),
        # One line a user can act on: "CUDA compiled in, no CUDA device found", ...
        "gpu": gpu.gpu_status().summary,
        "gpu_offload": bool(_core.supports_gpu_offload()),
        "mmap": bool(_core.supports_mmap()),
        "mlock": bool(_core.supports_mlock()),
        "rpc": bool(_core.supports_rpc()),
        # How OpenMP threads wait at llama.cpp's barriers (GOMP_SPINCOUNT; pyllama._cpu)
        "openmp_wait": _cpu.openmp_wait_setting(),
        "build": build,
        "models_cache": str(cache),
        "known_models": {name: models.is_cached(name) for name in models.KNOWN_MODELS},
        "default_model": models.DEFAULT_MODEL,
    }
