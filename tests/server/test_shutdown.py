"""Stopping the server: in-flight streams end cleanly, then the server exits."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import prometheus_value

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


def wait_until_healthy(proc: subprocess.Popen, base: str, timeout: float = 120) -> None:
    """Until the server process answers /health with 200 (it must not exit meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


def metric(base: str, name: str) -> float:
    return prometheus_value(httpx.get(f"{base}/metrics").text, name)


IN_FLIGHT = [  # (path, body): streams of both kinds, one of two choices, and a whole answer
    ("/v1/chat/completions", LONG_STREAM),
    ("/v1/chat/completions", {**LONG_STREAM, "n": 2}),
    ("/v1/completions", {"prompt": "Go on.", "max_tokens": 240, "stream": True, "ignore_eos": True}),
    ("/v1/chat/completions", {**LONG_STREAM, "stream": False}),
]


def finish_reasons(body: dict, lines: list[str]) -> list[str | None]:
    """Every choice's finish reason, from a whole answer or from a stream that must end with [DONE]."""
    if not body["stream"]:
        return [c["finish_reason"] for c in json.loads("".join(lines))["choices"]]
    data = [e.removeprefix("data: ") for e in lines if e.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    chunks = [json.loads(e) for e in data[:-1]]
    return [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_every_request_in_flight_then_the_process_exits(tiny_checkpoint, sig):
    port = free_port()
    command = [sys.executable, "-m", "gptserve.cli", "--log-level", "WARNING", "serve", "--model", str(tiny_checkpoint),
               "--device", "cpu", "--kv-cache-memory", "8MiB", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    results: list[tuple[int, list[str]] | BaseException] = [None] * len(IN_FLIGHT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, base)
        deadline = time.monotonic() + 120

        def run(i: int, path: str, body: dict) -> None:
            try:
                with httpx.Client(base_url=base, timeout=60) as http, http.stream("POST", path, json=body) as r:
                    results[i] = (r.status_code, list(r.iter_lines()))
            except BaseException as e:  # noqa: BLE001 - reported by the assertions below
                results[i] = e

        threads = [threading.Thread(target=run, args=(i, *req)) for i, req in enumerate(IN_FLIGHT)]
        for t in threads:
            t.start()
        # every request is being generated before the signal
        while metric(base, "gptserve_num_requests_running") < len(IN_FLIGHT):
            assert time.monotonic() < deadline, "requests did not start"
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        for t in threads:
            t.join(timeout=60)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for (path, body), result in zip(IN_FLIGHT, results):
        assert not isinstance(result, BaseException), (path, result)
        status, lines = result
        assert status == 200, (path, lines)
        reasons = finish_reasons(body, lines)
        assert reasons == ["abort"] * body.get("n", 1), (path, reasons)  # ended early, each choice
    # uvicorn re-raises the signal once it has shut down. A re-raised SIGINT goes through
    # asyncio.run's own SIGINT handler, which only cancels the main task; when that task
    # has no await left it ends normally and the process exits 0 (a race, seen once in ~10)
    assert proc.returncode in ((-sig,) if sig == signal.SIGTERM else (-sig, 0, 130)), proc.returncode  # 130: Ctrl-C
