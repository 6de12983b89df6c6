"""`serve --root-path`: behind a proxy that strips its path (nginx `location /clip/ { proxy_pass
http://127.0.0.1:8000/; }`), /docs, the OpenAPI servers and thumbnail_url name the proxy's path."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send
from typer.testing import CliRunner

from clipengine.cli import serve_cmd
from clipengine.cli.app import app
from clipengine.serve import ServeSettings, create_app, uvicorn_options

from .conftest import FakeIndex, FakeModel, ThreadedServer

PREFIX = "/clip"
API_KEY = "root-path-key"
_HOP_BY_HOP = {b"connection", b"content-length", b"transfer-encoding", b"keep-alive"}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return


def _stripping_proxy(backend: str) -> ASGIApp:
    """A reverse proxy at PREFIX that forwards to `backend` with the prefix taken off, as nginx's
    `proxy_pass http://backend/;` does: the service never sees the prefix in its requests."""

    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        raw_path: bytes = scope["raw_path"]
        if not raw_path.startswith(PREFIX.encode() + b"/"):  # the host's other sites
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not this service"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        url = raw_path[len(PREFIX) :].decode() + (
            "?" + scope["query_string"].decode() if scope["query_string"] else ""
        )
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP and k != b"host"]
        async with httpx.AsyncClient(base_url=backend, timeout=30) as client:
            reply = await client.request(scope["method"], url, headers=headers, content=body)
        out = [(k, v) for k, v in reply.headers.raw if k.lower() not in _HOP_BY_HOP]
        out.append((b"content-length", str(len(reply.content)).encode()))
        await send({"type": "http.response.start", "status": reply.status_code, "headers": out})
        await send({"type": "http.response.body", "body": reply.content})

    return proxy


@pytest.fixture
def proxy_url(fake_model: FakeModel, fake_index: FakeIndex) -> Iterator[str]:
    """The host's URL of a proxy serving the service (with `--root-path /clip`) under /clip/."""
    settings = ServeSettings(api_key=API_KEY, max_wait_ms=1)
    backend = ThreadedServer(
        create_app(fake_model, fake_index, settings), root_path=PREFIX, **uvicorn_options(settings)
    )
    proxy = ThreadedServer(_stripping_proxy(backend.url))
    yield proxy.url
    proxy.stop()
    backend.stop()


@pytest.mark.integration
def test_docs_and_openapi_name_the_proxy_path_and_the_api_works_through_it(proxy_url: str) -> None:
    key = {"X-API-Key": API_KEY}
    with httpx.Client(base_url=proxy_url, timeout=30) as client:
        docs = client.get(f"{PREFIX}/docs")  # public, with a key set too (a browser sends none)
        assert docs.status_code == 200, docs.text
        # Was "/openapi.json": the host's root, outside the proxy's path (its 404 broke the page).
        urls = re.findall(r"""url: ['"]([^'"]+)['"]""", docs.text)
        assert urls == [f"{PREFIX}/openapi.json"], urls
        schema = client.get(urls[0], headers=key)
        assert schema.status_code == 200, schema.text
        # "Try it out" calls {servers[0].url}/v1/...: through the proxy too.
        assert schema.json()["servers"] == [{"url": PREFIX}]
        assert "/v1/search" in schema.json()["paths"]

        for public in ("/", "/static/app.js", "/healthz", "/readyz"):
            assert client.get(PREFIX + public).status_code == 200, public
        assert client.get(f"{PREFIX}/v1/info").status_code == 401  # the key is still needed
        hits = client.post(f"{PREFIX}/v1/search", json={"text": "a cat", "k": 3}, headers=key).json()[
            "results"
        ]
        assert len(hits) == 3
        for hit in hits:
            # From the host's root, as an <img src> or a client resolving it against the proxy uses it.
            assert hit["thumbnail_url"] == f"{PREFIX}/v1/thumbnails/{hit['id']}"
            thumbnail = client.get(hit["thumbnail_url"], headers=key)
            assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
        metrics = client.get(f"{PREFIX}/metrics", headers=key).text
        # Routes are counted by their template inside the service, the prefix not in it.
        assert 'route="/v1/search",status="200"' in metrics and PREFIX + "/v1" not in metrics


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, fake_model: FakeModel, fake_index: FakeIndex) -> dict[str, Any]:
    """What `serve` hands uvicorn.run, with the model load and the run itself replaced."""
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve_cmd, "_load_model", lambda *args: fake_model)
    monkeypatch.setattr(serve_cmd, "_check_bindable", lambda host, port: None)
    monkeypatch.setattr(uvicorn, "run", lambda web_app, **options: seen.update(options))
    return seen


@pytest.mark.parametrize(
    ("given", "passed"),
    [(None, ""), ("/clip", "/clip"), ("/clip/", "/clip"), ("/a/b-c_d.e~", "/a/b-c_d.e~"), ("/", "")],
)
def test_the_root_path_option_reaches_uvicorn(served: dict[str, Any], given: str | None, passed: str) -> None:
    extra = [] if given is None else ["--root-path", given]
    result = CliRunner().invoke(app, ["serve", "--model", "m", *extra])
    assert result.exit_code == 0, result.output
    assert served["root_path"] == passed
    assert f"docs: {passed}/docs" in result.output


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("clip", "must start with '/'"),  # relative: /docs fetched "clip/openapi.json"
        ("/clïp", "'ï' cannot be in it"),  # uvicorn answered every request 400
        ("/clip path", "' ' cannot be in it"),
        ("/clip%20x", "'%' cannot be in it"),
        ("/clip?x=1", "'?' cannot be in it"),
        ("/a//b", "empty, '.' or '..' segment"),
        ("/a/../b", "empty, '.' or '..' segment"),
    ],
)
def test_a_root_path_uvicorn_cannot_use_is_refused_before_the_model_loads(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch, given: str, why: str
) -> None:
    def no_load(*args: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(serve_cmd, "_load_model", no_load)
    result = CliRunner().invoke(app, ["serve", "--model", "m", "--root-path", given])
    assert result.exit_code == 2, result.output
    assert "--root-path" in result.output and why in result.output, result.output
    assert served == {}


def test_a_trailing_slash_in_a_mount_root_path_is_not_doubled_in_thumbnail_urls(
    fake_model: FakeModel, fake_index: FakeIndex
) -> None:
    """uvicorn.run(app, root_path="/clip/") from library code: "/clip//v1/thumbnails/..." before."""
    from fastapi.testclient import TestClient

    web_app = create_app(fake_model, fake_index, ServeSettings(max_wait_ms=1))
    with TestClient(web_app, root_path="/clip/") as client:
        hits = client.post("/v1/search", json={"text": "a cat", "k": 1}).json()["results"]
    assert hits[0]["thumbnail_url"] == f"/clip/v1/thumbnails/{hits[0]['id']}"
