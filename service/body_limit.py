"""Request body limits: size counted on the bytes actually received, and a deadline to receive it.

A `Content-Length` check alone is not enough: a chunked upload has no Content-Length and
can stream without end. This pure ASGI middleware wraps `receive`: a declared length above
the limit, or a running total of received chunks that passes it, raises `BodyTooLarge`
(an HTTPException, so FastAPI and the routes let it through untouched) and the client
gets 413 naming the limit, before the body is buffered.

A client that sends the headers and then dribbles the body, or stops (slow loris), would
otherwise hold its connection, a task and an in-flight request until it gives up: uvicorn
times out idle connections only, not a body being read. So the whole body must arrive
within `body_read_timeout_s` of the request's start, else `BodyReadTimeout`: 408 naming
BODY_READ_TIMEOUT_S, and the connection is closed. Routes that never read a body pay nothing;
once the body is complete, `receive` is passed through untimed (a response may wait on it
for a disconnect).
"""

from __future__ import annotations

import asyncio

import orjson
from fastapi import HTTPException, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyRefused(HTTPException):
    """A body this middleware will not take; the answer closes the connection (what is left of
    the body is never read, so the connection cannot carry another request)."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(status_code, detail=detail, headers={"Connection": "close"})


class BodyTooLarge(BodyRefused):
    def __init__(self, limit: int):
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE, f"request body is larger than MAX_BODY_BYTES={limit} bytes")


class BodyReadTimeout(BodyRefused):
    def __init__(self, timeout_s: float):
        super().__init__(
            status.HTTP_408_REQUEST_TIMEOUT,
            f"request body not received within BODY_READ_TIMEOUT_S={timeout_s:g} seconds",
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
    def __init__(self, app: ASGIApp, max_body_bytes: int, body_read_timeout_s: float | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        timeout_s = self.body_read_timeout_s
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        declared = _declared_length(scope)
        received = 0
        body_done = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if declared is not None and declared > limit:
                raise BodyTooLarge(limit)
            if body_done or deadline is None:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise BodyReadTimeout(timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyRefused as e:  # a route that swallowed the HTTPException handling: answer here
            if started:
                raise
            await send(
                {"type": "http.response.start", "status": e.status_code,
                 "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]}
            )
            await send({"type": "http.response.body", "body": orjson.dumps({"detail": e.detail})})
