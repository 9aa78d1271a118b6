"""The served models: name -> engine (loaded, loading, unloaded), under one memory budget.

A server serves one model or several (`--model NAME=PATH` repeated, or `--models-file`).
Each has a name, what to load, and its engine's settings (config.ModelSpec). The registry
loads a model on its first request (or at start with `--preload`), one engine per loaded
model in this process, and unloads the least recently used idle model when loading another
would pass `--models-memory`, or when one has been idle for `--idle-unload` seconds. A
request holds its model (`use`) from the route's start until its last output is sent, so a
model is never unloaded under a request; a request whose model can't be loaded in
`--model-load-timeout` seconds (every other model busy, or a slow load) gets 503 with
Retry-After, and the load goes on for the next one.

A name may also be a LoRA adapter of a loaded model (ServingContext.adapters): the request
then goes to that model's context. The engines are built by a `ModelLoader` the command line
gives (the HTTP layer builds none itself).
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncIterator, Protocol

from gptserve.config import ModelSpec, ServerConfig
from gptserve.engine.client import EngineClient
from gptserve.server.chat_template import ChatTemplate
from gptserve.server.errors import ModelNotFoundError, NotReadyError
from gptserve.server.serving import ServerState, ServingContext

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5  # what a 503 for a model still loading tells the client


class ServedModelsError(ValueError):
    """The models can't be served as given: two share a name, or one can't fit --models-memory alone."""


class ModelLoader(Protocol):
    def build(self, spec: ModelSpec) -> EngineClient:
        """Build (load) the model's engine; blocking, run in a thread."""

    def estimate(self, spec: ModelSpec) -> int:
        """The bytes its engine will hold, before it is built."""


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"


@dataclass(eq=False)
class ServedModel:
    spec: ModelSpec
    memory: int  # bytes it holds when loaded: estimated, then as its engine reports
    state: ModelState = ModelState.UNLOADED
    ctx: ServingContext | None = None
    holders: int = 0  # requests between `use` and their route's end
    last_used: float = field(default_factory=time.monotonic)
    loading: asyncio.Task | None = None
    loads: int = 0

    @property
    def adapters(self) -> dict[str, str]:
        """Its LoRA adapters (name -> folder): those it serves, or will serve once loaded."""
        return self.ctx.adapters if self.ctx is not None else self.spec.engine.lora_modules

    @property
    def busy(self) -> bool:
        return self.holders > 0 or (self.ctx is not None and self.ctx.num_model_in_flight > 0)


@dataclass
class ModelCatalog:
    """What a server of several models starts from: the models, in order (the first answers
    requests that name none), how to build them, and those built already."""

    specs: list[ModelSpec]
    loader: ModelLoader
    loaded: dict[str, EngineClient] = field(default_factory=dict)


