"""pyllama: a fast Cython binding to llama.cpp."""
from pyllama._core import Batch, Context, Engine, GenerationRequest, Model, SamplerChain, Vocab, backends, system_info
from pyllama._core import __llama_cpp_commit__
from pyllama.errors import *  # noqa: F401,F403

__version__ = "0.1.0"
