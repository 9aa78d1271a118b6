"""POST /v1/chat/completions: messages through the chat template, answered as
`chat.completion` or a stream of `chat.completion.chunk` events; tools and output formats
become one grammar (structured.py), and tool calls are read back out of the answer."""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Callable, TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from gptserve.engine.outputs import Logprob
from gptserve.engine.sampling_params import SamplingParams
from gptserve.server.errors import InvalidRequestError
from gptserve.server.protocol import (ChatChunkChoice, ChatCompletionChoice, ChatCompletionChunk,
                                      ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage,
                                      ChatLogprobToken, ChatResponseMessage, DeltaMessage, TopLogprob, Usage)
from gptserve.server.generation import Generation, UsageCounter, collect, finish_reason_of, usage_of
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


def chat_prompt(ctx: ServingContext, messages: list[ChatMessage], plan: ToolPlan | None,
                add_generation_prompt: bool = True) -> list[int]:
    """The prompt's token ids: the messages and the offered tools through the chat template."""
    tools = [t.model_dump(exclude_none=True) for t in plan.tools] if plan is not None else None
    return ctx.encode_chat(messages, add_generation_prompt, tools=tools)


def open_chat(ctx: ServingContext, messages: list[ChatMessage], plan: ToolPlan | None, output_format: str | None,
              format_param: str, sampling: Callable[[list[str], str | None], SamplingParams],
              request_id: str, prompt_param: str = "messages", add_generation_prompt: bool = True) -> Generation:
    """One chat turn, whatever API asked for it: the messages and the offered tools through
    the chat template, constrained by the tools' grammar when the model may call them, else
    by `output_format` (the grammar of the request's field `format_param`).
    `sampling(extra_stop, grammar)` builds the request's SamplingParams; `prompt_param` is
    the request field that carried the conversation, for errors about it. Without
    `add_generation_prompt` the answer continues the last (assistant) message."""
    may_call = plan is not None and plan.may_call
    if may_call and output_format is not None:
        raise InvalidRequestError(f"a JSON {format_param} can't be combined with tools the model may call; "
                                  "set tool_choice to 'none' or drop one", param=format_param)
    grammar, grammar_param = (plan.grammar, "tools") if may_call else (output_format, format_param)
    prompt_ids = chat_prompt(ctx, messages, plan, add_generation_prompt)
    # the template's implicit stops end free text; a grammar ends its own output
    free_text = grammar is None or plan is not None and plan.choice == "auto"
    params = sampling(ctx.chat_template.stop if free_text else [], grammar)
    return ctx.open_generation([prompt_ids], params, request_id, prompt_param, grammar_param)


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
                               lambda stop, grammar: req.to_sampling_params(extra_stop=stop, grammar=grammar),
                               f"chatcmpl-{uuid.uuid4().hex}")
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
                logprobs=chat_logprobs(tokenizer, choice.logprobs) if req.logprobs else None))
        return ChatCompletionResponse(id=generation.request_id, model=self.ctx.served_model_name,
                                      choices=choices, usage=usage_of([result]),
                                      system_fingerprint=self.ctx.system_fingerprint)

    async def _chunks(self, req: ChatCompletionRequest, generation: Generation,
                      plan: ToolPlan | None) -> AsyncIterator[str]:
        created, request_id = int(time.time()), generation.request_id

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return ChatCompletionChunk(id=request_id, created=created, model=self.ctx.served_model_name,
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
                content, tool_calls = calls[delta.index].push(delta.text)
                finish_reason = finish_reason_of(delta.finish_reason)
                if finish_reason:
                    content += calls[delta.index].finish()
                if content or logprobs:
                    yield chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(content=content),
                                                 logprobs=logprobs)])
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
