"""A body refused before it was read to its end (408 stalled or too slow, 413 too large) is answered
with `Connection: close` and the connection closed: it stayed open for the keep-alive timeout."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from .conftest import FakeModel, ThreadedServer, png_bytes
from .test_slow_clients import (
    _connect,
    _read_until_closed,
    _server,
    _status_and_error,
    _texts_request,
    parser,  # noqa: F401  (the fixture: both of uvicorn's HTTP stacks)
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("parser")]

LIMIT = 4096
# Well under uvicorn's keep-alive timeout (5 s), which closed these connections before.
CLOSED_WITHIN_S = 2.0


@pytest.fixture
def server(fake_model: FakeModel) -> Iterator[ThreadedServer]:
    # A head timeout longer than the test: only the answer may close the connection.
    yield from _server(
        fake_model, request_timeout_s=0.5, min_upload_rate=100, max_upload_bytes=LIMIT, head_timeout_s=30
    )


def _answer_then_closed(sock: socket.socket, sent_at: float) -> tuple[int, str, bytes]:
    """(status, error code, response head) of the one answer, failing if the server keeps the connection."""
    reply = _read_until_closed(sock, timeout=CLOSED_WITHIN_S + 3)  # 408s answer after 0.5 s or so
    assert time.monotonic() - sent_at < CLOSED_WITHIN_S + 1.5, "the connection stayed open after the answer"
    status, error = _status_and_error(reply)
    assert isinstance(error, dict), reply
    return status, error["code"], reply.partition(b"\r\n\r\n")[0].lower()


def test_a_stalled_body_gets_408_and_the_connection_closes(server: ThreadedServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_texts_request(b'{"texts": [', length=500))
        status, code, head = _answer_then_closed(sock, time.monotonic())
    assert (status, code) == (408, "request_timeout")
    assert b"\r\nconnection: close" in head, head


def test_a_body_trickled_too_slowly_gets_408_and_the_connection_closes(server: ThreadedServer) -> None:
    with _connect(server) as sock:
        sock.sendall(_texts_request(b'{"texts": [', length=2000))
        sock.settimeout(0.05)
        started, reply = time.monotonic(), b""
        while time.monotonic() - started < 10 and b"\r\n\r\n" not in reply:
            try:
                sock.sendall(b" ")  # 20 bytes/s, under the 100 bytes/s minimum
                reply += sock.recv(65536)
            except TimeoutError:
                continue
        answered = time.monotonic()
        head, _, _ = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"\r\nconnection: close" in head.lower(), reply
        # Stop sending: the server closes the connection (a FIN, read as b"") instead of waiting for more.
        sock.settimeout(CLOSED_WITHIN_S)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass  # the bytes sent after its close: as closed
        except TimeoutError:
            pytest.fail("the connection stayed open after the 408")
    assert time.monotonic() - answered < CLOSED_WITHIN_S + 0.5


def test_a_declared_body_over_the_limit_gets_413_and_the_connection_closes(server: ThreadedServer) -> None:
    with _connect(server) as sock:
        sent_at = time.monotonic()
        sock.sendall(_texts_request(b"", length=10 * LIMIT))
        status, code, head = _answer_then_closed(sock, sent_at)
    assert (status, code) == (413, "payload_too_large")
    assert b"\r\nconnection: close" in head, head


def _chunked(content_type: bytes, body: bytes) -> bytes:
    return (
        b"POST /v1/embeddings/images HTTP/1.1\r\nHost: t\r\nContent-Type: " + content_type + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body + b"\r\n"
    )


@pytest.mark.parametrize("kind", ["json", "multipart"])
def test_a_streamed_body_over_the_limit_gets_413_and_the_connection_closes(
    server: ThreadedServer, kind: str
) -> None:
    if kind == "json":
        request = _chunked(b"application/json", b'{"images": ["' + b"A" * 2 * LIMIT)
    else:
        part = png_bytes(1, size=(64, 64))
        assert len(part) > LIMIT
        request = _chunked(
            b"multipart/form-data; boundary=XyZ",
            b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + part,
        )
    with _connect(server) as sock:  # no last chunk: the body is not over when the limit is passed
        sent_at = time.monotonic()
        sock.sendall(request)
        status, code, head = _answer_then_closed(sock, sent_at)
    assert (status, code) == (413, "payload_too_large")
    assert b"\r\nconnection: close" in head, head


def test_an_answer_that_read_the_whole_body_keeps_the_connection(server: ThreadedServer) -> None:
    # Not every error closes: a 422 after the whole body stays a keep-alive connection.
    with _connect(server) as sock:
        sock.sendall(_texts_request(b'{"texts": 1}') * 2)
        sock.settimeout(5)
        replies = b""
        while replies.count(b"HTTP/1.1 422 ") < 2:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {replies!r}"
            replies += chunk
    assert b"connection: close" not in replies.lower()
