"""POST /v1/completions: the request, and the answer (each streamed chunk has its shape too)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gptserve.server.protocol.base import (OpenAIModel, Refused, SamplingRequest, Usage, documented, invalid, now,
                                           unsupported)
from gptserve.server.protocol.structured import ResponseFormat, StructuredOutputs

PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: PromptInput | None = None  # None: "<|endoftext|>", a new document
    max_tokens: int | None = documented(16, minimum=0)  # 0, with echo and logprobs: score the prompt only
    echo: bool | None = False
    logprobs: int | None = documented(minimum=0)  # the chosen token's logprob and this many alternatives (at most --max-top-logprobs)
    suffix: str | None = None  # refused: no insertion
    best_of: int | None = None  # only best_of == n
    response_format: ResponseFormat | None = None  # as chat's (vLLM takes it here too)
    structured_outputs: StructuredOutputs | None = None  # ours, as vLLM's
    REFUSED = {"suffix": Refused("'suffix'", "insertion is not supported",
                                 asks=lambda value: isinstance(value, str) and value != "")}

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        if prompt is None or isinstance(prompt, str):
            return prompt
        if not isinstance(prompt, list) or not prompt:
            raise invalid("prompt must be a string, a list of strings, a list of token ids "
                          "or a list of lists of token ids, and not empty")
        def token_list(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        if all(isinstance(p, str) for p in prompt) or token_list(prompt):
            return prompt
        if all(token_list(p) and p for p in prompt):
            return prompt
        raise invalid("prompt must be a string, a list of strings, a list of token ids "
                      "or a list of non-empty lists of token ids")

    @model_validator(mode="after")
    def _nothing_to_generate_scores_the_prompt(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.wants_prompt_logprobs():
            raise invalid("max_tokens 0 generates nothing: it scores the prompt, with echo true and logprobs set",
                          "max_tokens")
        return self

    @model_validator(mode="after")
    def _best_of_is_n(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise unsupported("'best_of'", "only best_of equal to n (every candidate returned) is supported",
                              "best_of")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def wants_prompt_logprobs(self) -> bool:
        return bool(self.echo) and self.logprobs is not None


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(OpenAIModel):
    """Both the full response and each streamed chunk, as in OpenAI's API."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
