"""x-request-id: on every response (the client's own when usable, else ours), streams and
errors included, and on the server's log lines written while the request is served."""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import httpx
import pytest

from gptserve.cli import SERVE_LOG_FORMAT as LOG_FORMAT
from gptserve.server.request_id import RequestIdFilter

GENERATED = re.compile(r"[0-9a-f]{32}")  # uuid4 hex
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": True}


def test_a_response_carries_a_request_id_of_its_own(http: httpx.Client):
    first, second = http.get("/v1/models").headers["x-request-id"], http.get("/v1/models").headers["x-request-id"]
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second)
    assert first != second


def test_the_clients_request_id_comes_back(http: httpx.Client):
    response = http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "trace-42/a:b=c"})
    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == ["trace-42/a:b=c"]


@pytest.mark.parametrize("sent", [b"x" * 129, "café".encode(), b""], ids=["too long", "not ascii", "empty"])
def test_an_unusable_request_id_is_replaced_by_ours(http: httpx.Client, sent: bytes):
    response = http.get("/health", headers={"x-request-id": sent})
    assert GENERATED.fullmatch(response.headers["x-request-id"])


def test_a_stream_carries_the_request_id(http: httpx.Client):
    with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                     headers={"x-request-id": "stream-7"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"] == "stream-7"
        assert list(response.iter_lines())[-2:] == ["data: [DONE]", ""]


@pytest.mark.parametrize("method,path,body,status", [
    ("GET", "/v1/nowhere", None, 404),
    ("POST", "/v1/chat/completions", {"messages": []}, 400),
    ("POST", "/v1/completions", {"prompt": "x" * 3_000_000}, 413),
])
def test_an_error_carries_the_request_id(http: httpx.Client, method: str, path: str, body, status: int):
    response = http.request(method, path, json=body, headers={"x-request-id": f"err-{status}"})
    assert response.status_code == status
    assert response.headers["x-request-id"] == f"err-{status}"


def test_a_missing_api_key_401_carries_the_request_id(keyed_server):
    with keyed_server.http() as http:
        response = http.get("/v1/models", headers={"x-request-id": "no-key"})
    assert response.status_code == 401 and response.headers["x-request-id"] == "no-key"


def test_the_500_of_an_unexpected_exception_carries_the_request_id(http: httpx.Client, server, monkeypatch):
    def broken(model: str | None) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.models, "resolve", broken)
    response = http.get("/v1/models/tiny-gpt2", headers={"x-request-id": "bug-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "bug-1"


@pytest.fixture
def server_log() -> Iterator[list[str]]:
    """The gptserve log lines, formatted as the command line formats them, at DEBUG."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("gptserve")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_log_lines_written_while_a_request_is_served_carry_its_id(http: httpx.Client, server_log: list[str]):
    assert http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "logged-9"}).status_code == 200
    assert any("[logged-9]" in line and "prompt(s)" in line for line in server_log), server_log
    logging.getLogger("gptserve.test").info("outside any request")
    assert server_log[-1].endswith("[-]: outside any request")
