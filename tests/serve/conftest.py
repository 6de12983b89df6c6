"""Fixtures for the serve tests: a deterministic fake model, a fake index over real files, test images."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from clipengine.errors import DecodeError

DIM = 16
SIZE = 8  # fake model input is (3, 8, 8)


def png_bytes(seed: int, size: tuple[int, int] = (24, 24)) -> bytes:
    """A distinct small RGB noise image per seed."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


class FakeModel:
    """Embeds images from their pixels and texts from their hash: every row depends only on its input.

    `gate` (when set) blocks every backend call until it is opened, to hold requests in flight.
    """

    name = "fake-clip"
    embed_dim = DIM
    image_size = SIZE
    logit_scale = 100.0

    def __init__(self) -> None:
        rng = np.random.default_rng(1234)
        self._proj = rng.standard_normal((3 * SIZE * SIZE, DIM)).astype(np.float32)
        self.image_batches: list[int] = []
        self.text_batches: list[int] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()  # set whenever a backend call starts
        self.fail_on_text: str | None = None
        self._lock = threading.Lock()

    def preprocess(self, image: Any) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(image)) as img:
                rgb = img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError) as e:
            raise DecodeError("<bytes>", f"cannot decode: {e}") from e
        return (np.asarray(rgb, dtype=np.float32) / 255.0).transpose(2, 0, 1).copy()

    def _wait(self) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)

    def encode_images(self, images: Any) -> np.ndarray:
        pixels = np.asarray(images, dtype=np.float32)
        self._wait()
        with self._lock:
            self.image_batches.append(len(pixels))
        # Row by row so a row's value never depends on its batch neighbours (exact comparisons).
        out = np.stack([p.reshape(-1) @ self._proj for p in pixels]) - 0.5
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self._wait()
        if self.fail_on_text is not None and self.fail_on_text in texts:
            raise RuntimeError("fake backend failure")
        with self._lock:
            self.text_batches.append(len(texts))
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).standard_normal(DIM))
        out = np.asarray(rows, dtype=np.float32)
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


class FakeIndex:
    """Exact cosine search over the fake model's embeddings of the files under one root."""

    def __init__(self, model: FakeModel, root: Path) -> None:
        self.model = model.name
        self.extra: dict[str, Any] = {}  # as Index: model_files etc.
        self.dim = DIM
        self.image_roots = [root]
        self.ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
        pixels = np.stack([model.preprocess((root / i).read_bytes()) for i in self.ids])
        self.vectors = model.encode_images(pixels)
        model.image_batches.clear()

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, id_: object) -> bool:
        return id_ in self.ids

    def search_vectors(self, q: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        scores = np.asarray(q, dtype=np.float32) @ self.vectors.T
        out = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]
            out.append([(self.ids[i], float(row[i])) for i in order])
        return out


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        (root / f"img{i}.png").write_bytes(png_bytes(100 + i))
    (root / "sub" / "deep.png").write_bytes(png_bytes(200))
    (tmp_path / "secret.txt").write_text("not for you")
    return root


@pytest.fixture
def fake_index(fake_model: FakeModel, image_root: Path) -> FakeIndex:
    return FakeIndex(fake_model, image_root)


@pytest.fixture
def make_client(fake_model: FakeModel, fake_index: FakeIndex) -> Iterator[Any]:
    """Factory: make_client(**settings) -> a started TestClient (lifespan run) over the fake model."""
    from fastapi.testclient import TestClient

    from clipengine.serve import ServeSettings, create_app

    clients: list[TestClient] = []

    def make(index: Any = fake_index, model: Any = fake_model, **settings: Any) -> TestClient:
        app = create_app(model, index, ServeSettings(**settings))
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def tiny_clip(tiny_model: Any) -> Any:
    """The shared tiny random-weight CLIP behind the real ClipModel API (torch backend, 32 px)."""
    api = pytest.importorskip("clipengine.api", reason="clipengine.api is not built yet")
    from clipengine.backends import create_backend
    from clipengine.image.preprocess import PreprocessConfig

    backend = create_backend("torch", tiny_model)
    return api.ClipModel(backend, PreprocessConfig(image_size=32), "tiny-vit", 100.0, 77)


@pytest.fixture
def tiny_index(tiny_clip: Any, image_root: Path) -> Any:
    """A real clipengine Index of the files under `image_root`, built with the tiny model."""
    index_mod = pytest.importorskip("clipengine.index", reason="clipengine.index is not built yet")
    ids = sorted(p.relative_to(image_root).as_posix() for p in image_root.rglob("*.png"))
    vectors = tiny_clip.encode_images([str(image_root / i) for i in ids])
    return index_mod.Index.build(ids, vectors, model=tiny_clip.name, image_roots=[image_root])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedServer:
    """uvicorn running `app` on 127.0.0.1:<free port> in a daemon thread; `stop()` = what SIGTERM does.

    `options` go to `uvicorn.Config` (e.g. `serve.protocol.uvicorn_options(settings)`).
    """

    def __init__(self, app: Any, **options: Any) -> None:
        import time

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", **options
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
