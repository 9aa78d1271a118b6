"""POST /tokenize and /detokenize (ours, as vLLM's)."""
from __future__ import annotations

from pydantic import model_validator

from gptserve.server.protocol.base import OpenAIModel, OpenAIRequest, invalid
from gptserve.server.protocol.chat import ChatMessage

class TokenizeRequest(OpenAIRequest):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # rendered with the chat template
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise invalid("give exactly one of 'prompt' and 'messages'", "prompt")
        return self


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[int]


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str]


class DetokenizeResponse(OpenAIModel):
    prompt: str
