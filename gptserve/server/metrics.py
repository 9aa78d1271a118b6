"""Prometheus metrics, one registry per app: each loaded model's engine state read at scrape
time, and latencies the server observes per request; every series carries the model's name
(`model_name`, as vLLM labels them)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gptserve.engine.client import EngineClient
    from gptserve.engine.outputs import EngineStats, RequestOutput

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


# (metric, kind, EngineStats field, help): what the engine reports, as Prometheus series
ENGINE_SERIES = [
    ("gptserve_num_requests_running", GaugeMetricFamily, "num_requests_running",
     "Requests with a sequence in the running batch."),
    ("gptserve_num_requests_waiting", GaugeMetricFamily, "num_requests_waiting",
     "Unfinished requests with no sequence in the running batch."),
    ("gptserve_kv_blocks_used", GaugeMetricFamily, "kv_blocks_used", "KV cache blocks in use."),
    ("gptserve_kv_blocks_total", GaugeMetricFamily, "kv_blocks_total", "KV cache blocks in the pool."),
    ("gptserve_prefix_cache_queries", CounterMetricFamily, "prefix_cache_queries",
     "Prompt tokens looked up in the prefix cache."),
    ("gptserve_prefix_cache_hits", CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("gptserve_num_preemptions", CounterMetricFamily, "num_preemptions", "Sequences preempted for lack of KV blocks."),
    ("gptserve_prompt_tokens", CounterMetricFamily, "prompt_tokens", "Prompt tokens processed."),
    ("gptserve_generation_tokens", CounterMetricFamily, "generation_tokens", "Tokens generated."),
]


class EngineCollector(Collector):
    """Reads each loaded model's `engine.stats()` whenever Prometheus scrapes, so gauges are
    never stale; every series is labelled with its model (`model_name`, vLLM's label)."""

    def __init__(self, engines: Callable[[], list[tuple[str, "EngineClient"]]]):
        self.engines = engines  # the loaded models: (name, engine)

    def describe(self) -> Iterator[Metric]:
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        stats = []
        for name, engine in self.engines():
            try:
                stats.append((name, engine.stats()))
            except Exception as e:  # noqa: BLE001 - a dead engine must not break /metrics
                log.warning("engine stats of %s unavailable: %r", name, e)
        return self._families(stats)

    @staticmethod
    def _families(models: list[tuple[str, "EngineStats"]]) -> Iterator[Metric]:
        def family(kind, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Metric:
            return kind(name, help_text, labels=["model_name", *labels])

        for name, kind, field, help_text in ENGINE_SERIES:
            f = family(kind, name, help_text)
            for model, stats in models:
                f.add_metric([model], float(getattr(stats, field)))
            yield f
        hit_rate = family(GaugeMetricFamily, "gptserve_prefix_cache_hit_rate",
                          "Share of looked-up prompt tokens found in the prefix cache, since start.")
        # The queue depth and KV-cache use an endpoint picker reads from each server (the Gateway API
        # Inference Extension, llm-d), under the names of the extension's model-server protocol:
        # TotalQueuedRequests, TotalRunningRequests and KVCacheUtilization (a fraction, 1 is full) are
        # vllm:num_requests_waiting, vllm:num_requests_running and vllm:kv_cache_usage_perc in
        # kubernetes-sigs/gateway-api-inference-extension, docs/proposals/003-model-server-protocol.
        waiting = family(GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting (the model-server "
                         "protocol's TotalQueuedRequests).")
        running = family(GaugeMetricFamily, "vllm:num_requests_running", "Requests running (the model-server "
                         "protocol's TotalRunningRequests).")
        kv_usage = family(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV cache in use, 1 is full (the "
                          "model-server protocol's KVCacheUtilization).")
        finished = family(CounterMetricFamily, "gptserve_sequences_finished", "Choices (sequences) finished, by "
                          "reason.", ("finish_reason",))
        for model, stats in models:
            queries = stats.prefix_cache_queries
            hit_rate.add_metric([model], stats.prefix_cache_hits / queries if queries else 0.0)
            waiting.add_metric([model], float(stats.num_requests_waiting))
            running.add_metric([model], float(stats.num_requests_running))
            total = stats.kv_blocks_total
            kv_usage.add_metric([model], stats.kv_blocks_used / total if total else 0.0)
            for reason, count in sorted(stats.sequences_finished.items()):
                finished.add_metric([model, reason], float(count))
        yield from (hit_rate, waiting, running, kv_usage, finished)
        yield from EngineCollector._speculation(models, family)

    @staticmethod
    def _speculation(models: list[tuple[str, "EngineStats"]], family) -> Iterator[Metric]:
        """Speculative decoding, by method: guesses verified, guesses that stood, their ratio."""
        draft_family = family(CounterMetricFamily, "gptserve_spec_decode_num_draft_tokens",
                              "Speculative guesses verified by the model.", ("method",))
        accepted_family = family(CounterMetricFamily, "gptserve_spec_decode_num_accepted_tokens",
                                 "Speculative guesses that the model's own tokens confirmed.", ("method",))
        rate_family = family(GaugeMetricFamily, "gptserve_spec_decode_acceptance_rate",
                             "Share of verified guesses accepted, since start.", ("method",))
        for model, stats in models:
            drafted, accepted = stats.spec_draft_tokens, stats.spec_accepted_tokens
            for method in sorted(drafted):
                draft_family.add_metric([model, method], float(drafted[method]))
                accepted_family.add_metric([model, method], float(accepted.get(method, 0)))
                rate_family.add_metric([model, method],
                                       accepted.get(method, 0) / drafted[method] if drafted[method] else 0.0)
        yield from (draft_family, accepted_family, rate_family)


@dataclass
class ModelMetrics:
    """One model's series of the server's histograms and counters (labelled with its name)."""

    registry: CollectorRegistry
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_request_latency: Histogram
    requests_rejected: Counter


class ServerMetrics:
    def __init__(self, engines: Callable[[], list[tuple[str, "EngineClient"]]]):
        """`engines`: the loaded models, (name, engine), read at every scrape."""
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engines))
        labels = ["model_name"]
        self.time_to_first_token = Histogram(
            "gptserve_time_to_first_token_seconds", "From arrival to the first generated token.", labels,
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "gptserve_inter_token_latency_seconds", "Between consecutive generated tokens of a request.", labels,
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            "gptserve_e2e_request_latency_seconds", "From arrival to the last token.", labels,
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests_rejected = Counter(
            "gptserve_requests_rejected", "Requests refused because the queue was full.", labels,
            registry=self.registry)

    def for_model(self, name: str) -> ModelMetrics:
        return ModelMetrics(self.registry, self.time_to_first_token.labels(name), self.inter_token_latency.labels(name),
                            self.e2e_request_latency.labels(name), self.requests_rejected.labels(name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """One engine request's latencies, recorded as its outputs arrive."""

    def __init__(self, metrics: ModelMetrics):
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None

    def record(self, out: "RequestOutput") -> None:
        now, m = time.monotonic(), self.metrics
        new_tokens = max((len(c.token_ids) for c in out.choices), default=0)  # per choice, this step
        if new_tokens and self.last_token_time is None:
            m.time_to_first_token.observe(now - self.arrival)
        elif new_tokens:
            for _ in range(new_tokens):
                m.inter_token_latency.observe((now - self.last_token_time) / new_tokens)
        if new_tokens:
            self.last_token_time = now
        if out.finished:
            m.e2e_request_latency.observe(now - self.arrival)
