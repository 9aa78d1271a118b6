"""The routes of OpenAI's chat completions, completions and embeddings, kept thin: each
hands its validated body to its serving class."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gptserve.server.errors import error_responses
from gptserve.server.openai.protocol.chat import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from gptserve.server.openai.protocol.completions import CompletionRequest, CompletionResponse
from gptserve.server.openai.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from gptserve.server.routes import generation_responses

router = APIRouter()


@router.post("/v1/chat/completions", responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await request.app.state.chat.create(body, request)


@router.post("/v1/completions", responses=generation_responses(CompletionResponse, CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await request.app.state.completion.create(body, request)


@router.post("/v1/embeddings", responses=error_responses(404, 429, 500, 503))
async def create_embedding(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    return await request.app.state.embedding.create(body, request)
