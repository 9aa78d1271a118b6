"""POST /v1/chat/completions: the request, the answer and its streamed chunks."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from gptserve.server.protocol.base import (OpenAIModel, OpenAIRequest, SamplingRequest, TopLogprob, Usage,
                                           documented, invalid, nullable, now, unsupported)

CHAT_ROLES = ("system", "developer", "user", "assistant")


class ChatMessage(OpenAIRequest):
    role: str = documented(..., enum=list(CHAT_ROLES))
    content: str | list[dict[str, Any]] | None = documented(  # a string, or a list of text parts
        anyOf=[{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}])
    name: str | None = None
    tool_calls: Any = None  # refused: no tool calling

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role in ("tool", "function"):
            raise unsupported(f"role '{role}'", "tool and function calling are not supported")
        if role not in CHAT_ROLES:
            raise invalid(f"role must be one of {', '.join(CHAT_ROLES)}; got '{role}'")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise invalid("content must be a string or a list of content parts")
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is None:
                raise invalid(f"content part {i} must be an object with a 'type'")
            if kind != "text":
                raise unsupported(f"content part type '{kind}'",
                                  "this server serves text-only models; send {\"type\": \"text\", \"text\": ...}")
            if not isinstance(part.get("text"), str):
                raise invalid(f"content part {i} of type 'text' needs a string 'text'")
        return content

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, tool_calls: Any) -> Any:
        if tool_calls:
            raise unsupported("'tool_calls'", "tool calling is not supported")
        return tool_calls

    @property
    def text(self) -> str:
        """The content as one string; text parts joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})  # checked in _coherent
    max_tokens: int | None = documented(minimum=1)  # None: up to the context limit
    max_completion_tokens: int | None = documented(minimum=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = documented(minimum=0)  # at most --max-top-logprobs
    # OpenAI features this server can't honour, declared so they are refused by name
    # (documented as the values that are accepted)
    tools: Any = documented(**nullable({"type": "array", "maxItems": 0}))
    tool_choice: Any = documented(**nullable({"const": "none"}))
    functions: Any = documented(**nullable({"type": "array", "maxItems": 0}))
    function_call: Any = documented(**nullable({"const": "none"}))
    response_format: Any = documented(**nullable({"anyOf": [
        {"const": "text"}, {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}}]}))
    audio: Any = documented(type="null")
    modalities: Any = documented(**nullable({"const": ["text"]}))
    web_search_options: Any = documented(type="null")

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: Any, info: Any) -> Any:
        if value is not None and value != []:
            raise unsupported(f"'{info.field_name}'", "tool and function calling are not supported")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any, info: Any) -> Any:
        if value not in (None, "none"):
            raise unsupported(f"'{info.field_name}'", "tool and function calling are not supported")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else value
        if value is not None and kind != "text":
            raise unsupported("'response_format'", f"type '{kind}' is not available; only 'text' output is")
        return value

    @field_validator("audio", "web_search_options")
    @classmethod
    def _no_audio_or_search(cls, value: Any, info: Any) -> Any:
        if value is not None:
            raise unsupported(f"'{info.field_name}'", "this server serves a text-only model")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_modality_only(cls, value: Any) -> Any:
        if value is not None and value != ["text"]:
            raise unsupported("'modalities'", "only [\"text\"] is available")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> "ChatCompletionRequest":
        if not self.messages:
            raise invalid("messages must contain at least one message", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        return self

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


class ChatCompletionChoice(OpenAIModel):
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

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler: Any) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(OpenAIModel):
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
