"""The service behind a reverse proxy under a sub-path (https://host/clip/): the page's URLs stay under it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from clipengine.serve import ServeSettings, create_app

from .conftest import FakeIndex, FakeModel, ThreadedServer
from .test_browser import CHROMIUM, CHROMIUM_ARGS

STATIC = Path(__file__).parents[2] / "src" / "clipengine" / "serve" / "static"
PREFIX = "/clip"
API_KEY = "sub-path-key"


def test_the_page_names_no_url_from_the_host_root() -> None:
    # "/v1/...", "/static/..." leave a sub-path; every URL the page uses must be relative to it.
    html = (STATIC / "index.html").read_text()
    assert re.findall(r'(?:href|src|action)="/', html) == []
    script = (STATIC / "app.js").read_text()
    assert re.findall(r"""["'`]/(?:v1|static|metrics|openapi|docs|healthz|readyz)""", script) == []
    assert re.findall(r"""["'`]v1/""", script), "the page's API calls were not found: update this test"


def _behind_proxy(app: ASGIApp, mode: str) -> ASGIApp:
    """`app` as a proxy at PREFIX shows it: "strip" as nginx's `location /clip/ { proxy_pass
    http://app/; }` (the app never sees the prefix), "root_path" as a Starlette Mount or uvicorn's
    --root-path (the path keeps it, root_path names it)."""

    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await app(scope, receive, send)
            return
        if not scope["path"].startswith(PREFIX + "/"):  # the host's other sites
            await PlainTextResponse("not this service", 404)(scope, receive, send)
            return
        if mode == "strip":
            inner = dict(scope, path=scope["path"][len(PREFIX) :], raw_path=scope["raw_path"][len(PREFIX) :])
        else:
            inner = dict(scope, root_path=PREFIX)
        await app(inner, receive, send)

    return proxy


@pytest.fixture(params=["strip", "root_path"])
def proxied(request: pytest.FixtureRequest, fake_model: FakeModel, fake_index: FakeIndex) -> Iterator[str]:
    """The URL of the service's page behind a proxy, with an API key set."""
    app = create_app(fake_model, fake_index, ServeSettings(api_key=API_KEY, max_wait_ms=1))
    srv = ThreadedServer(_behind_proxy(app, request.param))
    yield srv.url + PREFIX + "/" + ("#knows-root-path" if request.param == "root_path" else "")
    srv.stop()


def test_under_a_sub_path_the_public_routes_need_no_key_and_the_api_works(proxied: str) -> None:
    page, _, knows_root_path = proxied.partition("#")
    with httpx.Client(base_url=page, timeout=30) as client:
        for public in ("", "static/app.js", "static/style.css", "healthz"):
            assert client.get(public).status_code == 200, public
        assert client.get("v1/info").status_code == 401
        key = {"X-API-Key": API_KEY}
        hits = client.post("v1/search", json={"text": "a cat", "k": 2}, headers=key).json()["results"]
        assert len(hits) == 2
        for hit in hits:
            # thumbnail_url is from the host's root: right when the app knows its root_path (as
            # url_for); the page builds the URL relative to itself either way.
            url = hit["thumbnail_url"]
            root = PREFIX if knows_root_path else ""
            assert url == f"{root}/v1/thumbnails/{hit['id']}", url
            assert client.get(f"v1/thumbnails/{hit['id']}", headers=key).status_code == 200
        metrics = client.get("metrics", headers=key).text
        assert 'route="/v1/search",status="200"' in metrics


@pytest.mark.browser
@pytest.mark.integration
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_the_page_searches_and_shows_thumbnails_under_a_sub_path(proxied: str) -> None:
    from playwright.sync_api import sync_playwright

    proxied = proxied.partition("#")[0]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        outside: list[str] = []
        page.on("request", lambda r: None if r.url.startswith((proxied, "blob:")) else outside.append(r.url))
        page.goto(proxied)
        page.fill("#api-key", API_KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('model-badge').textContent.includes('fake-clip')")
        page.fill("#search-text", "a red square")
        page.select_option("#search-k", "6")
        page.click("#search-btn")
        page.wait_for_function(
            "() => { const imgs = [...document.querySelectorAll('#results .thumb img')];"
            " return imgs.length === 6 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
            timeout=20_000,
        )
        assert page.is_hidden("#search-error")
        browser.close()
    # The browser's own favicon request goes to the host root whatever the page says.
    assert [u for u in outside if not u.endswith("/favicon.ico")] == [] and errors == []
