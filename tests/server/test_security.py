"""Security: the API key is checked in constant time and never logged; prompts and outputs
are not logged at INFO; CORS is off unless configured; every request limit is enforced,
configurable from `gptserve serve`, and refused with a message naming it."""
from __future__ import annotations

import hmac
import logging
import os
import signal
import subprocess
import sys
from typing import Iterator

import httpx
import pytest

from gptserve.cli import build_parser
from gptserve.cli.flags import server_config
from gptserve.config import ServerConfig
from tests.server.conftest import API_KEY
from tests.server.test_errors import assert_error
from tests.server.test_shutdown import free_port, wait_until_healthy

# --- the API key --------------------------------------------------------------------------


def test_api_key_is_compared_in_constant_time(keyed_server, monkeypatch):
    compared = []

    def spy(a, b):
        compared.append((a, b))
        return hmac_compare(a, b)

    hmac_compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", spy)
    with keyed_server.http(headers={"Authorization": "Bearer sk-wrong"}) as http:
        assert_error(http.get("/v1/models"), 401)
    with keyed_server.http(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        assert http.get("/v1/models").status_code == 200
    assert compared == [(b"sk-wrong", API_KEY.encode()), (API_KEY.encode(), API_KEY.encode())]


def test_a_key_that_is_not_ascii_is_401_not_500(keyed_server):
    with keyed_server.http(headers={"Authorization": "Bearer sk-\xe9\xff".encode("latin-1")}) as http:
        assert_error(http.get("/v1/models"), 401)


def test_the_api_key_never_appears_in_the_logs_even_at_debug(tiny_checkpoint):
    """The real CLI, logging at DEBUG, served with a key: right and wrong keys, good and bad requests."""
    key, wrong = "sk-secret-7f3a9c1e5b", "sk-guess-0d2b4e6f8a"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptserve.cli", "--log-level", "DEBUG", "serve", "--model", str(tiny_checkpoint),
         "--device", "cpu", "--kv-cache-memory", "8MiB", "--enforce-eager", "--port", str(port), "--api-key", key],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, base)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            assert http.post("/v1/chat/completions", json=body).status_code == 200
            assert http.post("/v1/chat/completions", json={**body, "stream": True}).status_code == 200
            assert http.post("/v1/chat/completions", json={**body, "temperature": 9}).status_code == 400
        for headers in ({"Authorization": f"Bearer {wrong}"}, {"Authorization": wrong}, {"X-Api-Key": wrong}):
            assert httpx.get(f"{base}/v1/models", headers=headers).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"X-Api-Key": key}).status_code == 200  # Anthropic's header
        os.kill(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "DEBUG" in output  # it did log at DEBUG
    assert key not in output and wrong not in output


# --- prompts and outputs ---------------------------------------------------------------------


class RecordingHandler(logging.Handler):
    """Records what the server logs at INFO and above: ours (through the root logger), and
    uvicorn's, whose loggers don't propagate and are configured when a server is made."""

    UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def attach(self, *names: str) -> None:
        for name in names:
            logger = logging.getLogger(name)
            self.levels.setdefault(name, logger.level)
            logger.setLevel(logging.INFO)
            logger.addHandler(self)

    def detach(self) -> None:
        for name, level in self.levels.items():
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(level)


def test_prompts_and_outputs_are_not_logged_at_info(launch):
    secret = "Zanzibar quokka 4417"
    logs = RecordingHandler()
    try:
        logs.attach("", "gptserve")
        running = launch()
        logs.attach(*RecordingHandler.UVICORN)  # at INFO, as `gptserve serve` runs them
        messages = [{"role": "user", "content": f"My secret is {secret}."}]
        with running.http() as http:
            reply = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 24, "temperature": 0,
                                                            "ignore_eos": True}).json()
            streamed = running.sse("/v1/chat/completions", {"messages": messages, "max_tokens": 8, "stream": True})
            completion = http.post("/v1/completions", json={"prompt": secret, "max_tokens": 24, "temperature": 0,
                                                            "ignore_eos": True}).json()
            assert http.post("/tokenize", json={"prompt": secret}).status_code == 200
            assert http.post("/v1/completions", json={"prompt": secret * 200, "max_tokens": 200}).status_code == 400
        running.stop()
    finally:
        logs.detach()
    assert streamed[-1] == "[DONE]"
    outputs = [reply["choices"][0]["message"]["content"], completion["choices"][0]["text"]]
    assert all(len(text) > 20 for text in outputs)  # distinctive enough to search for
    assert logs.lines and any("POST /v1/chat/completions" in line for line in logs.lines)  # it did log
    text = "\n".join(logs.lines)
    assert secret not in text and "Zanzibar" not in text
    assert not any(output in text for output in outputs)


