"""Optional integrations with other libraries.

Each submodule needs its own extra and is imported explicitly; importing this
package imports nothing else:

* :mod:`pyllama.integrations.langchain` -- ``pip install "pyllama[langchain]"``:
  ``LlamaCpp`` (alias ``PyLlama``), ``ChatLlamaCpp`` and ``LlamaCppEmbeddings`` for
  langchain-core 1.x.  See docs/langchain.md.
"""

__all__: list = []
