"""The 503 to a request on a connection over `--max-connections` is counted as the connection layer's
refusal (`clipengine_http_rejected_total{reason="too_many_connections"}`), not as a request to the
route "unmatched"."""

from __future__ import annotations

import re
import socket
import time

import pytest

from .conftest import FakeModel
from .test_slow_clients import (
    _connect,
    _metrics,
    _read_until_closed,
    _rejections,
    _server,
    _status_and_error,
    _texts_request,
    parser,  # noqa: F401  (the fixture: both of uvicorn's HTTP stacks)
)

CAP = 3


def _requests_counted(metrics: str) -> dict[tuple[str, str, str], float]:
    """clipengine_http_requests_total by (method, route, status)."""
    found = re.findall(
        r'^clipengine_http_requests_total\{method="(\w+)",route="([^"]*)",status="(\d+)"\} (\S+)$',
        metrics,
        re.M,
    )
    return {(method, route, status): float(n) for method, route, status, n in found}


def _wait_for_connections(server: object, count: int) -> None:
    state = server.server.server_state  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while len(state.connections) != count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(state.connections) == count, len(state.connections)


@pytest.mark.integration
@pytest.mark.usefixtures("parser")
def test_the_over_cap_503_is_counted_as_a_connection_refusal(fake_model: FakeModel) -> None:
    for server in _server(fake_model, max_connections=CAP, head_timeout_s=5):
        held: list[socket.socket] = [_connect(server) for _ in range(CAP)]
        try:
            _wait_for_connections(server, CAP)
            for request in (
                _texts_request(b'{"texts": ["hi"]}'),
                b"GET /v1/info HTTP/1.1\r\nHost: t\r\n\r\n",
            ):
                with _connect(server) as sock:
                    sock.sendall(request)
                    status, error = _status_and_error(_read_until_closed(sock, timeout=5))
                assert status == 503 and isinstance(error, dict) and error["code"] == "too_many_connections"
            with _connect(server) as sock:  # liveness over the cap: served, and counted as a request
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                assert _read_until_closed(sock, timeout=5).startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in held:
                sock.close()
        _wait_for_connections(server, 0)

        assert _rejections(server)["too_many_connections"] == 2  # was 0: only idle ones were counted
        counted = _requests_counted(_metrics(server))
        # Was: ("POST", "unmatched", "503") and ("GET", "unmatched", "503"), 1 each.
        assert not [key for key in counted if key[2] == "503"], counted
        assert counted[("GET", "/healthz", "200")] == 1
