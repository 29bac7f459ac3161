"""LangChain integration: pyllama models as LangChain LLMs, chat models and embeddings.

Install with ``pip install "pyllama[langchain]"`` (langchain-core 1.x only; langchain-community
is not needed).  The examples of LangChain's "Llama.cpp" page run unchanged except for the
import line::

    from pyllama.integrations.langchain import LlamaCpp      # was: langchain_community.llms

    llm = LlamaCpp(model_path="model.gguf", temperature=0.75, max_tokens=2000, top_p=1,
                   callback_manager=CallbackManager([StreamingStdOutCallbackHandler()]),
                   verbose=True)
    llm.invoke("Question: ...")

Three classes:

* :class:`LlamaCpp` (also :data:`PyLlama`): a ``langchain_core`` ``LLM`` accepting every field
  of langchain-community's ``LlamaCpp``; token streaming, batched ``batch()``, real async.
* :class:`ChatLlamaCpp`: a ``BaseChatModel`` using the model's own chat template, with
  ``bind_tools`` (the tool call enforced by a grammar) and ``with_structured_output``.
* :class:`LlamaCppEmbeddings`: ``Embeddings`` computed in one batched call.

Modules: :mod:`~pyllama.integrations.langchain.llms`, :mod:`~.chat_models`,
:mod:`~.embeddings`.  Differences from langchain-community's classes are listed in
docs/langchain.md.
"""

try:
    import langchain_core  # noqa: F401
    import pydantic  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "pyllama.integrations.langchain needs langchain-core 1.x: pip install \"pyllama[langchain]\" "
        f"(or pip install \"langchain-core>=1.0,<2\"); import failed with: {_exc}"
    ) from _exc

from pyllama.integrations.langchain._common import IgnoredFieldWarning
from pyllama.integrations.langchain.chat_models import ChatLlamaCpp
from pyllama.integrations.langchain.embeddings import LlamaCppEmbeddings
from pyllama.integrations.langchain.llms import LlamaCpp, PyLlama

__all__ = [
    "LlamaCpp",
    "PyLlama",
    "ChatLlamaCpp",
    "LlamaCppEmbeddings",
    "IgnoredFieldWarning",
]
