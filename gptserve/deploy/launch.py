"""`gptserve serve --ray`: the server as a Ray Serve application (application.py) on the
local Ray cluster: the one running on this machine (`ray start --head`, or RAY_ADDRESS)
is joined, else one is started for this process. Serve listens on --host/--port. Runs
until Ctrl-C or SIGTERM, then deletes the application (its replicas finish their
requests first); a cluster this process started stops with it.
"""
from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from gptserve.config import EngineConfig, ServerConfig
from gptserve.deploy.spec import AppSpec, Routing, Scaling

log = logging.getLogger(__name__)
APP_NAME = "gptserve"


def parse_autoscale(text: str) -> tuple[int, int]:
    """`MIN:MAX` replicas, e.g. 1:4."""
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"--autoscale takes MIN:MAX replicas, e.g. 1:4; got {text!r}")
    return int(low), int(high)


def cli_spec(model: str | None, engine_config: EngineConfig, server_config: ServerConfig, num_replicas: int,
             autoscale: str | None, prefix_affinity: bool, replica_num_gpus: float) -> AppSpec:
    scaling = Scaling(num_replicas=num_replicas, num_gpus=replica_num_gpus)
    if autoscale:
        scaling.min_replicas, scaling.max_replicas = parse_autoscale(autoscale)
    scaling.check()
    return AppSpec(model, engine_config, server_config, scaling, Routing(prefix_affinity=prefix_affinity))


def run_on_ray(spec: AppSpec) -> None:
    from gptserve.deploy.application import build_application

    ray.init(log_to_driver=False)  # joins this machine's cluster, or starts one that ends with us
    serve.start(http_options={"host": spec.server.host, "port": spec.server.port})
    serve.run(build_application(spec), name=APP_NAME, route_prefix="/")
    log.info("serving on http://%s:%d (Ray Serve application %r)", spec.server.host, spec.server.port, APP_NAME)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)  # its replicas finish their requests first (graceful_shutdown_timeout_s)
        ray.shutdown()  # a cluster this process started stops; a joined one goes on
