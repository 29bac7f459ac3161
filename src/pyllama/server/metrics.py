"""GET /metrics: Prometheus text with llama-server's metric names (``llamacpp:`` prefix), so
dashboards and slot-aware load balancers built for llama-server work unchanged.

The numbers come from ``LLM.metrics()`` at scrape time (a custom collector, nothing is
counted twice); the names, help texts and types are llama-server's
(tools/server/server-task.cpp, ``server_task_result_metrics::to_metrics``).
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name without "llamacpp:", help, key in LLM.metrics(), scale)
_COUNTERS = [
    ("prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens", "prompt_tokens_total", 1.0),
    ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache", "prompt_tokens_cached_total", 1.0),
    ("prompt_seconds_total", "Total time spent processing prompts", "prompt_seconds_total", 1.0),
    ("tokens_predicted_total", "Number of generation tokens processed", "tokens_predicted_total", 1.0),
    ("tokens_predicted_seconds_total", "Total time spent generating tokens", "tokens_predicted_seconds_total", 1.0),
    ("n_decode_total", "Total number of llama_decode() calls", "n_decode_total", 1.0),
]


class _LLMCollector:
    def __init__(self, read: Callable[[], dict]) -> None:
        self._read = read

    def collect(self) -> Any:
        m = self._read()
        for name, doc, key, scale in _COUNTERS:
            if key in m:
                yield CounterMetricFamily("llamacpp:" + name, doc, value=float(m[key]) * scale)

        def rate(tokens: str, seconds: str) -> float:
            s = float(m.get(seconds, 0.0) or 0.0)
            return float(m.get(tokens, 0.0) or 0.0) / s if s > 0 else 0.0

        n_decode = float(m.get("n_decode_total", 0) or 0)
        gauges = [
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s",
             rate("prompt_tokens_total", "prompt_seconds_total")),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s",
             rate("tokens_predicted_total", "tokens_predicted_seconds_total")),
            ("requests_processing", "Number of requests processing", float(m.get("requests_processing", 0))),
            ("requests_deferred", "Number of requests deferred", float(m.get("requests_deferred", 0))),
            ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call",
             float(m.get("n_busy_slots_total", 0) or 0) / max(n_decode, 1.0)),
            # llama-server declares it a counter, but a Prometheus counter's sample must end in
            # _total: as a gauge the sample keeps llama-server's exact name (what queries use).
            ("n_tokens_max", "Largest observed sequence length (prompt + generation)",
             float(m.get("n_tokens_max", 0) or 0)),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily("llamacpp:" + name, doc, value=value)


def make_registry(read: Callable[[], dict]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one: two apps in one process
    must not share numbers)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_LLMCollector(read))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
