"""The async front: concurrent streams, aborts, lifecycle edges, and one request's failure
staying its own."""
from __future__ import annotations

import asyncio
import threading

import pytest

from gptserve.config import EngineConfig
from gptserve.engine.async_engine import AsyncEngine
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.outputs import EngineDeadError, PromptTooLongError, RequestFailedError
from gptserve.engine.sampling_params import SamplingParams
from tests.engine.conftest import assert_same_greedy


@pytest.fixture
async def engine(tiny_checkpoint, speculation, precision):
    """The engine thread's engine, in each variant (tests/engine/conftest.py)."""
    eng = AsyncEngine(str(tiny_checkpoint), EngineConfig(kv_cache_memory=8 * 2**20, dtype=precision,
                                                         speculative=speculation))
    eng.start()
    yield eng
    await eng.shutdown()
    assert eng.engine.block_manager.num_used_blocks == 0


async def collect(engine: AsyncEngine, prompt, params, rid):
    tokens, finish = [], None
    async for out in engine.generate(prompt, params, rid):
        for c in out.choices:
            tokens += c.token_ids
            finish = c.finish_reason or finish
    return tokens, finish


async def test_hundreds_of_concurrent_requests_all_complete(engine):
    params = SamplingParams(temperature=0.7, max_tokens=8, ignore_eos=True)
    results = await asyncio.gather(*(collect(engine, [i % 500 + 1, 2, 3], params, f"r{i}") for i in range(300)))
    assert all(len(t) == 8 and f == "length" for t, f in results)
    assert engine.stats().generation_tokens == 300 * 8


async def test_concurrent_greedy_streams_equal_each_prompt_alone(engine):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[7, 8, 9, i] for i in range(6)]
    streamed = await asyncio.gather(*(collect(engine, p, params, f"g{i}") for i, p in enumerate(prompts)))
    for prompt, (tokens, _) in zip(prompts, streamed):
        assert_same_greedy(tokens, prompt, engine.engine.model)


async def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_closing_the_stream_aborts_long_before_the_request_would_end(engine):
    max_tokens = 240  # the whole context of the tiny model: far more steps than an abort takes
    stream = engine.generate([1, 2, 3], SamplingParams(max_tokens=max_tokens, ignore_eos=True), "gone")
    await stream.__anext__()
    assert engine.stats().kv_blocks_used > 0
    await stream.aclose()
    await wait_for(lambda: engine.stats().kv_blocks_used == 0)
    stats = engine.stats()
    assert stats.num_requests_running == 0 and stats.num_requests_waiting == 0
    assert stats.generation_tokens < max_tokens // 2, "the request ran on after its stream was closed"
    assert stats.sequences_finished == {"abort": 1}
    # and nothing of it runs after: a later request's steps add its own tokens alone
    tokens, _ = await collect(engine, [4, 5], SamplingParams(max_tokens=6, ignore_eos=True), "after")
    assert len(tokens) == 6
    assert engine.stats().generation_tokens == stats.generation_tokens + 6


