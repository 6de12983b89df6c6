"""The web page against hostile index ids, odd top-N values, a too-large upload and a server that is gone
(headless Chromium)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from clipengine.serve import ServeSettings, create_app, uvicorn_options

from .conftest import ThreadedServer

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"),
]

# Index ids a gallery can hold: markup (must stay text), and characters a URL path gives a meaning to.
HOSTILE_IDS = [
    "<img src=x onerror=alert(1)>.png",
    "sub/<b>bold</b>.png",
    "a#b.png",
    "q?x=1.png",
    "100%.png",
    "a%20b.png",
    "sp ace.png",
    "ünï ☃.png",
]
UPLOAD_LIMIT = 400_000


@pytest.fixture(scope="module")
def server(tiny_clip: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    from clipengine.index import Index

    root = tmp_path_factory.mktemp("hostile")
    for n, image_id in enumerate(HOSTILE_IDS):
        path = root / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (n * 30, 100, 200)).save(path, format="PNG")
    embeddings = tiny_clip.encode_images([str(root / i) for i in HOSTILE_IDS])
    index = Index.build(HOSTILE_IDS, embeddings, model=tiny_clip.name, image_roots=[root])
    settings = ServeSettings(max_upload_bytes=UPLOAD_LIMIT, max_wait_ms=2)
    srv = ThreadedServer(create_app(tiny_clip, index, settings), **uvicorn_options(settings))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium for the module (a launch costs 1-2 s); each test gets its own context, so no
    page state, storage or cache passes from one test to the next."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(server: ThreadedServer, browser: Any) -> Iterator[Any]:
    """A page on the server; fails the test on a script error or a dialog (an injected alert())."""
    context = browser.new_context()
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    pg.goto(server.url + "/")
    pg.wait_for_function("document.getElementById('model-badge').textContent.includes('tiny-vit')")
    yield pg
    context.close()
    assert problems == []


def test_index_ids_render_as_text_and_their_thumbnails_load(page: Any) -> None:
    page.fill("#search-text", "anything")
    page.select_option("#search-k", "24")
    page.click("#search-btn")
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('#results .thumb img')];"
        f" return imgs.length === {len(HOSTILE_IDS)} && imgs.every(i => i.complete && i.naturalWidth > 0); }}"
    )
    captions = page.eval_on_selector_all("#results .thumb .id", "els => els.map(e => e.textContent)")
    assert sorted(captions) == sorted(HOSTILE_IDS)
    # Markup in an id stays text: no element was made from it.
    elements = page.eval_on_selector_all(
        "#results .thumb", "els => els.map(e => e.querySelectorAll('b, img').length)"
    )
    assert elements == [1] * len(HOSTILE_IDS)  # each figure's own <img>, nothing else


def test_labels_with_markup_render_as_text(page: Any, clip_png: Path) -> None:
    labels = ["<img src=x onerror=alert(2)>", "<b>bold</b>"]
    page.set_input_files("#file-input", str(clip_png))
    page.fill("#labels", ", ".join(labels))
    page.click("#classify-btn")
    page.wait_for_function("document.querySelectorAll('#chart .bar-row').length === 2")
    shown = page.eval_on_selector_all("#chart .bar-label", "els => els.map(e => e.textContent)")
    assert sorted(shown) == sorted(labels)
    assert page.eval_on_selector("#chart", "e => e.querySelectorAll('b, img').length") == 0


@pytest.mark.parametrize(("typed", "bars"), [("1e3", 3), ("99999999999999999999", 3), ("2.0", 2), ("2e0", 2)])
def test_a_top_n_the_number_field_accepts_is_sent_as_the_integer(
    page: Any, clip_png: Path, typed: str, bars: int
) -> None:
    """The number field takes "1e3", "2.0" and 20 digits as valid; the server's top_k takes digits only, up to
    18 of them. N at least the 3 labels typed keeps every label, as the docs say."""
    page.set_input_files("#file-input", str(clip_png))
    page.fill("#labels", "a diagram, a dog, a cat")
    page.fill("#top-k", typed)
    assert page.eval_on_selector("#top-k", "e => e.checkValidity()")
    page.click("#classify-btn")
    page.wait_for_function(
        "document.querySelectorAll('#chart .bar-row').length > 0"
        " || !document.getElementById('classify-error').hidden"
    )
    assert page.is_hidden("#classify-error"), page.inner_text("#classify-error")
    assert len(page.query_selector_all("#chart .bar-row")) == bars


def test_a_too_large_upload_shows_the_servers_reason(page: Any, clip_png: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(clip_png.read_bytes() + b"\0" * 3_000_000)
    page.set_input_files("#file-input", str(big))
    page.click("#classify-btn")
    page.wait_for_selector("#classify-error:not([hidden])")
    message = page.inner_text("#classify-error")
    assert f"exceeds the limit of {UPLOAD_LIMIT} bytes" in message and "HTTP 413" in message
    assert page.is_enabled("#classify-btn")


def test_an_api_key_a_header_cannot_carry_is_named_not_taken_for_a_network_failure(
    page: Any, clip_png: Path
) -> None:
    page.fill("#api-key", "ключ")  # typed with a Cyrillic layout
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model-badge').textContent === 'API key unusable'")
    page.set_input_files("#file-input", str(clip_png))
    page.click("#classify-btn")
    page.wait_for_selector("#classify-error:not([hidden])")
    message = page.inner_text("#classify-error")
    assert "API key" in message and "no answer" not in message.lower(), message


def test_a_server_that_is_gone_is_named_as_such(tiny_clip: Any, clip_png: Path, browser: Any) -> None:
    srv = ThreadedServer(create_app(tiny_clip, None, ServeSettings(max_wait_ms=2)))
    context = browser.new_context()
    page = context.new_page()
    page.goto(srv.url + "/")
    page.wait_for_function("document.getElementById('model-badge').textContent.includes('tiny-vit')")
    srv.stop()
    page.set_input_files("#file-input", str(clip_png))
    page.click("#classify-btn")
    page.wait_for_selector("#classify-error:not([hidden])")
    message = page.inner_text("#classify-error")
    context.close()
    assert "no answer from the server" in message.lower(), message


def test_a_failed_classify_clears_the_last_answers_bars(page: Any, clip_png: Path, tmp_path: Path) -> None:
    """The previous image's bars stayed on screen beside the error, reading as this image's answer."""
    page.set_input_files("#file-input", str(clip_png))
    page.fill("#labels", "a diagram, a dog")
    page.click("#classify-btn")
    page.wait_for_function("document.querySelectorAll('#chart .bar-row').length === 2")
    big = tmp_path / "big.png"
    big.write_bytes(clip_png.read_bytes() + b"\0" * 3_000_000)
    page.set_input_files("#file-input", str(big))
    page.click("#classify-btn")
    page.wait_for_selector("#classify-error:not([hidden])")
    assert "HTTP 413" in page.inner_text("#classify-error")
    assert page.query_selector_all("#chart .bar-row") == []
    assert page.inner_text("#classify-time") == ""
