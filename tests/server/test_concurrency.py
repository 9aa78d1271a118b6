"""Many clients at once (clients that go away: test_lifecycle.py)."""
from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import prometheus_value



def kv_blocks_used(http: httpx.Client) -> float:
    return prometheus_value(http.get("/metrics").text, "gptserve_kv_blocks_used")


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


async def test_32_concurrent_streams_all_complete(server):
    client = server.async_client()

    async def one(i: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": f"Story number {i}"}], max_tokens=24,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, usage = "", None, 0
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return text, finish, usage

    results = await asyncio.gather(*(one(i) for i in range(32)))
    await client.close()
    assert all(finish == "length" and usage == 24 for _, finish, usage in results)
    # batched with 31 others, each greedy reply is the one it gets alone
    alone = server.client().chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "Story number 5"}], max_tokens=24,
        temperature=0, extra_body={"ignore_eos": True})
    assert results[5][0] == alone.choices[0].message.content
