"""Request body size limit, counted on the bytes actually received.

A `Content-Length` check alone is not enough: a chunked upload has no Content-Length and
can stream without end. This pure ASGI middleware wraps `receive`: a declared length above
the limit, or a running total of received chunks that passes it, raises `BodyTooLarge`
(an HTTPException, so FastAPI and the routes let it through untouched) and the client
gets 413 naming the limit, before the body is buffered. Routes that never read a body pay
nothing.
"""

from __future__ import annotations

import orjson
from fastapi import HTTPException, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(
            status.HTTP_413_CONTENT_TOO_LARGE,
            detail=f"request body is larger than MAX_BODY_BYTES={limit} bytes",
            headers={"Connection": "close"},
        )


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _declared_length(scope)
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge as e:  # a route that swallowed the HTTPException handling: answer here
            if started:
                raise
            await send(
                {"type": "http.response.start", "status": e.status_code,
                 "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]}
            )
            await send({"type": "http.response.body", "body": orjson.dumps({"detail": e.detail})})
