"""Graceful shutdown: stop taking work, finish what is in flight, then stop the batchers."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from clipengine.serve import ServeSettings, create_app

from .conftest import FakeIndex, FakeModel, ThreadedServer


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.005)


def test_lifespan_shutdown_drains_in_flight_requests(fake_model: FakeModel, fake_index: FakeIndex) -> None:
    app = create_app(fake_model, fake_index, ServeSettings(max_wait_ms=1))
    state = app.state.clipengine

    async def main() -> None:
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            fake_model.gate = threading.Event()
            fake_model.entered.clear()
            inflight = [
                asyncio.create_task(client.post("/v1/embeddings/texts", json={"texts": [f"t{i}"]}))
                for i in range(3)
            ]
            await _until(lambda: fake_model.entered.is_set() and state.tracker.in_flight == 3)
            shutdown = asyncio.create_task(lifespan.__aexit__(None, None, None))
            await _until(lambda: state.tracker.draining)
            # Draining: new API work is refused with 503 + Retry-After, readiness fails, health holds.
            refused = await client.post("/v1/embeddings/texts", json={"texts": ["late"]})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert refused.headers["retry-after"] == "1"
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/healthz")).status_code == 200
            assert not shutdown.done()  # still waiting for the three requests
            fake_model.gate.set()
            responses = await asyncio.gather(*inflight)
            await shutdown
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert not state.service.texts.running and not state.service.images.running

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def _wait_until_refusing(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
        time.sleep(0.02)
    raise AssertionError("server kept accepting connections after should_exit")


@pytest.mark.integration
def test_uvicorn_exit_finishes_the_request_in_flight(fake_model: FakeModel, fake_index: FakeIndex) -> None:
    server = ThreadedServer(create_app(fake_model, fake_index, ServeSettings(max_wait_ms=1)))
    base = server.url
    fake_model.gate = threading.Event()
    fake_model.entered.clear()
    result: dict[str, Any] = {}

    def slow_request() -> None:
        with httpx.Client(timeout=30) as client:
            result["response"] = client.post(f"{base}/v1/embeddings/texts", json={"texts": ["in flight"]})

    client_thread = threading.Thread(target=slow_request)
    client_thread.start()
    assert fake_model.entered.wait(timeout=30)
    server.server.should_exit = True  # what SIGTERM/SIGINT do
    _wait_until_refusing(server.port)  # shutdown has begun: no new connections...
    assert client_thread.is_alive()  # ...while the request is still held in the backend
    fake_model.gate.set()
    client_thread.join(timeout=30)
    server.thread.join(timeout=30)
    assert not server.thread.is_alive()
    assert result["response"].status_code == 200
    assert len(result["response"].json()["data"]) == 1
