"""Image formats the server refuses before decoding: those Pillow decodes by running another program."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from .conftest import FakeModel

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\n"


@pytest.mark.parametrize("route", ["/v1/embeddings/images", "/v1/classify", "/v1/search"])
def test_eps_uploads_never_reach_ghostscript(
    make_client: Any, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    decoded: list[bytes] = []
    real = fake_model.preprocess
    monkeypatch.setattr(fake_model, "preprocess", lambda data: decoded.append(data) or real(data))
    c = make_client()
    data = {"labels": "cat, dog"} if route == "/v1/classify" else {}
    r = c.post(route, files=[("files", ("doc.eps", EPS, "application/postscript"))], data=data)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {
        "code": "invalid_image",
        "message": "doc.eps: EPS images are not accepted (Pillow renders them with Ghostscript)",
    }
    r = c.post("/v1/embeddings/images", json={"images": [base64.b64encode(EPS).decode()]})
    assert r.status_code == 400 and "EPS images are not accepted" in r.text
    # Was: the bytes went on to the decoder, which runs Ghostscript on them where it is installed.
    assert decoded == []
