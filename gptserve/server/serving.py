"""What every API request shares on its way to the engine and back.

A request: check the model name and readiness, turn the body into prompt token ids and
SamplingParams, check them against the server's limits and the context length, take a
queue slot, then run one engine request per prompt as one merged `Generation`, streamed
as SSE or collected. A client that goes away aborts its engine requests, so their KV
blocks are freed at the next step. Chat and completions differ only in how they read
the body and word the answer (serving_chat.py, serving_completion.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from gptserve.config import ServerConfig
from gptserve.engine.outputs import FinishReason, Logprob, RequestOutput
from gptserve.engine.sampling_params import SamplingParams
from gptserve.server.chat_template import ChatTemplate
from gptserve.server.errors import (ClientDisconnected, ContextLengthExceededError, EngineFailedError,
                                    InvalidRequestError, ModelNotFoundError, NotReadyError, QueueFullError,
                                    error_body, from_exception)
from gptserve.server.metrics import RequestTracker, ServerMetrics
from gptserve.server.protocol import ChatMessage, PromptTokensDetails, SamplingRequest, Usage

if TYPE_CHECKING:
    from gptserve.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)
T = TypeVar("T")

# On shutdown, how long a stream may take to send its last chunks after the engine
# ended its request, before sse-starlette cuts it (uvicorn waits a little longer).
STREAM_SHUTDOWN_GRACE_S = 10.0
LOGPROB_FLOOR = -9999.0  # JSON has no -inf


class ServingContext:
    """The engine and the server's settings, limits and queue, shared by all routes."""

    def __init__(self, engine: "AsyncEngine", config: ServerConfig, metrics: ServerMetrics,
                 chat_template: ChatTemplate):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = config
        self.metrics = metrics
        self.chat_template = chat_template
        self.served_model_name = config.served_model_name or engine.model_name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.created = int(time.time())
        self.num_in_flight = 0  # engine requests admitted and not yet closed
        self.draining = False
        self._engine_stopped: asyncio.Future | None = None

    # --- checks, in the order a request meets them ---

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise ModelNotFoundError(model)

    def check_ready(self) -> None:
        if self.draining:
            raise NotReadyError("The server is shutting down.")
        if not self.engine.is_ready:
            raise NotReadyError("The engine is not ready to serve requests.")

    def check_limits(self, req: SamplingRequest, max_tokens_param: str, logprobs_param: str) -> None:
        """The server's own limits (ServerConfig); each message names the flag that sets it."""
        cfg = self.config
        if req.n is not None and req.n > cfg.max_n:
            raise InvalidRequestError(f"n must be at most {cfg.max_n} on this server (--max-n), got {req.n}",
                                      param="n")
        max_tokens = req.max_new_tokens()
        if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
            raise InvalidRequestError(f"{max_tokens_param} must be at most {cfg.max_tokens_limit} on this server "
                                      f"(--max-tokens-limit), got {max_tokens}", param=max_tokens_param)
        logprobs = req.num_logprobs()
        if logprobs is not None and not 0 <= logprobs <= cfg.max_top_logprobs:
            raise InvalidRequestError(f"{logprobs_param} must be in [0, {cfg.max_top_logprobs}] on this server "
                                      f"(--max-top-logprobs), got {logprobs}", param=logprobs_param)
        stops = req.stop_strings
        if len(stops) > cfg.max_stop_strings:
            raise InvalidRequestError(f"at most {cfg.max_stop_strings} stop strings are allowed on this server "
                                      f"(--max-stop-strings), got {len(stops)}", param="stop")
        longest = max(map(len, stops), default=0)
        if longest > cfg.max_stop_length:
            raise InvalidRequestError(f"stop strings must be at most {cfg.max_stop_length} characters long on this "
                                      f"server (--max-stop-length), got one of {longest}", param="stop")

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        """OpenAI's wording; the engine checks again (it also knows the KV pool's size)."""
        limit = self.max_model_len
        if max_tokens is None and num_prompt_tokens >= limit:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {limit} tokens. However, your {param} resulted in "
                f"{num_prompt_tokens} tokens, leaving no room for the completion. "
                f"Please reduce the length of the {param}.", param=param)
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, {max_tokens} in "
                f"the completion). Please reduce the length of the {param} or completion.", param=param)

    def cap_max_tokens(self, params: SamplingParams, prompt_lengths: list[int]) -> None:
        """A request without max_tokens runs to the end of the context, but never past
        --max-tokens-limit (after check_length: every prompt leaves room)."""
        rooms = [self.max_model_len - n for n in prompt_lengths]
        if params.max_tokens is None and max(rooms) > self.config.max_tokens_limit:
            params.max_tokens = min(self.config.max_tokens_limit, min(rooms))

    # --- prompts ---

    def encode_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        if len(messages) > self.config.max_messages:
            raise InvalidRequestError(f"at most {self.config.max_messages} messages are allowed on this server "
                                      f"(--max-messages), got {len(messages)}", param="messages")
        text = self.chat_template.render(messages, add_generation_prompt)
        if not self.chat_template.uses_eos_token:
            return self.tokenizer.encode(text)  # a literal <|endoftext|> in a message stays text
        # a template that writes eos_token means the special token (as with transformers,
        # the same text inside a message then is one too)
        ids: list[int] = []
        for i, part in enumerate(text.split(self.chat_template.eos_token)):
            if i:
                ids.append(self.tokenizer.eos_token_id)
            ids.extend(self.tokenizer.encode(part))
        return ids

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param=param)

    # --- running ---

    def reserve_slots(self, n: int) -> None:
        """Take n of the --max-queued-requests slots (429 when they aren't free); the
        taker gives them back by lowering num_in_flight."""
        limit = self.config.max_queued_requests
        if self.num_in_flight + n > limit:
            self.metrics.requests_rejected.inc()
            raise QueueFullError(f"The server already has {self.num_in_flight} requests in flight, its limit is "
                                 f"{limit} (--max-queued-requests). Retry later.")
        self.num_in_flight += n

    def open_generation(self, prompts: list[list[int]], params: SamplingParams, request_id: str) -> "Generation":
        """Takes one queue slot per prompt (429 when full) and starts the engine requests."""
        self.reserve_slots(len(prompts))
        log.debug("%s: %d prompt(s) of %s tokens, n=%d, max_tokens=%s", request_id, len(prompts),
                  "/".join(str(len(p)) for p in prompts), params.n, params.max_tokens)
        return Generation(self, prompts, params, request_id)

    async def respond(self, request: Request, generation: "Generation", stream: bool,
                      events: Callable[[], AsyncIterator[str]],
                      complete: Callable[[], Awaitable[BaseModel]]) -> Response:
        """The whole answer as JSON (`complete`), or `events` as SSE ending with `data: [DONE]`.
        A stream starts once every prompt has its first output, so that errors before the
        first token (too long, engine failure) are HTTP errors, not a broken stream."""
        if not stream:
            try:
                answer = await cancel_on_disconnect(request, complete())
            finally:
                await generation.aclose()
            return Response(answer.model_dump_json(), media_type="application/json")
        try:
            await cancel_on_disconnect(request, generation.start())
        except BaseException:
            await generation.aclose()
            raise
        return EventStream(sse_frames(events(), generation), generation.request_id, sep="\n",
                           shutdown_grace_period=STREAM_SHUTDOWN_GRACE_S,
                           send_timeout=self.config.stream_send_timeout)

    async def stop_engine(self) -> None:
        """Ends in-flight requests (their streams finish cleanly) and stops the engine; idempotent."""
        self.draining = True
        if self._engine_stopped is None:
            self._engine_stopped = asyncio.ensure_future(self.engine.shutdown())
        await asyncio.shield(self._engine_stopped)


