"""Ray integration: many GGUF replicas on plain CPU nodes, for offline batches and for traffic.

Install with ``pip install "pyllama[ray]"`` (``ray[data,serve]`` plus the server's FastAPI
stack).  Two halves, each using only pyllama's public API:

* **Ray Data** -- :class:`LLMPredictor`, a callable class for ``Dataset.map_batches``.  Each
  actor loads one :class:`pyllama.LLM`; each batch runs through one ``LLM.generate`` call, so
  all its rows advance together in one context.  Input: a ``prompt`` column or a ``messages``
  column (rendered with the model's chat template), optionally a per-row ``json_schema``.
  Output: the input columns plus ``generated_text``, ``finish_reason``, ``prompt_tokens``,
  ``completion_tokens`` and ``error`` (None for a row that succeeded)::

      ds = ray.data.from_items([{"prompt": p} for p in prompts])
      out = ds.map_batches(LLMPredictor, fn_constructor_kwargs={"model_path": "smollm2", "max_tokens": 64},
                           concurrency=2, num_cpus=1, batch_size=32)

* **Ray Serve** -- :func:`build_app` returns a Serve application: N replicas, each serving
  the OpenAI-compatible app of :func:`pyllama.server.create_app` over its own model.
  :func:`app_builder` is the same for ``serve run`` and Serve config files::

      serve run pyllama.integrations.ray:app_builder model=smollm2 num_replicas=2 n_threads=1

A model given by name (``"smollm2"``) is fetched on each node through :mod:`pyllama.models`;
a path must exist on every node, and :func:`load_llm` says which node lacks it.
See docs/ray.md.

Importing this package does not import Ray; the submodules import it when they need it.
"""

from __future__ import annotations

import importlib.util
from typing import Any


def _ray_installed() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except ValueError:   # sys.modules["ray"] is None: imports of ray are blocked
        return False


if not _ray_installed():
    raise ImportError(
        "pyllama.integrations.ray needs Ray: pip install \"pyllama[ray]\" "
        "(or pip install \"ray[data,serve]\" fastapi uvicorn)"
    )

__all__ = ["LLMPredictor", "build_app", "app_builder", "load_llm", "node_description", "REPLICA_HEADER",
           "OUTPUT_COLUMNS"]

_LAZY = {
    "LLMPredictor": "pyllama.integrations.ray.data",
    "OUTPUT_COLUMNS": "pyllama.integrations.ray.data",
    "build_app": "pyllama.integrations.ray.serve",
    "app_builder": "pyllama.integrations.ray.serve",
    "REPLICA_HEADER": "pyllama.integrations.ray.serve",
    "load_llm": "pyllama.integrations.ray.nodes",
    "node_description": "pyllama.integrations.ray.nodes",
}


def __getattr__(name: str) -> Any:
    # Lazy: a Ray Data actor needs neither ray.serve nor FastAPI, and `import ray.serve` is slow.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
