"""One API request's engine requests, read as one stream, and what they add up to.

A `Generation` is one engine request per prompt (completions may send several prompts),
read as one stream of (prompt index, RequestOutput). One prompt, the common case, is
read straight from the engine's stream: one queue hop per token, no task. Several are
merged through a queue fed by one task each. Closing the generation closes the engine
streams, which aborts their unfinished requests (engine/client.py), and gives its queue
slots back; it is safe to close twice, and the work is done before the first await, so
that closing inside a cancelled scope still does it.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from gptserve.engine.client import EngineClient
from gptserve.engine.outputs import FinishReason, Logprob, RequestOutput, TokenDetail
from gptserve.engine.sampling_params import SamplingParams
from gptserve.server.errors import from_exception
from gptserve.server.metrics import ModelMetrics, RequestTracker
from gptserve.server.protocol.base import PromptTokensDetails, Usage

Item = tuple[int, RequestOutput]  # (prompt index, output)
_END = object()


class Generation:
    def __init__(self, engine: EngineClient, metrics: ModelMetrics, release_slots: Callable[[], None],
                 prompts: list[list[int]], params: list[SamplingParams], request_id: str, prompt_param: str,
                 grammar_param: str, model: str):
        """`params`: one per prompt (each with its own max_tokens). Takes no queue slots
        itself: the caller has reserved one per prompt, and aclose gives them back once,
        through `release_slots`. `prompt_param` and `grammar_param` are the request fields
        that carried the prompt and the grammar, for error messages; `model`, the model name
        the answer carries (the served model's, or its LoRA adapter's)."""
        self.request_id = request_id
        self.model = model
        self.prompt_param, self.grammar_param = prompt_param, grammar_param
        self.n = params[0].n
        self.num_prompts = len(prompts)
        self._metrics, self._release_slots = metrics, release_slots
        streams = [self._tracked(engine.generate(ids, p, self.engine_request_id(i)))
                   for i, (ids, p) in enumerate(zip(prompts, params))]
        self._outputs = self._one(streams[0]) if len(streams) == 1 else self._merged(streams)
        self._started: list[Item] = []
        self._closed = False

    def engine_request_id(self, prompt_index: int) -> str:
        return self.request_id if self.num_prompts == 1 else f"{self.request_id}-{prompt_index}"

    async def _tracked(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        tracker = RequestTracker(self._metrics)
        try:
            async for out in stream:
                tracker.record(out)
                yield out
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # aborts it, if unfinished

    async def _one(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[Item]:
        try:
            async for out in stream:
                yield 0, out
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def _merged(self, streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[Item]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(prompt_index: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((prompt_index, out))
                queue.put_nowait((prompt_index, _END))
            except Exception as e:  # noqa: BLE001 - raised by the reader below
                queue.put_nowait((prompt_index, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            num_open = len(tasks)
            while num_open:
                prompt_index, item = await queue.get()
                if item is _END:
                    num_open -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield prompt_index, item
        finally:
            for task in tasks:
                task.cancel()  # each engine stream's clean-up aborts its request
            await asyncio.gather(*tasks, return_exceptions=True)

    async def start(self) -> None:
        """Wait until every prompt has its first output, so that a request refused by the
        engine (too long, engine failure) is an HTTP error, not a broken stream."""
        started: set[int] = set()
        while len(started) < self.num_prompts:
            item = await self._next()
            if item is None:
                return
            self._started.append(item)
            started.add(item[0])

    async def _next(self) -> Item | None:
        try:
            return await self._outputs.__anext__()
        except StopAsyncIteration:
            return None
        except Exception as e:  # noqa: BLE001 - worded for the client, naming this API's prompt field
            raise from_exception(e, self.request_id, self.prompt_param, self.grammar_param) from e

    async def __aiter__(self) -> AsyncIterator[Item]:
        while self._started:
            yield self._started.pop(0)
        while (item := await self._next()) is not None:
            yield item

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._release_slots()
            await self._outputs.aclose()  # type: ignore[attr-defined]


# --- what a generation adds up to, shared by chat and completions ---


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    details: list[TokenDetail] = field(default_factory=list)  # when the request asked (token_details)
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if one did


@dataclass
class PromptResult:
    prompt_token_ids: list[int]
    choices: list[ChoiceResult]
    prompt_logprobs: list[Logprob | None] | None = None
    num_cached_tokens: int = 0


def finish_reason_of(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


async def collect(generation: Generation) -> list[PromptResult]:
    """Runs a generation to its end: the full text, tokens and logprobs of every choice."""
    results: dict[int, PromptResult] = {}
    async for prompt_index, out in generation:
        result = results.get(prompt_index)
        if result is None:
            result = results[prompt_index] = PromptResult(out.prompt_token_ids,
                                                          [ChoiceResult() for _ in range(generation.n)])
        if out.prompt_logprobs is not None:
            result.prompt_logprobs = out.prompt_logprobs
        result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
        for delta in out.choices:
            choice = result.choices[delta.index]
            choice.text += delta.text
            choice.token_ids.extend(delta.token_ids)
            choice.logprobs.extend(delta.logprobs or [])
            choice.details.extend(delta.details or [])
            choice.finish_reason = finish_reason_of(delta.finish_reason) or choice.finish_reason
            choice.stop_reason = delta.stop_reason if delta.stop_reason is not None else choice.stop_reason
    return [results[i] for i in sorted(results)]


@dataclass
class UsageCounter:
    """Token counts of a generation as it streams, per prompt (prompts are counted once, not n times)."""

    prompt_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.prompt_tokens[prompt_index] = len(out.prompt_token_ids)
        self.cached_tokens[prompt_index] = max(self.cached_tokens.get(prompt_index, 0), out.num_cached_tokens)
        self.completion_tokens += sum(len(c.token_ids) for c in out.choices)

    def usage(self) -> Usage:
        prompt = sum(self.prompt_tokens.values())
        return Usage(prompt_tokens=prompt, completion_tokens=self.completion_tokens,
                     total_tokens=prompt + self.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())))


def usage_of(results: list[PromptResult]) -> Usage:
    counter = UsageCounter()
    for i, r in enumerate(results):
        counter.prompt_tokens[i] = len(r.prompt_token_ids)
        counter.cached_tokens[i] = r.num_cached_tokens
        counter.completion_tokens += sum(len(c.token_ids) for c in r.choices)
    return counter.usage()
