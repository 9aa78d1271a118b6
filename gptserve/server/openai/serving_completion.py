"""POST /v1/completions: one or many raw prompts (text or token ids), answered as
`text_completion`, streamed or not, with OpenAI's legacy logprobs and `echo`."""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from gptserve.engine.outputs import Logprob
from gptserve.engine.sampling_params import InvalidSamplingParams
from gptserve.server.errors import InvalidRequestError
from gptserve.server.generation import Generation, UsageCounter, collect, finish_reason_of, usage_of
from gptserve.server.openai.protocol.completions import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                                         CompletionResponse)
from gptserve.server.protocol.base import Usage
from gptserve.server.serving import LimitedSettings, ServingContext, clamp_logprob
from gptserve.server.structured import format_grammar

if TYPE_CHECKING:
    from gptserve.model.tokenizer import Tokenizer


class LogprobWriter:
    """Completions' logprobs for one choice, written a piece at a time; `text_offset`
    counts characters from the start of the choice's text (the echoed prompt included)."""

    def __init__(self, tokenizer: Tokenizer, text_offset: int = 0):
        self.tokenizer, self.text_offset = tokenizer, text_offset

    def write(self, token_ids: list[int], logprobs: list[Logprob | None]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, lp in zip(token_ids, logprobs):
            token = self.tokenizer.token_str(token_id)
            out.tokens.append(token)
            out.text_offset.append(self.text_offset)
            self.text_offset += len(token)
            if lp is None:  # the first prompt token has nothing before it
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(clamp_logprob(lp.logprob))
            # as OpenAI: the alternatives, and always the chosen token too
            top = {self.tokenizer.token_str(t): clamp_logprob(v) for t, v in lp.top}
            top.setdefault(token, clamp_logprob(lp.logprob))
            out.top_logprobs.append(top)
        return out


def merge_logprobs(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for part in parts:
        out.tokens += part.tokens
        out.text_offset += part.text_offset
        out.token_logprobs += part.token_logprobs
        out.top_logprobs += part.top_logprobs
    return out


class ServingCompletion:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: CompletionRequest, request: Request) -> Response:
        ctx = self.ctx
        ctx.admit(req.model, LimitedSettings(n=req.n, max_tokens=req.max_new_tokens(), logprobs=req.num_logprobs(),
                                             stop=req.stop_strings))
        prompts, prompt_texts = self._prompts(req)
        grammar, grammar_param = await format_grammar(req.response_format, req.structured_outputs, ctx.config)
        try:
            params = req.to_sampling_params(grammar=grammar)
        except InvalidSamplingParams as e:  # completions call top_logprobs `logprobs`
            raise InvalidRequestError(str(e), param="logprobs" if e.param == "top_logprobs" else e.param) from None
        generation = ctx.open_generation(prompts, params, f"cmpl-{uuid.uuid4().hex}", req.model, "prompt",
                                         grammar_param)
        return await ctx.respond(request, generation, bool(req.stream),
                                 lambda: self._chunks(req, generation, prompt_texts),
                                 lambda: self._complete(req, generation, prompt_texts))

    def _prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt; an empty prompt is <|endoftext|>, a new document."""
        tokenizer, prompt = self.ctx.tokenizer, req.prompt
        if prompt is None or isinstance(prompt, str):
            texts = [prompt or ""]
        elif isinstance(prompt[0], str):
            texts = list(prompt)
        else:
            id_lists = [prompt] if isinstance(prompt[0], int) else prompt
            for ids in id_lists:
                self.ctx.check_token_ids(ids, "prompt")
            return id_lists, [tokenizer.decode(ids) for ids in id_lists]
        return [tokenizer.encode(t) or [tokenizer.eos_token_id] for t in texts], texts

    def _echo(self, req: CompletionRequest, writer: LogprobWriter, prompt_text: str, prompt_ids: list[int],
              prompt_logprobs: list[Logprob | None] | None) -> tuple[str, CompletionLogprobs | None]:
        if not req.echo:
            return "", None
        if req.logprobs is None:
            return prompt_text, None
        return prompt_text, writer.write(prompt_ids, prompt_logprobs or [None] * len(prompt_ids))

    async def _complete(self, req: CompletionRequest, generation: Generation,
                        prompt_texts: list[str]) -> CompletionResponse:
        results = await collect(generation)
        n, choices = generation.n, []
        for prompt_index, result in enumerate(results):
            for i, choice in enumerate(result.choices):
                writer = LogprobWriter(self.ctx.tokenizer)
                echo_text, echo_logprobs = self._echo(req, writer, prompt_texts[prompt_index],
                                                      result.prompt_token_ids, result.prompt_logprobs)
                logprobs = None
                if req.logprobs is not None:
                    writer.text_offset = len(echo_text)
                    generated = writer.write(choice.token_ids, choice.logprobs)
                    logprobs = merge_logprobs([echo_logprobs, generated] if echo_logprobs else [generated])
                choices.append(CompletionChoice(index=prompt_index * n + i, text=echo_text + choice.text,
                                                logprobs=logprobs, finish_reason=choice.finish_reason))
        return CompletionResponse(id=generation.request_id, model=generation.model,
                                  choices=choices, usage=usage_of(results),
                                  system_fingerprint=self.ctx.system_fingerprint)

    async def _chunks(self, req: CompletionRequest, generation: Generation,
                      prompt_texts: list[str]) -> AsyncIterator[str]:
        created, request_id, n = int(time.time()), generation.request_id, generation.n
        writers: dict[int, LogprobWriter] = {}  # by choice index

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return CompletionResponse(id=request_id, created=created, model=generation.model,
                                      choices=choices, usage=usage,
                                      system_fingerprint=self.ctx.system_fingerprint).model_dump_json()

        usage = UsageCounter()
        async for prompt_index, out in generation:
            usage.add(prompt_index, out)
            if prompt_index * n not in writers:  # this prompt's first output
                for i in range(n):
                    writer = writers[prompt_index * n + i] = LogprobWriter(self.ctx.tokenizer)
                    text, logprobs = self._echo(req, writer, prompt_texts[prompt_index], out.prompt_token_ids,
                                                out.prompt_logprobs)
                    writer.text_offset = len(text)
                    if text:
                        yield chunk([CompletionChoice(index=prompt_index * n + i, text=text, logprobs=logprobs)])
            for delta in out.choices:
                index = prompt_index * n + delta.index
                logprobs = None
                if req.logprobs is not None and delta.logprobs:
                    logprobs = writers[index].write(delta.token_ids, delta.logprobs)
                if delta.text or logprobs:
                    yield chunk([CompletionChoice(index=index, text=delta.text, logprobs=logprobs)])
                finish_reason = finish_reason_of(delta.finish_reason)
                if finish_reason:
                    yield chunk([CompletionChoice(index=index, text="", finish_reason=finish_reason)])
        if req.include_usage:
            yield chunk([], usage.usage())
