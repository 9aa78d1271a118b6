"""`run_server(engine, server_config)`: serve an engine, or several models, with uvicorn
(`gptserve serve` builds a single model's engine first).

On SIGINT/SIGTERM uvicorn stops accepting connections; before it waits for the open
ones, the engine ends every in-flight request, so each stream sends its last chunk
(finish_reason "abort") and `data: [DONE]` instead of being cut; then the process exits.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable

import uvicorn
from fastapi import FastAPI

from gptserve.config import ServerConfig
from gptserve.engine.client import EngineClient
from gptserve.server.app import build_app
from gptserve.server.models import ModelCatalog
from gptserve.server.serving import STREAM_SHUTDOWN_GRACE_S

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which lets the engine end in-flight requests as it shuts down."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]):
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # runs once the listeners are closed (the first thing uvicorn's shutdown does)
        drained = asyncio.ensure_future(self.drain())
        await super().shutdown(sockets)
        await drained


def make_server(app: FastAPI, server_config: ServerConfig, log_level: int | str = "info") -> DrainingServer:
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level=log_level,
                            timeout_graceful_shutdown=int(STREAM_SHUTDOWN_GRACE_S) + 5)
    return DrainingServer(config, drain=app.state.models.stop)


def run_server(served: EngineClient | ModelCatalog, server_config: ServerConfig) -> None:
    app = build_app(served, server_config)
    log.info("listening on http://%s:%d", server_config.host, server_config.port)
    make_server(app, server_config, log_level=logging.getLogger().level or logging.INFO).run()
