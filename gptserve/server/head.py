"""HEAD answered as GET without the body, on every GET route.

HTTP says a server should (RFC 9110, 9.3.2), and probes, load balancers and link
checkers send HEAD; FastAPI's routes answer it with 405, and listing HEAD on each route
would put every operation twice in the OpenAPI document. So the route sees a GET, and
the response goes out with the GET's status and headers (Content-Length included) and
no body. A HEAD to a route without GET is a 405, as before.
"""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)
