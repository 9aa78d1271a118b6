"""A request's resources come back however it ends: its queue slots, its KV blocks, its
place in the engine, long before the request would have ended on its own."""
from __future__ import annotations

import asyncio
import json

import httpx

from tests.conftest import prometheus_value
from tests.server.conftest import RunningServer
from tests.server.test_concurrency import kv_blocks_used, wait_until

LONG = 240  # tokens: the tiny model's whole context, many steps longer than an abort takes


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    return prometheus_value(http.get("/metrics").text, name, **labels)


def aborted(http: httpx.Client) -> float:
    return metric(http, "gptserve_sequences_finished_total", finish_reason="abort")


def generated(http: httpx.Client) -> float:
    return metric(http, "gptserve_generation_tokens_total")


async def test_a_stream_cut_before_its_first_byte_gives_everything_back(server: RunningServer):
    """The client goes away after the request was admitted and had its first token, but
    before the response's first byte went out: the SSE body never starts."""
    body = json.dumps({"messages": [{"role": "user", "content": "Begin."}], "max_tokens": LONG,
                       "stream": True, "ignore_eos": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    receives = 0

    async def receive() -> dict:
        nonlocal receives
        receives += 1
        if receives == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        if receives == 2:  # the watcher while the first token is awaited: the client is still there
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}  # then it is gone

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.start":
            await asyncio.Event().wait()  # the socket never takes the headers

    with server.http() as http:
        aborted_before, generated_before = aborted(http), generated(http)
        await asyncio.wait_for(server.server.config.app(scope, receive, send), timeout=30)
        assert [m["type"] for m in sent] == ["http.response.start"]  # no byte of the body went out
        assert server.serving.num_in_flight == 0
        wait_until(lambda: aborted(http) == aborted_before + 1)
        wait_until(lambda: kv_blocks_used(http) == 0)
        assert generated(http) - generated_before < LONG // 2, "the request ran on after its client left"


def test_a_client_gone_mid_stream_frees_its_blocks_long_before_the_request_would_end(server: RunningServer):
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": LONG, "stream": True,
            "ignore_eos": True}
    with server.http() as http:
        aborted_before, generated_before = aborted(http), generated(http)
        with server.http() as streamer, streamer.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert kv_blocks_used(http) > 0
        wait_until(lambda: kv_blocks_used(http) == 0)
        assert aborted(http) == aborted_before + 1  # counted by the engine, as it ended the request
        assert server.serving.num_in_flight == 0
        assert generated(http) - generated_before < LONG // 2, "the request ran on after its client left"


def test_a_higher_max_top_logprobs_is_honoured(launch):
    running = launch(max_top_logprobs=30)
    with running.http() as http:
        response = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": True, "top_logprobs": 25})
        assert response.status_code == 200, response.text
        content = response.json()["choices"][0]["logprobs"]["content"]
        assert [len(token["top_logprobs"]) for token in content] == [25, 25]
        response = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "logprobs": 30})
        assert response.status_code == 200, response.text
        assert len(response.json()["choices"][0]["logprobs"]["top_logprobs"][0]) >= 30
        too_many = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "logprobs": 31})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "logprobs"


def test_a_client_gone_while_waiting_for_a_whole_reply_aborts_it(server: RunningServer):
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": LONG, "ignore_eos": True}
    with server.http() as http:
        aborted_before, generated_before = aborted(http), generated(http)
        with server.http(timeout=httpx.Timeout(10, read=0.2)) as impatient:
            try:
                impatient.post("/v1/chat/completions", json=body)
            except httpx.TimeoutException:
                pass
        wait_until(lambda: aborted(http) == aborted_before + 1)
        wait_until(lambda: kv_blocks_used(http) == 0)
        assert server.serving.num_in_flight == 0
        assert generated(http) - generated_before < LONG, "the request ran to its end after its client left"
