"""POST /v1/inspect: how the serving model reads a prompt, for the playground's inspect view.

An engine request (`engine.inspect`): the serving model runs the prompt once, on the
engine thread, with a recording attention backend (no second model implementation); the
answer is every layer's and head's attention weights over the prompt's tokens and the
most likely next tokens. The prompt is capped at what a heatmap can show
(MAX_INSPECT_TOKENS); the run takes one of the server's queue slots, like a generation,
so inspection can't crowd out serving.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field

from gptserve.server.errors import InvalidRequestError
from gptserve.server.protocol.base import OpenAIModel
from gptserve.server.routes import model_for
from gptserve.server.serving import ServingContext

MAX_INSPECT_TOKENS = 128  # a 128 x 128 heatmap still has a few pixels per cell
MAX_TOP_K = 20
ROUND_DECIMALS = 4

router = APIRouter()


class InspectRequest(OpenAIModel):  # ours
    prompt: str
    model: str | None = None
    top_k: int = Field(10, ge=1, le=MAX_TOP_K)  # how many next tokens to return


class NextToken(OpenAIModel):
    id: int
    token: str
    prob: float


class InspectResponse(OpenAIModel):
    object: str = "inspection"
    model: str
    tokens: list[int]
    token_strs: list[str]
    n_layer: int
    n_head: int
    attention: list[list[list[list[float]]]]  # [layer][head][query][key], rows sum to 1
    top_next_tokens: list[NextToken]  # most likely first


def prompt_ids(ctx: ServingContext, prompt: str) -> list[int]:
    """The prompt's tokens, at most a heatmap's worth (the engine refuses an empty one)."""
    ids = ctx.tokenizer.encode(prompt)
    limit = min(MAX_INSPECT_TOKENS, ctx.limits.max_model_len)
    if len(ids) > limit:
        raise InvalidRequestError(f"Inspection draws at most {limit} prompt tokens; this prompt has {len(ids)}. "
                                  "Please shorten the prompt.", param="prompt")
    return ids


@router.post("/v1/inspect")
async def inspect_prompt(body: InspectRequest, request: Request) -> Response:
    async with model_for(request, body.model) as ctx:
        ctx.admit(body.model, generates=False)
        ids = prompt_ids(ctx, body.prompt)
        seen = await ctx.call_engine(request, lambda: ctx.engine.inspect(ids, body.top_k, ROUND_DECIMALS), "prompt")
    config = ctx.engine.model_config
    answer = InspectResponse(
        model=ctx.served_model_name, tokens=ids, token_strs=[ctx.tokenizer.token_str(t) for t in ids],
        n_layer=config.n_layer, n_head=config.n_head, attention=seen.attention,
        top_next_tokens=[NextToken(id=t, token=ctx.tokenizer.token_str(t), prob=p) for t, p in seen.top_next_tokens])
    return Response(answer.model_dump_json(), media_type="application/json")
