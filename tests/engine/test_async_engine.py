"""The async front: concurrent streams, aborts, and one request's failure staying its own."""
from __future__ import annotations

import asyncio

import pytest

from gptserve.config import EngineConfig
from gptserve.engine.async_engine import AsyncEngine
from gptserve.engine.outputs import PromptTooLongError, RequestFailedError
from gptserve.engine.sampling_params import SamplingParams
from tests.engine.conftest import assert_same_greedy


@pytest.fixture
async def engine(tiny_checkpoint):
    eng = AsyncEngine(str(tiny_checkpoint), EngineConfig(kv_cache_memory=8 * 2**20))
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


async def test_closing_the_stream_aborts_and_frees_blocks_within_a_step(engine):
    stream = engine.generate(list(range(1, 60)), SamplingParams(max_tokens=150, ignore_eos=True), "gone")
    await stream.__anext__()
    assert engine.engine.block_manager.num_used_blocks > 0
    await stream.aclose()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0:
            break
    assert engine.stats().kv_blocks_used == 0


async def test_a_too_long_prompt_is_refused_before_any_output(engine):
    with pytest.raises(PromptTooLongError):
        await collect(engine, [1] * 250, SamplingParams(max_tokens=10), "long")


async def test_a_failure_in_one_request_fails_it_alone(engine):
    def hook(seq):
        if seq.request_id == "bad" and seq.num_output_tokens == 2:
            raise RuntimeError("injected")
    engine.engine.fault_hook = hook
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    results = await asyncio.gather(collect(engine, [1, 2], params, "good1"), collect(engine, [3, 4], params, "bad"),
                                   collect(engine, [5, 6], params, "good2"), return_exceptions=True)
    assert isinstance(results[1], RequestFailedError) and "injected" in str(results[1])
    assert len(results[0][0]) == 10 and len(results[2][0]) == 10


async def test_all_tensor_work_runs_on_the_engine_thread(tiny_checkpoint, monkeypatch):
    """Loading, steps and inspect all run on one thread (see async_engine's docstring)."""
    import threading

    from gptserve.engine import async_engine
    from gptserve.engine.llm_engine import LLMEngine

    seen: dict[str, set[str]] = {"load": set(), "step": set()}

    class Recording(LLMEngine):
        def __init__(self, *args, **kwargs):
            seen["load"].add(threading.current_thread().name)
            super().__init__(*args, **kwargs)

        def step(self):
            seen["step"].add(threading.current_thread().name)
            return super().step()

    monkeypatch.setattr(async_engine, "LLMEngine", Recording)
    eng = AsyncEngine(str(tiny_checkpoint), EngineConfig(kv_cache_memory=8 * 2**20))
    eng.start()
    try:
        await collect(eng, [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), "r")
        where = await eng.call(lambda: threading.current_thread().name)
        inspection = await eng.inspect([5, 6, 7], top_k=3)
    finally:
        await eng.shutdown()
    assert seen == {"load": {"gptserve-engine"}, "step": {"gptserve-engine"}}
    assert where == "gptserve-engine"
    assert len(inspection.top_next_tokens) == 3


def test_a_model_that_fails_to_load_raises_in_the_caller(tmp_path):
    from gptserve.model.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="has no vocab.json"):
        AsyncEngine(str(tmp_path), EngineConfig())
