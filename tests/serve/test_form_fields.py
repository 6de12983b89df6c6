"""Multipart text fields of classify and search: files where text belongs, and strict integer `k`."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import png_bytes


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
    return str(response.json()["error"]["message"])


@pytest.mark.parametrize(
    ("route", "field", "data"),
    [
        ("/v1/classify", "labels", {}),
        ("/v1/classify", "templates", {"labels": "cat, dog"}),
        ("/v1/search", "text", {}),
        ("/v1/search", "k", {"text": "a cat"}),
    ],
)
def test_a_file_part_under_a_text_field_is_named_as_such(
    make_client: Any, route: str, field: str, data: dict[str, str]
) -> None:
    c = make_client()
    files = [("files", ("q.png", png_bytes(1), "image/png")), (field, ("f.txt", b"cat, dog", "text/plain"))]
    if route == "/v1/search":
        files = files[1:]  # the file under the text field is the only upload
    # Was: the part was read as one more image: "labels: give at least one non-empty label", or for
    # search's `text` "f.txt: not a readable image" (400), and a `k` file became a second query.
    message = _error(c.post(route, files=files, data=data), 422, "invalid_request")
    assert message == f"{field}: expected a text field, got a file upload"


@pytest.mark.parametrize("k", ["1_0", "\u0665", "+\u0033\u0663", "5.0", "1e1", "", "0x5"])
def test_search_k_from_a_form_takes_ascii_digits_only(make_client: Any, k: str) -> None:
    c = make_client()
    # Was: int() took "1_0" as 10 and Arabic-Indic digits as 5.
    message = _error(c.post("/v1/search", data={"text": "a cat", "k": k}), 422, "invalid_request")
    assert message == f"k: {k!r} is not an integer"


def test_search_k_from_a_form_out_of_range_or_huge(make_client: Any) -> None:
    c = make_client()
    assert c.post("/v1/search", data={"text": "a cat", "k": " 3 "}).json()["k"] == 3
    _error(c.post("/v1/search", data={"text": "a cat", "k": "-1"}), 422, "invalid_request")
    # Was: the whole 5000-digit value echoed back (and past 4300 digits int() raised instead).
    message = _error(c.post("/v1/search", data={"text": "a cat", "k": "9" * 5000}), 422, "invalid_request")
    assert message == "k: '99999999999999999999...' is out of range"


def test_multipart_content_type_is_case_insensitive(make_client: Any) -> None:
    c = make_client()
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png_bytes(1)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"content-type": f"Multipart/Form-Data; boundary={boundary}"}
    # Was: 415 unsupported_media_type for a media type in other letter case.
    r = c.post("/v1/embeddings/images", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["name"] == "a.png"
