"""bench/serve.py, the load generator, drives every API the server speaks and counts what
it asked for: each request's output tokens, as the server's usage reports them."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH_SERVE = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


@pytest.fixture(scope="module")
def bench_serve():
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH_SERVE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("endpoint", ["completions", "chat", "responses", "messages"])
def test_the_load_generator_streams_every_api(server, bench_serve, endpoint: str):
    summary = bench_serve.main(["--base-url", server.base_url, "--endpoint", endpoint, "--num-requests", "3",
                                "--concurrency", "2", "--input-len", "8", "--output-len", "6", "--disable-tqdm"])
    assert summary["completed"] == 3 and summary["failed"] == 0, summary["errors"]
    assert summary["usage_reported"] == 3 and summary["wrong_output_len"] == 0
    assert summary["total_output_tokens"] == 18 and summary["ttft_ms"]["p50"] > 0


async def test_a_request_on_a_connection_the_server_closed_while_idle_is_sent_once_more(bench_serve):
    """llama.cpp's server closes idle keep-alive connections: the next request on one sees
    the server disconnect before any response, and goes again on a new connection."""
    import argparse
    import asyncio

    import httpx

    body = b'data: {"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}]}\n\ndata: [DONE]\n\n'
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if connections > 1:  # the first connection is closed with no answer
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    args = argparse.Namespace(model="m", temperature=0.0, endpoint="completions", no_ignore_eos=False,
                              eos_logit_bias=False, extra_body={})
    spec = bench_serve.RequestSpec("hello", None, 1)
    async with server, httpx.AsyncClient(trust_env=False) as client:
        result = await bench_serve.send_request(client, f"http://127.0.0.1:{port}/v1/completions", args, spec, 0.0)
    assert connections == 2 and result.ok and result.error == "", result.error
