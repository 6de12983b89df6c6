"""Pure-ASGI middleware: request metrics and draining, API-key check, and the upload size limit."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http_errors import ApiError, error_body
from .metrics import ServeMetrics

__all__ = [
    "OVER_CAP_KEY",
    "ApiKeyMiddleware",
    "BodyLimitMiddleware",
    "RequestTracker",
    "TrackingMiddleware",
]

# In a request's scope["state"] when its connection opened over the server's connection cap: the
# (open connections, cap) the protocol (serve.protocol) saw. The app then answers 503, never the route.
OVER_CAP_KEY = "clipengine.serve.over_connection_cap"

# Metric label values for the method: clients can send any token as a method, so anything else is
# counted as "other" (one new series per made-up method would grow the registry without bound).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route_path(scope: Scope) -> str:
    """The path inside the app: ASGI's `path` starts with `root_path` (under a Mount, or uvicorn's
    --root-path behind a proxy), so "/clip/v1/search" is the app's "/v1/search" (as Starlette routes it)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


class RequestTracker:
    """Counts in-flight API requests and refuses new ones once draining starts (graceful shutdown)."""

    def __init__(self, metrics: ServeMetrics) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle: Callable[[], None] | None = None
        metrics.in_flight.set_function(lambda: float(self.in_flight))

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle()

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting API requests and wait until none is in flight; False if the timeout hit."""
        self.draining = True
        if self.in_flight == 0:
            return True
        done = asyncio.Event()
        self._idle = done.set
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._idle = None


class TrackingMiddleware:
    """Outermost layer: request counts and latency by route template and status; in-flight tracking."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServeMetrics,
        tracker: RequestTracker,
        retry_after_s: int,
        api_prefix: str,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.tracker = tracker
        self.retry_after = {"Retry-After": str(retry_after_s)}
        self.api_prefix = api_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        over_cap = (scope.get("state") or {}).get(OVER_CAP_KEY)
        if over_cap is not None and path != "/healthz":  # liveness: the process still answers
            # Refused for its connection, not its route: counted with the connection layer's own
            # refusals (those over the cap that send nothing), not as a request to route "unmatched".
            self.metrics.http_rejected.inc(reason="too_many_connections")
            await self._refuse_over_cap(send, *over_cap)
            return
        is_api = path.startswith(self.api_prefix)
        if is_api and self.tracker.draining:
            # Refused for the server's state, before routing: counted as a refusal (like the over-cap
            # 503), not as a request to route "unmatched".
            self.metrics.http_rejected.inc(reason="shutting_down")
            await _send_json(
                send, 503, error_body("shutting_down", "the server is stopping; retry later"), self.retry_after
            )
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if is_api:
                self.tracker.enter()
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                if is_api:
                    self.tracker.leave()
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"  # never the raw path: bounded labels
            method = scope.get("method", "GET")
            method = method if method in _METHODS else "other"
            self.metrics.requests.inc(method=method, route=template, status=str(status["code"]))
            self.metrics.latency.observe(time.perf_counter() - started, method=method, route=template)


    async def _refuse_over_cap(self, send: Send, open_connections: int, cap: int) -> None:
        """503 and close: the connection stays open only while it is answered, freeing its descriptor."""
        message = (
            f"too many connections: {open_connections} open, over the server's limit of {cap} "
            "(clipengine serve --max-connections); retry later"
        )
        headers = {**self.retry_after, "Connection": "close"}
        await _send_json(send, 503, error_body("too_many_connections", message), headers)


