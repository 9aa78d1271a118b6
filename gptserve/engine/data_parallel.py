"""Data parallel: N engine replicas (one per GPU) behind one front, least-loaded routing.

Each replica is a full AsyncEngine with its own weights, KV pool and step thread. On GPUs
each replica's engine runs in a process of its own, bound to its GPU (engine_process.py),
so replicas don't share one interpreter lock; on the CPU (where several replicas are for
tests) they are threads of this process, unless asked otherwise (data_parallel_backend).
A new request goes to the replica with the fewest requests in flight; its aborts follow it.
The front is an EngineClient (engine/client.py) like one replica, so the server can't
tell them apart.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

from gptserve.config import EngineConfig, ModelSpec
from gptserve.engine.async_engine import AsyncEngine
from gptserve.engine.engine_process import EngineProcess
from gptserve.engine.outputs import EngineStats, Explanation, Inspection, RequestOutput
from gptserve.engine.placement import PlacementError, estimated_memory
from gptserve.engine.sampling_params import SamplingParams


def replica_devices(device: str, n: int, cuda_count: int) -> list[str]:
    """Devices for n replicas: cuda:0..n-1 on GPUs; the CPU may hold several (for testing)."""
    if device == "cpu":
        return ["cpu"] * n
    if device not in ("auto", "cuda"):
        raise PlacementError(f"--data-parallel-size {n} needs --device auto, cuda or cpu, not {device!r}")
    if cuda_count < n:
        raise PlacementError(f"--data-parallel-size {n} needs {n} CUDA GPUs; {cuda_count} found")
    return [f"cuda:{i}" for i in range(n)]


def uses_processes(backend: str, devices: list[str]) -> bool:
    """auto: a process per replica on GPUs, threads on the CPU."""
    if backend not in ("auto", "process", "thread"):
        raise PlacementError(f"unknown data parallel backend {backend!r}: use auto, process or thread")
    return backend == "process" or (backend == "auto" and devices[0] != "cpu")


def start_processes(model: str | None, configs: list[EngineConfig]) -> list[EngineProcess]:
    """One engine process per config, loading side by side; all stopped if one fails."""
    processes = [EngineProcess(model, c) for c in configs]
    try:
        for p in processes:
            p.wait_ready()
    except BaseException:
        for p in processes:
            p.close()
        raise
    return processes


class DataParallelEngine:
    def __init__(self, model: str | None, config: EngineConfig, replicas: list[AsyncEngine] | None = None):
        self.processes: list[EngineProcess] = []
        if replicas is None:
            import torch

            devices = replica_devices(config.device, config.data_parallel_size, torch.cuda.device_count())
            configs = [dataclasses.replace(config, device=d, data_parallel_size=1) for d in devices]
            if uses_processes(config.data_parallel_backend, devices):
                self.processes = start_processes(model, configs)
                replicas = [AsyncEngine(model, c, engine=p) for c, p in zip(configs, self.processes)]
            else:
                replicas = [AsyncEngine(model, c) for c in configs]
        self.replicas = replicas
        first = replicas[0]
        self.model_name = first.model_name
        self.tokenizer = first.tokenizer
        self.model_config = first.model_config
        self.dtype = first.dtype
        self.limits = first.limits
        self.lora_adapters = first.lora_adapters
        self.memory_bytes = sum(r.memory_bytes for r in replicas)
        self.in_flight = [0] * len(replicas)
        self.owner: dict[str, int] = {}

    def start(self) -> None:
        for r in self.replicas:
            r.start()

    async def shutdown(self) -> None:
        for r in self.replicas:
            await r.shutdown()
        for p in self.processes:  # their driving threads have stopped: nothing else talks to them
            await asyncio.to_thread(p.close)

    @property
    def is_ready(self) -> bool:
        return all(r.is_ready for r in self.replicas)

    def pick(self) -> int:
        return min(range(len(self.replicas)), key=lambda i: self.in_flight[i])

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        i = self.pick()
        self.in_flight[i] += 1
        self.owner[request_id] = i
        stream = self.replicas[i].generate(prompt_token_ids, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            self.in_flight[i] -= 1
            self.owner.pop(request_id, None)
            await stream.aclose()  # closed unfinished: the replica aborts it

    def abort(self, request_id: str) -> None:
        i = self.owner.get(request_id)
        if i is not None:
            self.replicas[i].abort(request_id)

    def stats(self) -> EngineStats:
        parts = [r.stats() for r in self.replicas]
        return EngineStats.merge(parts)

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        return await self.replicas[self.pick()].embed(prompts)

    async def inspect(self, prompt_token_ids: list[int], top_k: int, decimals: int) -> Inspection:
        return await self.replicas[self.pick()].inspect(prompt_token_ids, top_k, decimals)

    async def explain(self, prompt_token_ids: list[int], position: int, top_k: int, decimals: int) -> Explanation:
        return await self.replicas[self.pick()].explain(prompt_token_ids, position, top_k, decimals)

    async def load_lora(self, name: str, path: str) -> None:
        """On every replica; where one refuses, those that had loaded it unload it again."""
        done = []
        try:
            for replica in self.replicas:
                await replica.load_lora(name, path)
                done.append(replica)
        except BaseException:
            for replica in done:
                await replica.unload_lora(name)
            raise

    async def unload_lora(self, name: str) -> None:
        for replica in self.replicas:
            await replica.unload_lora(name)


def build_engine(model: str | None, config: EngineConfig) -> AsyncEngine | DataParallelEngine:
    if config.data_parallel_size > 1:
        return DataParallelEngine(model, config)
    return AsyncEngine(model, config)


class EngineLoader:
    """How a server of several models (server/models.py) builds each model's engine, and
    what it expects that engine to hold."""

    def build(self, spec: ModelSpec) -> AsyncEngine | DataParallelEngine:
        return build_engine(spec.model, spec.engine)

    def estimate(self, spec: ModelSpec) -> int:
        return estimated_memory(spec.model, spec.engine)
