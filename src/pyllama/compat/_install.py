"""``install_as_llama_cpp()``: make ``import llama_cpp`` give pyllama's compatibility layer,
the way ``pymysql.install_as_MySQLdb()`` stands in for MySQLdb."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

# llama_cpp's submodules, and the pyllama.compat module that stands in for each.
SUBMODULES = {
    "llama": "llama",
    "llama_types": "llama_types",
    "llama_cache": "llama_cache",
    "llama_grammar": "llama_grammar",
    "llama_chat_format": "llama_chat_format",
    "llama_tokenizer": "llama_tokenizer",
    "llama_speculative": "llama_speculative",
    "llama_cpp": "_lowlevel",
    "_internals": "_internals",
}


def install_as_llama_cpp() -> ModuleType:
    """Register pyllama's compatibility package as ``llama_cpp`` (and ``llama_cpp.llama``,
    ``llama_cpp.llama_chat_format``, ``llama_cpp.llama_grammar``, ``llama_cpp.llama_types``,
    ``llama_cpp.llama_tokenizer``, ``llama_cpp.llama_speculative``, ``llama_cpp.llama_cache``,
    ``llama_cpp.llama_cpp``) in ``sys.modules``, so code written for llama-cpp-python runs on
    pyllama unchanged.  Call it before that code imports ``llama_cpp``.  Calling it again does
    nothing.  Returns the module.

    Raises ImportError when the real ``llama_cpp`` (llama-cpp-python) is already imported: two
    implementations in one process would hand each other's objects around.  A submodule that
    cannot be imported here (a missing optional dependency) is left out: importing it then
    raises that module's ImportError."""
    import pyllama.compat as compat

    present = sys.modules.get("llama_cpp")
    if present is compat:
        return compat
    if present is not None:
        where = getattr(present, "__file__", None) or repr(present)
        raise ImportError(
            f"install_as_llama_cpp(): a real 'llama_cpp' module is already imported (from {where}); pyllama "
            "cannot stand in for it now. Call pyllama.install_as_llama_cpp() before anything imports llama_cpp "
            "(or uninstall llama-cpp-python).")
    stray = sorted(name for name in sys.modules if name.startswith("llama_cpp."))
    if stray:
        raise ImportError(f"install_as_llama_cpp(): parts of a real llama_cpp are already imported ({', '.join(stray)})")

    modules = {}
    for public, ours in SUBMODULES.items():
        try:
            modules[public] = importlib.import_module(f"pyllama.compat.{ours}")
        except ImportError:
            continue
    sys.modules["llama_cpp"] = compat
    for public, module in modules.items():
        sys.modules[f"llama_cpp.{public}"] = module
        setattr(compat, public, module)
    return compat
