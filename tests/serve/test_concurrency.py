"""64 concurrent clients each get exactly their own answer, batches > 1 form, and nothing fails."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np

from clipengine.serve import ServeSettings, create_app

from .conftest import FakeIndex, FakeModel, png_bytes

N_CLIENTS = 64


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan started, behind an in-process ASGI client."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.005)


def _batches_over_one(metrics_text: str, queue: str) -> int:
    """Number of backend calls with more than one item, from the batch-size histogram."""
    count = re.search(rf'clipengine_batch_size_count{{queue="{queue}"}} (\d+)', metrics_text)
    le1 = re.search(rf'clipengine_batch_size_bucket{{queue="{queue}",le="1"}} (\d+)', metrics_text)
    assert count and le1, metrics_text
    return int(count.group(1)) - int(le1.group(1))


async def _one(client: httpx.AsyncClient, i: int) -> list[list[float]]:
    """Client i: even clients embed a distinct image, odd clients a distinct text."""
    if i % 2 == 0:
        files = [("files", (f"c{i}.png", png_bytes(1000 + i), "image/png"))]
        r = await client.post("/v1/embeddings/images", files=files)
    else:
        r = await client.post("/v1/embeddings/texts", json={"texts": [f"client {i} text", f"second {i}"]})
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


def test_64_concurrent_clients_get_their_own_answers(fake_model: FakeModel, fake_index: FakeIndex) -> None:
    app = create_app(fake_model, fake_index, ServeSettings(max_batch=16, max_wait_ms=20, max_queue=512))

    async def main() -> tuple[list[Any], list[Any], str]:
        async with running(app) as client:
            singles = [await _one(client, i) for i in range(N_CLIENTS)]  # one at a time: batches of 1
            # Hold the backend on the first call so the others pile up, then let everything through.
            fake_model.gate = threading.Event()
            fake_model.entered.clear()
            tasks = [asyncio.create_task(_one(client, i)) for i in range(N_CLIENTS)]
            await _until(fake_model.entered.is_set)
            state = app.state.clipengine
            await _until(lambda: state.service.texts.depth + state.service.images.depth >= N_CLIENTS // 2)
            fake_model.gate.set()
            together = await asyncio.gather(*tasks)
            metrics = (await client.get("/metrics")).text
        return singles, together, metrics

    singles, together, metrics = asyncio.run(asyncio.wait_for(main(), timeout=120))
    for i, (alone, crowded) in enumerate(zip(singles, together, strict=True)):
        np.testing.assert_array_equal(
            np.array(crowded), np.array(alone), err_msg=f"client {i} got another answer"
        )
    assert _batches_over_one(metrics, "text") > 0
    assert _batches_over_one(metrics, "image") > 0
    assert max(fake_model.text_batches) > 1 and max(fake_model.image_batches) > 1
    assert max(fake_model.text_batches + fake_model.image_batches) <= 16
    statuses = re.findall(
        r'clipengine_http_requests_total{method="POST",route="[^"]+",status="(\d+)"}', metrics
    )
    assert set(statuses) == {"200"}


def test_concurrent_classify_and_search_match_single_requests(
    fake_model: FakeModel, fake_index: FakeIndex
) -> None:
    app = create_app(fake_model, fake_index, ServeSettings(max_batch=8, max_wait_ms=10))

    async def classify(client: httpx.AsyncClient, i: int) -> Any:
        files = [("files", (f"q{i}.png", png_bytes(2000 + i), "image/png"))]
        r = await client.post("/v1/classify", files=files, data={"labels": f"red {i}, green, blue {i % 3}"})
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["labels"]

    async def search(client: httpx.AsyncClient, i: int) -> Any:
        r = await client.post("/v1/search", json={"text": f"query {i}", "k": 4})
        assert r.status_code == 200, r.text
        return r.json()["results"]

    async def main() -> None:
        async with running(app) as client:
            want_c = [await classify(client, i) for i in range(16)]
            want_s = [await search(client, i) for i in range(16)]
            got_c, got_s = await asyncio.gather(
                asyncio.gather(*(classify(client, i) for i in range(16))),
                asyncio.gather(*(search(client, i) for i in range(16))),
            )
        assert list(got_c) == want_c
        assert list(got_s) == want_s

    asyncio.run(asyncio.wait_for(main(), timeout=120))
