"""Optional integrations with other libraries.

Each submodule needs its own extra and is imported explicitly; importing this
package imports nothing else:

* :mod:`pyllama.integrations.langchain` -- ``pip install "pyllama[langchain]"``:
  ``LlamaCpp`` (alias ``PyLlama``), ``ChatLlamaCpp`` and ``LlamaCppEmbeddings`` for
  langchain-core 1.x.  See docs/langchain.md.
* :mod:`pyllama.integrations.ray` -- ``pip install "pyllama[ray]"``: ``LLMPredictor``
  for Ray Data's ``map_batches`` (offline batches over many actors/nodes), ``build_app``
  / ``app_builder`` for Ray Serve replicas of the OpenAI-compatible server.  See docs/ray.md.
"""

__all__: list = []
