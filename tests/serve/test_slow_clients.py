"""Slow and hostile clients against a real uvicorn: stalled heads, oversized heads, trickled bodies."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from clipengine.serve import ServeSettings, create_app
from clipengine.serve.metrics import CONNECTION_REJECTIONS
from clipengine.serve.protocol import uvicorn_options

from .conftest import FakeModel, ThreadedServer

pytestmark = pytest.mark.integration

HEAD_TIMEOUT = 0.5  # short, so each test takes about a second


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both of uvicorn's HTTP/1.1 stacks: httptools (the `serve` extra) and h11 (plain uvicorn)."""
    if request.param == "h11":  # as if httptools were not installed: uvicorn falls back to h11
        monkeypatch.setitem(sys.modules, "uvicorn.protocols.http.httptools_impl", None)  # type: ignore[arg-type]
    else:
        pytest.importorskip("httptools")
    stack = {"h11": "GuardedH11Protocol", "httptools": "GuardedHttpToolsProtocol"}[request.param]
    assert uvicorn_options(ServeSettings())["http"].__name__ == stack
    return str(request.param)


def _server(fake_model: FakeModel, **settings: Any) -> Iterator[ThreadedServer]:
    config = ServeSettings(**{"max_wait_ms": 1, "head_timeout_s": HEAD_TIMEOUT, **settings})
    server = ThreadedServer(create_app(fake_model, None, config), **uvicorn_options(config))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(fake_model: FakeModel, parser: str) -> Iterator[ThreadedServer]:
    yield from _server(fake_model)


def _connect(server: ThreadedServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {timeout} s; got {data[:200]!r}")
    return data


def _status_and_error(reply: bytes) -> tuple[int, dict[str, Any] | str]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)["error"]
    except ValueError:
        return status, body.decode()


def _texts_request(body: bytes, length: int | None = None) -> bytes:
    return (
        b"POST /v1/embeddings/texts HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length)
    ) + body


def _metrics(server: ThreadedServer) -> str:
    """GET /metrics over a socket."""
    with _connect(server) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        reply = _read_until_closed(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], reply
    return body.decode()


def _rejections(server: ThreadedServer) -> dict[str, float]:
    """clipengine_http_rejected_total by reason, scraped from GET /metrics."""
    found = re.findall(r'^clipengine_http_rejected_total\{reason="(\w+)"\} (\S+)$', _metrics(server), re.M)
    return {reason: float(value) for reason, value in found}


def _only(reason: str, count: float) -> dict[str, float]:
    """The rejections expected when `count` of one reason happened and nothing else."""
    return {**dict.fromkeys(CONNECTION_REJECTIONS, 0.0), reason: count}


def _good_request(server: ThreadedServer) -> tuple[int, float]:
    started = time.monotonic()
    with _connect(server) as sock:
        sock.sendall(
            _texts_request(b'{"texts": ["hi"]}').replace(b"Host: t", b"Host: t\r\nConnection: close")
        )
        reply = _read_until_closed(sock)
    return int(reply.split(b" ", 2)[1]), time.monotonic() - started


@pytest.mark.usefixtures("parser")
def test_stalled_request_heads_get_408_and_are_closed_while_others_are_served(fake_model: FakeModel) -> None:
    for server in _server(fake_model, head_timeout_s=2):  # room for a loaded machine to answer first
        assert _rejections(server) == _only("head_timeout", 0)  # every reason shows from the start
        stalled = [_connect(server) for _ in range(50)]
        for sock in stalled:
            sock.sendall(b"POST /v1/embeddings/texts HTTP/1.1\r\nHost: t\r\nContent-Ty")
        status, elapsed = _good_request(server)
        assert status == 200 and elapsed < 2  # served at once, not after the stalled ones are gone
        for sock in stalled:  # was: every one held open for ever (a file descriptor each)
            with sock:
                reply = _read_until_closed(sock)
            status, error = _status_and_error(reply)
            assert status == 408 and isinstance(error, dict), reply
            assert error == {
                "code": "request_timeout",
                "message": "the request line and headers did not arrive within 2 s",
            }
        assert not server.server.server_state.connections
        assert _rejections(server) == _only("head_timeout", 50)  # was: not in /metrics at all


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server: ThreadedServer) -> None:
    started = time.monotonic()
    with _connect(server) as sock:
        assert _read_until_closed(sock) == b""
    assert HEAD_TIMEOUT * 0.8 < time.monotonic() - started < HEAD_TIMEOUT + 5
    assert _rejections(server) == _only("no_request", 1)


