"""`EngineClient`: all the server knows of an engine, whatever runs behind it.

One engine replica (`AsyncEngine`) and several behind one front (`DataParallelEngine`)
both implement it; the server is written against this protocol only. A request's life
is `generate`: iterate it for the request's outputs; stop iterating (close it, or cancel
the task that iterates) and the request is aborted, its KV blocks freed at the next step.
"""
from __future__ import annotations

from typing import AsyncIterator, Protocol

from gptserve.config import ModelConfig
from gptserve.engine.limits import EngineLimits
from gptserve.engine.outputs import EngineStats, Explanation, Inspection, RequestOutput
from gptserve.engine.sampling_params import SamplingParams
from gptserve.model.tokenizer import Tokenizer


class EngineClient(Protocol):
    model_name: str
    tokenizer: Tokenizer
    model_config: ModelConfig
    dtype: str  # of the weights and the KV cache, e.g. "float32" or "int8 weights, float32 compute"
    limits: EngineLimits
    lora_adapters: dict[str, str]  # the LoRA adapters loaded at start: name -> folder
    memory_bytes: int  # what it holds in this process (weights, KV pool); 0 where it runs elsewhere

    @property
    def is_ready(self) -> bool:
        """Started, alive and not shutting down (health checks)."""

    def start(self) -> None:
        """Start the step loop(s); the server's lifespan calls it."""

    async def shutdown(self) -> None:
        """Abort what is in flight (each stream ends with finish_reason 'abort') and stop."""

    def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        """The request's outputs, the last with finished=True. Raises EngineError subclasses:
        the request can't be served (PromptTooLongError, InvalidPromptError), it failed
        (RequestFailedError), or the engine stopped (EngineDeadError)."""

    def abort(self, request_id: str) -> None:
        """End a request from outside its stream (its stream gets finish_reason 'abort')."""

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Each prompt's embedding: final hidden states, mean-pooled, unit length. Raises
        InvalidPromptError or PromptTooLongError for a prompt the model can't read."""

    async def inspect(self, prompt_token_ids: list[int], top_k: int, decimals: int) -> Inspection:
        """How the serving model reads one prompt: attention weights and top next tokens."""

    async def explain(self, prompt_token_ids: list[int], position: int, top_k: int, decimals: int) -> Explanation:
        """One prompt through the serving model step by step, read at token `position`."""

    async def load_lora(self, name: str, path: str) -> None:
        """Serve the PEFT adapter at `path` as `name` (engine/lora.py). Raises AdapterError:
        adapters are off, the name is taken, or the adapter can't be read or doesn't fit."""

    async def unload_lora(self, name: str) -> None:
        """Forget adapter `name`; requests running on it finish. Raises AdapterNotFoundError."""

    def stats(self) -> EngineStats:
        """The latest counters and gauges (no waiting on the engine)."""
