"""Images the server refuses before decoding: formats Pillow decodes by running another program, and
files built to take the decoder hours."""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import pytest
from PIL import Image

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


def _progressive_jpeg(extra_scans: int) -> bytes:
    """A progressive JPEG with `extra_scans` more scans that hold no data: 14 bytes each, yet the
    decoder makes a pass over every block for each one (the "scan bomb")."""
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(out, format="JPEG", progressive=True)
    data = out.getvalue()
    starts = [m.start() for m in re.finditer(b"\xff\xda", data)]
    header_len = int.from_bytes(data[starts[-1] + 2 : starts[-1] + 4], "big")
    empty_scan = data[starts[-1] : starts[-1] + 2 + header_len]  # its header without its data
    end = data.rfind(b"\xff\xd9")
    return data[:end] + empty_scan * extra_scans + data[end:]


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(
    make_client: Any, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was decoded: a 6000x6000 JPEG (under the pixel limit) with 10,000 empty scans is 350 KB and took
    # 60 s to decode; a 20 MB upload holds a million such scans, hours in a preprocess thread.
    decoded: list[bytes] = []
    real = fake_model.preprocess
    monkeypatch.setattr(fake_model, "preprocess", lambda data: decoded.append(data) or real(data))
    c = make_client()
    r = c.post("/v1/embeddings/images", files=[("files", ("bomb.jpg", _progressive_jpeg(600), "image/jpeg"))])
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {
        "code": "invalid_image",
        "message": "bomb.jpg: a JPEG of 610 scans, at most 500 accepted (each scan is a pass over "
        "every block: such files take minutes to decode)",
    }
    assert decoded == []
    ordinary = _progressive_jpeg(0)  # 10 scans, as encoders write them
    r = c.post("/v1/embeddings/images", files=[("files", ("ok.jpg", ordinary, "image/jpeg"))])
    assert r.status_code == 200, r.text
    assert decoded == [ordinary]
