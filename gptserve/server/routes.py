"""The routes every API family shares, kept thin: /v1/models and the tokenizer endpoints
(`api_router`, behind the API key when one is set), /health and /metrics for probes and
scrapers (`public_router`), loading and unloading LoRA adapters (`lora_router`, vLLM's
endpoints, mounted only with --enable-lora-runtime-updates); and how a generating route's
answer is documented; `model_for` hands a route the served model its request names
(models.py). Each API family's own routes are in its folder (openai/, responses/,
anthropic/routes.py).
"""
from __future__ import annotations

from typing import AsyncContextManager, Literal

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from gptserve.server.errors import InvalidRequestError, ModelNotFoundError, NotFoundError, error_responses
from gptserve.server.metrics import CONTENT_TYPE
from gptserve.server.protocol.base import ModelCard, ModelList
from gptserve.server.protocol.lora import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from gptserve.server.protocol.tokenize import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                                               TokenizeResponse, TokenizerInfoResponse)
from gptserve.server.models import ModelRegistry
from gptserve.server.serving import ServingContext

# what each route answers, for the OpenAPI document (401: app.py; 400 and 413: errors.py)
api_router = APIRouter()
public_router = APIRouter()
lora_router = APIRouter()


def generation_responses(answer: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """A JSON answer, or with stream=true server-sent events (each described by `itemSchema`)."""
    data = {"type": "string", "description": f"a {chunk.__name__} as JSON; an error object if the request fails "
                                             "mid-stream; [DONE], the last event"}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"model": answer, "description": f"A {answer.__name__}, or with stream=true a stream of events",
                  "content": {"text/event-stream": {"itemSchema": event}}},
            **error_responses(404, 429, 500, 503)}


def registry(request: Request) -> ModelRegistry:
    return request.app.state.models


def model_for(request: Request, model: str | None) -> AsyncContextManager[ServingContext]:
    """The context of the model a request names, loaded and held while the block runs
    (models.py): 404 for a name the server doesn't serve, 503 when it can't be loaded in time."""
    return registry(request).use(model)


def _model_cards(models: ModelRegistry) -> list[ModelCard]:
    """Every model, with its state, then its LoRA adapters (vLLM's cards: an adapter's
    parent is its model)."""
    cards = []
    for model in models.models.values():
        ctx, name = model.ctx, model.spec.name
        max_len = ctx.limits.max_model_len if ctx is not None else None
        created = ctx.created if ctx is not None else models.created
        cards.append(ModelCard(id=name, created=created, max_model_len=max_len, state=model.state.value,
                               root=model.spec.model or (ctx.engine.model_name if ctx is not None else None)))
        cards += [ModelCard(id=adapter, created=created, max_model_len=max_len, state=model.state.value, root=path,
                            parent=name) for adapter, path in model.adapters.items()]
    return cards


@api_router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_model_cards(registry(request)))


@api_router.get("/v1/models/{model:path}", responses=error_responses(404))
async def retrieve_model(model: str, request: Request) -> ModelCard:
    models = registry(request)
    models.resolve(model)  # 404 for a name not served
    return next(card for card in _model_cards(models) if card.id == model)


@lora_router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
                  responses=error_responses(400, 404, 503))
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Response:
    """Serve the PEFT adapter in folder `lora_path` as the model `lora_name`, on the model
    `base_model_name` (default: the server's first)."""
    models = registry(request)
    if body.lora_name in models.names():
        raise InvalidRequestError(f"The model name {body.lora_name!r} is already in use.", param="lora_name")
    if body.base_model_name is not None and body.base_model_name not in models.models:
        raise ModelNotFoundError(body.base_model_name, list(models.models))
    async with models.use(body.base_model_name) as ctx:
        await ctx.engine.load_lora(body.lora_name, body.lora_path)
        ctx.adapters[body.lora_name] = body.lora_path
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@lora_router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=error_responses(404))
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Response:
    """Stop serving adapter `lora_name`: new requests for it get 404, running ones finish."""
    models = registry(request)
    model = next((m for m in models.models.values() if body.lora_name in m.adapters), None)
    if model is None:
        raise NotFoundError(f"The LoRA adapter {body.lora_name!r} is not loaded.", param="lora_name")
    del model.adapters[body.lora_name]  # first: from here on new requests for it are refused
    if model.ctx is not None:  # an unloaded model forgets it by the line above
        await model.ctx.engine.unload_lora(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@api_router.post("/tokenize", responses=error_responses(404, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    async with model_for(request, body.model) as ctx:
        return _tokenize(ctx, body)


def _tokenize(ctx: ServingContext, body: TokenizeRequest) -> TokenizeResponse:
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


@api_router.post("/detokenize", responses=error_responses(404, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    async with model_for(request, body.model) as ctx:
        ctx.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens))


@api_router.get("/tokenizer_info", responses=error_responses(404, 503))
async def tokenizer_info(request: Request, model: str | None = None) -> TokenizerInfoResponse:
    async with model_for(request, model) as ctx:
        return _tokenizer_info(ctx)


def _tokenizer_info(ctx: ServingContext) -> TokenizerInfoResponse:
    tokenizer, eos_id, bos_id = ctx.tokenizer, ctx.tokenizer.eos_token_id, ctx.engine.model_config.bos_token_id
    return TokenizerInfoResponse(eos_token=tokenizer.token_str(eos_id), eos_token_id=eos_id,
                                 bos_token=tokenizer.token_str(bos_id), bos_token_id=bos_id,
                                 unk_token=tokenizer.token_str(eos_id), model_max_length=ctx.limits.max_model_len,
                                 vocab_size=ctx.limits.vocab_size, chat_template=ctx.chat_template.source)


@public_router.get("/health", response_class=Response, responses=error_responses(503))
async def health(request: Request) -> Response:
    registry(request).check_ready()
    return Response(status_code=200)


@public_router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