class ModelRegistry:
    def __init__(self, specs: list[ModelSpec], config: ServerConfig, loader: ModelLoader | None,
                 shared: ServerState, loaded: dict[str, EngineClient] | None = None):
        """`loaded`: engines already built, by model name (a single-model server's)."""
        self.config, self.loader, self.shared = config, loader, shared
        self.models: dict[str, ServedModel] = {}
        self.default = specs[0].name  # what a request without a model gets
        self.created = int(time.time())
        self._changed = asyncio.Event()  # set when a model goes idle or is unloaded: a waiting load retries
        for spec in specs:
            if spec.name in self.models:
                raise ServedModelsError(f"two models are named {spec.name!r}")
            if spec.chat_template is not None:  # a bad template fails the start, not the model's first load
                ChatTemplate.load(spec.chat_template, "", "")
            engine = (loaded or {}).get(spec.name)
            memory = engine.memory_bytes if engine is not None else loader.estimate(spec)
            budget = config.models_memory
            if budget is not None and memory > budget:
                raise ServedModelsError(f"model {spec.name!r} needs about {memory / 2**20:.0f} MiB, more than "
                                 f"--models-memory ({budget / 2**20:.0f} MiB)")
            model = self.models[spec.name] = ServedModel(spec, memory)
            if engine is not None:
                self._loaded(model, engine)

    # ---- routing ------------------------------------------------------------------------------
    def resolve(self, name: str | None) -> ServedModel:
        """The model a request's `model` names (itself, or a LoRA adapter of it); 404 else."""
        if name is None:
            return self.models[self.default]
        if name in self.models:
            return self.models[name]
        for model in self.models.values():
            if name in model.adapters:
                return model
        raise ModelNotFoundError(name, self.names())

    def names(self) -> list[str]:
        """Every model and every adapter of one."""
        return list(self.models) + [name for model in self.models.values() for name in model.adapters]

    @asynccontextmanager
    async def use(self, name: str | None) -> AsyncIterator[ServingContext]:
        """The context of the model `name` asks for, loaded, held until the block ends (a
        request's engine work holds it on past that, until its last output)."""
        model = self.resolve(name)
        model.holders += 1
        try:
            if model.state is not ModelState.LOADED:
                await self._wait_loaded(model)
            model.last_used = time.monotonic()
            yield model.ctx
        finally:
            model.holders -= 1
            model.last_used = time.monotonic()
            self._changed.set()

    def check_ready(self) -> None:
        """503 while shutting down, or when a loaded model's engine has stopped."""
        if self.shared.draining:
            raise NotReadyError("The server is shutting down.")
        for model in self.models.values():
            if model.ctx is not None:
                model.ctx.check_ready()

    def loaded_engines(self) -> list[tuple[str, EngineClient]]:
        return [(m.spec.name, m.ctx.engine) for m in self.models.values() if m.ctx is not None]

    @property
    def first_loaded(self) -> ServingContext | None:
        return next((m.ctx for m in self.models.values() if m.ctx is not None), None)

    # ---- loading -------------------------------------------------------------------------------
    async def _wait_loaded(self, model: ServedModel) -> None:
        if self.shared.draining:
            raise NotReadyError("The server is shutting down.")
        if model.loading is None:
            model.loading = asyncio.ensure_future(self._load(model))
        try:
            await asyncio.wait_for(asyncio.shield(model.loading), self.config.model_load_timeout)
        except asyncio.TimeoutError:
            raise NotReadyError(f"The model `{model.spec.name}` is still loading (it waits for memory other models "
                                f"hold, or loads slowly). Retry later.",
                                retry_after=RETRY_AFTER_S) from None

    async def _load(self, model: ServedModel) -> None:
        try:
            await self._make_room(model)
            model.state = ModelState.LOADING
            log.info("loading model %s (%s)", model.spec.name, model.spec.model or "bundled model")
            started = time.perf_counter()
            engine = await asyncio.to_thread(self.loader.build, model.spec)
            self._loaded(model, engine)
            engine.start()
            log.info("model %s loaded in %.1f s (%.0f MiB)", model.spec.name, time.perf_counter() - started,
                     model.memory / 2**20)
        except BaseException:
            model.state = ModelState.UNLOADED
            raise
        finally:
            model.loading = None

    def _loaded(self, model: ServedModel, engine: EngineClient) -> None:
        eos = engine.tokenizer.token_str(engine.tokenizer.eos_token_id)
        template = ChatTemplate.load(model.spec.chat_template or self.config.chat_template, eos, eos)
        ctx = ServingContext(engine, self.shared, template, model.spec.name)
        ctx.on_idle = self._changed.set
        model.ctx, model.state, model.memory = ctx, ModelState.LOADED, engine.memory_bytes or model.memory
        model.loads += 1
        model.last_used = time.monotonic()

    async def _make_room(self, model: ServedModel) -> None:
        """Unload idle models, least recently used first, until `model` fits the budget;
        wait for one to go idle while every other is busy."""
        budget = self.config.models_memory
        while budget is not None and self._held(model) + model.memory > budget:
            idle = [m for m in self.models.values()
                    if m is not model and m.state is ModelState.LOADED and not m.busy]
            if idle:
                await self.unload(min(idle, key=lambda m: m.last_used), "to make room for " + model.spec.name)
                continue
            self._changed.clear()
            await self._changed.wait()

    def _held(self, model: ServedModel) -> int:
        return sum(m.memory for m in self.models.values()
                   if m is not model and m.state in (ModelState.LOADED, ModelState.LOADING))

    async def unload(self, model: ServedModel, why: str) -> None:
        ctx = model.ctx
        if ctx is None:
            return
        model.ctx, model.state = None, ModelState.UNLOADED
        await ctx.stop_engine()
        model.spec.engine.lora_modules = dict(ctx.adapters)  # a reload serves the same adapters
        log.info("unloaded model %s (%s)", model.spec.name, why)
        self._changed.set()

    # ---- lifecycle -----------------------------------------------------------------------------
    async def preload(self) -> None:
        """Load every model now, in order, as far as the budget holds them all."""
        budget = self.config.models_memory
        for model in self.models.values():
            if model.state is ModelState.LOADED:
                continue
            if budget is not None and self._held(model) + model.memory > budget:
                log.warning("not preloading %s and the models after it: --models-memory is full", model.spec.name)
                return
            async with self.use(model.spec.name):
                pass

    async def unload_idle(self) -> None:
        """Unload models unused for --idle-unload seconds; runs until cancelled."""
        limit = self.config.idle_unload
        while limit is not None:
            await asyncio.sleep(min(limit / 4, 1.0))
            now = time.monotonic()
            for model in list(self.models.values()):
                if model.state is ModelState.LOADED and not model.busy and now - model.last_used >= limit:
                    await self.unload(model, f"idle for {limit:g} s")

    async def stop(self) -> None:
        """Ends every in-flight request (their streams finish cleanly) and stops every engine."""
        self.shared.draining = True
        await asyncio.gather(*(m.ctx.stop_engine() for m in self.models.values() if m.ctx is not None))

    def start(self) -> None:
        for model in self.models.values():
            if model.ctx is not None:
                model.ctx.engine.start()


def single_model(engine: EngineClient, config: ServerConfig, shared: ServerState) -> ModelRegistry:
    """The registry of a server of one model, already built."""
    name = config.served_model_name or engine.model_name
    return ModelRegistry([ModelSpec(name, engine.model_name)], config, None, shared, {name: engine})

