"""The Responses API's output items and its stream of semantic events.

A stream goes, in OpenAI's order, each event numbered by `sequence_number`:
response.created, response.in_progress; for a message, response.output_item.added,
response.content_part.added, response.output_text.delta per piece of text,
response.output_text.done, response.content_part.done, response.output_item.done; for
each tool call, response.output_item.added, response.function_call_arguments.delta and
.done, response.output_item.done; then response.completed (or response.incomplete when
cut by max_output_tokens). A failure mid-stream is an `error` event and response.failed,
numbered in the same sequence. Each event is an SSE event named by its type; there is no
[DONE].
"""
from __future__ import annotations

import itertools
import json
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, TYPE_CHECKING

from sse_starlette import ServerSentEvent

from gptserve.engine.outputs import Logprob
from gptserve.server.errors import APIError
from gptserve.server.generation import ChoiceResult, Generation, UsageCounter, finish_reason_of
from gptserve.server.openai.serving_chat import chat_logprobs
from gptserve.server.protocol.base import Usage
from gptserve.server.responses.answers import ResponseObject, ResponseUsage
from gptserve.server.sse import Event, StreamFormat
from gptserve.server.structured import ToolCallStream, ToolPlan, parse_tool_calls

if TYPE_CHECKING:
    from gptserve.model.tokenizer import Tokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputWriter:
    """Output items as the API writes them, with or without their tokens' logprobs."""

    def __init__(self, tokenizer: Tokenizer, plan: ToolPlan | None, with_logprobs: bool):
        self.tokenizer, self.plan, self.with_logprobs = tokenizer, plan, with_logprobs

    def logprobs(self, logprobs: list[Logprob] | None) -> list[dict[str, Any]]:
        if not self.with_logprobs or not logprobs:
            return []
        return [t.model_dump() for t in chat_logprobs(self.tokenizer, logprobs).content or []]

    def text_part(self, text: str, logprobs: list[Logprob] | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": self.logprobs(logprobs)}

    def message(self, item_id: str, text: str | None, logprobs: list[Logprob] | None,
                status: str) -> dict[str, Any]:
        """A message item; text None: just opened, no content part yet."""
        content = [] if text is None else [self.text_part(text, logprobs)]
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def function_call(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
        return {"type": "function_call", "id": new_id("fc"), "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}


def finished(response: ResponseObject, finish_reason: str | None, usage: Usage) -> None:
    """Marks a response done: incomplete when cut by max_output_tokens."""
    incomplete = finish_reason == "length"
    response.status = "incomplete" if incomplete else "completed"
    response.incomplete_details = {"reason": "max_output_tokens"} if incomplete else None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    response.usage = ResponseUsage(input_tokens=usage.prompt_tokens, input_tokens_details={"cached_tokens": cached},
                                   output_tokens=usage.completion_tokens,
                                   output_tokens_details={"reasoning_tokens": 0}, total_tokens=usage.total_tokens)


def output_items(choice: ChoiceResult, plan: ToolPlan | None, writer: OutputWriter) -> list[dict[str, Any]]:
    """A finished answer as output items: its tool calls, or one message."""
    content, calls = parse_tool_calls(choice.text, plan)
    if calls:
        return [writer.function_call(call.id, call.function.name, call.function.arguments) for call in calls]
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    return [writer.message(new_id("msg"), content or "", choice.logprobs, status)]


class ResponseStream:
    """The events of one streamed response, numbered by `sequence_number` in the order they
    go out. A failure mid-stream is told by `failed` (sse_frames calls it, through `format`),
    numbered in the same sequence: an `error` event, then response.failed."""

    def __init__(self, response: ResponseObject, generation: Generation, writer: OutputWriter,
                 finish: Callable[[ResponseObject], Awaitable[ResponseObject]]):
        """`finish` stores the finished response before the last event."""
        self.response, self.generation, self.writer, self.finish = response, generation, writer, finish
        self._numbers = itertools.count()
        self.format = StreamFormat(error_events=self.failed, done=None)

    def _event(self, kind: str, **fields: Any) -> ServerSentEvent:
        return ServerSentEvent(event=kind, data=json.dumps({"type": kind, "sequence_number": next(self._numbers),
                                                            **fields}))

    def failed(self, err: APIError) -> list[Event]:
        response = self.response
        error = self._event("error", code=err.code, message=err.message, param=err.param)
        response.status, response.error = "failed", {"code": err.code or "server_error", "message": err.message}
        return [error, self._event("response.failed", response=response.model_dump())]

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        response, writer, event = self.response, self.writer, self._event

        def snapshot() -> dict[str, Any]:
            return response.model_dump()

        yield event("response.created", response=snapshot())
        yield event("response.in_progress", response=snapshot())
        calls, usage = ToolCallStream(writer.plan), UsageCounter()
        message: dict[str, Any] | None = None  # the message item being written, if any
        text, logprobs, finish_reason = "", [], None
        open_call: dict[str, Any] | None = None

        def open_message() -> list[ServerSentEvent]:
            nonlocal message
            message = writer.message(new_id("msg"), None, None, "in_progress")
            response.output.append(message)
            where = {"item_id": message["id"], "output_index": len(response.output) - 1}
            return [event("response.output_item.added", output_index=where["output_index"], item=message),
                    event("response.content_part.added", **where, content_index=0, part=writer.text_part(""))]

        async for _, out in self.generation:
            usage.add(0, out)
            delta = out.choices[0]
            content, call_deltas = calls.push(delta.text)
            finish_reason = finish_reason_of(delta.finish_reason) or finish_reason
            if finish_reason:
                content += calls.finish()
            if content or (message is not None and delta.logprobs and writer.with_logprobs):
                if message is None:
                    for e in open_message():
                        yield e
                text += content
                logprobs += delta.logprobs or []
                yield event("response.output_text.delta", item_id=message["id"],
                            output_index=len(response.output) - 1, content_index=0, delta=content,
                            logprobs=writer.logprobs(delta.logprobs))
            for call in call_deltas:
                if call.id is not None:  # a call's first delta: its id and name
                    open_call = writer.function_call(call.id, call.function.name, "", "in_progress")
                    response.output.append(open_call)
                    yield event("response.output_item.added", output_index=len(response.output) - 1,
                                item=open_call)
                    continue
                where = {"item_id": open_call["id"], "output_index": len(response.output) - 1}
                yield event("response.function_call_arguments.delta", **where, delta=call.function.arguments)
                open_call.update(arguments=call.function.arguments, status="completed")
                yield event("response.function_call_arguments.done", **where, arguments=open_call["arguments"])
                yield event("response.output_item.done", output_index=where["output_index"], item=open_call)
        if message is None and not calls.num_calls:
            for e in open_message():
                yield e
        if message is not None:
            where = {"item_id": message["id"], "output_index": response.output.index(message)}
            part = writer.text_part(text, logprobs)
            message.update(content=[part], status="incomplete" if finish_reason == "length" else "completed")
            yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=part["logprobs"])
            yield event("response.content_part.done", **where, content_index=0, part=part)
            yield event("response.output_item.done", output_index=where["output_index"], item=message)
        finished(response, finish_reason, usage.usage())
        await self.finish(response)
        yield event("response.incomplete" if response.status == "incomplete" else "response.completed",
                    response=snapshot())
