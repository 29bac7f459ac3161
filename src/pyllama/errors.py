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


class GPUUnavailableError(PyllamaError, RuntimeError):
    """``require_gpu=True`` (``--require-gpu``) and no device can take the model's layers:
    the build has no GPU backend, or its backend found no device.  The message says which,
    and how to rebuild."""


class OutOfMemoryError(PyllamaError, MemoryError, ValueError):
    """llama.cpp could not allocate a buffer for a context (its KV cache or compute buffers)
    on a device or on the host: a smaller ``n_ctx``, ``n_parallel`` or ``n_batch``, fewer
    offloaded layers or ``offload_kqv=False`` may fit.  A MemoryError, and a ValueError as
    context-creation failures were before it existed."""


def detach_traceback(exc: BaseException) -> BaseException:
    """Prepare an exception that outlives the step that caught it (stored on a request, for
    its owner to raise later): its frames are dropped.  Frames link, through f_back, every
    caller of the thread that was stepping the engine; kept alive, they would keep that
    thread's objects alive too (a stream another caller dropped would then never be collected,
    and its requests would never end).  The traceback of an exception raised by user code (a
    hook, a listener) is kept as text, in a note; pyllama's own errors name their cause in
    their message and get none.  Returns `exc`.  (Not exported: used by _core and the
    scheduler.)"""
    import traceback

    seen: set = set()
    e: "BaseException | None" = exc
    while e is not None and id(e) not in seen and len(seen) < 16:
        seen.add(id(e))
        tb = e.__traceback__
        if tb is not None:
            if hasattr(e, "add_note") and not isinstance(e, PyllamaError):   # notes: Python 3.11+
                e.add_note("Traceback, in the thread that was stepping the engine:\n"
                           + "".join(traceback.format_tb(tb)).rstrip())
            e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return exc


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
    "GPUUnavailableError",
    "OutOfMemoryError",
]
