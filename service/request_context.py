"""The outermost layer of every HTTP request: request id, access log, latency metric, last-resort 500.

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware, which copies every response
through an extra task and stream): it wraps `send` to see the status and add a header,
nothing more.

- Request id: a client's `X-Request-ID` is kept when it is a sane token (at most 128 of
  `A-Z a-z 0-9 . _ : -`; anything else could forge log lines), otherwise a new one is made;
  it is echoed in the response header and set in `request_id_var` for every log line.
- Metrics: latency by route template, method and status; requests in flight.
- Access log: one structured line per request.
- Errors: an exception that escapes the app becomes a generic 500 JSON body with the
  request id (the traceback goes to the log only, never to the client).
- A client that hangs up while its body is read (the app sees `http.disconnect`, or
  Starlette's ClientDisconnect escapes) is its own outcome, not a server error: status 499
  (nginx's "client closed request") in the metric and the access log, one info line without
  a traceback, and no response attempted. Counting it as 500 would let hung-up clients set
  off error-rate alerts. A hang-up after the body, while the request waits for its ranking, is
  not watched for (a task per request would be the price) and keeps its answer's status.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

import orjson
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import ServiceMetrics
from service.structured_logging import request_id_var

log = logging.getLogger(__name__)
access_log = logging.getLogger("din.access")

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
UNMATCHED_ROUTE = "unmatched"
CLIENT_CLOSED = 499  # nginx's status for "client closed the connection before the response"


def internal_error_body(request_id: str | None) -> bytes:
    return orjson.dumps(
        {"detail": "internal server error; quote the request id when reporting it", "request_id": request_id}
    )


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return value.decode("ascii") if _SANE_ID.match(value) else None
    return None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable_path(scope: Scope) -> str:
    """The request path for a log line: ASGI hands it over percent-decoded, so `%0A` would be a
    real newline, and a client could forge whole lines in a text log. Control characters -> \\xNN."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", scope["path"])


def route_label(scope: Scope) -> str:
    """The route's template (`/rank`), so the label set stays bounded; `unmatched` for a 404.

    FastAPI's routes put themselves in the scope; Starlette's plain ones (`/docs`,
    `/openapi.json`: no path parameters) only leave their endpoint, and a mount (`/static`)
    its root path.
    """
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", None) or UNMATCHED_ROUTE
    if "endpoint" not in scope:
        return UNMATCHED_ROUTE
    if "app_root_path" in scope:  # a mount: its prefix, whatever file below it
        return scope.get("root_path") or scope["path"]
    return scope["path"]  # a plain route without path parameters: the path is its template


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, *, access_log_enabled: bool = True):
        self.app = app
        self.metrics = metrics
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        status = 500
        started = completed = client_gone = False
        rid_header = (b"x-request-id", rid.encode("ascii"))

        async def watched_receive() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect" and not completed:
                client_gone = True  # whatever the app answers now reaches no one
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, started, completed
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
            await send(message)

        start = time.perf_counter()
        self.metrics.requests_in_flight.inc()
        try:
            await self.app(scope, watched_receive, send_with_id)
        except ClientDisconnect:  # the client hung up while its body was read: nobody to answer
            client_gone = True
            log.info("client closed the connection during %s %s", scope["method"], printable_path(scope))
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], printable_path(scope))
            if started:  # half a response is out: nothing sane to add; the server drops the connection
                raise
            status = 500
            await send_with_id(
                {"type": "http.response.start", "status": 500,
                 "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": internal_error_body(rid)})
        finally:
            if client_gone:
                status = CLIENT_CLOSED
            elapsed = time.perf_counter() - start
            self.metrics.requests_in_flight.dec()
            route = route_label(scope)
            self.metrics.request_seconds.labels(route, scope["method"], str(status)).observe(elapsed)
            if self.access_log_enabled:
                access_log.info(
                    "%s %s %d", scope["method"], printable_path(scope), status,
                    extra={"route": route, "status": status, "duration_ms": round(elapsed * 1000, 3),
                           "client": (scope.get("client") or ("", 0))[0]},
                )
            request_id_var.reset(token)