class ApiKeyMiddleware:
    """When a key is set, every path except the public ones needs `Authorization: Bearer` or `X-API-Key`."""

    def __init__(
        self, app: ASGIApp, api_key: str | None, public: Iterable[str], public_prefixes: Iterable[str]
    ) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.public = frozenset(public)
        self.public_prefixes = tuple(public_prefixes)

    def _presented(self, scope: Scope) -> bytes | None:
        headers: dict[bytes, bytes] = dict(scope.get("headers") or [])
        if b"x-api-key" in headers:
            return headers[b"x-api-key"].strip()
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None:
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        if path in self.public or path.startswith(self.public_prefixes) or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        presented = self._presented(scope)
        if presented is None:
            await _send_json(
                send,
                401,
                error_body(
                    "unauthorized", "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'"
                ),
                {"WWW-Authenticate": "Bearer"},
            )
            return
        if not hmac.compare_digest(presented, self.key):
            await _send_json(
                send, 401, error_body("unauthorized", "invalid API key"), {"WWW-Authenticate": "Bearer"}
            )
            return
        await self.app(scope, receive, send)


# On the answers given before the body was read to its end (too large, stalled, too slow): the server
# then closes the connection. Without it the connection stayed open for the keep-alive timeout,
# though the rest of the body, if it ever came, was only read to be thrown away.
_CLOSE = {"Connection": "close"}


class BodyTooLargeError(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes", _CLOSE)


class BodyStalledError(ApiError):
    def __init__(self, idle_s: float) -> None:
        super().__init__(
            408, "request_timeout", f"no request body data for {idle_s:g} s; send the whole body", _CLOSE
        )


class BodyTooSlowError(ApiError):
    def __init__(self, seen: int, elapsed_s: float, min_rate: float) -> None:
        super().__init__(
            408,
            "request_timeout",
            f"request body too slow: {seen} bytes in {elapsed_s:.0f} s, under the minimum of {min_rate:g} "
            "bytes/s; send the whole body faster",
            _CLOSE,
        )


class BodyLimitMiddleware:
    """Refuse bodies over `limit` bytes: at once from Content-Length, else as soon as the stream passes it.

    A body that stops arriving for `idle_s` seconds is refused with 408: the request timeout covers
    the work done for a request, and without this a client that sends part of a body would hold its
    connection and handler for as long as it liked. A body that keeps trickling in is held to a
    minimum average rate (as Apache's mod_reqtimeout does): `idle_s` seconds, plus one second for
    every `min_rate` bytes received; a byte every few seconds held a handler for hours before.
    """

    def __init__(
        self, app: ASGIApp, limit: int, idle_s: float | None = None, min_rate: float | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        self.idle_s = idle_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                await _send_json(send, 400, error_body("bad_request", "Content-Length is not a number"))
                return
            if too_big:
                await _send_json(
                    send,
                    413,
                    error_body(
                        "payload_too_large",
                        f"request body of {int(declared)} bytes exceeds the limit of {self.limit} bytes",
                    ),
                    _CLOSE,
                )
                return
        seen = 0
        body_done = False
        started = time.monotonic()

        async def limited_receive() -> Message:
            nonlocal seen, body_done
            if body_done or self.idle_s is None:  # after the body, receive() waits for a disconnect
                message = await receive()
            else:
                message = await self._receive_in_time(receive, self.idle_s, seen, started)
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Raised inside whatever is reading the body; FastAPI re-raises HTTPExceptions
                    # untouched and the app's handler turns it into the JSON 413.
                    raise BodyTooLargeError(self.limit)
            return message

        await self.app(scope, limited_receive, send)

    async def _receive_in_time(self, receive: Receive, idle_s: float, seen: int, started: float) -> Message:
        """The next body message within `idle_s`, and before the minimum-rate deadline (408 otherwise)."""
        wait_s, slow = idle_s, False
        if self.min_rate is not None:
            left = started + idle_s + seen / self.min_rate - time.monotonic()
            wait_s, slow = min(wait_s, left), left < wait_s
        try:
            if wait_s <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(receive(), wait_s)
        except asyncio.TimeoutError as e:
            if slow and self.min_rate is not None:
                raise BodyTooSlowError(seen, time.monotonic() - started, self.min_rate) from e
            raise BodyStalledError(idle_s) from e
