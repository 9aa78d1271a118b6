"""The HTTP routes, kept thin: each hands its validated body to the serving code.

`api_router` carries the OpenAI API and the tokenizer endpoints (behind the API key
when one is set); `public_router` carries /health and /metrics for probes and scrapers.
"""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from gptserve.server.errors import InvalidRequestError, error_responses
from gptserve.server.metrics import CONTENT_TYPE
from gptserve.server.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                      CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                                      EmbeddingRequest, EmbeddingResponse, InputItemList, ResponseDeleted,
                                      ResponseObject, ResponsesRequest,
                                      ModelCard, ModelList, TokenizeRequest, TokenizeResponse, TokenizerInfoResponse)
from gptserve.server.protocol.anthropic import CountTokensRequest, MessagesRequest
from gptserve.server.protocol.anthropic_answers import AnthropicErrorResponse, CountTokensResponse, MessagesResponse
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


@api_router.post("/v1/responses", responses=generation_responses(ResponseObject, ResponseObject))
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    return await request.app.state.responses.create(body, request)


@api_router.get("/v1/responses/{response_id}", responses=error_responses(404))
async def retrieve_response(response_id: str, request: Request) -> ResponseObject:
    return await request.app.state.responses.retrieve(response_id)


@api_router.delete("/v1/responses/{response_id}", responses=error_responses(404))
async def delete_response(response_id: str, request: Request) -> ResponseDeleted:
    return await request.app.state.responses.delete(response_id)


@api_router.get("/v1/responses/{response_id}/input_items", responses=error_responses(404))
async def list_input_items(response_id: str, request: Request, after: str | None = None,
                           limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc") -> InputItemList:
    return await request.app.state.responses.input_items(response_id, after, limit, order)


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


@api_router.post("/v1/messages", responses=messages_responses())
async def create_message(body: MessagesRequest, request: Request) -> Response:
    return await request.app.state.messages.create(body, request)


@api_router.post("/v1/messages/count_tokens", responses=error_responses(401, 404, model=AnthropicErrorResponse))
async def count_message_tokens(body: CountTokensRequest, request: Request) -> CountTokensResponse:
    return await request.app.state.messages.count_tokens(body)


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
        tokens = ctx.tokenizer.encode(body.prompt, special_tokens_allowed(ctx, body.allowed_special))
    return TokenizeResponse(count=len(tokens), max_model_len=ctx.limits.max_model_len, tokens=tokens,
                            token_strs=[ctx.tokenizer.token_str(t) for t in tokens])


def special_tokens_allowed(ctx: ServingContext, names: Literal["all"] | list[str]) -> set[str]:
    """The special tokens a /tokenize prompt may write as such; a name the vocabulary lacks is a 400."""
    known = ctx.tokenizer.special_tokens
    unknown = [name for name in names if name not in known] if names != "all" else []
    if unknown:
        raise InvalidRequestError(f"{unknown[0]!r} is not a special token of this tokenizer, which has "
                                  f"{sorted(known)}", param="allowed_special")
    return known if names == "all" else set(names)


@api_router.post("/detokenize", responses=error_responses(404))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    ctx = serving(request)
    ctx.check_model(body.model)
    ctx.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens))


@api_router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> TokenizerInfoResponse:
    ctx = serving(request)
    tokenizer, eos_id, bos_id = ctx.tokenizer, ctx.tokenizer.eos_token_id, ctx.engine.model_config.bos_token_id
    return TokenizerInfoResponse(eos_token=tokenizer.token_str(eos_id), eos_token_id=eos_id,
                                 bos_token=tokenizer.token_str(bos_id), bos_token_id=bos_id,
                                 unk_token=tokenizer.token_str(eos_id), model_max_length=ctx.limits.max_model_len,
                                 vocab_size=ctx.limits.vocab_size, chat_template=ctx.chat_template.source)


@public_router.get("/health", response_class=Response, responses=error_responses(503))
async def health(request: Request) -> Response:
    serving(request).check_ready()
    return Response(status_code=200)


@public_router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(serving(request).metrics.render(), media_type=CONTENT_TYPE)
