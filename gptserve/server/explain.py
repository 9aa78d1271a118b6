"""POST /v1/explain: one prompt through the serving model, step by step, for the
playground's Explain view (ours).

The five steps of a GPT, read at one chosen token of the prompt (`position`, default the
last): the BPE tokens with their bytes; each token's token and position embeddings (as
strips of their vectors, their norms, and the prompt's vectors on their first two
principal axes); per layer and head, that token's attention scores before and after the
softmax; per layer, its most active MLP neurons and the norm of its residual stream before
the block, after attention and after the MLP; and its next-token logits, which the page
turns into probabilities under any temperature and top-p itself. One engine call, one
forward pass on the engine thread (`engine.explain`), behind the API key and one queue slot
like inspect; the prompt is capped as inspect's is (MAX_INSPECT_TOKENS).
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field

from gptserve.server.errors import InvalidRequestError
from gptserve.server.inspect import ROUND_DECIMALS, prompt_ids
from gptserve.server.protocol.base import OpenAIModel
from gptserve.server.routes import model_for

MAX_LOGITS = 100

router = APIRouter()


class ExplainRequest(OpenAIModel):  # ours
    prompt: str
    model: str | None = None
    position: int | None = None  # the token to read the steps at (default: the last)
    top_k: int = Field(50, ge=1, le=MAX_LOGITS)  # next-token logits to return


class Token(OpenAIModel):
    id: int
    text: str  # the token as text (a piece of a multi-byte character shows as bytes)
    bytes: list[int]  # its UTF-8 bytes: a character may span tokens


class Embeddings(OpenAIModel):
    token: list[list[float]]  # per token: its token embedding (wte row), averaged into at most `cells` values
    position: list[list[float]]  # per token: its position embedding (wpe row), the same
    cells: int
    norms: list[list[float]]  # per token: |token|, |position|, |token + position|
    projection: list[list[float]]  # per token: token + position on the prompt's first two principal axes


class Attention(OpenAIModel):
    scores: list[list[list[float]]]  # [layer][head][key <= position]: q.k / sqrt(d), before the softmax
    weights: list[list[list[float]]]  # [layer][head][key <= position]: after it; each row sums to 1


class Neuron(OpenAIModel):
    index: int
    activation: float  # after GELU


class FeedForward(OpenAIModel):
    width: int  # neurons per layer
    neurons: list[list[Neuron]]  # [layer]: the most active at the position, most active first
    residual: list[list[float]]  # [layer]: |x| before the block, after attention, after the MLP


class Logit(OpenAIModel):
    id: int
    token: str
    logit: float


class ExplainResponse(OpenAIModel):
    object: str = "explanation"
    model: str
    tokens: list[Token]
    position: int
    n_layer: int
    n_head: int
    n_embd: int
    embeddings: Embeddings
    attention: Attention
    feed_forward: FeedForward
    next_token: list[Logit]  # the highest logits, highest first


@router.post("/v1/explain")
async def explain_prompt(body: ExplainRequest, request: Request) -> Response:
    async with model_for(request, body.model) as ctx:
        ctx.admit(body.model, generates=False)
        ids = prompt_ids(ctx, body.prompt)
        position = len(ids) - 1 if body.position is None else body.position
        if ids and not 0 <= position < len(ids):
            raise InvalidRequestError(f"position must be a token of the prompt, 0 to {len(ids) - 1}; got {position}",
                                      param="position")
        seen = await ctx.call_engine(
            request, lambda: ctx.engine.explain(ids, position, body.top_k, ROUND_DECIMALS), "prompt")
    config, tokenizer = ctx.engine.model_config, ctx.tokenizer
    answer = ExplainResponse(
        model=ctx.served_model_name, position=position, n_layer=config.n_layer, n_head=config.n_head,
        n_embd=config.n_embd,
        tokens=[Token(id=t, text=tokenizer.token_str(t), bytes=list(tokenizer.token_bytes(t))) for t in ids],
        embeddings=Embeddings(token=seen.token_vectors, position=seen.position_vectors,
                              cells=len(seen.token_vectors[0]), norms=seen.norms, projection=seen.projection),
        attention=Attention(scores=seen.scores, weights=seen.weights),
        feed_forward=FeedForward(width=config.mlp_dim, residual=seen.residual, neurons=[
            [Neuron(index=i, activation=a) for i, a in layer] for layer in seen.neurons]),
        next_token=[Logit(id=t, token=tokenizer.token_str(t), logit=v) for t, v in seen.logits])
    return Response(answer.model_dump_json(), media_type="application/json")
