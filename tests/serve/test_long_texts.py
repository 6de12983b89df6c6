"""Texts past the model's context length but within the character cap: served as CLIP truncates them."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from clipengine.serve import ServeSettings, create_app


def test_a_text_past_the_context_length_is_embedded_as_its_truncation(tiny_clip: Any) -> None:
    assert tiny_clip.context_length == 77
    long = "word " * 199  # 199 tokens + start and end: cut to start, 75 words, end
    assert len(long) < ServeSettings().max_text_chars
    with TestClient(create_app(tiny_clip, None, ServeSettings())) as client:
        r = client.post("/v1/embeddings/texts", json={"texts": [long, "a dog", "word " * 75]})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    np.testing.assert_allclose(got[0], got[2], atol=1e-6)
    np.testing.assert_allclose(got[1], tiny_clip.encode_texts(["a dog"])[0], atol=1e-5)