# --- CORS -------------------------------------------------------------------------------------

PREFLIGHT = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_preflight_is_refused_by_default(http: httpx.Client):
    response = http.options("/v1/chat/completions", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-methods" not in response.headers


# (allowed origins, configured: test_endpoints.py's test_cors_allows_the_configured_origins)


# --- limits -------------------------------------------------------------------------------------

LIMITS = dict(max_body_bytes=4096, max_messages=2, max_tokens_limit=8, max_n=2, max_top_logprobs=3,
              max_stop_strings=2, max_stop_length=5)


def test_serve_flags_set_every_limit_and_cors():
    args = build_parser().parse_args([
        "serve", "--max-body-bytes", "4KiB", "--max-messages", "2", "--max-tokens-limit", "8", "--max-n", "2",
        "--max-top-logprobs", "3", "--max-stop-strings", "2", "--max-stop-length", "5",
        "--cors-allow-origin", "http://a.example", "--cors-allow-origin", "http://b.example",
        "--stream-send-timeout", "7", "--api-key", "k"])
    config = server_config(args)
    assert {name: getattr(config, name) for name in LIMITS} == LIMITS
    assert config.cors_allow_origins == ["http://a.example", "http://b.example"]
    assert config.stream_send_timeout == 7 and config.api_key == "k"
    assert server_config(build_parser().parse_args(["serve"])) == ServerConfig()  # the defaults are ServerConfig's


@pytest.fixture(scope="module")
def limited(tiny_checkpoint) -> Iterator[httpx.Client]:
    from tests.server.conftest import start_server

    running = start_server(tiny_checkpoint, **LIMITS)
    with running.http() as http:
        yield http
    running.stop()


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


@pytest.mark.parametrize("path,body,param,words", [
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "a"}] * 3), "messages",
     ["2", "--max-messages"]),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}] * 3}, "messages", ["2", "--max-messages"]),
    ("/v1/chat/completions", chat(max_tokens=9), "max_tokens", ["8", "--max-tokens-limit"]),
    ("/v1/chat/completions", chat(max_completion_tokens=9), "max_completion_tokens", ["8", "--max-tokens-limit"]),
    ("/v1/completions", {"prompt": "a", "max_tokens": 9}, "max_tokens", ["8", "--max-tokens-limit"]),
    ("/v1/chat/completions", chat(n=3), "n", ["2", "--max-n"]),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2, "n": 3}, "n", ["2", "--max-n"]),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=4), "top_logprobs", ["3", "--max-top-logprobs"]),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2, "logprobs": 4}, "logprobs", ["3", "--max-top-logprobs"]),
    ("/v1/chat/completions", chat(stop=["a", "b", "c"]), "stop", ["2", "--max-stop-strings"]),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2, "stop": ["a", "b", "c"]}, "stop",
     ["2", "--max-stop-strings"]),
    ("/v1/chat/completions", chat(stop="abcdef"), "stop", ["5", "--max-stop-length"]),
])
def test_a_request_over_a_limit_is_400_naming_the_limit(limited: httpx.Client, path, body, param, words):
    error = assert_error(limited.post(path, json=body), 400, param)
    assert all(word in error["message"] for word in words), error["message"]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "a"}] * 2, n=2, max_tokens=8,
                                  logprobs=True, top_logprobs=3, stop=["abcde", "x"])),
    ("/v1/completions", {"prompt": "a", "max_tokens": 8, "n": 2, "logprobs": 3, "stop": ["abcde", "x"]}),
])
def test_a_request_at_every_limit_is_served(limited: httpx.Client, path, body):
    assert limited.post(path, json=body).status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_max_body_bytes_is_413_naming_the_limit(limited: httpx.Client, chunked):
    body = b'{"prompt": "' + b"x" * 5000 + b'", "max_tokens": 2}'
    content = iter([body[:1000], body[1000:]]) if chunked else body  # no Content-Length when chunked
    response = limited.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    error = assert_error(response, 413)
    assert "4096" in error["message"] and "--max-body-bytes" in error["message"]


def test_without_max_tokens_a_request_stops_at_max_tokens_limit(limited: httpx.Client):
    # before: no max_tokens meant "to the end of the context", past --max-tokens-limit
    reply = limited.post("/v1/chat/completions", json=chat(max_tokens=None, ignore_eos=True)).json()
    assert reply["usage"]["completion_tokens"] == 8 and reply["choices"][0]["finish_reason"] == "length"
    completion = limited.post("/v1/completions", json={"prompt": "a", "max_tokens": None, "ignore_eos": True}).json()
    assert completion["usage"]["completion_tokens"] == 8
