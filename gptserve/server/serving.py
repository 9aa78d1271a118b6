"""What every API request shares on its way to the engine and back.

A `ServingContext` is one served model: its engine, tokenizer, limits and chat template;
every model of a server shares one `ServerState` (settings, metrics, the queue's slots),
and the model registry (models.py) hands a request the context of the model it names.
A request meets one admission first (`ServingContext.admit`): the model name, readiness,
and the server's own limits (ServerConfig) on its sampling settings. Its serving class
then turns the body into prompt token ids and SamplingParams; `open_generation` takes one
queue slot per prompt and runs one engine request per prompt as one `Generation`
(generation.py), streamed as SSE (sse.py) or collected (`respond`). Whether a prompt fits
the context, and what max_tokens means when unset, is the engine's rule (engine/limits.py).
The API families differ only in how they read the body and word the answer.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.metadata
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from gptserve.config import ServerConfig
from gptserve.engine.client import EngineClient
from gptserve.engine.sampling_params import SamplingParams
from gptserve.server.chat_template import ChatTemplate
from gptserve.server.errors import (ClientDisconnected, InvalidRequestError, ModelNotFoundError, NotReadyError,
                                    QueueFullError, from_exception)
from gptserve.server.generation import Generation
from gptserve.server.metrics import ServerMetrics
from gptserve.server.protocol.messages import ChatMessage
from gptserve.server.sse import OPENAI_STREAM, Event, EventStream, StreamFormat, sse_frames

log = logging.getLogger(__name__)
T = TypeVar("T")

# On shutdown, how long a stream may take to send its last chunks after the engine
# ended its request, before sse-starlette cuts it (uvicorn waits a little longer).
STREAM_SHUTDOWN_GRACE_S = 10.0
LOGPROB_FLOOR = -9999.0  # JSON has no -inf


def clamp_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def system_fingerprint(engine: EngineClient) -> str:
    """OpenAI's system_fingerprint: one value per backend that may answer differently (our
    version, the model, its dtype, shape and context), so clients can tell when it changed."""
    try:
        version = importlib.metadata.version("gptserve")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        version = "source"
    backend = f"{version}|{engine.model_name}|{engine.dtype}|{engine.model_config}|{engine.limits.max_model_len}"
    return "fp_" + hashlib.sha256(backend.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LimitedSettings:
    """A generating request's settings that the server's own limits bound, each with the
    request field that carried it (API families name them differently)."""

    max_tokens: int | None
    max_tokens_param: str = "max_tokens"
    n: int | None = 1
    logprobs: int | None = None  # alternatives per token, when logprobs are asked for
    logprobs_param: str = "logprobs"
    stop: Sequence[str] = ()
    stop_param: str = "stop"


class ServerState:
    """What every served model shares: the settings, the metrics, the queue's slots, draining."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics):
        self.config, self.metrics = config, metrics
        self.num_in_flight = 0  # queue slots taken: engine requests admitted and not yet closed
        self.draining = False


