"""Every route, limit and bad input of the HTTP API, through the ASGI test client (fake model)."""

from __future__ import annotations

import base64
import struct
import threading
import zlib
from typing import Any

import numpy as np
import pytest

from .conftest import FakeIndex, FakeModel, png_bytes


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries almost no pixel data (a decompression bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _files(*blobs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"f{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _error(response: Any, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


# ---- happy paths ---------------------------------------------------------------------------------
def test_health_ready_info_page_and_openapi(make_client: Any) -> None:
    c = make_client()
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").json()["status"] == "ready"
    info = c.get("/v1/info").json()
    assert info["model"] == "fake-clip" and info["embed_dim"] == 16 and info["index"]["size"] == 7
    page = c.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="static/app.js"' in page.text and "http" not in page.text.replace("http-equiv", "")  # no CDN
    for asset in ("/static/app.js", "/static/style.css"):
        assert c.get(asset).status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    for route in ("/v1/embeddings/images", "/v1/embeddings/texts", "/v1/classify", "/v1/search", "/healthz"):
        assert route in paths
    assert "multipart/form-data" in paths["/v1/classify"]["post"]["requestBody"]["content"]


def test_embed_images_multipart_and_base64_agree_with_the_model(
    make_client: Any, fake_model: FakeModel
) -> None:
    c = make_client()
    blobs = [png_bytes(1), png_bytes(2)]
    multipart = c.post("/v1/embeddings/images", files=_files(*blobs)).json()
    as_json = c.post("/v1/embeddings/images", json={"images": [_b64(b) for b in blobs]}).json()
    data_url = c.post(
        "/v1/embeddings/images", json={"images": ["data:image/png;base64," + _b64(blobs[0])]}
    ).json()
    expected = fake_model.encode_images(np.stack([fake_model.preprocess(b) for b in blobs]))
    assert multipart["dim"] == 16 and [d["name"] for d in multipart["data"]] == ["f0.png", "f1.png"]
    got = np.array([d["embedding"] for d in multipart["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    assert [d["embedding"] for d in as_json["data"]] == [d["embedding"] for d in multipart["data"]]
    assert data_url["data"][0]["embedding"] == multipart["data"][0]["embedding"]


def test_embed_texts_returns_one_row_per_text(make_client: Any, fake_model: FakeModel) -> None:
    c = make_client()
    body = c.post("/v1/embeddings/texts", json={"texts": ["a dog", "a cat", ""]}).json()
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, fake_model.encode_texts(["a dog", "a cat", ""]))
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["elapsed_ms"] >= 0


def test_classify_sorts_labels_by_probability_per_image(make_client: Any, fake_model: FakeModel) -> None:
    c = make_client()
    labels = ["a dog", "a cat", "a diagram"]
    r = c.post("/v1/classify", files=_files(png_bytes(1), png_bytes(2)), data={"labels": ", ".join(labels)})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2
    for i, res in enumerate(results):
        probs = [x["probability"] for x in res["labels"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)
        assert sorted(x["label"] for x in res["labels"]) == sorted(labels)
        img = fake_model.encode_images(fake_model.preprocess(png_bytes(i + 1))[None])
        logits = 100.0 * img @ fake_model.encode_texts(labels).T
        assert res["labels"][0]["label"] == labels[int(np.argmax(logits))]


def test_classify_json_with_templates_averages_prompts(make_client: Any, fake_model: FakeModel) -> None:
    c = make_client()
    templates = ["a photo of {}.", "a drawing of {}."]
    body = {"images": [_b64(png_bytes(3))], "labels": ["x", "y"], "templates": templates}
    res = c.post("/v1/classify", json=body).json()["results"][0]["labels"]
    img = fake_model.encode_images(fake_model.preprocess(png_bytes(3))[None])[0]
    weights = []
    for label in ("x", "y"):
        w = fake_model.encode_texts([t.replace("{}", label) for t in templates]).mean(axis=0)
        weights.append(w / np.linalg.norm(w))
    logits = 100.0 * np.stack(weights) @ img
    p = np.exp(logits - logits.max())
    p /= p.sum()
    got = {x["label"]: x["probability"] for x in res}
    assert got["x"] == pytest.approx(float(p[0]), abs=1e-5) and got["y"] == pytest.approx(
        float(p[1]), abs=1e-5
    )


def test_classify_reuses_cached_label_embeddings(make_client: Any, fake_model: FakeModel) -> None:
    c = make_client()
    for _ in range(3):
        assert c.post("/v1/classify", files=_files(png_bytes(1)), data={"labels": "a,b"}).status_code == 200
    assert sum(fake_model.text_batches[1:]) == 2  # after warm-up, "a" and "b" were encoded once


def test_search_by_text_and_by_image_returns_thumbnails(make_client: Any, fake_index: FakeIndex) -> None:
    c = make_client()
    body = c.post("/v1/search", json={"text": "noise", "k": 3}).json()
    assert body["k"] == 3 and len(body["results"]) == 3
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    for hit in body["results"]:
        assert hit["thumbnail_url"] == f"/v1/thumbnails/{hit['id']}"
        thumb = c.get(hit["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert thumb.content[:2] == b"\xff\xd8"
    # An indexed image finds itself first, by JSON and by multipart.
    query = (fake_index.image_roots[0] / "sub" / "deep.png").read_bytes()
    top = c.post("/v1/search", json={"image": _b64(query), "k": 1}).json()["results"][0]
    assert top["id"] == "sub/deep.png" and top["score"] == pytest.approx(1.0, abs=1e-5)
    top = c.post("/v1/search", files=_files(query), data={"k": "2"}).json()["results"][0]
    assert top["id"] == "sub/deep.png"
    assert c.get("/v1/thumbnails/sub/deep.png").status_code == 200
    for bad in ({"json": {"text": "", "k": 1}}, {"data": {"text": "  "}}):
        r = c.post("/v1/search", **bad)
        assert r.status_code == 422 and r.json()["error"]["message"] == "text: the query is empty", r.text


def test_metrics_count_requests_by_route_and_status(make_client: Any) -> None:
    c = make_client()
    c.post("/v1/embeddings/texts", json={"texts": ["x"]})
    c.post("/v1/embeddings/texts", json={"texts": 5})
    c.get("/no/such/route")
    r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'clipengine_http_requests_total{method="POST",route="/v1/embeddings/texts",status="200"} 1' in text
    assert 'clipengine_http_requests_total{method="POST",route="/v1/embeddings/texts",status="422"} 1' in text
    assert 'route="unmatched",status="404"' in text and "/no/such/route" not in text
    assert 'clipengine_batch_size_count{queue="text"}' in text
    assert 'clipengine_queue_depth{queue="image"} 0' in text


# ---- bad inputs: never a 500 ----------------------------------------------------------------------
BAD_IMAGE_UPLOADS = [
    ("garbage", b"this is not an image at all", 400, "invalid_image"),
    ("empty", b"", 400, "invalid_image"),
    ("truncated", png_bytes(5)[:60], 400, "invalid_image"),
    ("bomb_header", _png_header(20000, 20000), 413, "image_too_large"),
    ("over_max_pixels", png_bytes(6, size=(300, 300)), 413, "image_too_large"),
]


@pytest.mark.parametrize(
    ("case", "blob", "status", "code"), BAD_IMAGE_UPLOADS, ids=[c[0] for c in BAD_IMAGE_UPLOADS]
)
@pytest.mark.parametrize("route", ["/v1/embeddings/images", "/v1/classify", "/v1/search"])
def test_bad_images_are_client_errors(
    make_client: Any, route: str, case: str, blob: bytes, status: int, code: str
) -> None:
    c = make_client(max_pixels=200 * 200)
    data = {"labels": "a,b"} if route == "/v1/classify" else None
    message = _error(c.post(route, files=_files(blob), data=data), status, code)
    assert "f0.png" in message  # the error names the bad upload
    assert " object at 0x" not in message  # and never leaks a Python object's repr
    if case == "empty":
        assert message.endswith("empty file (0 bytes)")  # as embed's failures.jsonl and predict say
    if case == "bomb_header":  # Pillow refused it first; the message still quotes this server's limit
        assert message.endswith("400000000 pixels exceeds the limit of 40000"), message
    base64_body = {"images": [_b64(blob)]} if route != "/v1/search" else {"image": _b64(blob)}
    if route == "/v1/classify":
        base64_body["labels"] = ["a", "b"]
    _error(c.post(route, json=base64_body), status, code)


BAD_JSON = [
    ("/v1/embeddings/texts", {"texts": "not a list"}, "invalid_request"),
    ("/v1/embeddings/texts", {"texts": [1, 2]}, "invalid_request"),
    ("/v1/embeddings/texts", {}, "invalid_request"),
    ("/v1/embeddings/texts", {"texts": []}, "invalid_request"),
    ("/v1/embeddings/texts", {"texts": ["a"], "typo": 1}, "invalid_request"),
    ("/v1/embeddings/texts", ["a"], "invalid_request"),
    ("/v1/embeddings/images", {"images": "abc"}, "invalid_request"),
    ("/v1/embeddings/images", {"images": []}, "invalid_request"),
    ("/v1/embeddings/images", {"images": ["%%%not-base64%%%"]}, "invalid_base64"),
    ("/v1/embeddings/images", {"pictures": ["aGk="]}, "invalid_request"),
    ("/v1/classify", {"images": [_b64(png_bytes(1))]}, "invalid_request"),
    ("/v1/classify", {"images": [_b64(png_bytes(1))], "labels": []}, "invalid_request"),
    ("/v1/classify", {"images": [_b64(png_bytes(1))], "labels": ["a", ""]}, "invalid_request"),
    ("/v1/classify", {"images": [_b64(png_bytes(1))], "labels": ["a", "a"]}, "invalid_request"),
    (
        "/v1/classify",
        {"images": [_b64(png_bytes(1))], "labels": ["a"], "templates": ["no slot"]},
        "invalid_request",
    ),
    ("/v1/classify", {"images": [_b64(png_bytes(1))], "labels": ["a"], "templates": []}, "invalid_request"),
    ("/v1/classify", {"images": [_b64(png_bytes(1))], "labels": "a,b"}, "invalid_request"),
    ("/v1/search", {"text": "x", "k": 0}, "invalid_request"),
    ("/v1/search", {"text": "x", "k": 101}, "invalid_request"),
    ("/v1/search", {"text": "x", "k": "many"}, "invalid_request"),
    ("/v1/search", {"text": "x", "k": 2.5}, "invalid_request"),
    ("/v1/search", {"text": "x", "k": "5"}, "invalid_request"),
    ("/v1/search", {"text": "x", "k": True}, "invalid_request"),
    ("/v1/search", {"text": "x", "k": None}, "invalid_request"),
    ("/v1/embeddings/texts", {"texts": None}, "invalid_request"),
    ("/v1/embeddings/texts", {"texts": [None]}, "invalid_request"),
    ("/v1/embeddings/texts", {"texts": [["nested"]]}, "invalid_request"),
    ("/v1/search", {"k": 3}, "invalid_request"),
    ("/v1/search", {"text": "x", "image": _b64(png_bytes(1))}, "invalid_request"),
    ("/v1/search", {"text": 7}, "invalid_request"),
    ("/v1/search", {"image": "???"}, "invalid_base64"),
]


@pytest.mark.parametrize(("route", "body", "code"), BAD_JSON)
def test_bad_fields_are_422_with_a_clear_message(make_client: Any, route: str, body: Any, code: str) -> None:
    message = _error(make_client().post(route, json=body), 422, code)
    assert message


def test_invalid_json_and_wrong_content_type(make_client: Any) -> None:
    c = make_client()
    headers = {"content-type": "application/json"}
    for route in ("/v1/embeddings/texts", "/v1/embeddings/images", "/v1/classify", "/v1/search"):
        _error(c.post(route, content=b"{not json", headers=headers), 422)
    for route in ("/v1/embeddings/images", "/v1/classify", "/v1/search"):
        _error(
            c.post(route, content=b"hello", headers={"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        )


def test_multipart_field_problems(make_client: Any) -> None:
    c = make_client()
    _error(c.post("/v1/classify", files=_files(png_bytes(1))), 422, "invalid_request")  # no labels
    _error(c.post("/v1/classify", data={"labels": "a"}, files=[("x", ("", b"", "text/plain"))]), 422)
    _error(c.post("/v1/classify", data={"labels": "a", "colour": "red"}, files=_files(png_bytes(1))), 422)
    _error(c.post("/v1/embeddings/images", data={"files": "not a file"}), 422, "invalid_request")
    _error(c.post("/v1/search", data={"text": "x", "k": "lots"}), 422, "invalid_request")
    _error(c.post("/v1/search", data={"k": "3"}), 422, "invalid_request")
    two = _files(png_bytes(1), png_bytes(2))
    _error(c.post("/v1/search", files=two), 422, "invalid_request")
    _error(c.post("/v1/search", data={"text": ["a", "b"]}), 422, "invalid_request")


def test_no_index_means_search_is_404(make_client: Any) -> None:
    c = make_client(index=None)
    _error(c.post("/v1/search", json={"text": "x"}), 404, "no_index")
    _error(c.get("/v1/thumbnails/img0.png"), 404, "not_found")
    assert c.get("/v1/info").json()["index"] is None


# ---- limits ------------------------------------------------------------------------------------
def test_text_limits(make_client: Any) -> None:
    c = make_client(max_texts=3, max_text_chars=10)
    _error(c.post("/v1/embeddings/texts", json={"texts": ["a"] * 4}), 422, "too_many_texts")
    assert "texts[1]" in _error(
        c.post("/v1/embeddings/texts", json={"texts": ["ok", "x" * 11]}), 422, "text_too_long"
    )
    _error(
        c.post("/v1/classify", files=_files(png_bytes(1)), data={"labels": "a,b,c,d"}), 422, "too_many_texts"
    )
    _error(c.post("/v1/search", json={"text": "y" * 11}), 422, "text_too_long")
    assert c.post("/v1/embeddings/texts", json={"texts": ["a", "b", "x" * 10]}).status_code == 200


def test_a_template_that_repeats_its_placeholder_cannot_multiply_a_label(
    make_client: Any, fake_model: FakeModel
) -> None:
    """Each '{}' takes the whole label: 500 of them in a 1000-character template made one label of
    1000 characters a prompt of 500,000 (about 95 s to tokenize, one per label and template, held in
    memory together: 256 labels x 32 templates is 4 GB), all within the limits on each field."""
    c = make_client()
    warm_up = list(fake_model.text_batches)
    label = "x" * 1000
    bomb = {"images": [_b64(png_bytes(1))], "labels": [label], "templates": ["{}" * 500]}
    r = c.post("/v1/classify", json=bomb)
    message = _error(r, 422, "text_too_long")
    assert message == (
        "templates[0] with labels[0]: the prompt is 500000 characters, at most 1000 allowed"
    ), message
    assert fake_model.text_batches == warm_up  # refused before any text was embedded
    ok = {"images": [_b64(png_bytes(1))], "labels": ["cat", "x" * 990], "templates": ["a {}", "{} or {}"]}
    message = _error(c.post("/v1/classify", json=ok), 422, "text_too_long")
    assert message.startswith("templates[1] with labels[1]: the prompt is 1984 characters"), message
    ok["labels"] = ["cat", "x" * 498]
    assert c.post("/v1/classify", json=ok).status_code == 200  # 1000 characters: within the limit


def test_too_many_images(make_client: Any) -> None:
    c = make_client(max_images=2)
    _error(
        c.post("/v1/embeddings/images", files=_files(*(png_bytes(i) for i in range(3)))),
        422,
        "too_many_images",
    )
    _error(c.post("/v1/embeddings/images", json={"images": [_b64(png_bytes(1))] * 3}), 422, "too_many_images")


def test_upload_limit_by_content_length_and_while_streaming(make_client: Any) -> None:
    c = make_client(max_upload_bytes=2000)
    big = png_bytes(9, size=(64, 64))
    assert len(big) > 2000
    _error(c.post("/v1/embeddings/images", files=_files(big)), 413, "payload_too_large")
    _error(c.post("/v1/embeddings/texts", json={"texts": ["z" * 3000]}), 413, "payload_too_large")

    def chunks() -> Any:  # no Content-Length: the limit must fire while the body streams in
        for _ in range(10):
            yield b"x" * 500

    headers = {"content-type": "application/json"}
    _error(c.post("/v1/embeddings/texts", content=chunks(), headers=headers), 413, "payload_too_large")
    _error(c.post("/v1/embeddings/images", content=chunks(), headers=headers), 413, "payload_too_large")
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'.encode()
    )

    def multipart_chunks() -> Any:
        yield head
        yield from chunks()
        yield f"\r\n--{boundary}--\r\n".encode()

    multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}
    _error(c.post("/v1/classify", content=multipart_chunks(), headers=multipart), 413, "payload_too_large")
    assert c.post("/v1/embeddings/images", files=_files(png_bytes(1, size=(8, 8)))).status_code == 200


def test_request_timeout_is_504(make_client: Any, fake_model: FakeModel) -> None:
    c = make_client(request_timeout_s=0.2)
    fake_model.gate = threading.Event()  # the backend hangs until released
    try:
        _error(c.post("/v1/embeddings/texts", json={"texts": ["slow"]}), 504, "timeout")
    finally:
        fake_model.gate.set()
    assert c.post("/v1/embeddings/texts", json={"texts": ["fast"]}).status_code == 200


def test_backend_failure_is_a_json_500_not_a_crash(make_client: Any, fake_model: FakeModel) -> None:
    c = make_client()
    fake_model.fail_on_text = "boom"
    _error(c.post("/v1/embeddings/texts", json={"texts": ["boom"]}), 500, "internal_error")
    assert c.post("/v1/embeddings/texts", json={"texts": ["fine"]}).status_code == 200


def test_arguments_the_model_refuses_are_a_422_not_a_500(
    make_client: Any, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipengine.errors import InputError

    def refuse(texts: Any) -> Any:
        raise InputError("texts[0]: expected a str, got NoneType")

    c = make_client()  # (its start-up warms the model up with a text)
    monkeypatch.setattr(fake_model, "encode_texts", refuse)
    message = _error(c.post("/v1/embeddings/texts", json={"texts": ["x"]}), 422, "invalid_input")
    assert "texts[0]" in message


# ---- API key -----------------------------------------------------------------------------------
def test_api_key_guards_everything_but_health_the_page_and_the_docs(make_client: Any) -> None:
    c = make_client(api_key="s3cret")
    for path in ("/healthz", "/readyz", "/", "/static/app.js", "/static/style.css", "/docs", "/openapi.json"):
        assert c.get(path).status_code == 200, path
    guarded = [
        ("get", "/v1/info"),
        ("get", "/metrics"),
        ("get", "/v1/thumbnails/img0.png"),
        ("post", "/v1/embeddings/texts"),
        ("post", "/v1/classify"),
        ("post", "/v1/search"),
        ("post", "/v1/embeddings/images"),
    ]
    for method, path in guarded:
        _error(getattr(c, method)(path), 401, "unauthorized")
        _error(getattr(c, method)(path, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        _error(getattr(c, method)(path, headers={"X-API-Key": "s3cret-not"}), 401, "unauthorized")
    body = {"texts": ["hi"]}
    assert (
        c.post("/v1/embeddings/texts", json=body, headers={"Authorization": "Bearer s3cret"}).status_code
        == 200
    )
    assert c.post("/v1/embeddings/texts", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert c.get("/v1/thumbnails/img0.png", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert c.get("/v1/info", headers={"Authorization": "bearer s3cret"}).status_code == 200
    schema = c.get("/openapi.json", headers={"X-API-Key": "s3cret"}).json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert (
        schema["paths"]["/v1/search"]["post"]["security"]
        and "security" not in schema["paths"]["/healthz"]["get"]
    )


# ---- thumbnails ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/v1/thumbnails/nope.png",
        "/v1/thumbnails/..%2Fsecret.txt",
        "/v1/thumbnails/%2E%2E/secret.txt",
        "/v1/thumbnails/sub/%2E%2E/%2E%2E/secret.txt",
        "/v1/thumbnails/%2Fetc%2Fpasswd",
        "/v1/thumbnails//etc/passwd",
        "/v1/thumbnails/..%5Csecret.txt",
        "/v1/thumbnails/img0.png%00.txt",
        "/v1/thumbnails/sub",
    ],
)
def test_thumbnails_refuse_unknown_ids_and_path_traversal(make_client: Any, path: str) -> None:
    _error(make_client().get(path), 404, "not_found")


def test_unreadable_or_huge_index_files_are_404_not_500(make_client: Any, image_root: Any) -> None:
    c = make_client(max_pixels=20 * 20)  # index images are 24x24
    assert "exceeds" in _error(c.get("/v1/thumbnails/img0.png"), 404, "not_found")
    (image_root / "img1.png").write_bytes(b"corrupted after indexing")
    _error(make_client().get("/v1/thumbnails/img1.png"), 404, "not_found")


# ---- hostile requests ----------------------------------------------------------------------------
def _raw_json(c: Any, route: str, body: bytes, content_type: str = "application/json") -> Any:
    return c.post(route, content=body, headers={"content-type": content_type})


_IMG = b'"' + _b64(png_bytes(1)).encode() + b'"'


@pytest.mark.parametrize(
    ("route", "field", "code", "limit"),
    [
        ("/v1/embeddings/texts", "texts", "too_many_texts", 256),
        ("/v1/embeddings/images", "images", "too_many_images", 16),
        ("/v1/classify", "images", "too_many_images", 16),
        ("/v1/classify", "labels", "too_many_texts", 256),
        ("/v1/classify", "templates", "too_many_texts", 32),
    ],
)
def test_an_over_long_list_is_refused_before_its_items_are_validated(
    make_client: Any, route: str, field: str, code: str, limit: int
) -> None:
    # Was: pydantic checked every item first, one error each: 4 million numbers (16 MB) held the
    # event loop, every route and /healthz included, for 46 s before the 422.
    body: dict[str, Any] = {field: [0] * 100_000}
    if route == "/v1/classify":
        body = {"images": [_b64(png_bytes(1))], "labels": ["a"], **body}
    r = make_client().post(route, json=body)
    assert _error(r, 422, code) == f"{field}: 100000 items, at most {limit} allowed"


def test_unknown_json_fields_are_named_once_not_validated_one_by_one(make_client: Any) -> None:
    # Was: one "Extra inputs are not permitted" per key: 1.2 million keys held the event loop for 10 s.
    body = {"texts": ["a"], **{f"k{i}": 0 for i in range(100_000)}}
    message = _error(make_client().post("/v1/embeddings/texts", json=body), 422, "invalid_request")
    assert message == (
        "unknown field(s) ['k0', 'k1', 'k10', 'k100', 'k1000', ...] (100000 in all); expected ['texts']"
    )


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/embeddings/texts", b'{"texts": ["a", "\\ud800"]}'),
        ("/v1/search", b'{"text": "\\udc80"}'),
        ("/v1/classify", b'{"images": [' + _IMG + b'], "labels": ["\\ud800", "b"]}'),
        ("/v1/classify", b'{"images": [' + _IMG + b'], "labels": ["a"], "templates": ["\\udfff {}"]}'),
    ],
    ids=["texts", "search", "label", "template"],
)
def test_lone_surrogates_in_text_are_422_not_500(make_client: Any, route: str, body: bytes) -> None:
    # Valid JSON escapes, but not Unicode text: no UTF-8 encoding exists for the model or the answer.
    message = _error(_raw_json(make_client(), route, body), 422, "invalid_request")
    assert "unicode" in message.lower()


@pytest.mark.parametrize(
    "route", ["/v1/embeddings/texts", "/v1/embeddings/images", "/v1/classify", "/v1/search"]
)
def test_deeply_nested_or_undecodable_json_is_422_invalid_json(make_client: Any, route: str) -> None:
    c = make_client()
    _error(_raw_json(c, route, b"[" * 50_000 + b"]" * 50_000), 422, "invalid_json")  # RecursionError
    _error(_raw_json(c, route, b'{"texts": ["\xff\xfe"]}'), 422, "invalid_json")  # not UTF-8


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "", "multipart/form-data; boundary=x"]
)
def test_texts_with_a_non_json_content_type_is_415(make_client: Any, content_type: str) -> None:
    # curl -d '{"texts": [...]}' sends application/x-www-form-urlencoded: say so, not "not a dictionary".
    r = _raw_json(make_client(), "/v1/embeddings/texts", b'{"texts": ["a"]}', content_type)
    assert "application/json" in _error(r, 415, "unsupported_media_type")


def test_a_files_part_without_a_filename_is_named_as_such(make_client: Any) -> None:
    # curl -F 'files=<cat.jpg' sends the bytes as a text field: "unknown field 'files'" would mislead.
    c = make_client()
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="files"\r\n\r\n' + png_bytes(1) + b"\r\n--XyZ--\r\n"
    )
    headers = {"content-type": "multipart/form-data; boundary=XyZ"}
    for route in ("/v1/embeddings/images", "/v1/classify", "/v1/search"):
        message = _error(c.post(route, content=body, headers=headers), 422, "invalid_request")
        assert "files" in message and "file upload" in message and "unknown" not in message, message


def test_made_up_http_methods_do_not_grow_the_metrics(make_client: Any) -> None:
    c = make_client()
    for i in range(20):
        assert c.request(f"BREW{i}", "/v1/search").status_code == 405
        assert c.request(f"BREW{i}", "/no/such/route").status_code == 404
    text = c.get("/metrics").text
    assert "BREW" not in text
    assert 'clipengine_http_requests_total{method="other",route="unmatched",status="404"} 20' in text


# ---- HEAD ------------------------------------------------------------------------------------------
_GET_ROUTES = [
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/info",
    "/v1/thumbnails/img0.png",
    "/v1/thumbnails/sub/deep.png",
    "/favicon.ico",
    "/openapi.json",
    "/static/app.js",
]
# Differs between two requests by nature (the metrics page's length does too: it counts the GET before it).
_VOLATILE_HEADERS = {"date"}


@pytest.mark.parametrize("path", _GET_ROUTES)
def test_head_on_a_get_route_answers_like_get(make_client: Any, path: str) -> None:
    c = make_client()
    got = c.get(path)
    head = c.head(path)
    assert head.status_code == got.status_code and got.status_code in (200, 204), head.text
    volatile = _VOLATILE_HEADERS | ({"content-length"} if path == "/metrics" else set())
    same = {k: v for k, v in got.headers.items() if k not in volatile}
    assert {k: v for k, v in head.headers.items() if k not in volatile} == same


def test_head_keeps_the_api_key_check_and_stays_out_of_the_schema(make_client: Any) -> None:
    c = make_client(api_key="s3cret")
    assert c.head("/healthz").status_code == 200
    assert c.head("/v1/info").status_code == 401
    assert c.head("/v1/info", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert c.head("/v1/search", headers={"X-API-Key": "s3cret"}).status_code == 405  # POST-only
    assert c.head("/v1/thumbnails/nope.png", headers={"X-API-Key": "s3cret"}).status_code == 404
    paths = c.get("/openapi.json", headers={"X-API-Key": "s3cret"}).json()["paths"]
    assert set(paths["/healthz"]) == {"get"} and set(paths["/v1/thumbnails/{image_id}"]) == {"get"}
    text = c.get("/metrics", headers={"X-API-Key": "s3cret"}).text
    assert 'clipengine_http_requests_total{method="HEAD",route="/v1/info",status="200"} 1' in text


@pytest.mark.integration
def test_head_through_uvicorn_sends_no_body(fake_model: FakeModel, fake_index: FakeIndex) -> None:
    import http.client

    from clipengine.serve import ServeSettings, create_app

    from .conftest import ThreadedServer

    server = ThreadedServer(create_app(fake_model, fake_index, ServeSettings()))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for path in ("/healthz", "/v1/info", "/"):
            conn.request("HEAD", path)
            head = conn.getresponse()
            assert head.status == 200 and int(head.headers["content-length"]) > 0
            assert head.read() == b""
            # Same connection: a body sent after the HEAD headers would corrupt this response.
            conn.request("GET", path)
            got = conn.getresponse()
            body = got.read()
            assert got.status == 200 and len(body) == int(head.headers["content-length"])
    finally:
        conn.close()
        server.stop()


@pytest.mark.integration
def test_a_stalled_request_body_is_408_not_a_hang(fake_model: FakeModel, fake_index: FakeIndex) -> None:
    import socket

    from clipengine.serve import ServeSettings, create_app

    from .conftest import ThreadedServer

    server = ThreadedServer(create_app(fake_model, fake_index, ServeSettings(request_timeout_s=0.3)))
    head = b"POST /v1/embeddings/texts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(head + b'{"te')  # 4 of the 100 bytes promised, then nothing
            try:
                reply = conn.recv(4096)
            except TimeoutError:
                reply = b""  # was: no answer at all, the connection held open for as long as the client liked
    finally:
        server.stop()
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert b'"request_timeout"' in reply and b"no request body data for 0.3 s" in reply
