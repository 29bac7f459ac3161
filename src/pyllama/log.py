"""Where pyllama's and llama.cpp's log lines go.

pyllama logs through the standard :mod:`logging` logger ``"pyllama"``.  llama.cpp's and
ggml's own log lines (model loading, backend choice, warnings) are forwarded to that
logger as well, but only at or above a threshold that is *off* by default: llama.cpp
prints dozens of lines per model load, and a library should stay quiet unless asked.

    import pyllama
    pyllama.enable_logging()                 # what LLM(verbose=True) and --verbose do
    pyllama.enable_logging(logging.DEBUG)    # also llama.cpp's debug lines
    pyllama.disable_logging()

Applications that configure :mod:`logging` themselves only need the threshold:
``pyllama.set_llama_log_level(logging.WARNING)`` forwards llama.cpp's warnings and
errors to the ``"pyllama"`` logger, and their own handlers decide where they go.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Optional, TextIO

from pyllama import _core

__all__ = ["enable_logging", "disable_logging", "set_llama_log_level", "llama_log_level", "LOGGER_NAME"]

LOGGER_NAME = "pyllama"
#: llama.cpp's threshold when nothing is forwarded (above logging.CRITICAL).
_OFF = logging.CRITICAL + 10

_lock = threading.Lock()
_handler: Optional[logging.StreamHandler] = None


def set_llama_log_level(level: int) -> None:
    """Forward llama.cpp/ggml log lines at or above `level` (a :mod:`logging` level) to
    the ``"pyllama"`` logger; ``logging.CRITICAL + 10`` forwards nothing (the default)."""
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"level must be a logging level (an int), got {level!r}")
    _core.set_log_level(level)


def llama_log_level() -> int:
    """The current forwarding threshold for llama.cpp's log lines."""
    return _core.get_log_level()


def enable_logging(level: int = logging.INFO, stream: Optional[TextIO] = None) -> logging.Handler:
    """Print pyllama's and llama.cpp's log lines at `level` and above to `stream`
    (default: ``sys.stderr``), one line each, as llama.cpp prints them.

    Idempotent: a second call changes the level or stream of the same handler instead
    of adding another.  Returns that handler.  ``LLM(verbose=True)`` and the command's
    ``--verbose`` call this.
    """
    global _handler
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"level must be a logging level (an int), got {level!r}")
    logger = logging.getLogger(LOGGER_NAME)
    with _lock:
        if _handler is None:
            _handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
            _handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(_handler)
        elif stream is not None:
            _handler.setStream(stream)
        _handler.setLevel(level)
        if logger.level == logging.NOTSET or logger.level > level:
            logger.setLevel(level)
        _core.set_log_level(level)
        return _handler


def disable_logging() -> None:
    """Undo :func:`enable_logging`: remove its handler and stop forwarding llama.cpp's lines."""
    global _handler
    with _lock:
        if _handler is not None:
            logging.getLogger(LOGGER_NAME).removeHandler(_handler)
            _handler = None
        _core.set_log_level(_OFF)
