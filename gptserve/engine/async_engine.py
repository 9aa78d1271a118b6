"""The async front: requests in from the event loop, deltas back, the step loop in a thread.

The thread owns the LLMEngine; the event loop talks to it only through a command queue
(add, abort, call) and gets each step's outputs back in one call_soon_threadsafe hand-off.

All tensor work, loading the model included, happens on that one thread. On the CPU this
is a speed matter: PyTorch's OpenMP runtime (libgomp) keeps a pool of worker threads for
each thread that runs a parallel op, and once more pool threads exist than cores, every
pool stops spin-waiting between ops and sleeps instead, so each of a decode step's few
hundred small parallel ops pays a wake-up. A model loaded on the main thread and run on
another measured 1.6x slower per linear layer (GPT-2 small, batch 1, 2 cores).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Callable, TypeVar

import torch

from gptserve.config import EngineConfig
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.outputs import (EngineDeadError, EngineStats, Inspection, RequestFailedError,
                                     RequestOutput)
from gptserve.engine.sampling_params import SamplingParams
from gptserve.model.attention import DenseAttention

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncEngine:
    def __init__(self, model: str | None, config: EngineConfig | None = None,
                 engine: LLMEngine | None = None):
        """Builds the LLMEngine on the engine thread (see above) and waits until it is
        loaded; its step loop runs from start()."""
        self.model_name = model or "gptserve-default"
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._built = threading.Event()
        self._go = threading.Event()
        self._build_error: BaseException | None = None
        build = (lambda: engine) if engine is not None else (lambda: LLMEngine(model, config))
        self._thread = threading.Thread(target=self._main, args=(build,), name="gptserve-engine", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self._stats = self.engine.stats()

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._go.set()

    @property
    def is_ready(self) -> bool:
        return self._go.is_set() and self._thread.is_alive() and not self._stopping

    async def shutdown(self) -> None:
        """Abort what is in flight (its streams end with finish_reason 'abort') and stop."""
        for request_id in list(self._streams):
            self.abort(request_id)
        self._stopping = True
        self._go.set()  # a never-started loop starts, finds nothing to do and ends
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 10)

    # ---- requests ---------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if self._dead is not None or self._stopping:
            raise EngineDeadError("the engine is not running")
        self.engine.check_request(prompt_token_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", request_id, list(prompt_token_ids), params))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    raise RequestFailedError(request_id, item.error)
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the caller went away: free its blocks at the next step
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        return self._stats

    async def inspect(self, prompt_token_ids: list[int], top_k: int = 10,
                      decimals: int = 4) -> Inspection:
        """Attention weights of every layer and head and the top next tokens for one prompt,
        computed by the serving model itself with a recording attention backend."""
        def run() -> Inspection:
            model = self.engine.model
            attn = DenseAttention(batch_size=1, record=True)
            ids = torch.tensor(prompt_token_ids, device=model.device)
            with torch.inference_mode():
                hidden = model(ids, torch.arange(len(ids), device=model.device), attn)
                probs, top = model.logits(hidden[-1:]).float()[0].softmax(-1).topk(top_k)
            # float64 before rounding, so that 0.4965 is written as 0.4965, not 0.49649998
            attention = [attn.weights[layer][0].double().round(decimals=decimals).tolist()
                         for layer in sorted(attn.weights)]
            return Inspection(attention, list(zip(top.tolist(), probs.tolist())))
        return await self.call(run)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the engine thread between two steps (all tensor work stays on that
        thread) and return its result."""
        if self._dead is not None or self._stopping:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._commands.put(("call", fn, loop, done))
        self._wake.set()
        return await done

    # ---- the thread -------------------------------------------------------------------
    def _main(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = build()
        except BaseException as e:  # noqa: BLE001 - raised again by __init__, on the caller's thread
            self._build_error = e
            return
        finally:
            self._built.set()
        self._go.wait()
        self._run()

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                self._drain_commands()
                if self._stopping and not engine.has_unfinished():
                    break
                if not engine.has_unfinished():
                    self._stats = engine.stats()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                outputs = engine.step()
                self._stats = engine.stats()
                self._deliver(outputs)
        except BaseException as e:  # noqa: BLE001 - whatever kills the loop, tell every waiter
            log.exception("engine loop died")
            self._dead = e
            dead = EngineDeadError(f"the engine stopped: {e!r}")
            for loop, stream in list(self._streams.values()):
                _call_soon(loop, stream.put_nowait, dead)
            while True:  # calls still queued would wait forever
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
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
                    continue  # cancelled before it was added
                try:
                    engine.add_request(request_id, prompt, params)
                except Exception as e:  # noqa: BLE001 - refused: tell that caller only
                    self._deliver_error(request_id, e)
            elif cmd[0] == "call":
                _, fn, loop, done = cmd
                try:
                    result, error = fn(), None
                except Exception as e:  # noqa: BLE001 - the caller's failure, raised in the caller
                    result, error = None, e
                _call_soon(loop, _settle, done, result, error)
            else:
                out = engine.abort(cmd[1])
                if out is not None:
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
