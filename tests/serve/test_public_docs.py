"""With an API key set, the OpenAPI schema and its docs pages are public like the web page (a browser
opening /docs cannot send the key: it was a 401), while every /v1 route and /metrics still need it."""

from __future__ import annotations

from typing import Any

import pytest

KEY = "s3cret"
DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


@pytest.mark.parametrize("path", DOCS)
def test_the_schema_and_docs_pages_need_no_key(make_client: Any, path: str) -> None:
    response = make_client(api_key=KEY).get(path)
    assert response.status_code == 200, response.text  # was 401 unauthorized


def test_the_docs_page_loads_a_schema_that_declares_the_key(make_client: Any) -> None:
    c = make_client(api_key=KEY)
    assert "/openapi.json" in c.get("/docs").text
    schema = c.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}  # Swagger's "Authorize"


def test_every_v1_route_and_metrics_still_need_the_key(make_client: Any) -> None:
    c = make_client(api_key=KEY)
    paths = c.get("/openapi.json").json()["paths"]
    operations = [
        (method, path.replace("{image_id}", "img0.png"))
        for path, methods in paths.items()
        if path.startswith("/v1/") or path == "/metrics"
        for method in methods
    ]
    assert len([op for op in operations if op[1].startswith("/v1/")]) >= 6, operations  # all found
    for method, path in operations:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            refused = c.request(method.upper(), path, headers=headers)
            assert refused.status_code == 401, (method, path, headers, refused.status_code)
            assert refused.json()["error"]["code"] == "unauthorized"
        # ...and the key opens it (whatever the route then says of the empty request: not a 401).
        assert c.request(method.upper(), path, headers={"X-API-Key": KEY}).status_code != 401, path
    assert paths["/v1/search"]["post"]["security"] and "security" not in paths["/healthz"]["get"]
