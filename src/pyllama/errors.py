"""pyllama's exceptions.

Each one also subclasses the builtin a user would naturally catch, so
``except ValueError`` or ``except OSError`` keeps working.
"""

from __future__ import annotations


class PyllamaError(Exception):
    """Base class of every pyllama-specific error."""


class ModelLoadError(PyllamaError, OSError):
    """A model file could not be loaded (not GGUF, truncated, corrupt, unsupported)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot load model {path!r}: {reason}")

    def __str__(self) -> str:  # OSError would otherwise format its args itself
        return f"cannot load model {self.path!r}: {self.reason}"

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class GrammarError(PyllamaError, ValueError):
    """A GBNF grammar does not parse, or cannot be used with this vocabulary."""


class JSONSchemaError(GrammarError):
    """A JSON schema uses something pyllama cannot turn into a grammar."""


class InvalidTokenError(PyllamaError, ValueError):
    """A token id outside [0, n_vocab)."""


class InvalidSequenceError(PyllamaError, ValueError):
    """A sequence id outside [0, n_seq_max)."""


class BatchCapacityError(PyllamaError, ValueError):
    """More tokens than a batch (or n_batch) can hold."""


class ContextLengthError(PyllamaError, ValueError):
    """A prompt (or prompts) that cannot fit in the context window.

    `retryable` is True when the prompt fits a sequence but other sequences hold the KV cells
    it needs right now: the same request may succeed once they finish (the server answers
    503 with Retry-After instead of 400)."""

    retryable: bool = False


class DecodeError(PyllamaError, RuntimeError):
    """llama_decode / llama_encode failed."""


class KVCacheFullError(DecodeError):
    """No room left in the KV memory for the batch (llama_decode returned 1)."""


class DecodeAborted(DecodeError):
    """A decode was aborted on request (Context.abort from another thread)."""


class MediaError(PyllamaError, ValueError):
    """An image or audio input cannot be used: unreadable or unsupported data, an image too
    large to decode, media given to a model loaded without a projector (``mmproj``), or a
    projector that does not fit the model."""


class ClosedError(PyllamaError, ValueError):
    """The LLM is closed (or was closed while the call was running)."""


__all__ = [
    "PyllamaError",
    "ModelLoadError",
    "GrammarError",
    "JSONSchemaError",
    "InvalidTokenError",
    "InvalidSequenceError",
    "BatchCapacityError",
    "ContextLengthError",
    "DecodeError",
    "KVCacheFullError",
    "DecodeAborted",
    "MediaError",
    "ClosedError",
]
