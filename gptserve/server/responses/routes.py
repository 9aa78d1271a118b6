"""The routes of OpenAI's Responses API, kept thin: POST hands its validated body to the
serving class, for the model it names; GET, DELETE and input_items read the stored
responses through it."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from gptserve.server.errors import error_responses
from gptserve.server.responses.answers import InputItemList, ResponseDeleted, ResponseObject
from gptserve.server.responses.protocol import ResponsesRequest
from gptserve.server.responses.serving_responses import ServingResponses
from gptserve.server.routes import generation_responses, model_for

router = APIRouter()


def stored(request: Request) -> ServingResponses:
    """The stored responses, whatever model wrote them."""
    return ServingResponses(None, request.app.state.store)


@router.post("/v1/responses", responses=generation_responses(ResponseObject, ResponseObject))
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    async with model_for(request, await conversation_model(request, body)) as ctx:
        return await ServingResponses(ctx, request.app.state.store).create(body, request)


async def conversation_model(request: Request, body: ResponsesRequest) -> str | None:
    """The model a request names; one that names none but continues a stored conversation
    goes on with the model that answered it, while the server still serves it."""
    store = request.app.state.store
    if body.model is not None or body.previous_response_id is None or store is None:
        return body.model
    previous = await store.get(body.previous_response_id)
    model = previous.response.get("model") if previous is not None else None
    return model if model in request.app.state.models.names() else None


@router.get("/v1/responses/{response_id}", responses=error_responses(404))
async def retrieve_response(response_id: str, request: Request) -> ResponseObject:
    return await stored(request).retrieve(response_id)


@router.delete("/v1/responses/{response_id}", responses=error_responses(404))
async def delete_response(response_id: str, request: Request) -> ResponseDeleted:
    return await stored(request).delete(response_id)


@router.get("/v1/responses/{response_id}/input_items", responses=error_responses(404))
async def list_input_items(response_id: str, request: Request, after: str | None = None,
                           limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc") -> InputItemList:
    return await stored(request).input_items(response_id, after, limit, order)
