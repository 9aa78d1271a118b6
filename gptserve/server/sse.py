"""A streamed answer as server-sent events, framed as its API family frames them.

`sse_frames` is the one place a failure mid-stream is caught: the headers are sent, so the
family's `StreamFormat` words it as events (OpenAI's chat and completions: an error object,
then `data: [DONE]`; Anthropic's: a named `error` event; the Responses API: an `error` event
and response.failed, numbered in the stream's sequence). `EventStream` closes the
generation however the response ends.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from gptserve.server.errors import APIError, error_body, from_exception
from gptserve.server.generation import Generation

log = logging.getLogger(__name__)

Event = str | ServerSentEvent  # a data line, or an event with its name


def openai_error_events(err: APIError) -> list[Event]:
    return [json.dumps(error_body(err.message, err.type, err.param, err.code))]


@dataclass(frozen=True)
class StreamFormat:
    """How an API family ends its event stream and words an error that happens mid-stream."""

    error_events: Callable[[APIError], list[Event]] = openai_error_events
    done: str | None = "[DONE]"  # the last data line, if the family sends one


OPENAI_STREAM = StreamFormat()


class EventStream(EventSourceResponse):
    """An SSE answer that owns its generation: however the response ends (done, the client
    gone before the first byte or mid-stream, a client that stopped reading and was cut
    after `send_timeout`), the generation is closed, its requests aborted, its slots back."""

    def __init__(self, content: AsyncIterator[Event], generation: Generation, **kwargs):
        super().__init__(content, **kwargs)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.warning("request %s: the client stopped reading its stream for %.0f s; cut",
                        self.generation.request_id, self.send_timeout)
        finally:
            await self.generation.aclose()


async def sse_frames(events: AsyncIterator[Event], generation: Generation,
                     stream_format: StreamFormat) -> AsyncIterator[Event]:
    """The SSE events: each event, the family's error events if the engine fails mid-stream,
    then the family's last line. Closing it early (the client went away) aborts the generation."""
    try:
        try:
            async for event in events:
                yield event
        except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
            err = from_exception(e, generation.request_id, generation.prompt_param, generation.grammar_param)
            log.warning("request %s failed mid-stream: %s", generation.request_id, err.message)
            for event in stream_format.error_events(err):
                yield event
        if stream_format.done is not None:
            yield stream_format.done
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        await generation.aclose()
