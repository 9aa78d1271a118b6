"""The async front: requests in from the event loop, deltas back, the step loop in a thread.

The thread owns the LLMEngine; the event loop talks to it only through a command queue
(add, abort) and gets each step's outputs back in one call_soon_threadsafe hand-off.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

import torch

from gptserve.config import EngineConfig
from gptserve.engine.llm_engine import LLMEngine
from gptserve.engine.outputs import (EngineDeadError, EngineStats, Inspection, RequestFailedError,
                                     RequestOutput)
from gptserve.engine.sampling_params import SamplingParams
from gptserve.model.attention import DenseAttention

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, model: str | None, config: EngineConfig | None = None,
                 engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(model, config)
        self.model_name = model or "gptserve-default"
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._stats = self.engine.stats()

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gptserve-engine", daemon=True)
            self._thread.start()

    @property
    def is_ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def shutdown(self) -> None:
        """Abort what is in flight (its streams end with finish_reason 'abort') and stop."""
        for request_id in list(self._streams):
            self.abort(request_id)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
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
        return await asyncio.to_thread(run)

    # ---- the thread -------------------------------------------------------------------
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


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, out in items:
        stream.put_nowait(out)
