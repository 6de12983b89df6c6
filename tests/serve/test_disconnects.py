"""Clients that hang up mid-request: counted as 499 (not 500), their queued work dropped at once."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest

from clipengine.serve import ServeSettings, create_app

from .conftest import FakeIndex, FakeModel

Receive = Callable[[], Awaitable[dict[str, Any]]]


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }


async def _call(app: Any, path: str, receive: Receive) -> list[dict[str, Any]]:
    """Run one request through the app's ASGI interface; returns the messages it sent."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_scope(path), receive, send)
    return sent


async def _until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.005)


def _requests(metrics: str, route: str, status: int) -> float:
    line = f'clipengine_http_requests_total{{method="POST",route="{route}",status="{status}"}} '
    return sum(float(row[len(line) :]) for row in metrics.splitlines() if row.startswith(line))


def test_a_hang_up_while_the_body_streams_in_is_a_499_not_a_logged_500(
    fake_model: FakeModel, fake_index: FakeIndex, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(fake_model, fake_index, ServeSettings())

    def part_then_hang_up(part: bytes) -> Receive:
        messages = iter([{"type": "http.request", "body": part, "more_body": True}])

        async def receive() -> dict[str, Any]:
            return next(messages, {"type": "http.disconnect"})

        return receive

    async def main() -> str:
        async with app.router.lifespan_context(app):
            for path, part in (("/v1/embeddings/texts", b'{"texts": ["a'), ("/v1/search", b'{"te')):
                sent = await _call(app, path, part_then_hang_up(part))
                assert sent and sent[0]["status"] == 499, sent
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return (await client.get("/metrics")).text

    with caplog.at_level(logging.INFO):
        metrics = asyncio.run(asyncio.wait_for(main(), timeout=30))
    # Was: 500 internal_error, with the ClientDisconnect traceback logged as an unexpected error.
    assert _requests(metrics, "/v1/embeddings/texts", 499) == 1
    assert _requests(metrics, "/v1/search", 499) == 1
    assert 'status="500"' not in metrics
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_client_that_hangs_up_leaves_the_queue_free_for_others(
    fake_model: FakeModel, fake_index: FakeIndex
) -> None:
    app = create_app(fake_model, fake_index, ServeSettings(max_batch=1, max_queue=4, max_wait_ms=0))
    texts = app.state.clipengine.service.texts
    hang_up = asyncio.Event()
    body = json.dumps({"texts": ["b1", "b2", "b3", "b4"]}).encode()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                fake_model.gate = threading.Event()  # the backend is busy with A until released
                fake_model.entered.clear()
                fake_model.text_batches.clear()  # the warm-up call
                try:
                    a = asyncio.create_task(client.post("/v1/embeddings/texts", json={"texts": ["a"]}))
                    await _until(fake_model.entered.is_set)
                    b = asyncio.create_task(_call(app, "/v1/embeddings/texts", receive))
                    await _until(lambda: texts.depth == 4)
                    full = await client.post("/v1/embeddings/texts", json={"texts": ["c"]})
                    assert full.status_code == 429  # B's four items fill the queue
                    hang_up.set()
                    sent = await asyncio.wait_for(b, 10)  # was: B waited for its rows after the hang-up
                    assert sent[0]["status"] == 499
                    # Was: B's cancelled items stayed queued until the backend got to them, still
                    # counted against max_queue (429 for live clients) and in the depth gauge.
                    assert texts.depth == 0
                    c = asyncio.create_task(client.post("/v1/embeddings/texts", json={"texts": ["c"]}))
                    await _until(lambda: texts.depth == 1)
                    fake_model.gate.set()
                    got_a, got_c = await asyncio.gather(a, c)
                    metrics = (await client.get("/metrics")).text
                finally:
                    fake_model.gate.set()  # a failed check must not leave shutdown waiting on A
        assert got_a.status_code == 200 and got_c.status_code == 200, got_c.text
        assert fake_model.text_batches == [1, 1]  # A, then C: B's four texts never ran
        want = fake_model.encode_texts(["a", "c"])
        assert np.allclose(got_a.json()["data"][0]["embedding"], want[0], atol=1e-6)
        assert np.allclose(got_c.json()["data"][0]["embedding"], want[1], atol=1e-6)
        assert _requests(metrics, "/v1/embeddings/texts", 499) == 1
        assert 'clipengine_queue_depth{queue="text"} 0' in metrics

    asyncio.run(asyncio.wait_for(main(), timeout=30))
