"""How LLMs end: every open LLM is closed at interpreter exit, a context that a stuck step still
uses is kept alive for ever, and the counters behind LLM.metrics() outlive a re-created context.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any

# Every open LLM, so that interpreter exit closes them before daemon threads and module
# teardown can free memory under a running decode.
live_llms: "weakref.WeakSet[Any]" = weakref.WeakSet()
_immortal: list = []


def keep_forever(obj: Any) -> None:
    """Never free `obj` (a context a stuck step still uses): one leak at exit beats a crash."""
    import ctypes

    _immortal.append(obj)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


@atexit.register
def close_all_at_exit() -> None:
    for llm in list(live_llms):
        try:
            llm.close()
        except Exception:   # noqa: BLE001 - exit must go on
            pass


class Counters:
    """Totals for LLM.metrics()."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.cached_tokens = 0     # prompt tokens reused from a slot's cache (not evaluated)
        self.n_tokens_max = 0      # the longest slot content seen: prompt (cached included) + answer fed
        self.prompt_ms = 0.0
        self.predicted_tokens = 0
        self.predicted_ms = 0.0
        self.requests = 0
        self.decodes_before = 0    # from engines replaced by a re-created context, and embedding decodes
        self.busy_before = 0
        self.drafted = self.draft_accepted = self.draft_steps = 0   # speculative decoding

    def add(self, t: Any, n_sampled: int, draft_steps: int = 0) -> None:
        """Count one finished call's Timings and its sampled tokens (llama-server's
        tokens_predicted_total counts those: the first one costs no decode step), and its
        speculative decoding: drafted and accepted tokens, verification steps."""
        self.drafted += t.draft_n
        self.draft_accepted += t.draft_n_accepted
        self.draft_steps += draft_steps
        self.requests += 1
        self.prompt_tokens += t.prompt_n
        self.cached_tokens += t.cached_n
        self.n_tokens_max = max(self.n_tokens_max, t.cached_n + t.prompt_n + t.predicted_n)
        self.prompt_ms += t.prompt_ms
        self.predicted_tokens += n_sampled
        self.predicted_ms += t.predicted_ms

    def add_embedding_decode(self, n_tokens: int) -> None:
        """An embedding call's decode (outside the engine): its tokens are prompt tokens, as
        llama-server counts them; nothing is sampled."""
        self.prompt_tokens += n_tokens
        self.decodes_before += 1
