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


async def test_requests_spread_over_replicas_by_load_and_all_finish(tiny_checkpoint):
    cfg = EngineConfig(device="cpu", kv_cache_memory=4 * 2**20, data_parallel_size=2)
    engine = build_engine(str(tiny_checkpoint), cfg)
    assert isinstance(engine, DataParallelEngine) and len(engine.replicas) == 2
    engine.start()
    seen_loads = []

    async def one(i):
        n = 0
        async for out in engine.generate([1, 2, i], SamplingParams(max_tokens=6, ignore_eos=True), f"r{i}"):
            seen_loads.append(tuple(engine.in_flight))
            n += sum(len(c.token_ids) for c in out.choices)
        return n

    try:
        counts = await asyncio.gather(*(one(i) for i in range(10)))
        assert counts == [6] * 10
        assert any(a > 0 and b > 0 for a, b in seen_loads), "one replica took everything"
        assert all(abs(a - b) <= 1 for a, b in seen_loads[:1])
        stats = engine.stats()
        assert stats.generation_tokens == 60 and stats.kv_blocks_used == 0
        gens = [r.stats().generation_tokens for r in engine.replicas]
        assert gens == [30, 30]
    finally:
        await engine.shutdown()
