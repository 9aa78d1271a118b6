"""Ray fixtures: one local Ray cluster for all of tests/deploy (2 CPUs, no dashboard),
started and shut down here, and one gptserve application on it: 2 CPU engine replicas of
`replica_checkpoint` (the tiny random checkpoint with GPT-2's 1,024 positions, so a stream
can run long enough to be cut) behind the ingress, on a free port of 127.0.0.1."""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from gptserve.config import EngineConfig, ServerConfig  # noqa: E402
from gptserve.deploy.application import build_application  # noqa: E402
from gptserve.deploy.spec import AppSpec, Routing, Scaling  # noqa: E402
from tests.conftest import prometheus_value  # noqa: E402
from tests.server.conftest import API_KEY, MODEL_NAME  # noqa: E402

APP_NAME = "gptserve"
NUM_REPLICAS = 2
MAX_NUM_SEQS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_spec(model_dir: Path, tmp_dir: Path, **routing) -> AppSpec:
    """2 engine replicas of half a CPU each (Ray's accounting; the machine has 2 cores). An
    engine runs at most MAX_NUM_SEQS sequences at once, so that under load some requests
    wait on a replica without output yet (those a lost replica's must not lose)."""
    return AppSpec(
        model=str(model_dir),
        engine=EngineConfig(device="cpu", dtype="float32", kv_cache_memory=8 * 2**20, enforce_eager=True,
                            max_num_seqs=MAX_NUM_SEQS),
        server=ServerConfig(served_model_name=MODEL_NAME, api_key=API_KEY, state_dir=str(tmp_dir)),
        scaling=Scaling(num_replicas=NUM_REPLICAS, num_cpus=0.5, ingress_num_cpus=0,
                        graceful_shutdown_timeout_s=5),
        routing=Routing(**routing))


@dataclass
class RayApp:
    base_url: str

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                            **{"timeout": 60, **kwargs})

    def metric(self, name: str) -> float:
        """A series of the ingress's /metrics (summed over its labels)."""
        with self.http() as http:
            return prometheus_value(http.get("/metrics").text, name)

    def running_engine_replicas(self) -> int:
        """How many engine replicas Serve reports running."""
        status = serve.status().applications[APP_NAME].deployments["GptServeEngine"]
        return status.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="package")
def replica_checkpoint(make_checkpoint) -> Path:
    return make_checkpoint(n_positions=1024)


@pytest.fixture(scope="package")
def ray_app(ray_cluster, replica_checkpoint: Path, tmp_path_factory) -> Iterator[RayApp]:
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(tiny_spec(replica_checkpoint, tmp_path_factory.mktemp("state"))),
              name=APP_NAME, route_prefix="/")
    app = RayApp(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while True:  # the proxy answers once it knows the route
        try:
            if httpx.get(f"{app.base_url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the Ray application did not come up"
        time.sleep(0.2)
    yield app
