"""The HTTP routes, kept thin: each hands its validated body to the serving code.

`api_router` carries the OpenAI API and the tokenizer endpoints (behind the API key
when one is set); `public_router` carries /health and /metrics for probes and scrapers.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from gptserve.server.errors import error_responses
from gptserve.server.metrics import CONTENT_TYPE
from gptserve.server.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                      CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                                      EmbeddingRequest, EmbeddingResponse,
                                      ModelCard, ModelList, TokenizeRequest, TokenizeResponse)
from gptserve.server.serving import ServingContext

# what each route answers, for the OpenAPI document (401: app.py; 400 and 413: errors.py)
api_router = APIRouter()
public_router = APIRouter()


def generation_responses(answer: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """A JSON answer, or with stream=true server-sent events (each described by `itemSchema`)."""
    data = {"type": "string", "description": f"a {chunk.__name__} as JSON; an error object if the request fails "
                                             "mid-stream; [DONE], the last event"}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"model": answer, "description": f"A {answer.__name__}, or with stream=true a stream of events",
                  "content": {"text/event-stream": {"itemSchema": event}}},
            **error_responses(404, 429, 500, 503)}


def serving(request: Request) -> ServingContext:
    return request.app.state.serving


@api_router.post("/v1/chat/completions", responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await request.app.state.chat.create(body, request)


@api_router.post("/v1/completions", responses=generation_responses(CompletionResponse, CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await request.app.state.completion.create(body, request)


@api_router.post("/v1/embeddings", responses=error_responses(404, 429, 500, 503))
async def create_embedding(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    return await request.app.state.embedding.create(body, request)


def _model_card(ctx: ServingContext) -> ModelCard:
    return ModelCard(id=ctx.served_model_name, created=ctx.created, max_model_len=ctx.limits.max_model_len)


@api_router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(serving(request))])


@api_router.get("/v1/models/{model:path}", responses=error_responses(404))
async def retrieve_model(model: str, request: Request) -> ModelCard:
    ctx = serving(request)
    ctx.check_model(model)
    return _model_card(ctx)


@api_router.post("/tokenize", responses=error_responses(404))
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    ctx = serving(request)
    ctx.check_model(body.model)
    if body.messages is not None:
        tokens = ctx.encode_chat(body.messages, body.add_generation_prompt)
    else:
        tokens = ctx.tokenizer.encode(body.prompt)
    return TokenizeResponse(count=len(tokens), max_model_len=ctx.limits.max_model_len, tokens=tokens,
                            token_strs=[ctx.tokenizer.token_str(t) for t in tokens])


@api_router.post("/detokenize", responses=error_responses(404))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    ctx = serving(request)
    ctx.check_model(body.model)
    ctx.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens))


@public_router.get("/health", response_class=Response, responses=error_responses(503))
async def health(request: Request) -> Response:
    serving(request).check_ready()
    return Response(status_code=200)


@public_router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(serving(request).metrics.render(), media_type=CONTENT_TYPE)
