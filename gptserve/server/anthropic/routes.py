"""The routes of Anthropic's Messages API, kept thin: each hands its validated body to the
serving class; their errors are in Anthropic's shape (errors.py)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gptserve.server.anthropic.answers import AnthropicErrorResponse, CountTokensResponse, MessagesResponse
from gptserve.server.anthropic.protocol import CountTokensRequest, MessagesRequest
from gptserve.server.anthropic.serving_messages import ServingMessages
from gptserve.server.errors import error_responses
from gptserve.server.routes import model_for

router = APIRouter()


def messages_responses() -> dict:
    """Anthropic's message as JSON, or with stream=true its named events; errors in Anthropic's shape."""
    event = {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"type": "string", "description": "message_start, content_block_start, ping, content_block_delta, "
                                                   "content_block_stop, message_delta, message_stop; error if the "
                                                   "request fails mid-stream"},
        "data": {"type": "string", "description": "the event as JSON"}}}
    return {200: {"model": MessagesResponse, "description": "A message, or with stream=true a stream of events",
                  "content": {"text/event-stream": {"itemSchema": event}}},
            **error_responses(401, 404, 429, 500, 503, model=AnthropicErrorResponse)}


@router.post("/v1/messages", responses=messages_responses())
async def create_message(body: MessagesRequest, request: Request) -> Response:
    async with model_for(request, body.model) as ctx:
        return await ServingMessages(ctx).create(body, request)


@router.post("/v1/messages/count_tokens", responses=error_responses(401, 404, 503, model=AnthropicErrorResponse))
async def count_message_tokens(body: CountTokensRequest, request: Request) -> CountTokensResponse:
    async with model_for(request, body.model) as ctx:
        return await ServingMessages(ctx).count_tokens(body)
