"""GET /metrics: Prometheus text with llama-server's metric names (``llamacpp:`` prefix), so
dashboards and slot-aware load balancers built for llama-server work unchanged.

The numbers come from ``LLM.metrics()`` at scrape time (nothing is counted twice); the names,
help texts, types and order are llama-server's (tools/server/server-task.cpp,
``server_task_result_metrics::to_metrics``).  The text is written here rather than by
prometheus_client: llama-server declares ``n_tokens_max`` a counter whose sample has no
``_total`` suffix, which prometheus_client cannot write, and clients parse llama-server's
lines as they are.
"""

from __future__ import annotations

import math
from typing import Callable, List, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name without "llamacpp:", help) in llama-server's order; the value is LLM.metrics()[name].
# A counter the LLM does not report is left out (never reported as a made-up 0).
_COUNTERS = [
    ("prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens"),
    ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache"),
    ("prompt_seconds_total", "Total time spent processing prompts"),
    ("tokens_predicted_total", "Number of generation tokens processed"),
    ("tokens_predicted_seconds_total", "Total time spent generating tokens"),
    ("n_decode_total", "Total number of llama_decode() calls, excluding speculative decoding and multimodal "
                       "decoding"),
    ("n_tokens_max", "Largest observed sequence length (prompt + generation)"),
    ("spec_decode_num_draft_tokens_total", "Speculative: Total draft tokens generated"),
    ("spec_decode_num_accepted_tokens_total", "Speculative: Total draft tokens accepted by the target model"),
    ("spec_decode_num_drafts_total", "Speculative: Total speculative decoding verification steps"),
]


class Registry:
    """What /metrics renders: a function returning ``LLM.metrics()`` (read at each scrape)."""

    def __init__(self, read: Callable[[], dict]) -> None:
        self.read = read


def make_registry(read: Callable[[], dict]) -> Registry:
    """The metrics of one app (each app its own: two apps in one process share nothing)."""
    return Registry(read)


def _number(value: float) -> str:
    value = float(value)
    return repr(value) if math.isfinite(value) else ("NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf"))


def _gauges(m: dict) -> List[Tuple[str, str, float]]:
    def rate(tokens: str, seconds: str) -> float:
        s = float(m.get(seconds, 0.0) or 0.0)
        return float(m.get(tokens, 0.0) or 0.0) / s if s > 0 else 0.0

    n_decode = float(m.get("n_decode_total", 0) or 0)
    return [
        ("prompt_tokens_seconds", "Average prompt throughput in tokens/s",
         rate("prompt_tokens_total", "prompt_seconds_total")),
        ("predicted_tokens_seconds", "Average generation throughput in tokens/s",
         rate("tokens_predicted_total", "tokens_predicted_seconds_total")),
        ("requests_processing", "Number of requests processing", float(m.get("requests_processing", 0))),
        ("requests_deferred", "Number of requests deferred", float(m.get("requests_deferred", 0))),
        ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call",
         float(m.get("n_busy_slots_total", 0) or 0) / max(n_decode, 1.0)),
    ]


def render(registry: Registry) -> bytes:
    """The Prometheus text (exposition format 0.0.4) of the current numbers."""
    m = registry.read()
    lines: List[str] = []

    def add(name: str, doc: str, kind: str, value: float) -> None:
        lines.extend((f"# HELP llamacpp:{name} {doc}", f"# TYPE llamacpp:{name} {kind}",
                      f"llamacpp:{name} {_number(value)}"))

    for name, doc in _COUNTERS:
        if name in m:
            add(name, doc, "counter", m[name])
    for name, doc, value in _gauges(m):
        add(name, doc, "gauge", value)
    return ("\n".join(lines) + "\n").encode("utf-8")
