"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's endpoints and bodies)."""
from __future__ import annotations

from pydantic import Field

from gptserve.server.protocol.base import OpenAIRequest


class LoadLoRAAdapterRequest(OpenAIRequest):
    lora_name: str = Field(min_length=1, max_length=256)  # the model name requests will use
    lora_path: str = Field(min_length=1)  # a PEFT adapter folder on the server's machine
    base_model_name: str | None = None  # ours: which served model it adapts (default: the first)


class UnloadLoRAAdapterRequest(OpenAIRequest):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; names are enough here