class ServingContext:
    """One served model: its engine, tokenizer, limits and chat template, and the server's
    shared state; every route of a request for this model works through it."""

    def __init__(self, engine: EngineClient, shared: ServerState, chat_template: ChatTemplate, name: str):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.limits = engine.limits
        self.shared = shared
        self.config = shared.config
        self.metrics = shared.metrics.for_model(name)
        self.chat_template = chat_template
        self.served_model_name = name
        self.adapters: dict[str, str] = dict(engine.lora_adapters)  # LoRA adapters by name (their folders)
        self.created = int(time.time())
        self.system_fingerprint = system_fingerprint(engine)
        self.num_model_in_flight = 0  # of the queue's slots, those this model's requests hold
        self.on_idle: Callable[[], None] = lambda: None  # called when its last request ends (models.py)
        self._engine_stopped: asyncio.Future | None = None

    @property
    def num_in_flight(self) -> int:
        """Queue slots taken on the whole server."""
        return self.shared.num_in_flight

    @property
    def draining(self) -> bool:
        return self.shared.draining

    # --- admission: the checks every request meets first, in this order ---

    def admit(self, model: str | None, asked: LimitedSettings | None = None, generates: bool = True) -> None:
        """The model name (404; a LoRA adapter's only where the request `generates`), the
        server ready and not draining (503), then the server's own limits on what a
        generating request asks for (400)."""
        self.check_model(model)
        if not generates and model in self.adapters:
            raise InvalidRequestError(f"`{model}` is a LoRA adapter, which serves generation only; ask the base "
                                      f"model `{self.served_model_name}`", param="model")
        self.check_ready()
        if asked is not None:
            self.check_limits(asked)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name and model not in self.adapters:
            raise ModelNotFoundError(model, [self.served_model_name, *self.adapters])

    def model_name(self, model: str | None) -> str:
        """The name an answer carries: the request's, when it names a LoRA adapter."""
        return model if model is not None and model in self.adapters else self.served_model_name

    def check_ready(self) -> None:
        if self.draining:
            raise NotReadyError("The server is shutting down.")
        if not self.engine.is_ready:
            raise NotReadyError("The engine is not ready to serve requests.")

    def check_limits(self, asked: LimitedSettings) -> None:
        """The server's own limits (ServerConfig) on a request's sampling settings, whatever
        API it came through; each message names the request's field and the flag that sets it."""
        cfg = self.config
        if asked.n is not None and asked.n > cfg.max_n:
            raise InvalidRequestError(f"n must be at most {cfg.max_n} on this server (--max-n), got {asked.n}",
                                      param="n")
        if asked.max_tokens is not None and asked.max_tokens > cfg.max_tokens_limit:
            raise InvalidRequestError(f"{asked.max_tokens_param} must be at most {cfg.max_tokens_limit} on this "
                                      f"server (--max-tokens-limit), got {asked.max_tokens}",
                                      param=asked.max_tokens_param)
        if asked.logprobs is not None and not 0 <= asked.logprobs <= cfg.max_top_logprobs:
            raise InvalidRequestError(f"{asked.logprobs_param} must be in [0, {cfg.max_top_logprobs}] on this "
                                      f"server (--max-top-logprobs), got {asked.logprobs}", param=asked.logprobs_param)
        if len(asked.stop) > cfg.max_stop_strings:
            raise InvalidRequestError(f"at most {cfg.max_stop_strings} stop strings are allowed on this server "
                                      f"(--max-stop-strings), got {len(asked.stop)}", param=asked.stop_param)
        longest = max(map(len, asked.stop), default=0)
        if longest > cfg.max_stop_length:
            raise InvalidRequestError(f"stop strings must be at most {cfg.max_stop_length} characters long on this "
                                      f"server (--max-stop-length), got one of {longest}", param=asked.stop_param)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = self.limits.out_of_vocab(ids)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {self.limits.vocab_size})",
                                      param=param)

    # --- prompts ---

    def encode_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        if len(messages) > self.config.max_messages:
            raise InvalidRequestError(f"at most {self.config.max_messages} messages are allowed on this server "
                                      f"(--max-messages), got {len(messages)}", param="messages")
        text = self.chat_template.render(messages, add_generation_prompt, tools)
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

    # --- running ---

    def reserve_slots(self, n: int) -> None:
        """Take n of the --max-queued-requests slots (429 when they aren't free); give them
        back with release_slots."""
        limit = self.config.max_queued_requests
        if self.num_in_flight + n > limit:
            self.metrics.requests_rejected.inc()
            raise QueueFullError(f"The server already has {self.num_in_flight} requests in flight, its limit is "
                                 f"{limit} (--max-queued-requests). Retry later.")
        self.shared.num_in_flight += n
        self.num_model_in_flight += n

    def release_slots(self, n: int) -> None:
        self.shared.num_in_flight -= n
        self.num_model_in_flight -= n
        if self.num_model_in_flight == 0:
            self.on_idle()

    async def call_engine(self, request: Request, work: Callable[[], Awaitable[T]], prompt_param: str) -> T:
        """An engine call that is not a generation (inspect, embed): it holds one queue slot
        (429 when none is free), is cancelled if the client goes away, and its errors name
        `prompt_param`."""
        self.reserve_slots(1)
        try:
            return await cancel_on_disconnect(request, work())
        except Exception as e:  # noqa: BLE001 - worded for the client
            raise from_exception(e, prompt_param=prompt_param) from e
        finally:
            self.release_slots(1)

    def open_generation(self, prompts: list[list[int]], params: SamplingParams, request_id: str, model: str | None,
                        prompt_param: str, grammar_param: str = "response_format") -> Generation:
        """Takes one queue slot per prompt (429 when full) and starts the engine requests,
        through the LoRA adapter when `model` (the request's, admitted) names one. A request
        without max_tokens runs to the end of its context, but never past --max-tokens-limit."""
        if model is not None and model in self.adapters:
            params = dataclasses.replace(params, adapter=model)
        self.reserve_slots(len(prompts))
        per_prompt = [self._capped(params, len(ids)) for ids in prompts]
        log.debug("%s: %d prompt(s) of %s tokens, n=%d, max_tokens=%s", request_id, len(prompts),
                  "/".join(str(len(p)) for p in prompts), params.n, [p.max_tokens for p in per_prompt])
        num_slots = len(prompts)
        return Generation(self.engine, self.metrics, lambda: self.release_slots(num_slots), prompts, per_prompt,
                          request_id, prompt_param, grammar_param, self.model_name(model))

    def _capped(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        if params.max_tokens is not None:
            return params  # check_limits held it to --max-tokens-limit
        max_tokens = self.limits.max_new_tokens(num_prompt_tokens, params, cap=self.config.max_tokens_limit)
        if max_tokens < 1:
            return params  # no room at all: the engine refuses it, naming the context length
        return dataclasses.replace(params, max_tokens=max_tokens)

    async def respond(self, request: Request, generation: Generation, stream: bool,
                      events: Callable[[], AsyncIterator[Event]],
                      complete: Callable[[], Awaitable[BaseModel]],
                      stream_format: StreamFormat = OPENAI_STREAM) -> Response:
        """The whole answer as JSON (`complete`), or `events` as SSE framed as the API
        family frames them (`stream_format`; OpenAI's chat and completions by default:
        data lines ending with `data: [DONE]`). A stream starts once every prompt has its
        first output, so that errors before the first token (too long, engine failure) are
        HTTP errors, not a broken stream."""
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
        return EventStream(sse_frames(events(), generation, stream_format), generation,
                           sep="\n", shutdown_grace_period=STREAM_SHUTDOWN_GRACE_S,
                           send_timeout=self.config.stream_send_timeout)

    async def stop_engine(self) -> None:
        """Ends in-flight requests (their streams finish cleanly) and stops the engine; idempotent."""
        if self._engine_stopped is None:
            self._engine_stopped = asyncio.ensure_future(self.engine.shutdown())
        await asyncio.shield(self._engine_stopped)


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
