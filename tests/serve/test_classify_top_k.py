"""classify's optional `top_k` (JSON and multipart): only the list is cut, the probabilities stay the
softmax over every label; a bad value is a 422 that says why."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from .conftest import png_bytes

LABELS = ["a dog", "a cat", "a diagram", "a car", "a tree"]


def _files(*blobs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"f{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


def _json_body(**extra: Any) -> dict[str, Any]:
    return {"images": [base64.b64encode(png_bytes(1)).decode()], "labels": LABELS, **extra}


def _message(response: Any) -> str:
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request", response.text
    return str(response.json()["error"]["message"])


def _labels(response: Any) -> list[list[tuple[str, float]]]:
    assert response.status_code == 200, response.text
    return [[(x["label"], x["probability"]) for x in r["labels"]] for r in response.json()["results"]]


def test_top_k_keeps_the_first_k_of_the_full_ranking_in_json_and_multipart(make_client: Any) -> None:
    c = make_client()
    (full,) = _labels(c.post("/v1/classify", json=_json_body()))
    assert len(full) == len(LABELS) and sum(p for _, p in full) == pytest.approx(1.0)
    (top2,) = _labels(c.post("/v1/classify", json=_json_body(top_k=2)))
    # The same pairs, probabilities unchanged: the softmax over all five labels, not renormalised.
    assert top2 == full[:2] and sum(p for _, p in top2) < 1.0
    blobs = _files(png_bytes(1), png_bytes(2))
    form = {"labels": ",".join(LABELS), "top_k": " 3 "}
    multipart = _labels(c.post("/v1/classify", files=blobs, data=form))
    every = _labels(c.post("/v1/classify", files=blobs, data={"labels": ",".join(LABELS)}))
    assert [len(r) for r in multipart] == [3, 3] and multipart == [r[:3] for r in every]
    # A batch of two images encodes image 0 to within float rounding of a batch of one.
    assert [lab for lab, _ in multipart[0]] == [lab for lab, _ in full[:3]]
    assert [p for _, p in multipart[0]] == pytest.approx([p for _, p in full[:3]], rel=1e-6)


@pytest.mark.parametrize("top_k", [5, 6, 10**30])
def test_top_k_of_as_many_labels_or_more_returns_them_all(make_client: Any, top_k: int) -> None:
    c = make_client()
    full = _labels(c.post("/v1/classify", json=_json_body()))
    assert _labels(c.post("/v1/classify", json=_json_body(top_k=top_k))) == full
    if top_k < 10**18:
        form = {"labels": ",".join(LABELS), "top_k": str(top_k)}
        assert _labels(c.post("/v1/classify", files=_files(png_bytes(1)), data=form)) == full


@pytest.mark.parametrize("top_k", [0, -1, "3", 2.0, 2.5, True, None, [2]])
def test_a_bad_json_top_k_is_a_422_naming_it(make_client: Any, top_k: Any) -> None:
    c = make_client()
    if top_k is None:  # null is the default: every label
        assert len(_labels(c.post("/v1/classify", json=_json_body(top_k=None)))[0]) == len(LABELS)
        return
    message = _message(c.post("/v1/classify", json=_json_body(top_k=top_k)))
    assert message.startswith("top_k: ")
    if top_k in (0, -1) and not isinstance(top_k, bool):
        assert "greater than or equal to 1" in message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0", "top_k: 0 is not >= 1 (leave top_k out to get every label)"),
        ("-2", "top_k: -2 is not >= 1 (leave top_k out to get every label)"),
        ("two", "top_k: 'two' is not an integer"),
        ("2.5", "top_k: '2.5' is not an integer"),
        ("", "top_k: '' is not an integer"),
        ("9" * 30, "top_k: '99999999999999999999...' is out of range"),
    ],
)
def test_a_bad_form_top_k_is_a_422_with_its_reason(make_client: Any, value: str, reason: str) -> None:
    c = make_client()
    form = {"labels": ",".join(LABELS), "top_k": value}
    assert _message(c.post("/v1/classify", files=_files(png_bytes(1)), data=form)) == reason


def test_top_k_given_twice_or_as_a_file_is_refused(make_client: Any) -> None:
    c = make_client()
    twice = {"labels": "a, b", "top_k": ["1", "2"]}
    message = _message(c.post("/v1/classify", files=_files(png_bytes(1)), data=twice))
    assert message == "top_k: give it once, got 2 values"
    files = [*_files(png_bytes(1)), ("top_k", ("k.txt", b"2", "text/plain"))]
    message = _message(c.post("/v1/classify", files=files, data={"labels": "a, b"}))
    assert message == "top_k: expected a text field, got a file upload"


def test_the_openapi_schema_documents_top_k(make_client: Any) -> None:
    paths = make_client().get("/openapi.json").json()["paths"]
    content = paths["/v1/classify"]["post"]["requestBody"]["content"]
    as_json = content["application/json"]["schema"]["properties"]["top_k"]
    as_form = content["multipart/form-data"]["schema"]["properties"]["top_k"]
    assert {"type": "integer", "minimum": 1} in as_json["anyOf"]
    assert as_form["type"] == "integer" and as_form["minimum"] == 1
    for doc in (as_json, as_form):
        assert "softmax over all the labels" in doc["description"]


def test_the_web_page_sends_top_k_from_its_own_input(make_client: Any) -> None:
    # The page's behaviour runs in tests/serve/test_browser.py (headless Chromium); this checks the wiring.
    c = make_client()
    page, script = c.get("/").text, c.get("/static/app.js").text
    assert 'id="top-k" type="number" min="1"' in page
    assert 'form.append("top_k", topK)' in script and 'const field = $("top-k");' in script
