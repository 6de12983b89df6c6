"""`--max-connections`: a connection over the cap is told 503 and closed; idle ones go within a second."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from clipengine.cli import serve_cmd
from clipengine.cli.app import app
from clipengine.serve import ServeSettings, create_app

from .conftest import FakeIndex, FakeModel
from .test_slow_clients import (
    HEAD_TIMEOUT,
    _connect,
    _good_request,
    _read_until_closed,
    _rejections,
    _server,
    _status_and_error,
    _texts_request,
    _trickle_until_closed,
    parser,  # noqa: F401  (the fixture: both of uvicorn's HTTP stacks)
)

CAP = 10


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.integration
@pytest.mark.usefixtures("parser")
def test_connections_over_the_cap_get_a_503_with_the_reason_and_idle_ones_are_closed(
    fake_model: FakeModel,
) -> None:
    for server in _server(fake_model, max_connections=CAP, head_timeout_s=5):
        idle = [_connect(server) for _ in range(2 * CAP)]
        try:
            _check_the_cap(server, idle)
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        assert _good_request(server)[0] == 200  # under the cap again
        # The idle ones closed over the cap, and the request answered 503 (test_over_cap_metrics.py).
        assert _rejections(server)["too_many_connections"] == CAP + 1


def _check_the_cap(server: Any, idle: list[socket.socket]) -> None:
    """Over the cap a client is told why at once; the idle connections over it close within a second."""
    time.sleep(0.2)  # all accepted
    started = time.monotonic()
    with _connect(server) as sock:  # a real client, over the cap
        sock.sendall(_texts_request(b'{"texts": ["hi"]}'))
        reply = _read_until_closed(sock, timeout=5)  # closed after the answer: its descriptor freed
    status, error = _status_and_error(reply)
    assert status == 503 and isinstance(error, dict), reply
    assert error["code"] == "too_many_connections" and f"limit of {CAP}" in error["message"], error
    assert b"\r\nretry-after: 1\r\n" in reply.lower() and time.monotonic() - started < 1

    # Was: each held for the whole head timeout (uvicorn's limit_concurrency too), a descriptor each.
    time.sleep(1.5)
    closed = [_closed_by_server(sock) for sock in idle]
    assert closed.count(True) == CAP, closed  # those over the cap; the first CAP wait for a request

    with _connect(server) as sock:  # liveness answers even over the cap
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 200 ")


@pytest.mark.integration
@pytest.mark.usefixtures("parser")
def test_a_head_sent_byte_by_byte_is_cut_off_at_the_head_timeout(fake_model: FakeModel) -> None:
    # Slowloris: a header byte every 50 ms, never ending. Each byte would restart a per-read timer;
    # the head's deadline runs from its first byte, so such connections cannot pile up.
    for server in _server(fake_model):
        with _connect(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            ended, got = _trickle_until_closed(sock, b"a")
        assert ended is not None and ended < HEAD_TIMEOUT + 3, ended
        assert got.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in got, got[:200]
        assert _rejections(server)["head_timeout"] == 1


def test_the_cap_comes_from_the_option_and_reaches_the_protocol(
    monkeypatch: pytest.MonkeyPatch, fake_model: FakeModel, fake_index: FakeIndex, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve_cmd, "_load_model", lambda *args: fake_model)
    monkeypatch.setattr(serve_cmd, "_load_index", lambda path: fake_index)
    monkeypatch.setattr(serve_cmd, "_run_server", lambda web_app, *args: seen.update(app=web_app))
    monkeypatch.setattr(serve_cmd, "_check_bindable", lambda host, port: None)
    monkeypatch.setattr(serve_cmd, "_fit_fd_limit", lambda n: seen.update(fit=n))
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--model", "m", "--max-connections", "7"])
    assert result.exit_code == 0, result.output
    assert seen["app"].state.clipengine.settings.max_connections == 7 and seen["fit"] == 7
    assert runner.invoke(app, ["serve", "--model", "m"]).exit_code == 0
    assert seen["app"].state.clipengine.settings.max_connections == 1000  # the documented default
    result = runner.invoke(app, ["serve", "--model", "m", "--max-connections", "0"])
    assert result.exit_code == 2 and "--max-connections" in result.output

    from clipengine.serve import uvicorn_options

    protocol = uvicorn_options(ServeSettings(max_connections=7))["http"]
    assert protocol.max_connections == 7  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="max_connections"):
        ServeSettings(max_connections=0)
    assert create_app(fake_model, None, ServeSettings(max_connections=1)) is not None


class _Limits:
    """resource.getrlimit / setrlimit over a pretend limit (the test process's own stays as it is)."""

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def get(self, which: int) -> tuple[int, int]:
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.soft = limits[0]


@pytest.mark.parametrize(
    ("soft", "hard", "refuse", "raised_to", "warns"),
    [
        (1024, 4096, False, 1100, False),  # the common soft limit: raised to fit the default cap
        (20000, 20000, False, 20000, False),  # room enough: left alone
        (1024, 1024, False, 1024, True),  # cannot go higher: say so, and what would fit
        (1024, 4096, True, 1024, True),  # the system refuses: say so
    ],
)
def test_the_descriptor_limit_is_raised_to_fit_the_cap_or_a_warning_says_why_not(
    monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, refuse: bool, raised_to: int, warns: bool
) -> None:
    resource = pytest.importorskip("resource")
    limits = _Limits(soft, hard, refuse)
    monkeypatch.setattr(resource, "getrlimit", limits.get)
    monkeypatch.setattr(resource, "setrlimit", limits.set)
    warning = serve_cmd._fit_fd_limit(1000)
    assert limits.soft == raised_to
    if warns:
        assert warning is not None and "ulimit -n" in warning and "--max-connections to 924" in warning, (
            warning
        )
    else:
        assert warning is None
