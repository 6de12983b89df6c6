"""End to end in headless Chromium: classify an uploaded image and search the index from the web page."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from clipengine.serve import ServeSettings, create_app

from .conftest import ThreadedServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "browser-test-key"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"),
]


def _gallery(root: Path) -> None:
    """Twelve small pictures: coloured shapes on tinted backgrounds, so thumbnails are easy to tell apart."""
    colours = ["#e03131", "#2f9e44", "#1971c2", "#f08c00", "#9c36b5", "#0c8599"]
    for i in range(12):
        img = Image.new("RGB", (96, 96), colours[(i + 3) % 6] + "")
        img = Image.blend(img, Image.new("RGB", (96, 96), "white"), 0.75)
        draw = ImageDraw.Draw(img)
        box = (18, 18, 78, 78)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colours[i % 6])
        folder = root / ("circles" if i % 2 else "squares")
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"shape_{i:02d}.png")


@pytest.fixture(scope="module")
def server(tiny_clip: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    from clipengine.index import Index

    root = tmp_path_factory.mktemp("gallery")
    _gallery(root)
    ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    index = Index.build(
        ids, tiny_clip.encode_images([str(root / i) for i in ids]), model=tiny_clip.name, image_roots=[root]
    )
    srv = ThreadedServer(create_app(tiny_clip, index, ServeSettings(api_key=API_KEY, max_wait_ms=2)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _screenshot(page: Any, name: str, tmp_path: Path) -> None:
    """Always into tmp_path; also into $CLIPENGINE_SCREENSHOT_DIR when set (docs, reviews)."""
    page.screenshot(path=str(tmp_path / name), full_page=True)
    if os.environ.get("CLIPENGINE_SCREENSHOT_DIR"):
        out = Path(os.environ["CLIPENGINE_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / name), full_page=True)


def test_page_classifies_an_upload_and_searches_the_index(
    server: ThreadedServer, browser: Any, clip_png: Path, tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    external: list[str] = []
    page.on(
        "request",
        lambda r: (
            None if r.url.startswith(server.url) or r.url.startswith("blob:") else external.append(r.url)
        ),
    )
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-badge').textContent.includes('API key needed')")

    # Without the key the API refuses, and the page says so.
    page.set_input_files("#file-input", str(clip_png))
    page.click("#classify-btn")
    page.wait_for_selector("#classify-error:not([hidden])")
    assert "unauthorized" in page.inner_text("#classify-error")

    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model-badge').textContent.includes('tiny-vit')")
    assert "12 images" in page.inner_text("#index-badge")

    labels = ["a diagram", "a dog", "a cat"]
    page.fill("#labels", ", ".join(labels))
    page.click("#classify-btn")
    page.wait_for_selector("#chart .bar-row")
    rows = page.query_selector_all("#chart .bar-row")
    shown = [
        (r.query_selector(".bar-label").inner_text(), float(r.get_attribute("data-probability")))
        for r in rows
    ]
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}) as api:
        files = [("files", ("CLIP.png", clip_png.read_bytes(), "image/png"))]
        want = api.post("/v1/classify", files=files, data={"labels": ",".join(labels)}).json()["results"][0][
            "labels"
        ]
    assert [lab for lab, _ in shown] == [w["label"] for w in want]
    assert [p for _, p in shown] == pytest.approx([w["probability"] for w in want], abs=1e-6)
    top_width = page.eval_on_selector("#chart .bar-row .bar-fill", "e => e.style.width")
    assert top_width == f"{max(0.5, want[0]['probability'] * 100):.2f}%"
    assert "ms" in page.inner_text("#classify-time")
    assert page.is_hidden("#classify-error")

    # "Show the top 2 labels": the first two bars of the full ranking, probabilities unchanged.
    page.fill("#top-k", "2")
    page.click("#classify-btn")
    page.wait_for_function("document.querySelectorAll('#chart .bar-row').length === 2")
    rows = page.query_selector_all("#chart .bar-row")
    top = [float(r.get_attribute("data-probability")) for r in rows]
    assert [r.query_selector(".bar-label").inner_text() for r in rows] == [w["label"] for w in want[:2]]
    assert top == pytest.approx([w["probability"] for w in want[:2]], abs=1e-6)

    page.fill("#search-text", "a red square")
    page.select_option("#search-k", "6")
    page.click("#search-btn")
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('#results .thumb img')];"
        " return imgs.length === 6 && imgs.every(i => i.complete && i.naturalWidth > 0); }"
    )
    captions = page.eval_on_selector_all("#results .thumb .id", "els => els.map(e => e.textContent)")
    assert len(captions) == 6 and all(c.endswith(".png") for c in captions)
    assert "6 results" in page.inner_text("#search-time")
    _screenshot(page, "serve-page.png", tmp_path)
    assert errors == [] and external == []
    page.close()
