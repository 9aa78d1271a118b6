"""The routes of OpenAI's chat completions, completions and embeddings, kept thin: each
hands its validated body to its serving class, for the model the body names."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gptserve.server.errors import error_responses
from gptserve.server.openai.protocol.chat import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from gptserve.server.openai.protocol.completions import CompletionRequest, CompletionResponse
from gptserve.server.openai.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from gptserve.server.openai.serving_chat import ServingChat
from gptserve.server.openai.serving_completion import ServingCompletion
from gptserve.server.openai.serving_embedding import ServingEmbedding
from gptserve.server.routes import generation_responses, model_for

router = APIRouter()


@router.post("/v1/chat/completions", responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    async with model_for(request, body.model) as ctx:
        return await ServingChat(ctx).create(body, request)


@router.post("/v1/completions", responses=generation_responses(CompletionResponse, CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    async with model_for(request, body.model) as ctx:
        return await ServingCompletion(ctx).create(body, request)


@router.post("/v1/embeddings", responses=error_responses(404, 429, 500, 503))
async def create_embedding(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    async with model_for(request, body.model) as ctx:
        return await ServingEmbedding(ctx).create(body, request)
