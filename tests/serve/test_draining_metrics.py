"""The 503 `shutting_down` to an API request while the server drains is counted as a refusal before
routing (`clipengine_http_rejected_total{reason="shutting_down"}`), as the over-cap 503 is, not as a
request to the route "unmatched"."""

from __future__ import annotations

import asyncio
import re

import httpx

from clipengine.serve import ServeSettings, create_app

from .conftest import FakeModel


def _requests_with_status(metrics: str, status: str) -> list[str]:
    return re.findall(rf'^clipengine_http_requests_total\{{[^}}]*status="{status}"\}} \S+$', metrics, re.M)


def test_the_draining_503_is_counted_as_a_refusal_not_an_unmatched_request(fake_model: FakeModel) -> None:
    app = create_app(fake_model, None, ServeSettings(max_wait_ms=1))
    state = app.state.clipengine

    async def main() -> str:
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            await lifespan.__aexit__(None, None, None)  # nothing in flight: draining at once
            assert state.tracker.draining
            for request in (
                client.post("/v1/embeddings/texts", json={"texts": ["late"]}),
                client.get("/v1/info"),
            ):
                refused = await request
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert (await client.get("/healthz")).status_code == 200  # not an API route: served
            return (await client.get("/metrics")).text

    metrics = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert 'clipengine_http_rejected_total{reason="shutting_down"} 2\n' in metrics  # was absent
    assert _requests_with_status(metrics, "503") == []  # was route "unmatched", 1 each for POST and GET
    assert 'clipengine_http_requests_total{method="GET",route="/healthz",status="200"} 1\n' in metrics
