"""Multipart bodies cut off, empty, or without their boundary: a 400 that says so, never a 422 about a field."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from clipengine.serve import ServeSettings, create_app, uvicorn_options

from .conftest import FakeIndex, FakeModel, ThreadedServer, png_bytes
from .test_slow_clients import _rejections
from .test_slow_clients import parser as parser  # the fixture: both of uvicorn's HTTP stacks

BOUNDARY = "XyZ"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
ROUTES = ("/v1/embeddings/images", "/v1/classify", "/v1/search")


def _whole_body() -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
    return head.encode() + png_bytes(3) + f"\r\n--{BOUNDARY}--\r\n".encode()


WHOLE = _whole_body()
CUT_OFF = {
    "mid_file": WHOLE[: len(WHOLE) // 2],
    "before_closing_boundary": WHOLE[: -len(f"--{BOUNDARY}--\r\n")],
    "mid_part_headers": WHOLE[:40],
}


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("cut", sorted(CUT_OFF))
def test_a_cut_off_multipart_body_is_a_400_that_says_incomplete(
    make_client: Any, route: str, cut: str
) -> None:
    body = CUT_OFF[cut]
    r = make_client().post(route, content=body, headers={"content-type": MULTIPART})
    message = _error(r, 400, "invalid_multipart")
    assert "incomplete" in message and f"after {len(body)} bytes" in message, message


@pytest.mark.parametrize("route", ROUTES)
def test_an_empty_multipart_body_is_a_400(make_client: Any, route: str) -> None:
    r = make_client().post(route, content=b"", headers={"content-type": MULTIPART})
    assert "empty multipart body" in _error(r, 400, "invalid_multipart")


def test_a_content_length_over_the_body_sent_is_a_400_not_a_missing_field(make_client: Any) -> None:
    # The ASGI server hands the app what arrived and ends the body there: the parser must notice.
    body = CUT_OFF["mid_file"]
    headers = {"content-type": MULTIPART, "content-length": str(len(WHOLE))}
    r = make_client().post("/v1/embeddings/images", content=body, headers=headers)
    assert "incomplete" in _error(r, 400, "invalid_multipart")


@pytest.mark.parametrize("route", ROUTES)
def test_a_missing_boundary_parameter_is_a_400_naming_it(make_client: Any, route: str) -> None:
    r = make_client().post(route, content=WHOLE, headers={"content-type": "multipart/form-data"})
    message = _error(r, 400, "invalid_multipart")
    assert "no boundary parameter" in message and "Content-Type" in message, message


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=other", MULTIPART])
def test_a_body_not_delimited_by_the_boundary_is_a_400_naming_it(
    make_client: Any, route: str, content_type: str
) -> None:
    body = WHOLE if "other" in content_type else b"hello, not multipart"
    message = _error(
        make_client().post(route, content=body, headers={"content-type": content_type}),
        400,
        "invalid_multipart",
    )
    assert "malformed multipart body" in message and "boundary" in message, message


def test_whole_bodies_still_parse(make_client: Any) -> None:
    c = make_client()
    assert (
        c.post("/v1/embeddings/images", content=WHOLE, headers={"content-type": MULTIPART}).status_code == 200
    )
    # An empty FormData, as a browser sends it: only the closing boundary. Well-formed, so the
    # answer is about the missing image, not the multipart.
    empty_form = f"--{BOUNDARY}--\r\n".encode()
    r = c.post("/v1/embeddings/images", content=empty_form, headers={"content-type": MULTIPART})
    assert "no image given" in _error(r, 422, "invalid_request")
    # No CRLF after the closing boundary, and an epilogue after it: both allowed (RFC 2046).
    for ending in (b"", b"epilogue\r\n"):
        body = WHOLE.removesuffix(b"\r\n") + ending
        assert c.post("/v1/search", content=body, headers={"content-type": MULTIPART}).status_code == 200


# ---- over a real socket ------------------------------------------------------------------------------
@pytest.fixture
def server(fake_model: FakeModel, fake_index: FakeIndex) -> Any:
    settings = ServeSettings(request_timeout_s=5)
    srv = ThreadedServer(create_app(fake_model, fake_index, settings), **uvicorn_options(settings))
    yield srv
    srv.stop()


def _exchange(port: int, head: bytes, body: bytes, *, half_close: bool) -> tuple[bytes, float]:
    """Send a request (then shut our sending side if asked) -> (the reply, seconds it took).

    Half-closed: read until the server closes, which it must do at once after its answer. Else
    until the reply's JSON is complete (the connection stays open for keep-alive).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        started, reply = time.monotonic(), b""
        while data := sock.recv(65536):
            reply += data
            if not half_close and reply.endswith(b"}"):
                break
        return reply, time.monotonic() - started


def _head(length: int, extra: str = "") -> bytes:
    return (
        f"POST /v1/embeddings/images HTTP/1.1\r\nHost: test\r\nContent-Type: {MULTIPART}\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def test_a_cut_off_body_over_a_socket_is_a_400(server: Any) -> None:
    body = CUT_OFF["mid_file"]
    reply, seconds = _exchange(server.port, _head(len(body)), body, half_close=False)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"incomplete multipart body" in reply and seconds < 5


def test_a_chunked_body_ended_early_over_a_socket_is_a_400(server: Any) -> None:
    body = CUT_OFF["before_closing_boundary"]
    head = (
        f"POST /v1/search HTTP/1.1\r\nHost: test\r\nContent-Type: {MULTIPART}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    reply, seconds = _exchange(server.port, head, chunked, half_close=False)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"incomplete multipart body" in reply and seconds < 5


@pytest.mark.usefixtures("parser")
def test_a_client_that_half_closes_mid_body_is_told_the_body_is_incomplete(
    fake_model: FakeModel, fake_index: FakeIndex
) -> None:
    # uvicorn closed the connection without a word when the client shut its sending side.
    settings = ServeSettings(request_timeout_s=5)
    server = ThreadedServer(create_app(fake_model, fake_index, settings), **uvicorn_options(settings))
    try:
        reply, seconds = _exchange(server.port, _head(len(WHOLE)), CUT_OFF["mid_file"], half_close=True)
        assert reply.startswith(b"HTTP/1.1 400 ") and b'"incomplete_body"' in reply, reply[:300]
        assert seconds < 2, seconds  # at once, not after the body's idle timeout
        # A whole request, then a half-close: closed unanswered, as before. A closed socket reads
        # the same, and the work of a client that hung up is dropped at once (tests/serve/test_disconnects.py).
        reply, seconds = _exchange(server.port, _head(len(WHOLE)), WHOLE, half_close=True)
        assert b" 500 " not in reply and seconds < 2, (reply[:300], seconds)
        rejected = _rejections(server)
        assert rejected["incomplete_body"] == 1, rejected
    finally:
        server.stop()
