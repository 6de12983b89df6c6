"""The web page states what /v1/info states: a lower precision's deviation from fp32 and an approximate
index's measured recall (headless Chromium)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipengine.serve import create_app

from .conftest import ThreadedServer

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"),
]


def _badges(app: Any) -> tuple[tuple[str, str], str]:
    from playwright.sync_api import sync_playwright

    srv = ThreadedServer(app)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
            page = browser.new_page()
            page.goto(srv.url + "/")
            page.wait_for_function("!document.getElementById('model-badge').textContent.includes('connecting')")
            model = (page.inner_text("#model-badge"), page.get_attribute("#model-badge", "title") or "")
            index = page.inner_text("#index-badge")
            browser.close()
    finally:
        srv.stop()
    return model, index


@pytest.fixture
def bf16_clip(tiny_model: Any) -> Iterator[Any]:
    import copy

    from clipengine.api import ClipModel
    from clipengine.backends import create_backend
    from clipengine.image.preprocess import PreprocessConfig

    # A copy: TorchBackend casts the module it is given in place (the session's tiny model stays fp32).
    backend = create_backend("torch", copy.deepcopy(tiny_model), precision="bf16")
    yield ClipModel(backend, PreprocessConfig(image_size=32), "tiny", 100.0)


def test_page_shows_the_precision_deviation_and_the_index_recall(bf16_clip: Any, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    from clipengine.index import Index
    from clipengine.report import DOCUMENTED_DEVIATION, index_recall

    vectors = np.random.default_rng(0).standard_normal((200, bf16_clip.embed_dim)).astype(np.float32)
    ids = [f"{i}.png" for i in range(200)]
    index = Index.build(ids, vectors, model="tiny", kind="ivf", nlist=8, nprobe=1, image_roots=[tmp_path])
    index.extra["recall"] = recall = index_recall(index, vectors, ids)
    assert recall is not None
    (text, title), index_text = _badges(create_app(bf16_clip, index))
    assert text.endswith("· bf16 · deviation unmeasured")
    assert "unmeasured for this model" in title and DOCUMENTED_DEVIATION["torch-bf16"] in title
    assert index_text == f"index: 200 images · ivf recall@10 {recall['recall']:.3f}"


def test_page_says_nothing_more_for_fp32_and_an_exact_index(tiny_clip: Any, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    from clipengine.index import Index

    vectors = np.random.default_rng(0).standard_normal((20, tiny_clip.embed_dim)).astype(np.float32)
    index = Index.build([f"{i}.png" for i in range(20)], vectors, model=tiny_clip.name, image_roots=[tmp_path])
    (text, title), index_text = _badges(create_app(tiny_clip, index))
    assert text == f"{tiny_clip.name} · {tiny_clip.embed_dim}-d" and title == "Model served (fp32)"
    assert index_text == "index: 20 images"


def test_page_shows_the_exports_measured_cosine(fake_model: Any) -> None:
    from types import SimpleNamespace

    from clipengine.export.manifest import EngineInfo, Manifest, Parity

    def engine(tower: str, cos: float) -> EngineInfo:
        parity = Parity(max_abs=0.01, min_cos=cos, bound={"min_cos": 0.99}, passed=True, samples=8)
        return EngineInfo(tower=tower, precision="int8", batch=None, file=f"{tower}_int8_dyn.onnx", sha256="0",
                          inputs=[], outputs=[], parity=parity)  # fmt: skip

    manifest = Manifest(model="m", pretrained=None, architecture={}, preprocess={}, context_length=77,
                        logit_scale=100.0, embed_dim=16, image_size=8,
                        engines=[engine("image", 0.99963), engine("text", 0.99829)])  # fmt: skip
    fake_model.backend = SimpleNamespace(name="onnx", precision="int8", manifest=manifest, engine_precision="int8")
    (text, title), _ = _badges(create_app(fake_model))
    assert text.endswith("· int8 · min cos 0.99829")
    assert title.startswith("onnx int8 vs fp32: min cosine image 0.99963, text 0.99829 (at export under ONNX Runtime")
