"""Many clients at once, and clients that go away."""
from __future__ import annotations

import asyncio
import time

import httpx

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def kv_blocks_used(http: httpx.Client) -> float:
    line = next(ln for ln in http.get("/metrics").text.splitlines() if ln.startswith("gptserve_kv_blocks_used "))
    return float(line.split()[-1])


def aborted_sequences(http: httpx.Client) -> float:
    prefix = 'gptserve_sequences_finished_total{finish_reason="abort"} '
    line = next((ln for ln in http.get("/metrics").text.splitlines() if ln.startswith(prefix)), None)
    return float(line.split()[-1]) if line else 0.0


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


def test_client_disconnect_mid_stream_aborts_and_frees_kv_blocks(server, http: httpx.Client):
    aborted_before = aborted_sequences(http)
    body = {"messages": MESSAGES, "max_tokens": 240, "stream": True, "ignore_eos": True}
    with server.http() as streamer, streamer.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert kv_blocks_used(http) > 0
    # the connection is closed here, long before 240 tokens
    wait_until(lambda: aborted_sequences(http) == aborted_before + 1)
    wait_until(lambda: kv_blocks_used(http) == 0)
    assert server.serving.num_in_flight == 0


def test_client_disconnect_while_waiting_for_a_whole_reply_aborts_it(server, http: httpx.Client):
    aborted_before = aborted_sequences(http)
    body = {"messages": MESSAGES, "max_tokens": 240, "ignore_eos": True}
    with server.http(timeout=httpx.Timeout(10, read=0.2)) as impatient:
        try:
            impatient.post("/v1/chat/completions", json=body)
        except httpx.TimeoutException:
            pass
    wait_until(lambda: aborted_sequences(http) == aborted_before + 1)
    wait_until(lambda: kv_blocks_used(http) == 0)
