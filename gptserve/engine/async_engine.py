"""The async front of one engine replica: requests in from the event loop, outputs back,
the step loop in a thread of its own.

Who owns what: the engine thread owns the LLMEngine (model, KV pool, scheduler, every
request's state) and does all tensor work, loading included. The event loop never touches
it: it sends commands (add, abort, call) through a queue and gets each step's outputs in
one call_soon_threadsafe hand-off, into one asyncio.Queue per request. The request streams
and whether the loop is dead or stopping change only under `_lock`, so a request either
registers before the loop dies (and is told) or sees it dead and fails at once. A grammar
is compiled before its request goes in (`LLMEngine.prepare_grammar`, on the grammar
threads), so the step loop never compiles one.

Why one thread does all tensor work: PyTorch's OpenMP runtime (libgomp) keeps a worker
pool per thread that runs a parallel op; with more pool threads than cores every pool
sleeps between ops instead of spinning, and each of a decode step's few hundred small ops
pays a wake-up: loaded on one thread and run on another, GPT-2 small's linear layers ran
1.6x slower (batch 1, 2 cores).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Callable, TypeVar

from gptserve.config import EngineConfig
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.outputs import (EngineDeadError, EngineStats, Explanation, GrammarError, Inspection,
                                     RequestFailedError, RequestOutput)
from gptserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncEngine:
    """One engine replica behind the EngineClient interface (engine/client.py)."""

    def __init__(self, model: str | None, config: EngineConfig | None = None,
                 engine: LLMEngine | None = None):
        """Builds the LLMEngine on the engine thread and waits until it is loaded; load
        errors raise here. The step loop runs from start()."""
        self.model_name = model or "gptserve-default"
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake, self._built, self._stepping_allowed = threading.Event(), threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._build_error: BaseException | None = None
        build = (lambda: engine) if engine is not None else (lambda: LLMEngine(model, config))
        self._thread = threading.Thread(target=self._main, args=(build,), name="gptserve-engine", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        self.tokenizer, self.model_config = self.engine.tokenizer, self.engine.model_config
        self.dtype, self.limits = str(self.engine.precision), self.engine.limits
        self._stats = self.engine.stats()
        self.lora_adapters = self.engine.lora_adapters()  # loaded at start: name -> folder
        self.memory_bytes = self.engine.memory_bytes()

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._stepping_allowed.set()

    @property
    def is_ready(self) -> bool:
        alive = self._dead is None and not self._stopping and self._thread.is_alive()
        return alive and self._stepping_allowed.is_set()

    async def shutdown(self) -> None:
        with self._lock:
            self._stopping = True  # no new requests from here on
            in_flight = list(self._streams)
        for request_id in in_flight:
            self.abort(request_id)
        self._stepping_allowed.set()  # a never-started loop starts, finds nothing to do and ends
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 10)
        if not self._thread.is_alive():  # the loop has stopped: let the weights and the KV pool go
            self.engine.release()

    # ---- requests ---------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if params.grammar is not None:  # a GrammarError raises here, before the request exists
            # shielded: the compile is shared by every request with this grammar, and a caller
            # that goes away must not cancel it for the others
            await asyncio.shield(asyncio.wrap_future(self.engine.prepare_grammar(params.grammar)))
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._check_running()
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
            self._send(("add", request_id, list(prompt_token_ids), params))
        ended = False  # by the engine: finished, failed or refused
        try:
            while not ended:
                item = await stream.get()
                ended = isinstance(item, BaseException) or item.error is not None or item.finished
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None and item.grammar_failed:
                    raise GrammarError(f"request {request_id} failed: {item.error}")
                if item.error is not None:
                    raise RequestFailedError(request_id, item.error)
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not ended:  # the caller stopped listening: free its blocks at the next step
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    async def inspect(self, prompt_token_ids: list[int], top_k: int, decimals: int) -> Inspection:
        return await self._call(lambda engine: engine.inspect(prompt_token_ids, top_k, decimals))

    async def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        return await self._call(lambda engine: engine.embed(prompts))

    async def explain(self, prompt_token_ids: list[int], position: int, top_k: int, decimals: int) -> Explanation:
        return await self._call(lambda engine: engine.explain(prompt_token_ids, position, top_k, decimals))

    async def load_lora(self, name: str, path: str) -> None:
        await self._call(lambda engine: engine.load_lora(name, path))

    async def unload_lora(self, name: str) -> None:
        await self._call(lambda engine: engine.unload_lora(name))

    async def _call(self, fn: Callable[[LLMEngine], T]) -> T:
        """fn(engine) on the engine thread between two steps; its result or its exception here."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        with self._lock:
            self._check_running()
            self._send(("call", fn, loop, done))
        return await done

    def _check_running(self) -> None:  # under _lock: no new work once the loop is dead or stopping
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped: {self._dead!r}")
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")

    def _send(self, command: tuple) -> None:  # ("add", id, prompt, params) | ("call", fn, loop, done) | ("abort", id)
        self._commands.put(command)
        self._wake.set()

    # ---- the engine thread ---------------------------------------------------------------
    def _main(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = build()  # LLMEngine binds this thread to its GPU before any CUDA work
        except BaseException as e:  # noqa: BLE001 - raised again by __init__, on the caller's thread
            self._build_error = e
            return
        finally:
            self._built.set()
        self._stepping_allowed.wait()
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - whatever kills the loop, tell every waiter
            log.exception("engine loop died")
            self._die(e)

    def _run(self) -> None:
        engine = self.engine
        while True:
            self._drain_commands()
            if not engine.has_unfinished():
                self._stats = engine.stats()
                if self._stopping:
                    return
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            outputs = engine.step()
            self._stats = engine.stats()
            self._deliver(outputs)

    def _die(self, error: BaseException) -> None:
        dead = EngineDeadError(f"the engine stopped: {error!r}")
        with self._lock:  # from here on nothing registers or queues a call
            self._dead = error
            streams = list(self._streams.values())
        for loop, stream in streams:
            _call_soon(loop, stream.put_nowait, dead)
        while True:  # calls still queued would wait forever
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "call":
                _call_soon(cmd[2], _settle, cmd[3], None, dead)

    def _drain_commands(self) -> None:
        engine = self.engine
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, request_id, prompt, params = cmd
                if request_id not in self._streams:
                    continue  # its caller went away before it was added
                try:
                    engine.add_request(request_id, prompt, params)
                except Exception as e:  # noqa: BLE001 - refused: tell that caller only
                    self._deliver_error(request_id, e)
            elif cmd[0] == "call":
                _, fn, loop, done = cmd
                try:
                    result, error = fn(engine), None
                except Exception as e:  # noqa: BLE001 - the caller's failure, raised in the caller
                    result, error = None, e
                _call_soon(loop, _settle, done, result, error)
            else:
                out = engine.abort(cmd[1])
                if out is not None:
                    self._stats = engine.stats()  # what the caller sees once told
                    self._deliver([out])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            _call_soon(target[0], target[1].put_nowait, error)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody is waiting any more
        pass


def _settle(done: asyncio.Future, result, error: BaseException | None) -> None:
    if not done.done():  # the caller may have been cancelled meanwhile
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, out in items:
        stream.put_nowait(out)
