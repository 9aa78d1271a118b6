"""POST /v1/chat/completions: the request, the answer and its streamed chunks."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from gptserve.server.protocol.base import (TEXT_ONLY, OpenAIModel, Refused, SamplingRequest, TopLogprob, Usage,
                                           documented, invalid, nullable, now)
from gptserve.server.protocol.messages import ChatMessage
from gptserve.server.protocol.structured import (FunctionCall, FunctionCallDelta, FunctionDefinition, NamedFunction,
                                                 NamedToolChoice, ResponseFormat, StructuredOutputs, Tool, ToolCall,
                                                 ToolCallDelta, ToolChoice, tool_names_unique)

class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})  # checked in _coherent
    max_tokens: int | None = documented(minimum=1)  # None: up to the context limit
    max_completion_tokens: int | None = documented(minimum=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = documented(minimum=0)  # at most --max-top-logprobs
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, "none" without
    parallel_tool_calls: bool | None = None  # default true
    functions: list[FunctionDefinition] | None = None  # the legacy form of tools
    function_call: Literal["none", "auto"] | NamedFunction | None = None  # the legacy form of tool_choice
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # ours, as vLLM's
    # ours: each generated token's TokenDetails (what the grammar allowed and forbade, whether
    # it was a confirmed speculative guess), in `choices[].token_details`
    token_details: bool | None = False
    # OpenAI features this server can't honour, declared so they are refused by name
    # (documented as the values that are accepted)
    audio: Any = documented(type="null")
    modalities: Any = documented(**nullable({"const": ["text"]}))
    web_search_options: Any = documented(type="null")
    REFUSED = {
        "audio": Refused("'audio'", TEXT_ONLY),
        "modalities": Refused("'modalities'", "only [\"text\"] is available",
                              asks=lambda value: value is not None and value != ["text"]),
        "web_search_options": Refused("'web_search_options'", TEXT_ONLY),
    }

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[Tool] | None) -> list[Tool] | None:
        return None if tools is None else tool_names_unique(tools)

    @model_validator(mode="after")
    def _coherent(self) -> "ChatCompletionRequest":
        if not self.messages:
            raise invalid("messages must contain at least one message", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.functions is not None and self.tools is not None:
            raise invalid("give tools or the legacy functions, not both", "functions")
        if self.function_call is not None and self.tool_choice is not None:
            raise invalid("give tool_choice or the legacy function_call, not both", "function_call")
        return self

    @property
    def tool_list(self) -> list[Tool] | None:
        """tools, or the legacy functions as tools."""
        if self.functions is not None:
            return [Tool(type="function", function=f) for f in self.functions]
        return self.tools

    @property
    def tool_choice_or_legacy(self) -> ToolChoice | None:
        if isinstance(self.function_call, NamedFunction):
            return NamedToolChoice(type="function", function=self.function_call)
        return self.function_call if self.function_call is not None else self.tool_choice

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # the legacy form, when the request sent `functions`


class ForbiddenToken(OpenAIModel):
    token: str
    logprob: float  # the model's, before the grammar's mask


class TokenDetails(OpenAIModel):  # ours: what the server did to one generated token
    allowed_tokens: int | None = None  # how many the grammar allowed at that step (None: no grammar)
    forbidden: list[ForbiddenToken] = Field(default_factory=list)  # the model's likeliest tokens it banned
    guessed: bool = False  # a speculative guess that the model confirmed


class WithTokenDetails(OpenAIModel):
    """A choice that carries `token_details` only when the request asked for them."""

    token_details: list[TokenDetails] | None = None

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler: Any) -> dict:
        data = handler(self)
        if data.get("token_details") is None:
            data.pop("token_details", None)
        return data


class ChatCompletionChoice(WithTokenDetails):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionCallDelta | None = None  # the legacy form, when the request sent `functions`

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler: Any) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(WithTokenDetails):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
