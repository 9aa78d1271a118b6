"""The Ray Serve application: an ingress deployment running our FastAPI app (every route,
SSE stream, error shape, API key and the playground, as `gptserve serve` serves them) in
front of the engine deployment (engine_replica.py), whose replicas scale on their
ongoing requests and are picked by the prefix-affinity router (router.py).

Entry points:
- `serve run gptserve.deploy.application:build_app model=gpt2 num_replicas=2` (and a
  Serve config file's `import_path` and `args`, e.g. deploy/serve-config.yaml): `build_app`
- `gptserve serve --ray ...` (launch.py): `build_application(spec)`
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

from fastapi import FastAPI
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp

from gptserve.config import EngineConfig
from gptserve.deploy.engine_replica import EngineReplica, replica_name
from gptserve.deploy.remote_engine import RemoteEngine
from gptserve.deploy.replica_header import ReplicaHeader
from gptserve.deploy.router import PrefixAffinityRouter
from gptserve.deploy.spec import AppSpec, spec_from_args
from gptserve.server.app import build_app as build_server_app
from gptserve.server.serving import ServingContext

STATS_PERIOD_S = 1.0  # how often each engine replica's stats reach the router (and /metrics)
HEALTH_CHECK_PERIOD_S = 2.0  # a replica whose step loop died is replaced within about this long


class FleetCollector(Collector):
    """The ingress's own series: engine replicas reachable, requests sent again after their
    replica was lost, and queue slots taken (what must come back to zero when idle)."""

    def __init__(self, engine: RemoteEngine, serving: ServingContext):
        self.engine, self.serving = engine, serving

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("gptserve_engine_replicas", "Engine replicas the ingress's router can reach.",
                                value=self.engine.num_replicas)
        yield CounterMetricFamily("gptserve_requests_retried", "Requests sent to another engine replica after "
                                  "theirs was lost before any output.", value=self.engine.requests_retried)
        yield GaugeMetricFamily("gptserve_queue_slots_in_use", "Queue slots (--max-queued-requests) taken at "
                                "this ingress.", value=self.serving.num_in_flight)


@serve.deployment(name="GptServeIngress")
@serve.ingress()
class Ingress:
    """One ingress replica: the FastAPI app around a RemoteEngine."""

    async def __init__(self, engine: DeploymentHandle, spec: AppSpec):
        self.spec = spec
        self.engine = await RemoteEngine.connect(engine)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = build_server_app(self.engine, self.spec.replica_server_config())
        app.state.metrics.registry.register(FleetCollector(self.engine, app.state.serving))
        around_all(app, lambda stack: ReplicaHeader(stack, ingress_name=replica_name()))
        return app


def around_all(app: FastAPI, wrap: Callable[[ASGIApp], ASGIApp]) -> None:
    """Wraps the app's whole middleware stack, the request id's (outermost) included: the app
    stays a FastAPI app, as Serve expects of an ingress."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: wrap(build())  # type: ignore[method-assign]


def replica_engine_config(spec: AppSpec) -> EngineConfig:
    """One engine replica's settings: one device (the GPU Ray gave it, seen as cuda:0)."""
    device = "cuda" if spec.scaling.num_gpus > 0 else spec.engine.device
    return dataclasses.replace(spec.engine, device=device, data_parallel_size=1)


def engine_options(spec: AppSpec) -> dict[str, Any]:
    """The engine deployment's Serve options: replicas or autoscaling, resources, routing."""
    s, r = spec.scaling, spec.routing
    if s.autoscaled:
        replicas: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests}}
    else:
        replicas = {"num_replicas": s.num_replicas}
    router = RequestRouterConfig(
        request_router_class=PrefixAffinityRouter,
        request_router_kwargs={"block_size": spec.engine.block_size, "prefix_affinity": r.prefix_affinity,
                               "max_imbalance": r.max_imbalance, "max_prefix_blocks": r.max_prefix_blocks,
                               "min_prefix_match": r.min_prefix_match},
        request_routing_stats_period_s=STATS_PERIOD_S)
    return {**replicas, "max_ongoing_requests": spec.server.max_queued_requests,
            "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
            "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S, "request_router_config": router}


def ingress_options(spec: AppSpec) -> dict[str, Any]:
    s = spec.scaling
    return {"num_replicas": s.ingress_replicas, "ray_actor_options": {"num_cpus": s.ingress_num_cpus},
            "max_ongoing_requests": spec.replica_server_config().max_queued_requests,
            "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s}


def build_application(spec: AppSpec) -> serve.Application:
    engine = EngineReplica.options(**engine_options(spec)).bind(spec.model, replica_engine_config(spec))
    return Ingress.options(**ingress_options(spec)).bind(engine, spec)


def build_app(args: dict[str, Any]) -> serve.Application:
    """`serve run gptserve.deploy.application:build_app model=... num_replicas=...`: each
    argument names a field of EngineConfig, ServerConfig, Scaling or Routing (spec.py)."""
    return build_application(spec_from_args(args))
