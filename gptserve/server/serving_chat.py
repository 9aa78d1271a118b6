"""POST /v1/chat/completions: messages through the chat template, answered as
`chat.completion` or a stream of `chat.completion.chunk` events."""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from gptserve.engine.outputs import Logprob
from gptserve.model.tokenizer import Tokenizer
from gptserve.server.protocol import (ChatChunkChoice, ChatCompletionChoice, ChatCompletionChunk,
                                      ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
                                      ChatLogprobToken, ChatResponseMessage, DeltaMessage, TopLogprob, Usage)
from gptserve.server.generation import Generation, UsageCounter, collect, finish_reason_of, usage_of
from gptserve.server.serving import ServingContext, clamp_logprob


def chat_logprobs(tokenizer: Tokenizer, logprobs: list[Logprob]) -> ChatLogprobs:
    """OpenAI's chat format: each token with its bytes and its top alternatives."""
    def entry(token_id: int, logprob: float) -> dict:
        return {"token": tokenizer.token_str(token_id), "logprob": clamp_logprob(logprob),
                "bytes": list(tokenizer.token_bytes(token_id))}

    return ChatLogprobs(content=[
        ChatLogprobToken(**entry(lp.token_id, lp.logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
        for lp in logprobs
    ])


class ServingChat:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, request: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(req.model)
        ctx.check_ready()
        max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        ctx.check_limits(req, max_tokens_param, "top_logprobs")
        prompt_ids = ctx.encode_chat(req.messages)
        params = req.to_sampling_params(extra_stop=ctx.chat_template.stop)
        generation = ctx.open_generation([prompt_ids], params, f"chatcmpl-{uuid.uuid4().hex}", "messages")
        return await ctx.respond(request, generation, bool(req.stream),
                                 lambda: self._chunks(req, generation), lambda: self._complete(req, generation))

    async def _complete(self, req: ChatCompletionRequest, generation: Generation) -> ChatCompletionResponse:
        [result] = await collect(generation)
        tokenizer = self.ctx.tokenizer
        choices = [
            ChatCompletionChoice(
                index=i,
                message=ChatResponseMessage(content=choice.text),
                logprobs=chat_logprobs(tokenizer, choice.logprobs) if req.logprobs else None,
                finish_reason=choice.finish_reason,
            )
            for i, choice in enumerate(result.choices)
        ]
        return ChatCompletionResponse(id=generation.request_id, model=self.ctx.served_model_name,
                                      choices=choices, usage=usage_of([result]))

    async def _chunks(self, req: ChatCompletionRequest, generation: Generation) -> AsyncIterator[str]:
        created, request_id = int(time.time()), generation.request_id

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return ChatCompletionChunk(id=request_id, created=created, model=self.ctx.served_model_name,
                                       choices=choices, usage=usage).model_dump_json()

        for i in range(generation.n):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        usage = UsageCounter()
        async for prompt_index, out in generation:
            usage.add(prompt_index, out)
            for delta in out.choices:
                logprobs = chat_logprobs(self.ctx.tokenizer, delta.logprobs) if req.logprobs and delta.logprobs else None
                if delta.text or logprobs:
                    yield chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(content=delta.text),
                                                 logprobs=logprobs)])
                finish_reason = finish_reason_of(delta.finish_reason)
                if finish_reason:
                    yield chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(),
                                                 finish_reason=finish_reason)])
        if req.include_usage:
            yield chunk([], usage.usage())