_END = object()


class Generation:
    """The engine requests behind one API request, one per prompt, merged into one stream
    of (prompt index, RequestOutput). Holds its queue slots until closed."""

    def __init__(self, ctx: ServingContext, prompts: list[list[int]], params: SamplingParams, request_id: str):
        self.ctx, self.params, self.request_id = ctx, params, request_id
        self.num_prompts = len(prompts)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._num_open = len(prompts)
        self._closed = False
        self._tasks = [asyncio.create_task(self._run(i, ids)) for i, ids in enumerate(prompts)]

    def engine_request_id(self, prompt_index: int) -> str:
        return self.request_id if self.num_prompts == 1 else f"{self.request_id}-{prompt_index}"

    async def _run(self, prompt_index: int, prompt_ids: list[int]) -> None:
        request_id = self.engine_request_id(prompt_index)
        tracker = RequestTracker(self.ctx.metrics, self.params.n)
        finished, end_reason = False, FinishReason.ABORT
        try:
            async for out in self.ctx.engine.generate(prompt_ids, self.params, request_id):
                tracker.record(out)
                finished = out.finished
                self._queue.put_nowait((prompt_index, out))
            self._queue.put_nowait((prompt_index, _END))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the reader, who turns it into an HTTP error
            end_reason = FinishReason.ERROR
            self._queue.put_nowait((prompt_index, e))
        finally:
            if not finished:  # the client went away, or the request failed
                self.ctx.engine.abort(request_id)
                tracker.record_cut(end_reason)

    async def _next(self) -> tuple[int, RequestOutput] | None:
        while self._num_open:
            prompt_index, item = await self._queue.get()
            if item is _END:
                self._num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return prompt_index, item
        return None

    async def start(self) -> None:
        """Waits until every prompt has its first output (or raises the engine's error)."""
        started: set[int] = set()
        while len(started) < self.num_prompts:
            item = await self._next()
            if item is None:
                return
            self._buffer.append(item)
            started.add(item[0])

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._buffer:
            yield self._buffer.pop(0)
        while (item := await self._next()) is not None:
            yield item

    async def aclose(self) -> None:
        """Gives the queue slots back and aborts whatever is unfinished. The work is done
        before the first await: a stream cut by its client closes us inside a cancelled
        scope, where every await is cancelled at once."""
        if not self._closed:
            self._closed = True
            self.ctx.num_in_flight -= self.num_prompts
            for task in self._tasks:
                task.cancel()  # each task's own clean-up aborts its engine request
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- collecting and wording results, shared by chat and completions ---


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class PromptResult:
    prompt_token_ids: list[int]
    choices: list[ChoiceResult]
    prompt_logprobs: list[Logprob | None] | None = None
    num_cached_tokens: int = 0


