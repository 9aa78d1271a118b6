"""The Ray application's response headers: `x-gptserve-replica` names the engine
replica(s) that produced the answer, or the ingress replica when no engine replica did
(GET /v1/models, a request refused before it reached an engine); and `x-request-id` is
left to Serve's proxy, which adds the request's id to every response itself (the id our
server then reads from the request), so that it is not sent twice.

The middleware wraps the whole app, the request id's middleware included. It hands each
request an empty list through a context variable; RemoteEngine adds the name of the
replica that streams a request's first output. Tasks started while serving the request
copy the context, so they share the same list.
"""
from __future__ import annotations

from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptserve.server.request_id import HEADER_BYTES as REQUEST_ID

REPLICA_HEADER = "x-gptserve-replica"
_served_by: ContextVar[list[str] | None] = ContextVar("gptserve_served_by", default=None)


def record_replica(name: str) -> None:
    """Name `name` in the current response's header (outside a request: nothing)."""
    served = _served_by.get()
    if served is not None and name not in served:
        served.append(name)


class ReplicaHeader:
    """ASGI middleware: sets the headers when the response starts."""

    def __init__(self, app: ASGIApp, ingress_name: str):
        self.app, self.ingress_name = app, ingress_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        served: list[str] = []
        token = _served_by.set(served)

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID]
                replicas = ",".join(served) or self.ingress_name
                message["headers"] = headers + [(REPLICA_HEADER.encode(), replicas.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_named)
        finally:
            _served_by.reset(token)
