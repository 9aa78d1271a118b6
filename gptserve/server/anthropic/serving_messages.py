"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, translated.

The conversation becomes our chat messages (system first; an assistant's tool_use blocks
its tool_calls; a user's tool_result blocks "tool" messages), the tools and tool_choice a
ToolPlan, and the turn runs as any chat turn does (chat_turn.open_chat): the same
template, grammar and implicit stops, so a greedy answer equals /v1/chat/completions'.
The answer goes back as a `message`, or as Anthropic's named stream events (answers.py). Which stop ended it comes from the engine's stop_reason:
only the request's own stop_sequences are "stop_sequence"; the template's implicit stop
("\\nUser:") ends the turn ("end_turn"). A conversation that ends with the assistant's
text is a prefill: the prompt ends with it, and the answer continues it.
"""
from __future__ import annotations

import json
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from gptserve.config import ServerConfig
from gptserve.server.anthropic.answers import (AnthropicUsage, ContentBlock, ContentBlockDeltaEvent,
                                               ContentBlockStartEvent, ContentBlockStopEvent, CountTokensResponse,
                                               InputJsonDelta, MessageDelta, MessageDeltaEvent, MessagesResponse,
                                               MessageStartEvent, MessageStopEvent, PingEvent, StopReason, TextDelta)
from gptserve.server.anthropic.protocol import (ConversationRequest, CountTokensRequest, MessagesRequest, TextBlock,
                                                ToolResultBlock, ToolUseBlock)
from gptserve.server.chat_turn import chat_prompt, open_chat
from gptserve.server.errors import APIError, anthropic_error_body
from gptserve.server.generation import Generation, UsageCounter, collect, finish_reason_of, usage_of
from gptserve.server.protocol.base import Usage
from gptserve.server.protocol.messages import ChatMessage
from gptserve.server.protocol.structured import (FunctionCallInMessage, FunctionDefinition, NamedFunction,
                                                 NamedToolChoice, Tool, ToolCallDelta, ToolCallInMessage)
from gptserve.server.serving import LimitedSettings, ServingContext
from gptserve.server.sse import Event, StreamFormat
from gptserve.server.structured import ToolCallStream, ToolPlan, parse_tool_calls, tool_plan


def anthropic_error_events(err: APIError) -> list[Event]:
    return [ServerSentEvent(event="error", data=json.dumps(anthropic_error_body(err)))]


ANTHROPIC_STREAM = StreamFormat(error_events=anthropic_error_events, done=None)


# --- the request, as a chat turn ----------------------------------------------------------

def chat_messages(req: ConversationRequest) -> list[ChatMessage]:
    """The conversation as our chat messages, in order; an errored tool result is marked
    "Error: " (the chat template has no field for it)."""
    messages = [ChatMessage(role="system", content=req.system_text)] if req.system_text else []
    for message in req.messages:
        blocks = message.blocks
        if message.role == "assistant":
            calls = [ToolCallInMessage(id=b.id, function=FunctionCallInMessage(name=b.name,
                                                                               arguments=json.dumps(b.input)))
                     for b in blocks if isinstance(b, ToolUseBlock)]
            text = "\n".join(b.text for b in blocks if isinstance(b, TextBlock))
            messages.append(ChatMessage(role="assistant", content=text, tool_calls=calls or None))
            continue
        texts: list[str] = []
        for block in blocks:
            if isinstance(block, ToolResultBlock):
                if texts:
                    messages.append(ChatMessage(role="user", content="\n".join(texts)))
                    texts = []
                messages.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id,
                                            content=("Error: " if block.is_error else "") + block.text))
            elif isinstance(block, TextBlock):
                texts.append(block.text)
        if texts or not any(isinstance(b, ToolResultBlock) for b in blocks):
            messages.append(ChatMessage(role="user", content="\n".join(texts)))
    return messages


async def chat_tools(req: ConversationRequest, config: ServerConfig) -> ToolPlan | None:
    """The tools as ours; tool_choice auto, any, tool and none as "auto", "required", a
    named function and "none"; disable_parallel_tool_use as parallel_tool_calls false."""
    tools = [Tool(type="function", function=FunctionDefinition(name=t.name, description=t.description,
                                                               parameters=t.input_schema))
             for t in req.tools or []]
    choice = req.tool_choice
    if choice is None or choice.type == "auto":
        tool_choice = None  # "auto" with tools, nothing without
    elif choice.type == "tool":
        tool_choice = NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
    else:
        tool_choice = "required" if choice.type == "any" else "none"
    return await tool_plan(tools or None, tool_choice, not (choice is not None and choice.disable_parallel_tool_use),
                           config)


# --- the answer ---------------------------------------------------------------------------

def stop_reason_of(finish_reason: str | None, stop: str | int | None, num_calls: int,
                   stop_sequences: list[str]) -> tuple[StopReason, str | None]:
    """(stop_reason, stop_sequence) of an answer that finished for `finish_reason`, ended by
    `stop` (the engine's stop_reason), with `num_calls` tool calls."""
    if finish_reason == "length":
        return "max_tokens", None
    if num_calls:
        return "tool_use", None
    if isinstance(stop, str) and stop in stop_sequences:
        return "stop_sequence", stop
    return "end_turn", None


def anthropic_usage(usage: Usage) -> AnthropicUsage:
    """Anthropic counts prompt tokens read from the cache apart from the others."""
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return AnthropicUsage(input_tokens=usage.prompt_tokens - cached, output_tokens=usage.completion_tokens,
                          cache_creation_input_tokens=0, cache_read_input_tokens=cached)


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def sse(event: BaseModel) -> ServerSentEvent:
    return ServerSentEvent(event=event.type, data=event.model_dump_json())  # type: ignore[attr-defined]


class BlockStream:
    """An answer's content blocks as stream events: one text block, open while text comes,
    or one tool_use block per call, its input in one delta; one ping after the first
    block starts. An answer with neither has one empty text block, as when whole."""

    def __init__(self) -> None:
        self.index = -1  # of the last block started
        self.text_open = False

    def _start(self, block: ContentBlock) -> list[BaseModel]:
        events = self.close()
        self.index += 1
        events.append(ContentBlockStartEvent(index=self.index, content_block=block))
        return events + [PingEvent()] if self.index == 0 else events

    def text(self, text: str) -> list[BaseModel]:
        events = [] if self.text_open else self._start(TextBlock(text=""))
        self.text_open = True
        return events + [ContentBlockDeltaEvent(index=self.index, delta=TextDelta(text=text))]

    def tool_uses(self, deltas: list[ToolCallDelta]) -> list[BaseModel]:
        """A ToolCallStream's deltas (each call's id and name, then its arguments) as blocks."""
        events: list[BaseModel] = []
        for index in sorted({d.index for d in deltas}):
            parts = [d for d in deltas if d.index == index]
            call_id, name = next((d.id, d.function.name) for d in parts if d.id is not None)
            events += self._start(ToolUseBlock(id=tool_use_id(call_id), name=name, input={}))
            events += [ContentBlockDeltaEvent(index=self.index, delta=InputJsonDelta(
                partial_json="".join(d.function.arguments or "" for d in parts))),
                       ContentBlockStopEvent(index=self.index)]
        return events

    def close(self) -> list[BaseModel]:
        if not self.text_open:
            return []
        self.text_open = False
        return [ContentBlockStopEvent(index=self.index)]

    def end(self) -> list[BaseModel]:
        if self.index < 0:
            events = self._start(TextBlock(text=""))
            return events + [ContentBlockStopEvent(index=self.index)]
        return self.close()


class ServingMessages:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: MessagesRequest, request: Request) -> Response:
        ctx = self.ctx
        ctx.admit(req.model, LimitedSettings(max_tokens=req.max_tokens, stop=req.stop_strings,
                                             stop_param="stop_sequences"))
        plan = await chat_tools(req, ctx.config)
        generation = open_chat(ctx, chat_messages(req), plan, None, "output_config", req.to_sampling_params,
                               f"msg_{uuid.uuid4().hex[:24]}", req.model, add_generation_prompt=not req.prefilled)
        return await ctx.respond(request, generation, bool(req.stream),
                                 lambda: self._events(req, generation, plan),
                                 lambda: self._complete(req, generation, plan), stream_format=ANTHROPIC_STREAM)

    async def count_tokens(self, req: CountTokensRequest) -> CountTokensResponse:
        """The prompt's tokens as a create call with this conversation and these tools sends them."""
        self.ctx.check_model(req.model)
        plan = await chat_tools(req, self.ctx.config)
        prompt = chat_prompt(self.ctx, chat_messages(req), plan, add_generation_prompt=not req.prefilled)
        return CountTokensResponse(input_tokens=len(prompt))

    def _message(self, generation: Generation, content: list[ContentBlock], usage: Usage) -> MessagesResponse:
        return MessagesResponse(id=generation.request_id, model=generation.model, content=content,
                                usage=anthropic_usage(usage))

    async def _complete(self, req: MessagesRequest, generation: Generation, plan: ToolPlan | None) -> MessagesResponse:
        [result] = await collect(generation)
        [choice] = result.choices
        text, calls = parse_tool_calls(choice.text, plan)
        content: list[ContentBlock] = [
            ToolUseBlock(id=tool_use_id(c.id), name=c.function.name, input=json.loads(c.function.arguments))
            for c in calls] or [TextBlock(text=text or "")]
        message = self._message(generation, content, usage_of([result]))
        message.stop_reason, message.stop_sequence = stop_reason_of(choice.finish_reason, choice.stop_reason,
                                                                    len(calls), req.stop_strings)
        return message

    async def _events(self, req: MessagesRequest, generation: Generation,
                      plan: ToolPlan | None) -> AsyncIterator[Event]:
        calls, blocks, usage = ToolCallStream(plan), BlockStream(), UsageCounter()
        async for _, out in generation:
            started = bool(usage.prompt_tokens)
            usage.add(0, out)
            if not started:
                yield sse(MessageStartEvent(message=self._message(generation, [], usage.usage())))
            for delta in out.choices:  # one: n is always 1
                text, deltas = calls.push(delta.text)
                finish_reason = finish_reason_of(delta.finish_reason)
                if finish_reason:
                    text += calls.finish()
                events = (blocks.text(text) if text else []) + blocks.tool_uses(deltas)
                if finish_reason:
                    stop_reason, stop_sequence = stop_reason_of(finish_reason, delta.stop_reason, calls.num_calls,
                                                                req.stop_strings)
                    events += blocks.end() + [
                        MessageDeltaEvent(delta=MessageDelta(stop_reason=stop_reason, stop_sequence=stop_sequence),
                                          usage=anthropic_usage(usage.usage())),
                        MessageStopEvent()]
                for event in events:
                    yield sse(event)