def finish_reason_of(reason: FinishReason | None, request_id: str) -> str | None:
    """OpenAI's finish_reason; an engine failure of this request is a 500 carrying its id."""
    if reason == FinishReason.ERROR:
        raise EngineFailedError(f"request {request_id} failed in the engine")
    return None if reason is None else reason.value


async def collect(generation: Generation) -> list[PromptResult]:
    """Runs a generation to its end: the full text, tokens and logprobs of every choice."""
    n = generation.params.n
    results: dict[int, PromptResult] = {}
    async for prompt_index, out in generation:
        result = results.setdefault(prompt_index, PromptResult(out.prompt_token_ids, [ChoiceResult() for _ in range(n)]))
        if out.prompt_logprobs is not None:
            result.prompt_logprobs = out.prompt_logprobs
        result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
        for delta in out.choices:
            choice = result.choices[delta.index]
            choice.text += delta.text
            choice.token_ids.extend(delta.token_ids)
            choice.logprobs.extend(delta.logprobs or [])
            choice.finish_reason = finish_reason_of(delta.finish_reason, generation.request_id) or choice.finish_reason
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
    prompt = sum(len(r.prompt_token_ids) for r in results)
    completion = sum(len(c.token_ids) for r in results for c in r.choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(r.num_cached_tokens for r in results)))


def clamp_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


# --- HTTP plumbing ---


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work` until done, or cancels it when the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class EventStream(EventSourceResponse):
    """An SSE answer. A client that stops reading (its socket full) is cut once a send has
    waited `send_timeout`: closing `sse_frames` aborts its generation and frees its slot."""

    def __init__(self, content: AsyncIterator[str], request_id: str, **kwargs):
        super().__init__(content, **kwargs)
        self.request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.warning("request %s: the client stopped reading its stream for %.0f s; cut", self.request_id,
                        self.send_timeout)


async def sse_frames(events: AsyncIterator[str], generation: Generation) -> AsyncIterator[str]:
    """The SSE data lines: each event, an error event if the engine fails mid-stream, then [DONE].
    Closing it early (the client went away) aborts the generation."""
    try:
        try:
            async for data in events:
                yield data
        except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
            err = from_exception(e, generation.request_id)
            log.warning("request %s failed mid-stream: %s", generation.request_id, err.message)
            yield json.dumps(error_body(err.message, err.type, err.param, err.code))
        yield "[DONE]"
    finally:
        await generation.aclose()
