"""What the Messages API answers: a message, a token count, an error, or a stream of events.

The stream (stream: true) is named SSE events, each `event: <type>` then `data: <the event
as JSON>`, in this order: message_start (the message with no content yet), then per
content block content_block_start, its deltas (text_delta, or input_json_delta with a
tool_use block's input) and content_block_stop, with one ping after the first block
starts; then message_delta (stop_reason, stop_sequence, usage) and message_stop. No
[DONE]; an error mid-stream is an `error` event with the error body (errors.py words it).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gptserve.server.anthropic.protocol import TextBlock, ToolUseBlock
from gptserve.server.protocol.base import OpenAIModel

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class AnthropicUsage(OpenAIModel):
    input_tokens: int  # prompt tokens not read from the prefix cache
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None  # prompt tokens read from the prefix cache


ContentBlock = Annotated[TextBlock | ToolUseBlock, Field(discriminator="type")]


class MessagesResponse(OpenAIModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None = None  # None only in a stream's message_start
    stop_sequence: str | None = None  # the one of stop_sequences that ended the answer
    usage: AnthropicUsage


class CountTokensResponse(OpenAIModel):
    input_tokens: int


class AnthropicError(OpenAIModel):
    type: str  # invalid_request_error, authentication_error, not_found_error, ...
    message: str


class AnthropicErrorResponse(OpenAIModel):
    """Every error answer of the Messages API, whatever its status."""

    type: Literal["error"] = "error"
    error: AnthropicError


# --- stream events, in the order they come ----------------------------------------------

class MessageStartEvent(OpenAIModel):
    type: Literal["message_start"] = "message_start"
    message: MessagesResponse


class ContentBlockStartEvent(OpenAIModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class PingEvent(OpenAIModel):
    type: Literal["ping"] = "ping"


class TextDelta(OpenAIModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(OpenAIModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDeltaEvent(OpenAIModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStopEvent(OpenAIModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(OpenAIModel):
    stop_reason: StopReason
    stop_sequence: str | None = None


class MessageDeltaEvent(OpenAIModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: AnthropicUsage  # totals so far


class MessageStopEvent(OpenAIModel):
    type: Literal["message_stop"] = "message_stop"