async def test_cancelling_the_task_that_reads_a_stream_aborts_its_request(engine):
    async def read() -> None:
        async for _ in engine.generate([4, 5, 6], SamplingParams(max_tokens=240, ignore_eos=True), "cancelled"):
            pass

    task = asyncio.create_task(read())
    await wait_for(lambda: engine.stats().generation_tokens > 0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await wait_for(lambda: engine.stats().kv_blocks_used == 0)
    assert engine.stats().generation_tokens < 120
    assert engine.stats().sequences_finished == {"abort": 1}


async def test_a_too_long_prompt_is_refused_before_any_output(engine):
    with pytest.raises(PromptTooLongError):
        await collect(engine, [1] * 250, SamplingParams(max_tokens=10), "long")


async def test_a_failure_in_one_request_fails_it_alone(engine, monkeypatch):
    append_token = engine.engine._append_token

    def faulty(seq, token, logprob, detail=None):
        if seq.request_id == "bad" and seq.num_output_tokens == 2:
            raise RuntimeError("injected")
        append_token(seq, token, logprob, detail)
    monkeypatch.setattr(engine.engine, "_append_token", faulty)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    results = await asyncio.gather(collect(engine, [1, 2], params, "good1"), collect(engine, [3, 4], params, "bad"),
                                   collect(engine, [5, 6], params, "good2"), return_exceptions=True)
    assert isinstance(results[1], RequestFailedError) and "injected" in str(results[1])
    assert len(results[0][0]) == 10 and len(results[2][0]) == 10
    assert engine.stats().sequences_finished == {"length": 2, "error": 1}


async def test_all_tensor_work_runs_on_the_engine_thread(tiny_checkpoint, monkeypatch):
    """Loading, steps and inspect all run on one thread (see async_engine's docstring)."""
    from gptserve.engine import async_engine

    seen: dict[str, set[str]] = {"load": set(), "step": set(), "inspect": set()}

    class Recording(LLMEngine):
        def __init__(self, *args, **kwargs):
            seen["load"].add(threading.current_thread().name)
            super().__init__(*args, **kwargs)

        def step(self):
            seen["step"].add(threading.current_thread().name)
            return super().step()

        def inspect(self, *args):
            seen["inspect"].add(threading.current_thread().name)
            return super().inspect(*args)

    monkeypatch.setattr(async_engine, "LLMEngine", Recording)
    eng = AsyncEngine(str(tiny_checkpoint), EngineConfig(kv_cache_memory=8 * 2**20))
    eng.start()
    try:
        await collect(eng, [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), "r")
        inspection = await eng.inspect([5, 6, 7], top_k=3, decimals=4)
    finally:
        await eng.shutdown()
    assert seen == {"load": {"gptserve-engine"}, "step": {"gptserve-engine"}, "inspect": {"gptserve-engine"}}
    assert len(inspection.top_next_tokens) == 3


def test_a_model_that_fails_to_load_raises_in_the_caller(tmp_path):
    from gptserve.model.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="has no vocab.json"):
        AsyncEngine(str(tmp_path), EngineConfig())


class DyingEngine(LLMEngine):
    """An engine whose step loop dies (a BaseException out of step) when `die` is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.die = threading.Event()

    def step(self):
        if self.die.is_set():
            raise SystemError("the step loop broke")
        return super().step()

    # before the engine interface, the event loop called this between its "is the loop
    # dead?" check and registering the request: the window a dying loop slips through
    def check_request(self, prompt_token_ids, params):
        self.die.set()
        self.loop_thread.join(10)


async def test_a_request_racing_the_loops_death_is_told_the_engine_died(tiny_checkpoint):
    llm = DyingEngine(str(tiny_checkpoint), EngineConfig(kv_cache_memory=8 * 2**20))
    eng = AsyncEngine(None, engine=llm)
    llm.loop_thread = eng._thread
    eng.start()
    busy = asyncio.create_task(collect(eng, [1, 2, 3], SamplingParams(max_tokens=240, ignore_eos=True), "busy"))
    await wait_for(lambda: eng.stats().generation_tokens > 0)

    async def racer() -> None:
        await asyncio.sleep(0.01)
        llm.die.set()  # the loop dies right after the request below registered

    kill = asyncio.create_task(racer())
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(collect(eng, [4, 5], SamplingParams(max_tokens=200, ignore_eos=True), "late"), timeout=10)
    await kill
    with pytest.raises(EngineDeadError):
        await busy
    with pytest.raises(EngineDeadError):  # and after the death, at once
        await asyncio.wait_for(collect(eng, [6], SamplingParams(max_tokens=2), "later"), timeout=10)
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(eng.inspect([6], top_k=1, decimals=2), timeout=10)
    assert not eng.is_ready
    await eng.shutdown()


async def test_shutdown_ends_every_stream_with_abort_and_refuses_new_requests(tiny_checkpoint):
    eng = AsyncEngine(str(tiny_checkpoint), EngineConfig(kv_cache_memory=8 * 2**20))
    eng.start()
    streams = [asyncio.create_task(collect(eng, [i, 2, 3], SamplingParams(max_tokens=240, ignore_eos=True), f"s{i}"))
               for i in range(4)]
    await wait_for(lambda: eng.stats().generation_tokens >= 4)
    await eng.shutdown()
    results = await asyncio.gather(*streams)
    assert all(finish == "abort" and len(tokens) < 240 for tokens, finish in results)
    with pytest.raises(EngineDeadError):
        await collect(eng, [1], SamplingParams(max_tokens=2), "after")
    assert eng.engine.block_manager.num_used_blocks == 0