def test_a_request_the_parser_refuses_is_counted(server: ThreadedServer) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
        reply = _read_until_closed(sock)
    assert _status_and_error(reply) == (400, "Invalid HTTP request received."), reply
    assert _rejections(server) == _only("invalid_request", 1)


@pytest.mark.usefixtures("parser")
def test_a_malformed_head_with_more_bytes_behind_it_is_not_counted_as_too_large(
    fake_model: FakeModel,
) -> None:
    for server in _server(fake_model, max_head_bytes=4096):
        with _connect(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n" + b"x" * 8192)
            reply = _read_until_closed(sock)
        assert _status_and_error(reply) == (400, "Invalid HTTP request received."), reply
        assert _rejections(server) == _only("invalid_request", 1)


def _trickle_until_closed(sock: socket.socket, byte: bytes) -> tuple[float | None, bytes]:
    """Send `byte` every 50 ms until the server closes; (seconds it took or None after 10 s, what came)."""
    started, got = time.monotonic(), b""
    sock.settimeout(0.05)
    while time.monotonic() - started < 10:
        try:
            sock.sendall(byte)
            chunk = sock.recv(65536)
        except TimeoutError:
            continue  # still open
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started, got
        if not chunk:
            return time.monotonic() - started, got
        got += chunk
    return None, got


def test_blank_lines_after_a_keep_alive_answer_do_not_hold_the_connection(server: ThreadedServer) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert b"200 OK" in sock.recv(65536)
        # httptools: each byte stopped uvicorn's keep-alive timer and nothing restarted it, so a
        # blank line every few seconds held the connection for ever (h11 answers a 400 to it).
        ended, _ = _trickle_until_closed(sock, b"\r\n")
    assert ended is not None and ended < HEAD_TIMEOUT + 3


def test_the_rest_of_a_body_answered_early_is_cut_off_without_a_second_answer(server: ThreadedServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_texts_request(b"", length=30 * 1024 * 1024))
        assert b" 413 " in sock.recv(65536).split(b"\r\n")[0]  # from Content-Length, before the body
        # Was: each byte of the unread body stopped the keep-alive timer: held for as long as it came.
        ended, got = _trickle_until_closed(sock, b"x")
    assert ended is not None and ended < HEAD_TIMEOUT + 3 and got == b""


def test_a_request_head_over_the_size_limit_is_refused(fake_model: FakeModel, parser: str) -> None:
    for server in _server(fake_model, max_head_bytes=4096):
        with _connect(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 3000 + b"\r\n\r\n")
            assert b"200 OK" in sock.recv(65536)  # under the limit: served
        with _connect(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: ")
            try:
                for _ in range(64):  # 1 MiB of one header; was read into memory whole (httptools)
                    sock.sendall(b"a" * 16384)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused part-way, as it should be
            reply = _read_until_closed(sock)
        status, error = _status_and_error(reply)
        if parser == "httptools":
            assert (status, error) == (
                431,
                {"code": "headers_too_large", "message": "request line and headers exceed 4096 bytes"},
            )
        else:  # h11's own cap, which uvicorn answers with its plain 400
            assert status == 400, reply
        assert _rejections(server) == _only("head_too_large", 1)  # h11's 400 too: not invalid_request


@pytest.mark.usefixtures("parser")
def test_a_body_trickled_below_the_minimum_rate_gets_408(fake_model: FakeModel) -> None:
    for server in _server(fake_model, request_timeout_s=0.5, min_upload_rate=100):
        started = time.monotonic()
        with _connect(server) as sock:
            sock.sendall(_texts_request(b'{"texts": [', length=1000))
            sock.settimeout(0.001)
            reply = b""
            while time.monotonic() - started < 10 and not reply:
                sock.sendall(b" ")  # 20 bytes/s: never idle for 0.5 s, so the idle check never fired
                time.sleep(0.05)
                try:
                    reply = sock.recv(65536)
                except TimeoutError:
                    pass
        status, error = _status_and_error(reply)
        assert status == 408 and isinstance(error, dict), reply
        assert error["code"] == "request_timeout" and "under the minimum of 100 bytes/s" in error["message"]
        assert time.monotonic() - started < 3  # 0.5 s + 0.1 s for each 10 bytes received (~0.8 s)


@pytest.mark.usefixtures("parser")
def test_a_slow_body_above_the_minimum_rate_is_served(fake_model: FakeModel) -> None:
    for server in _server(fake_model, request_timeout_s=1, min_upload_rate=100):
        body = b'{"texts": ["slow"]' + b" " * 600 + b"}"
        started = time.monotonic()
        with _connect(server) as sock:
            sock.sendall(_texts_request(b"", length=len(body)))
            for i in range(0, len(body), 40):  # 400 bytes/s for 1.6 s: longer than request_timeout_s
                sock.sendall(body[i : i + 40])
                time.sleep(0.1)
            reply = sock.recv(65536)
        assert time.monotonic() - started > 1
        assert b" 200 OK" in reply.split(b"\r\n")[0], reply


class _WideModel(FakeModel):
    """1024-d text embeddings: an answer for 256 texts is about 2 MB of JSON, enough to fill the buffers."""

    embed_dim = 1024

    def encode_texts(self, texts: Any) -> np.ndarray:
        return np.full((len(texts), self.embed_dim), 1 / 32, dtype=np.float32)


@pytest.mark.usefixtures("parser")
def test_a_client_that_stops_reading_its_answers_is_cut_off() -> None:
    for server in _server(_WideModel(), request_timeout_s=0.5):
        body = json.dumps({"texts": [f"text {i}" for i in range(256)]}).encode()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(_texts_request(body) * 5)  # pipelined, and never read
            state, started = server.server.server_state, time.monotonic()
            # The server sees the connection only after a moment: waiting for it to go first was
            # over at once, and the socket closed before the server ever blocked on it.
            while not state.tasks and time.monotonic() - started < 10:
                time.sleep(0.01)
            assert state.tasks, "the server never started answering"
            while (state.connections or state.tasks) and time.monotonic() - started < 10:
                time.sleep(0.05)
            # Was: the answer waited for the client to read for ever, holding the connection, the
            # request (in flight in /metrics) and a graceful shutdown for its whole drain timeout.
            assert not state.connections and not state.tasks
        assert server.server.config.app.state.clipengine.tracker.in_flight == 0
        assert _rejections(server) == _only("send_timeout", 1)


@pytest.mark.usefixtures("parser")
def test_a_client_that_hangs_up_on_pipelined_requests_ends_the_one_running(fake_model: FakeModel) -> None:
    for server in _server(fake_model, request_timeout_s=20):
        gate = fake_model.gate = threading.Event()
        fake_model.entered.clear()
        try:
            with _connect(server) as sock:
                sock.sendall(_texts_request(b'{"texts": ["first"]}') + _texts_request(b'{"texts": ["second"]}'))
                assert fake_model.entered.wait(timeout=10)  # the first is in the backend, the second queued
            tracker = server.server.config.app.state.clipengine.tracker
            deadline = time.monotonic() + 5
            while tracker.in_flight and time.monotonic() < deadline:
                time.sleep(0.02)
            # Was (httptools): uvicorn told only the queued second request that the client had gone;
            # the first went on in flight, for nobody, until the backend returned.
            assert tracker.in_flight == 0
            assert 'route="/v1/embeddings/texts",status="499"} 1' in _metrics(server)
        finally:
            gate.set()
