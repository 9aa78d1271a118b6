"""HTTP fixtures: real gptserve servers (the real AsyncEngine on the tiny random checkpoint,
behind uvicorn on 127.0.0.1 in a background thread), for the whole session or one test.

Servers run at `--dtype auto`, the precision `gptserve serve` runs by default (on a CPU
with the compiled kernel, bfloat16 weights with float32 compute); `float32_server` is for
the tests that compare the model's numbers with transformers' float32 ones."""
from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from gptserve.config import EngineConfig, ServerConfig
from gptserve.engine.async_engine import AsyncEngine
from gptserve.server.app import build_app
from gptserve.server.models import ModelCatalog, ModelRegistry
from gptserve.server.serve import DrainingServer, make_server
from gptserve.server.serving import ServingContext

MODEL_NAME = "tiny-gpt2"
API_KEY = "sk-test-secret"


@dataclass
class RunningServer:
    """A live server: its base URL, and clients pointed at it."""

    server: DrainingServer
    thread: threading.Thread
    base_url: str
    api_key: str = "unused"
    model_name: str = MODEL_NAME

    @property
    def serving(self) -> ServingContext:
        """The served model's context (engine, limits, queue), for tests that must reach inside."""
        return self.server.config.app.state.serving

    @property
    def models(self) -> ModelRegistry:
        """The app's model registry, for tests that must reach inside."""
        return self.server.config.app.state.models

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, **{"timeout": 60, **kwargs})

    def sse(self, path: str, body: dict, **kwargs) -> list[str]:
        """POST and read the whole event stream: the data of each event, in order."""
        with self.http() as http, http.stream("POST", path, json=body, **kwargs) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "server did not stop"


def server_engine_config(**settings) -> EngineConfig:
    """The engine settings of test servers: the CPU, `--dtype auto`, a small KV pool."""
    return EngineConfig(**{"device": "cpu", "dtype": "auto", "kv_cache_memory": 8 * 2**20, "enforce_eager": True,
                           **settings})


def start_server(model_dir: Path, engine_settings: dict | None = None, **server_settings) -> RunningServer:
    server_settings.setdefault("served_model_name", MODEL_NAME)
    return serve(AsyncEngine(str(model_dir), server_engine_config(**(engine_settings or {}))), **server_settings)


def serve(served: AsyncEngine | ModelCatalog, **server_settings) -> RunningServer:
    """Serve an engine, or several models, on a free port of 127.0.0.1."""
    # stored responses go to a fresh directory, never the user's own state directory
    server_settings.setdefault("state_dir", tempfile.mkdtemp(prefix="gptserve-state-"))
    server_config = dataclasses.replace(ServerConfig(port=0), **server_settings)
    app = build_app(served, server_config)
    server = make_server(app, server_config, log_level="warning")
    thread = threading.Thread(target=server.run, name="gptserve-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server, thread, f"http://127.0.0.1:{port}", server_config.api_key or "unused",
                         server_config.served_model_name or MODEL_NAME)


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    running = start_server(tiny_checkpoint)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def float32_server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    """A server at float32, for comparisons with transformers' float32 numbers."""
    running = start_server(tiny_checkpoint, {"dtype": "float32"})
    yield running
    running.stop()


@pytest.fixture(scope="session")
def keyed_server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    """A server that requires API_KEY."""
    running = start_server(tiny_checkpoint, api_key=API_KEY)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def single_slot_server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    """A server that takes one request at a time (--max-queued-requests 1)."""
    running = start_server(tiny_checkpoint, max_queued_requests=1)
    yield running
    running.stop()


@pytest.fixture
def launch(tiny_checkpoint: Path) -> Iterator:
    """Start a server of this test's own (ServerConfig fields as keywords); stopped after it."""
    started: list[RunningServer] = []

    def launch_server(**server_settings) -> RunningServer:
        started.append(start_server(tiny_checkpoint, **server_settings))
        return started[-1]

    yield launch_server
    for running in started:
        if running.thread.is_alive():
            running.stop()


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c
