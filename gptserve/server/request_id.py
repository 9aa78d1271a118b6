"""The request id: an `x-request-id` header on every response, and in every log line.

A client that sends its own `x-request-id` (a proxy, a tracing client) gets it back, so
one id follows the request through every hop; otherwise we make one. While a request is
served its id is in a context variable, which `RequestIdFilter` copies onto each log
record (`%(request_id)s` in a log format; "-" outside any request), so the server's log
lines about a request can be found from the id the client saw.
"""
from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
HEADER_BYTES = HEADER.encode()
MAX_LENGTH = 128  # longer ids are replaced, not cut: a cut id would match nothing upstream
NO_REQUEST = "-"

request_id: ContextVar[str] = ContextVar("request_id", default=NO_REQUEST)


def accept_or_make(sent: str | None) -> str:
    """The client's id when it is printable ASCII without surrounding spaces, at most
    MAX_LENGTH long (it is echoed in a header and written to logs); else a new uuid4 hex."""
    if sent and len(sent) <= MAX_LENGTH and sent == sent.strip() and all(" " <= c <= "~" for c in sent):
        return sent
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Sets the request's id for its whole handling and adds it to the response's headers
    (streamed responses too: the header goes out with the first message)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(HEADER_BYTES)
        rid = accept_or_make(sent.decode("latin-1") if sent is not None else None)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER_BYTES]
                message["headers"] = headers + [(HEADER_BYTES, rid.encode())]
            await send(message)

        token = request_id.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` attribute: the id of the request being served."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True
