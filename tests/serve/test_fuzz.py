"""Fuzz the JSON routes: any JSON body (NaN, lone surrogates, odd types) gets 200 or a JSON 4xx, never 5xx."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import png_bytes

IMAGES = [base64.b64encode(b).decode() for b in (png_bytes(1), b"", b"not an image", png_bytes(2)[:40])]

# Text including lone surrogates (valid JSON escapes that are not Unicode) and control characters.
TEXT = st.text(st.characters(codec=None), max_size=12) | st.builds(
    str.__add__, st.text(max_size=6), st.sampled_from(["\ud800", "\udfff", "\ud83d"])
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    st.sampled_from(IMAGES),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)

FIELDS = {
    "/v1/embeddings/texts": ["texts"],
    "/v1/embeddings/images": ["images"],
    "/v1/classify": ["images", "labels", "templates", "top_k"],
    "/v1/search": ["text", "image", "k"],
}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, Any]:
    route = draw(st.sampled_from(sorted(FIELDS)))
    if draw(st.integers(0, 9)) == 0:  # now and then not an object at all
        return route, draw(JSON)
    # Mostly well-typed values (so the checks past validation run too), sometimes anything.
    texts = st.lists(TEXT, min_size=1, max_size=3)
    typed: dict[str, st.SearchStrategy[Any]] = {
        "texts": texts,
        "labels": texts,
        "templates": st.lists(TEXT.map(lambda t: t + "{}"), min_size=1, max_size=2),
        "images": st.lists(st.sampled_from(IMAGES), min_size=1, max_size=2),
        "text": TEXT,
        "image": st.sampled_from(IMAGES),
        "k": st.integers(-2, 120),
        "top_k": st.integers(-2, 5) | st.integers(min_value=-(10**30), max_value=10**30),
    }
    body: dict[str, Any] = {}
    for key in FIELDS[route]:
        roll = draw(st.integers(0, 9))
        if roll < 7:
            body[key] = draw(typed[key])
        elif roll < 9:
            body[key] = draw(JSON)
    if draw(st.integers(0, 9)) == 0:
        body[draw(TEXT)] = draw(JSON)
    return route, body


@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=bodies())
def test_any_json_body_is_answered_without_a_server_error(make_client: Any, case: tuple[str, Any]) -> None:
    route, body = case
    c = getattr(make_client, "fuzz_client", None) or make_client()
    make_client.fuzz_client = c  # one app for all examples; the fixture closes it at teardown
    raw = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
    r = c.post(route, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (route, raw[:300], r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"code", "message"} and error["message"], r.text
