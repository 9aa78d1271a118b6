"""POST /v1/embeddings: text or token ids in, one vector per input out.

A GPT-2's embedding of a text is its final hidden states (after the last layer norm)
averaged over the text's tokens and scaled to unit length, computed by the serving model
on the engine thread (`EngineClient.embed`). The run takes one of the server's queue
slots, like a generation.
"""
from __future__ import annotations

import base64

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from gptserve.server.errors import InvalidRequestError, UnsupportedParameterError
from gptserve.server.openai.protocol.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from gptserve.server.serving import ServingContext

MAX_INPUTS = 2048  # as OpenAI's


class ServingEmbedding:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: EmbeddingRequest, request: Request) -> Response:
        ctx = self.ctx
        ctx.admit(req.model, generates=False)
        width = ctx.engine.model_config.n_embd
        if req.dimensions is not None and req.dimensions != width:
            raise UnsupportedParameterError(f"dimensions {req.dimensions} is not supported by this server: this "
                                            f"model's embeddings have {width}", param="dimensions")
        prompts = self._token_ids(req)
        vectors = await ctx.call_engine(request, lambda: ctx.engine.embed(prompts), "input")
        data = [Embedding(index=i, embedding=self._encoded(v, req.encoding_format)) for i, v in enumerate(vectors)]
        tokens = sum(map(len, prompts))
        answer = EmbeddingResponse(data=data, model=ctx.served_model_name,
                                   usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
        return Response(answer.model_dump_json(), media_type="application/json")

    def _token_ids(self, req: EmbeddingRequest) -> list[list[int]]:
        inputs = req.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs:
            raise InvalidRequestError("input must not be empty", param="input")
        if len(inputs) > MAX_INPUTS:
            raise InvalidRequestError(f"at most {MAX_INPUTS} inputs are allowed, got {len(inputs)}", param="input")
        prompts = [self.ctx.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        for ids in prompts:
            self.ctx.check_token_ids(ids, "input")
        return prompts

    @staticmethod
    def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
        if encoding_format == "float":
            return vector
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
