"""Data parallel front: replicas behind one engine interface, least-loaded routing."""
from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import time

import pytest

from gptserve.config import EngineConfig
from gptserve.engine.data_parallel import DataParallelEngine, build_engine, replica_devices, uses_processes
from gptserve.engine.outputs import InvalidPromptError, PromptTooLongError
from gptserve.engine.placement import PlacementError
from gptserve.engine.sampling_params import SamplingParams


def test_replicas_go_one_per_gpu_and_refuse_missing_gpus():
    assert replica_devices("auto", 2, cuda_count=4) == ["cuda:0", "cuda:1"]
    assert replica_devices("cpu", 2, cuda_count=0) == ["cpu", "cpu"]
    with pytest.raises(PlacementError, match="needs 4 CUDA GPUs; 1 found"):
        replica_devices("cuda", 4, cuda_count=1)
    with pytest.raises(PlacementError):
        replica_devices("cuda:1", 2, cuda_count=2)


async def test_each_request_goes_to_the_least_loaded_replica_and_all_finish(tiny_checkpoint):
    cfg = EngineConfig(device="cpu", kv_cache_memory=4 * 2**20, data_parallel_size=2)
    engine = build_engine(str(tiny_checkpoint), cfg)
    assert isinstance(engine, DataParallelEngine) and len(engine.replicas) == 2
    engine.start()
    try:
        streams, loads, counts = [], [], []
        for i in range(10):  # each request opened while the ones before it are still in flight
            stream = engine.generate([1, 2, i], SamplingParams(max_tokens=6, ignore_eos=True), f"r{i}")
            first = await stream.__anext__()
            streams.append(stream)
            loads.append(tuple(engine.in_flight))
            counts.append(sum(len(c.token_ids) for c in first.choices))
        assert loads == [(1, 0), (1, 1), (2, 1), (2, 2), (3, 2), (3, 3), (4, 3), (4, 4), (5, 4), (5, 5)]
        for i, stream in enumerate(streams):
            async for out in stream:
                counts[i] += sum(len(c.token_ids) for c in out.choices)
        assert counts == [6] * 10 and engine.in_flight == [0, 0] and engine.owner == {}
        stats = engine.stats()
        assert stats.generation_tokens == 60 and stats.kv_blocks_used == 0
        assert stats.sequences_finished == {"length": 10}
        assert [r.stats().generation_tokens for r in engine.replicas] == [30, 30]
    finally:
        await engine.shutdown()


async def test_an_abort_goes_to_the_replica_that_runs_the_request(tiny_checkpoint):
    cfg = EngineConfig(device="cpu", kv_cache_memory=4 * 2**20, data_parallel_size=2)
    engine = build_engine(str(tiny_checkpoint), cfg)
    engine.start()
    try:
        held = engine.generate([1, 2], SamplingParams(max_tokens=200, ignore_eos=True), "first")
        await held.__anext__()
        stream = engine.generate([3, 4], SamplingParams(max_tokens=200, ignore_eos=True), "second")
        await stream.__anext__()
        assert engine.owner == {"first": 0, "second": 1}
        engine.abort("second")
        finish = None
        async for out in stream:
            finish = out.choices[-1].finish_reason if out.choices else finish
        assert finish.value == "abort"
        assert engine.replicas[1].stats().sequences_finished == {"abort": 1}
        assert engine.replicas[0].stats().sequences_finished == {}
        await held.aclose()  # closing a stream unfinished aborts it on its replica
        deadline = time.monotonic() + 30  # the abort reaches the replica's loop at its next step
        while not engine.replicas[0].stats().sequences_finished and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.replicas[0].stats().sequences_finished == {"abort": 1}
        assert engine.stats().kv_blocks_used == 0
    finally:
        await engine.shutdown()


def test_replicas_are_processes_on_gpus_and_threads_on_the_cpu_unless_asked():
    assert uses_processes("auto", ["cuda:0", "cuda:1"])
    assert not uses_processes("auto", ["cpu", "cpu"])
    assert uses_processes("process", ["cpu", "cpu"])
    assert not uses_processes("thread", ["cuda:0", "cuda:1"])
    with pytest.raises(PlacementError, match="unknown data parallel backend 'ray'"):
        uses_processes("ray", ["cpu"])


async def _greedy(engine, prompt: list[int], params: SamplingParams, request_id: str) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(prompt, params, request_id):
        tokens.extend(t for c in out.choices for t in c.token_ids)
    return tokens


async def test_replicas_in_processes_give_one_engines_greedy_tokens_and_share_the_work(tiny_checkpoint):
    from gptserve.engine.llm_engine import LLMEngine

    prompts = [[(7 * i + j) % 500 + 1 for j in range(3 + 5 * i)] for i in range(8)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    cfg = EngineConfig(device="cpu", dtype="float32", kv_cache_memory=4 * 2**20)
    single = LLMEngine(str(tiny_checkpoint), cfg)
    want = [choices[0] for choices in single.generate(prompts, params)]

    engine = build_engine(str(tiny_checkpoint), dataclasses.replace(cfg, data_parallel_size=2,
                                                                    data_parallel_backend="process"))
    assert isinstance(engine, DataParallelEngine) and len(engine.processes) == 2
    pids = {p._process.pid for p in engine.processes}
    assert len(pids) == 2 and os.getpid() not in pids
    engine.start()
    try:
        got = await asyncio.gather(*(_greedy(engine, p, params, f"r{i}") for i, p in enumerate(prompts)))
        assert got == want
        per_replica = [r.stats().generation_tokens for r in engine.replicas]
        assert per_replica == [40, 40]  # least-loaded routing alternates: four requests each
        assert engine.stats().generation_tokens == 80 and engine.stats().kv_blocks_used == 0
        assert engine.tokenizer.decode(want[0]) == single.tokenizer.decode(want[0])
    finally:
        await engine.shutdown()
    assert not any(p._process.is_alive() for p in engine.processes)


async def test_a_process_replica_refuses_a_request_with_the_engines_own_error(tiny_checkpoint):
    cfg = EngineConfig(device="cpu", dtype="float32", kv_cache_memory=4 * 2**20, data_parallel_size=2,
                       data_parallel_backend="process")
    engine = build_engine(str(tiny_checkpoint), cfg)
    engine.start()
    try:
        with pytest.raises(PromptTooLongError, match="maximum context length is 256 tokens"):
            await _greedy(engine, [1] * 300, SamplingParams(max_tokens=1), "long")
        with pytest.raises(InvalidPromptError, match="outside the vocabulary"):
            await _greedy(engine, [10**6], SamplingParams(max_tokens=1), "bad")
        assert await _greedy(engine, [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), "ok") != []
        [vector] = await engine.embed([[1, 2, 3]])
        assert abs(sum(x * x for x in vector) - 1) < 1e-5
    finally:
        await engine.shutdown()


def test_a_process_replica_that_fails_to_load_raises_its_error_and_leaves_no_process(tmp_path):
    from gptserve.weights.loader import CheckpointError

    cfg = EngineConfig(device="cpu", kv_cache_memory=4 * 2**20, data_parallel_size=2, data_parallel_backend="process")
    with pytest.raises(CheckpointError, match="does not exist"):
        build_engine(str(tmp_path / "missing"), cfg)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("gptserve-engine")]
