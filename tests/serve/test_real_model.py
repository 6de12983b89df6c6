"""The service over the real stack: tiny CLIP through clipengine.api.ClipModel and a real Index."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipengine.errors import IndexMismatchError
from clipengine.serve import ServeSettings, create_app

from .conftest import png_bytes

BAD_DIR = Path(__file__).parents[1] / "data" / "bad"


def test_real_model_routes_match_the_library(tiny_clip: Any, tiny_index: Any, clip_png: Any) -> None:
    app = create_app(tiny_clip, tiny_index, ServeSettings(max_wait_ms=1))
    blob = clip_png.read_bytes()
    with TestClient(app) as client:
        r = client.post("/v1/embeddings/images", files=[("files", ("CLIP.png", blob, "image/png"))])
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(
            r.json()["data"][0]["embedding"], tiny_clip.encode_images(blob)[0], atol=1e-5
        )
        r = client.post("/v1/embeddings/texts", json={"texts": ["a diagram", "a dog"]})
        got = np.array([d["embedding"] for d in r.json()["data"]])
        np.testing.assert_allclose(got, tiny_clip.encode_texts(["a diagram", "a dog"]), atol=1e-5)
        labels = ["a diagram", "a dog", "a cat"]
        r = client.post(
            "/v1/classify",
            files=[("files", ("CLIP.png", blob, "image/png"))],
            data={"labels": ",".join(labels), "templates": "a photo of {}.\na drawing of {}."},
        )
        served = [(x["label"], x["probability"]) for x in r.json()["results"][0]["labels"]]
        library = tiny_clip.classify(blob, labels, templates=["a photo of {}.", "a drawing of {}."])[0]
        assert [lab for lab, _ in served] == [lab for lab, _ in library]
        np.testing.assert_allclose([p for _, p in served], [p for _, p in library], atol=1e-5)
        r = client.post("/v1/search", json={"text": "noise", "k": 3})
        hits = r.json()["results"]
        want = tiny_index.search_vectors(tiny_clip.encode_texts(["noise"]), 3)[0]
        assert [h["id"] for h in hits] == [i for i, _ in want]
        assert client.get(hits[0]["thumbnail_url"]).headers["content-type"] == "image/jpeg"


def test_real_model_concurrent_requests_match_single_requests(tiny_clip: Any, tiny_index: Any) -> None:
    app = create_app(tiny_clip, tiny_index, ServeSettings(max_batch=16, max_wait_ms=10))

    async def one(client: httpx.AsyncClient, i: int) -> np.ndarray:
        if i % 2:
            r = await client.post("/v1/embeddings/texts", json={"texts": [f"text number {i}"]})
        else:
            r = await client.post(
                "/v1/embeddings/images", files=[("files", (f"{i}.png", png_bytes(i), "image/png"))]
            )
        assert r.status_code == 200, r.text
        return np.array(r.json()["data"][0]["embedding"])

    async def main() -> tuple[list[np.ndarray], list[np.ndarray]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
                alone = [await one(client, i) for i in range(32)]
                together = await asyncio.gather(*(one(client, i) for i in range(32)))
        return alone, list(together)

    alone, together = asyncio.run(asyncio.wait_for(main(), timeout=120))
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=f"client {i}")  # batched vs single: fp tolerance


def test_index_from_another_model_is_refused(tiny_clip: Any, tiny_index: Any) -> None:
    tiny_index.model = "some-other-model"
    with pytest.raises(IndexMismatchError, match="some-other-model"):
        create_app(tiny_clip, tiny_index)


# What each awkward sample in tests/data/bad must get from the real decoder: 200 or a JSON 4xx, never a 500.
BAD_SAMPLES = {
    "animated.gif": 200,
    "bomb.png": 413,
    "bomb_warning_range.png": 413,
    "cmyk.jpg": 200,
    "corrupt_exif.jpg": 200,  # unreadable metadata never fails the pixels (Pillow warns; -W error here)
    "empty.jpg": 400,
    "exif_rotated.jpg": 200,
    "gray16.png": 200,
    "gray_alpha.png": 200,
    "palette_transparency.png": 200,
    "text.jpg": 400,
    "truncated.jpg": 400,
    "truncated.png": 400,
}


def test_every_bad_sample_is_served_or_refused_with_a_4xx(tiny_clip: Any, tiny_index: Any) -> None:
    assert sorted(BAD_SAMPLES) == sorted(p.name for p in BAD_DIR.iterdir() if p.suffix != ".py")
    app = create_app(tiny_clip, tiny_index, ServeSettings(max_wait_ms=1))
    with TestClient(app, raise_server_exceptions=False) as client:
        for name, status in BAD_SAMPLES.items():
            files = [("files", (name, (BAD_DIR / name).read_bytes(), "application/octet-stream"))]
            r = client.post("/v1/embeddings/images", files=files)
            assert r.status_code == status, (name, r.text)
            if status != 200:
                assert name in r.json()["error"]["message"], r.text
