"""Data parallel front: replicas behind one engine interface, least-loaded routing."""
from __future__ import annotations

import asyncio

import pytest

from gptserve.config import EngineConfig
from gptserve.engine.data_parallel import DataParallelEngine, build_engine, replica_devices
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
        for _ in range(200):
            if engine.replicas[0].stats().sequences_finished:
                break
            await asyncio.sleep(0.01)
        assert engine.replicas[0].stats().sequences_finished == {"abort": 1}
        assert engine.stats().kv_blocks_used == 0
    finally:
        await engine.shutdown()
