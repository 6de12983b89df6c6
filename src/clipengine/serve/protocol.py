"""uvicorn's HTTP/1.1 protocol with deadlines on each request's head and answer, and a cap on the head's size.

uvicorn times out only idle keep-alive connections, and only until the next byte arrives: a client
that opens connections and sends part of a request line or headers (or nothing, or a blank line
every few seconds) held each connection, and its file descriptor, for ever. With httptools (the
`serve` extra) the headers had no size limit either: a 50 MB header was read into memory whole.
And a client that stopped reading its answers held its connection and request for ever; one that
hung up on pipelined requests (httptools) left the one running unaware of it.

And nothing capped the number of open connections: each holds a file descriptor, so a flood of
them ran the process out (accept failing, files not opening). One over `max_connections` is
answered 503 by the app (OVER_CAP_KEY in its request's state) and closed, or closed within
OVER_CAP_HEAD_TIMEOUT_S if it sends nothing; uvicorn's own `limit_concurrency` kept such an idle
connection for the whole head timeout and answered a plain "Service Unavailable" without a reason.

Each refusal or drop is counted in the served app's `clipengine_http_rejected_total{reason}`: the
protocol finds the app's metrics in the lifespan state uvicorn hands every connection (STATE_KEY).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, cast

import h11

from .http_errors import error_body
from .metrics import STATE_KEY
from .middleware import OVER_CAP_KEY
from .settings import ServeSettings

__all__ = ["guarded_protocol", "uvicorn_options"]

log = logging.getLogger(__name__)

_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}

# A connection opened over the cap has this long to send its request head (to be told 503), not the
# full head timeout: idle ones would hold a descriptor each for that long, the cap notwithstanding.
OVER_CAP_HEAD_TIMEOUT_S = 1.0


class _HeadGuard(asyncio.Protocol):
    """Mixin placed before uvicorn's protocol: the request head must arrive in time and within a size.

    The clock starts when the connection opens, and again when bytes arrive while no request is in
    progress (uvicorn's keep-alive timer stops at the first byte of the next request); it stops when
    a request's head is complete. The body is the app's to time (BodyLimitMiddleware).
    """

    head_timeout_s: float = 10.0  # request line + headers must be complete this long after they start
    send_timeout_s: float = 30.0  # a client that reads none of its answer for this long is cut off
    max_head_bytes: int = 64 * 1024  # request line + headers; 431 above (httptools; h11 has its own cap)
    max_connections: int | None = None  # open connections; one over it is answered 503 and closed

    # uvicorn's own attributes, as the guard uses them
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    server_state: Any
    connections: set[Any]  # the server's open connections, this one included once it is made
    app_state: dict[str, Any]  # the app's lifespan state: its ServeMetrics under STATE_KEY

    _head_timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None
    _in_head = False  # part of a request head has arrived
    _head_bytes = 0  # bytes read since the head began (counted only where the parser has no cap)
    _counts_head_bytes = False
    _over_cap = False  # opened over max_connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            # This connection's requests are answered 503 by the app, which reads the mark from the
            # state uvicorn copies into each request's scope; a copy, so other connections lack it.
            self.app_state = {**self.app_state, OVER_CAP_KEY: (len(self.connections), self.max_connections)}
            self.head_timeout_s = min(self.head_timeout_s, OVER_CAP_HEAD_TIMEOUT_S)
            self._over_cap = True
        self._start_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        self._stop_send_clock()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        """The client shut its sending side: if that cut its request body short, say so, then close.

        uvicorn closed the connection without a word (the app saw a disconnect, a 499). A client
        that half-closes (`shutdown(SHUT_WR)`, `nc -N`) reads the 400; one that closed outright
        does not, as before. With the whole request in, the connection closes as uvicorn does:
        a closed socket reads the same as a half-closed one, and a client that hangs up must
        have its queued work dropped at once (the answer would find nobody).
        """
        cycle = self.cycle
        body_cut = cycle is not None and cycle.more_body and not cycle.response_started
        if body_cut and not self.transport.is_closing():
            self._refuse(
                400,
                "incomplete_body",
                "the request body ended early: the client closed its side of the connection before "
                "sending all of it (Content-Length or the last chunk); send the whole body",
                reason="incomplete_body",
            )
        super().eof_received()

    def pause_writing(self) -> None:
        """The answer fills the send buffer: the client has this long to read some of it."""
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        self._stop_send_clock()
        super().resume_writing()

    def _stop_send_clock(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
        self._send_timer = None

    def _send_timed_out(self) -> None:
        # uvicorn's answer waited for the buffer to drain for ever, holding the request (and a graceful
        # shutdown). close() would wait for the buffer too: abort() drops it and ends the request.
        self._send_timer = None
        self._count("send_timeout")
        log.info(
            "closed %s: it read none of its answer for %g s",
            getattr(self, "client", None),
            self.send_timeout_s,
        )
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head():
            self._start_clock()
            self._note_bytes()
        super().data_received(data)
        if self.transport.is_closing():
            return
        if not self._awaiting_head():
            self._stop_clock()
        elif self._in_head and self._counts_head_bytes:
            self._head_bytes += len(data)  # whole reads: exact to within one read of the limit
            if self._head_bytes > self.max_head_bytes:
                self._refuse(
                    431,
                    "headers_too_large",
                    f"request line and headers exceed {self.max_head_bytes} bytes",
                    reason="head_too_large",
                )

    def _note_bytes(self) -> None:
        """Bytes arrived while no request is in progress: say whether they start a request head."""
        raise NotImplementedError

    def _awaiting_head(self) -> bool:
        return self.cycle is None or bool(self.cycle.response_complete)

    def _start_clock(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = None
        self._in_head = False
        self._head_bytes = 0

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._awaiting_head():
            return
        if not self._in_head:  # nothing of a request arrived (as uvicorn's keep-alive timeout: no answer)
            self._count("too_many_connections" if self._over_cap else "no_request")
            self.transport.close()
            return
        self._refuse(
            408,
            "request_timeout",
            f"the request line and headers did not arrive within {self.head_timeout_s:g} s",
            reason="head_timeout",
        )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's plain-text 400 for a request its parser refuses: counted, then sent as uvicorn does."""
        self._count(self._parser_refusal())
        cast(Any, super()).send_400_response(msg)

    def _parser_refusal(self) -> str:
        """The rejection reason of a 400 from uvicorn's parser."""
        return "invalid_request"

    def _count(self, reason: str) -> None:
        """One more refusal in the served app's metrics (none when its lifespan did not run)."""
        metrics = self.app_state.get(STATE_KEY)
        if metrics is not None:
            metrics.http_rejected.inc(reason=reason)

    def _refuse(self, status: int, code: str, message: str, *, reason: str) -> None:
        """Answer with the API's JSON error shape and close (uvicorn's own 400s are written the same way)."""
        self._count(reason)
        level = logging.WARNING if status == 431 else logging.INFO  # slow or cut links are common, huge heads not
        log.log(level, "%s to %s: %s", status, getattr(self, "client", None), message)
        body = json.dumps(error_body(code, message)).encode()
        head = [f"HTTP/1.1 {status} {_REASONS[status]}".encode()]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()
        self._stop_clock()


class _H11HeadGuard(_HeadGuard):
    """h11 caps the head itself (`h11_max_incomplete_event_size`, a 400 above it)."""

    conn: h11.Connection

    def _note_bytes(self) -> None:
        # Not the rest of a body the app answered without reading (h11 swallows that).
        self._in_head = self.conn.their_state is not h11.SEND_BODY

    _refusal = "invalid_request"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # uvicorn answers every error h11 raises with the same 400 and drops the error; h11's own
        # status hint (431 for a head over its cap) is kept here for the metrics.
        parse = self.conn.next_event

        def next_event() -> Any:
            try:
                return parse()
            except h11.RemoteProtocolError as e:
                self._refusal = "head_too_large" if e.error_status_hint == 431 else "invalid_request"
                raise

        self.conn.next_event = next_event  # type: ignore[method-assign]

    def _parser_refusal(self) -> str:
        return self._refusal


class _HttpToolsHeadGuard(_HeadGuard):
    """httptools reports where a request starts and where its headers end: only those bytes count."""

    _counts_head_bytes = True  # httptools itself has no limit
    _cycles: list[Any]  # this connection's requests not answered yet: running, then pipelined

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._cycles = []
        super().connection_made(transport)

    def _note_bytes(self) -> None:
        pass  # leftover body of an answered request, or blank lines: not a request head yet

    def on_message_begin(self) -> None:
        cast(Any, super()).on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        cast(Any, super()).on_headers_complete()
        # uvicorn keeps only the newest request's cycle; pipelined ones wait behind the one running.
        self._cycles = [c for c in self._cycles if not c.response_complete]
        if self.cycle is not None and self.cycle not in self._cycles:
            self._cycles.append(self.cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        # uvicorn tells only the newest cycle that the client is gone: with pipelined requests, the
        # one running never saw the disconnect (its work went on for nobody, in flight, and with
        # uvloop its answer raised writing to the closed socket). Tell every unfinished one.
        for cycle in self._cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)


def guarded_protocol(
    head_timeout_s: float,
    max_head_bytes: int,
    send_timeout_s: float = 30.0,
    max_connections: int | None = None,
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, as uvicorn picks, else h11) with the guard."""
    base: type[asyncio.Protocol]
    guard: type[_HeadGuard]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn's pure-Python h11 stack
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base, guard = H11Protocol, _H11HeadGuard
    else:
        base, guard = HttpToolsProtocol, _HttpToolsHeadGuard
    attrs = {
        "head_timeout_s": head_timeout_s,
        "max_head_bytes": max_head_bytes,
        "send_timeout_s": send_timeout_s,
        "max_connections": max_connections,
    }
    return type(f"Guarded{base.__name__}", (guard, base), attrs)


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` that apply the settings' connection limits.

    Example:
        >>> uvicorn.run(app, host="127.0.0.1", port=8000, **uvicorn_options(settings))
    """
    return {
        "http": guarded_protocol(
            settings.head_timeout_s,
            settings.max_head_bytes,
            settings.request_timeout_s,
            settings.max_connections,
        ),
        "h11_max_incomplete_event_size": settings.max_head_bytes,  # h11's own cap (a 400 above it)
        "timeout_graceful_shutdown": int(settings.drain_timeout_s),
    }
