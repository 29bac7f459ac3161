"""pyllama: a fast Cython binding to llama.cpp.

    from pyllama import LLM
    llm = LLM("smollm2")            # a path to a .gguf file, or a known model name
    print(llm("The capital of France is", max_tokens=16, temperature=0))
"""

# Before the extension (and libgomp with it) loads: how OpenMP threads wait (see _cpu.py).
from pyllama._cpu import configure_openmp_wait as _configure_openmp_wait

_configure_openmp_wait()

from pyllama._core import (  # noqa: E402
    Batch,
    Bitmap,
    Context,
    Engine,
    GenerationRequest,
    LoraAdapter,
    MediaPrompt,
    Model,
    Multimodal,
    SamplerChain,
    UnsupportedTensorTypeError,
    Vocab,
    __llama_cpp_commit__,
    backends,
    system_info,
)
from pyllama._cpu import forget_openmp_wait_environ as _forget_openmp_wait_environ  # noqa: E402

_forget_openmp_wait_environ()   # (libgomp has read it)

from pyllama.errors import *  # noqa: F401,F403
from pyllama.errors import __all__ as _errors_all
from pyllama.log import disable_logging, enable_logging, set_llama_log_level
from pyllama.llm import LLM, AsyncStream, Chunk, Completion, Stream, Timings, TokenLogprob, TopLogprob
from pyllama.sampling import SamplingParams


def install_as_llama_cpp():
    """Make ``import llama_cpp`` give pyllama's llama-cpp-python compatibility layer
    (see pyllama.compat); call it before anything imports llama_cpp."""
    from pyllama.compat import install_as_llama_cpp as install

    return install()

__version__ = "0.1.0"


def __getattr__(name: str):
    # The grammar module (JSON schema conversion) is imported on first use: it is not
    # needed to generate text, and `import pyllama` stays fast.
    if name in ("grammar_path", "json_schema_to_gbnf"):
        from pyllama import grammar

        return getattr(grammar, name)
    raise AttributeError(f"module 'pyllama' has no attribute {name!r}")


def build_info() -> dict:
    """How this pyllama was built: llama.cpp commit, backend options, legacy flags mapped,
    options that had no effect, and whether ggml's AMX kernels were turned off (and why)."""
    from pyllama import _build_config as bc

    return {
        "version": __version__,
        "llama_cpp_commit": bc.llama_cpp_commit,
        "build_type": bc.build_type,
        "portable": bc.portable,
        "options": dict(bc.options),
        "legacy_options_mapped": list(bc.legacy_options_mapped),
        "unknown_options": list(bc.unknown_options),
        # ggml's AMX kernels: "OFF" when the build turned them off, with the reason
        "amx": getattr(bc, "amx", "AUTO"),
        "amx_disabled_reason": getattr(bc, "amx_disabled_reason", ""),
        # llama.cpp's mtmd library (images/audio in prompts), -DPYLLAMA_MTMD=OFF leaves it out
        "mtmd": getattr(bc, "mtmd", False),
        # CUDA builds: the GPU architectures compiled for, and why ("" without CUDA)
        "cuda_architectures": getattr(bc, "cuda_architectures", ""),
    }


__all__ = [
    "LLM", "Completion", "Timings", "Chunk", "TokenLogprob", "TopLogprob", "Stream", "AsyncStream", "SamplingParams", "Model", "Vocab", "Context", "Batch", "SamplerChain",
    "Engine", "GenerationRequest", "Multimodal", "Bitmap", "MediaPrompt", "UnsupportedTensorTypeError", "LoraAdapter", "backends", "system_info", "build_info", "enable_logging",
    "disable_logging", "set_llama_log_level", "grammar_path",
    "json_schema_to_gbnf", "install_as_llama_cpp", "__version__", "__llama_cpp_commit__", *_errors_all,
]
