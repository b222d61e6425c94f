"""Pure ASGI middleware of the service: body size limit and request metrics.

Pure ASGI (not Starlette's BaseHTTPMiddleware) because it costs a few microseconds per request
instead of an extra task and stream per request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from recloop.serve.metrics import ServiceMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """413 for bodies over the limit, by Content-Length or while streaming (chunked).

    A request body is read here in full (at most ``limit`` bytes) before the app sees it, so an
    oversized chunked body is refused with 413 before any route starts parsing it (a limit
    raised from inside the app's body read would surface as the framework's 400).
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    await _plain(send, 400, "bad Content-Length header")
                    return
                if too_big:
                    await _plain(send, 413, f"request body over {self.limit} bytes")
                    return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body: nobody to answer
            received += len(message.get("body", b""))
            if received > self.limit:
                await _plain(send, 413, f"request body over {self.limit} bytes")
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)


async def _plain(send: Send, status: int, detail: str) -> None:
    await send_json(send, status, json.dumps({"detail": detail}).encode())


class RequestMetrics:
    """Latency histogram per route template and status (pure ASGI: cheap per request)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            # The router stores the matched route in the (shared) scope: label by its template
            # so /v1/users/{user_id}/... is one series, not one per user (path_format: the
            # template without converters, "{user_id}" for "{user_id:path}").
            route = scope.get("route")
            path = getattr(route, "path_format", None) or getattr(route, "path", None)
            path = path or "unmatched"
            self.metrics.observe_request(path, status, time.perf_counter() - started)
