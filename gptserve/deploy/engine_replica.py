"""The engine deployment: each Ray Serve replica owns one `AsyncEngine` (its own weights,
KV pool and step thread, on the device Ray gave it) and answers the ingress's
RemoteEngine (remote_engine.py).

A `generate` stream starts with the replica's name, so the ingress knows which replica
answered (the `x-gptserve-replica` header), then yields the engine's outputs. When the
ingress cancels the call, Serve cancels the generator, and the engine aborts the request
and frees its blocks. Engine errors travel as ReplicaError (remote_errors.py).

Serve calls `check_health` (a dead step loop gets the replica replaced) and
`record_routing_stats` (the engine's stats, which reach the ingress's router: its
/metrics and its view of the fleet). On scale-down Serve stops routing to the replica,
waits for its ongoing requests (`graceful_shutdown_timeout_s`), then `__del__` stops
the engine. The engine itself is imported when a replica starts: the ingress, which
imports this module to name the deployment, holds no model and loads no torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ray import serve

from gptserve.config import EngineConfig, ModelConfig
from gptserve.deploy.remote_errors import CARRIED, ReplicaError
from gptserve.engine.limits import EngineLimits
from gptserve.engine.outputs import Explanation, Inspection, RequestOutput
from gptserve.engine.sampling_params import SamplingParams
from gptserve.model.tokenizer import Tokenizer

ENGINE_ERRORS = tuple(CARRIED.values())


@dataclass
class EngineDescription:
    """What the ingress needs to know of the engines behind it (all replicas are alike)."""

    model_name: str
    tokenizer: Tokenizer
    model_config: ModelConfig
    dtype: str
    limits: EngineLimits
    lora_adapters: dict[str, str] = dataclasses.field(default_factory=dict)  # loaded at start: name -> folder


def replica_name() -> str:
    """This replica's name: its deployment and Serve's replica id."""
    context = serve.get_replica_context()
    return f"{context.deployment}#{context.replica_tag}"


@serve.deployment(name="GptServeEngine")
class EngineReplica:
    def __init__(self, model: str | None, engine_config: EngineConfig):
        from gptserve.engine.async_engine import AsyncEngine  # here: the ingress imports this module, not torch

        self.name = replica_name()
        self.engine = AsyncEngine(model, engine_config)  # loads the model; errors fail the replica
        self.engine.start()

    def describe(self) -> EngineDescription:
        e = self.engine
        return EngineDescription(e.model_name, e.tokenizer, e.model_config, e.dtype, e.limits, e.lora_adapters)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[str | RequestOutput]:
        yield self.name
        try:
            async for out in self.engine.generate(prompt_token_ids, params, request_id):
                yield out
        except ENGINE_ERRORS as e:
            raise ReplicaError.of(e) from None

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        try:
            return await self.engine.embed(prompts)
        except ENGINE_ERRORS as e:
            raise ReplicaError.of(e) from None

    async def inspect(self, prompt_token_ids: list[int], top_k: int, decimals: int) -> Inspection:
        try:
            return await self.engine.inspect(prompt_token_ids, top_k, decimals)
        except ENGINE_ERRORS as e:
            raise ReplicaError.of(e) from None

    async def explain(self, prompt_token_ids: list[int], position: int, top_k: int, decimals: int) -> Explanation:
        try:
            return await self.engine.explain(prompt_token_ids, position, top_k, decimals)
        except ENGINE_ERRORS as e:
            raise ReplicaError.of(e) from None

    def record_routing_stats(self) -> dict[str, Any]:
        """The engine's latest stats, as Serve hands them to the routers (fleet.py)."""
        return {"replica": self.name, **dataclasses.asdict(self.engine.stats())}

    def check_health(self) -> None:
        if not self.engine.is_ready:
            raise RuntimeError(f"{self.name}: the engine's step loop is not running")

    async def __del__(self) -> None:
        await self.engine.shutdown()
