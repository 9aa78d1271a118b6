"""Prometheus metrics, one registry per app: the engine's state read at scrape time, and
latencies the server observes per request."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gptserve.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class EngineCollector(Collector):
    """Reads `engine.stats()` whenever Prometheus scrapes, so gauges are never stale."""

    def __init__(self, engine: "AsyncEngine"):
        self.engine = engine

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.engine.stats()
        except Exception as e:  # noqa: BLE001 - a dead engine must not break /metrics
            log.warning("engine stats unavailable: %r", e)
            return iter(())
        return self._families(stats)

    @staticmethod
    def _families(stats) -> Iterator[Metric]:
        def value(name: str) -> float:
            return float(getattr(stats, name)) if stats is not None else 0.0

        hit_rate = (value("prefix_cache_hits") / value("prefix_cache_queries")
                    if stats is not None and stats.prefix_cache_queries else 0.0)
        yield GaugeMetricFamily("gptserve_num_requests_running", "Requests in the running batch.",
                                value=value("num_running"))
        yield GaugeMetricFamily("gptserve_num_requests_waiting", "Requests waiting to be scheduled.",
                                value=value("num_waiting"))
        yield GaugeMetricFamily("gptserve_kv_blocks_used", "KV cache blocks in use.",
                                value=value("kv_blocks_used"))
        yield GaugeMetricFamily("gptserve_kv_blocks_total", "KV cache blocks in the pool.",
                                value=value("kv_blocks_total"))
        yield GaugeMetricFamily("gptserve_prefix_cache_hit_rate",
                                "Share of looked-up prompt tokens found in the prefix cache, since start.",
                                value=hit_rate)
        yield CounterMetricFamily("gptserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=value("prefix_cache_queries"))
        yield CounterMetricFamily("gptserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=value("prefix_cache_hits"))
        yield CounterMetricFamily("gptserve_num_preemptions", "Sequences preempted for lack of KV blocks.",
                                  value=value("num_preemptions"))
        yield CounterMetricFamily("gptserve_prompt_tokens", "Prompt tokens processed.",
                                  value=value("prompt_tokens"))
        yield CounterMetricFamily("gptserve_generation_tokens", "Tokens generated.",
                                  value=value("generation_tokens"))


class ServerMetrics:
    def __init__(self, engine: "AsyncEngine"):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.time_to_first_token = Histogram(
            "gptserve_time_to_first_token_seconds", "From arrival to the first generated token.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "gptserve_inter_token_latency_seconds", "Between consecutive generated tokens of a request.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            "gptserve_e2e_request_latency_seconds", "From arrival to the last token.",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.sequences_finished = Counter(
            "gptserve_sequences_finished", "Choices (sequences) finished, by reason.",
            ["finish_reason"], registry=self.registry)
        self.requests_rejected = Counter(
            "gptserve_requests_rejected", "Requests refused because the queue was full.",
            registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
