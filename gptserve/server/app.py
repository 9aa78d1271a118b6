"""`build_app(engine, server_config)`: the FastAPI app around one engine, or around several
models (a ModelCatalog: the registry in models.py loads and unloads them).

The lifespan starts the engines (loading every model first with --preload, and unloading
idle ones with --idle-unload) and stops them; the routers are each API family's (openai/,
responses/, anthropic/), the shared ones (routes.py) and inspect's; the API key is a
dependency of all but /health and /metrics; bodies over `max_body_bytes` are refused with
413 before anyone parses them;
CORS is off unless origins are configured. GET / is the playground page (static/).
Every response carries the request's `x-request-id` (request_id.py); every GET route
answers HEAD (head.py).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptserve.config import ServerConfig
from gptserve.server import routes
from gptserve.server.anthropic import routes as anthropic_routes
from gptserve.server.errors import (AuthenticationError, RequestTooLargeError, error_response, error_responses,
                                    install_error_handlers)
from gptserve.server.head import HeadAsGet
from gptserve.server.explain import router as explain_router
from gptserve.server.inspect import router as inspect_router
from gptserve.server.metrics import ServerMetrics
from gptserve.server.openai import routes as openai_routes
from gptserve.server.request_id import RequestIdMiddleware
from gptserve.server.responses import routes as responses_routes
from gptserve.server.responses.store import open_store
from gptserve.server.models import ModelCatalog, ModelRegistry, single_model
from gptserve.server.serving import ServerState

if TYPE_CHECKING:
    from gptserve.engine.client import EngineClient

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"


def require_api_key(request: Request) -> None:
    """When the server has a key: `Authorization: Bearer <key>` (OpenAI's clients) or
    `x-api-key: <key>` (Anthropic's); the key is never logged."""
    expected = request.app.state.models.config.api_key
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else ""
    key = key or request.headers.get("x-api-key", "").strip()
    if not key:
        raise AuthenticationError("You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                                  "or 'x-api-key: <key>'.")
    if not hmac.compare_digest(key.encode(), expected.encode()):
        raise AuthenticationError("Incorrect API key provided.")


async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


class BodySizeLimit:
    """Answers 413 to a body larger than `max_bytes`, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(f"The request body is larger than this server's limit of {self.max_bytes} bytes "
                                    "(--max-body-bytes).")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(self._too_large(), path=scope["path"])(scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a chunked body with no length declared
                raise StarletteHTTPException(413, self._too_large().message)
            return message

        await self.app(scope, counting_receive, send)


class GptServeApp(FastAPI):
    """FastAPI with the request id outermost: around Starlette's ServerErrorMiddleware too
    (which add_middleware can't wrap), so even the 500 of an unexpected exception, and
    its log line, carry the id."""

    def build_middleware_stack(self) -> ASGIApp:
        return RequestIdMiddleware(super().build_middleware_stack())


def build_app(served: "EngineClient | ModelCatalog", server_config: ServerConfig | None = None) -> FastAPI:
    """The app around one engine already built, or around several models (models.py)."""
    config = server_config or ServerConfig()
    models: ModelRegistry | None = None
    shared = ServerState(config, ServerMetrics(lambda: models.loaded_engines()))
    if isinstance(served, ModelCatalog):
        models = ModelRegistry(served.specs, config, served.loader, shared, served.loaded)
    else:
        models = single_model(served, config, shared)
    store = open_store(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        models.start()
        for name, engine in models.loaded_engines():
            log.info("serving %s (context %d tokens)", name, engine.limits.max_model_len)
        if config.preload:
            await models.preload()
        idle_unload = asyncio.ensure_future(models.unload_idle())
        try:
            yield
        finally:
            idle_unload.cancel()
            await models.stop()
            if store is not None:
                store.close()

    app = GptServeApp(title="gptserve", summary="OpenAI-compatible GPT-2 server", lifespan=lifespan)
    app.state.models = models
    app.state.serving = models.first_loaded  # a single-model server's one context (tests, Ray's ingress)
    app.state.metrics = shared.metrics
    app.state.store = store
    install_error_handlers(app)
    app.include_router(routes.public_router)
    keyed = [Depends(require_api_key)]
    for router in (openai_routes.router, responses_routes.router, anthropic_routes.router, routes.api_router):
        app.include_router(router, dependencies=keyed, responses=error_responses(401))
    for router in (inspect_router, explain_router):
        app.include_router(router, dependencies=keyed, responses=error_responses(401, 404, 429, 503))
    if config.enable_lora_runtime_updates:
        app.include_router(routes.lora_router, dependencies=keyed, responses=error_responses(401))
    app.add_api_route("/", playground, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(HeadAsGet)
    if config.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origins),
                           allow_methods=["*"], allow_headers=["*"])
    return app
