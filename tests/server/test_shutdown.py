"""Stopping the server: in-flight streams end cleanly, then the server exits."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

LONG_STREAM = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 240, "stream": True,
               "ignore_eos": True}


def finish_of(events: list[str]) -> str | None:
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return next((c["choices"][0]["finish_reason"] for c in reversed(chunks) if c["choices"]), None)


def test_stopping_the_server_ends_open_streams_with_done(launch):
    running = launch()
    with running.http() as http, http.stream("POST", "/v1/chat/completions", json=LONG_STREAM) as response:
        lines = response.iter_lines()
        events = [next(lines) for _ in range(4)]
        running.server.should_exit = True
        events += list(lines)
    running.thread.join(timeout=30)
    assert not running.thread.is_alive()
    data = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert finish_of(data) == "abort"
    assert len(data) < 200  # ended early, not by running out of tokens
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{running.base_url}/health")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_open_streams_then_the_process_exits(tiny_checkpoint, sig):
    port = free_port()
    script = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from gptserve.config import EngineConfig, ServerConfig\n"
        "from gptserve.server.serve import run_server\n"
        f"run_server({str(tiny_checkpoint)!r}, EngineConfig(device='cpu', kv_cache_memory=8 * 2**20),"
        f" ServerConfig(port={port}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=60) as http, \
                http.stream("POST", "/v1/chat/completions", json=LONG_STREAM) as response:
            lines = response.iter_lines()
            events = [next(lines) for _ in range(4)]
            os.kill(proc.pid, sig)
            events += list(lines)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    data = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert finish_of(data) == "abort"
    assert proc.returncode == -sig  # uvicorn re-raises the signal once it has shut down
