"""POST /v1/chat/completions: messages through the chat template, answered as
`chat.completion` or a stream of `chat.completion.chunk` events; tools and output formats
become one grammar (structured.py), and tool calls are read back out of the answer. The
turn itself is chat_turn.py's, shared with the Responses and Messages APIs."""
from __future__ import annotations

import dataclasses
import time
import uuid
from typing import AsyncIterator, TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from gptserve.engine.outputs import Logprob, TokenDetail
from gptserve.server.chat_turn import open_chat
from gptserve.server.generation import Generation, UsageCounter, collect, finish_reason_of, usage_of
from gptserve.server.openai.protocol.chat import (ChatChunkChoice, ChatCompletionChoice, ChatCompletionChunk,
                                                  ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
                                                  ChatLogprobToken, ChatResponseMessage, DeltaMessage,
                                                  ForbiddenToken, TokenDetails)
from gptserve.server.protocol.base import TopLogprob, Usage
from gptserve.server.serving import LimitedSettings, ServingContext, clamp_logprob
from gptserve.server.structured import ToolCallStream, ToolPlan, format_grammar, parse_tool_calls, tool_plan

if TYPE_CHECKING:
    from gptserve.model.tokenizer import Tokenizer


def chat_logprobs(tokenizer: Tokenizer, logprobs: list[Logprob]) -> ChatLogprobs:
    """OpenAI's chat format: each token with its bytes and its top alternatives."""
    def entry(token_id: int, logprob: float) -> dict:
        return {"token": tokenizer.token_str(token_id), "logprob": clamp_logprob(logprob),
                "bytes": list(tokenizer.token_bytes(token_id))}

    return ChatLogprobs(content=[
        ChatLogprobToken(**entry(lp.token_id, lp.logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
        for lp in logprobs
    ])


def token_details(tokenizer: Tokenizer, details: list[TokenDetail]) -> list[TokenDetails]:
    """Our extension's form of each token's details: forbidden tokens as text."""
    return [TokenDetails(allowed_tokens=d.allowed, guessed=d.guessed, forbidden=[
        ForbiddenToken(token=tokenizer.token_str(t), logprob=clamp_logprob(lp)) for t, lp in d.forbidden])
        for d in details]


class ServingChat:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, request: Request) -> Response:
        ctx = self.ctx
        max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        ctx.admit(req.model, LimitedSettings(n=req.n, max_tokens=req.max_new_tokens(),
                                             max_tokens_param=max_tokens_param, logprobs=req.num_logprobs(),
                                             logprobs_param="top_logprobs", stop=req.stop_strings))
        legacy = req.functions is not None  # one function_call, never several
        plan = await tool_plan(req.tool_list, req.tool_choice_or_legacy, False if legacy else req.parallel_tool_calls,
                               ctx.config)
        output_format, format_param = await format_grammar(req.response_format, req.structured_outputs, ctx.config)
        generation = open_chat(ctx, req.messages, plan, output_format, format_param,
                               lambda stop, grammar: dataclasses.replace(
                                   req.to_sampling_params(extra_stop=stop, grammar=grammar),
                                   token_details=bool(req.token_details)),
                               f"chatcmpl-{uuid.uuid4().hex}", req.model)
        return await ctx.respond(request, generation, bool(req.stream),
                                 lambda: self._chunks(req, generation, plan),
                                 lambda: self._complete(req, generation, plan))

    async def _complete(self, req: ChatCompletionRequest, generation: Generation,
                        plan: ToolPlan | None) -> ChatCompletionResponse:
        [result] = await collect(generation)
        tokenizer = self.ctx.tokenizer
        choices = []
        for i, choice in enumerate(result.choices):
            content, calls = parse_tool_calls(choice.text, plan)
            message = ChatResponseMessage(content=content)
            finish_reason = choice.finish_reason
            ended_by_grammar = finish_reason == "stop"  # not cut short by max_tokens
            if calls and req.functions is not None:  # the legacy form
                message.function_call = calls[0].function
                finish_reason = "function_call" if ended_by_grammar else finish_reason
            elif calls:
                message.tool_calls = calls
                finish_reason = "tool_calls" if ended_by_grammar else finish_reason
            choices.append(ChatCompletionChoice(
                index=i, message=message, finish_reason=finish_reason,
                logprobs=chat_logprobs(tokenizer, choice.logprobs) if req.logprobs else None,
                token_details=token_details(tokenizer, choice.details) if req.token_details else None))
        return ChatCompletionResponse(id=generation.request_id, model=generation.model,
                                      choices=choices, usage=usage_of([result]),
                                      system_fingerprint=self.ctx.system_fingerprint)

    async def _chunks(self, req: ChatCompletionRequest, generation: Generation,
                      plan: ToolPlan | None) -> AsyncIterator[str]:
        created, request_id = int(time.time()), generation.request_id

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return ChatCompletionChunk(id=request_id, created=created, model=generation.model,
                                       choices=choices, usage=usage,
                                       system_fingerprint=self.ctx.system_fingerprint).model_dump_json()

        calls = [ToolCallStream(plan) for _ in range(generation.n)]
        for i in range(generation.n):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        usage = UsageCounter()
        async for prompt_index, out in generation:
            usage.add(prompt_index, out)
            for delta in out.choices:
                logprobs = chat_logprobs(self.ctx.tokenizer, delta.logprobs) if req.logprobs and delta.logprobs else None
                details = token_details(self.ctx.tokenizer, delta.details) if delta.details else None
                content, tool_calls = calls[delta.index].push(delta.text)
                finish_reason = finish_reason_of(delta.finish_reason)
                if finish_reason:
                    content += calls[delta.index].finish()
                if content or logprobs or details:
                    yield chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(content=content),
                                                 logprobs=logprobs, token_details=details)])
                if tool_calls and req.functions is not None:  # the legacy form: one function_call
                    for call in tool_calls:
                        yield chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(function_call=call.function))])
                elif tool_calls:
                    yield chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(tool_calls=tool_calls))])
                if finish_reason:
                    if finish_reason == "stop" and calls[delta.index].num_calls:
                        finish_reason = "function_call" if req.functions is not None else "tool_calls"
                    yield chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(),
                                                 finish_reason=finish_reason)])
        if req.include_usage:
            yield chunk([], usage.usage())
