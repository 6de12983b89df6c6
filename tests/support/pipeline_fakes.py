"""A deterministic fake Backend (embedding derived from pixel content) and image writers for pipeline tests.

Importable by name from every test (pytest's `pythonpath` includes tests/support) and from the
subprocess entry script (`tests/pipeline/embed_entry.py`), so it must not import pytest.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

__all__ = ["FakeBackend", "FakeBackendFactory", "die_on", "write_images"]


class FakeBackend:
    """Embeds images by a fixed random projection of their pixels: same pixels -> same vector.

    Records the size of every `encode_images` call in `calls`; `delay_s` slows each call (used only
    to keep a subprocess busy long enough to be killed mid-run, never for timing asserts).
    """

    name = "fake"
    device = "cpu"
    precision = "fp32"
    context_length = 77

    def __init__(self, embed_dim: int = 8, image_size: int = 32, delay_s: float = 0.0) -> None:
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.delay_s = delay_s
        self.calls: list[int] = []
        rng = np.random.default_rng(1234)
        self._proj = rng.standard_normal((3 * image_size * image_size, embed_dim)).astype(np.float64)
        self._text_proj = rng.standard_normal((self.context_length, embed_dim))

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        self.calls.append(int(pixels.shape[0]))
        if self.delay_s:
            time.sleep(self.delay_s)
        flat = np.asarray(pixels, dtype=np.float64).reshape(pixels.shape[0], -1)
        return _unit(flat @ self._proj)

    def encode_texts(self, tokens: np.ndarray) -> np.ndarray:
        return _unit(np.asarray(tokens, dtype=np.float64) @ self._text_proj)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x.astype(np.float32)


class FakeBackendFactory:
    """Picklable zero-argument factory (what crosses process boundaries); counts how often it builds."""

    def __init__(self, embed_dim: int = 8, image_size: int = 32, delay_s: float = 0.0) -> None:
        self.kwargs = {"embed_dim": embed_dim, "image_size": image_size, "delay_s": delay_s}
        self.built: list[FakeBackend] = []

    def __call__(self) -> FakeBackend:
        backend = FakeBackend(**self.kwargs)
        self.built.append(backend)
        return backend


def write_images(
    folder: Path, n: int, *, prefix: str = "img", ext: str = ".jpg", seed: int = 0
) -> list[Path]:
    """Write `n` small distinct RGB images (varying sizes) named `<prefix>-0007<ext>`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = 24 + (i % 5) * 4, 20 + (i % 3) * 6
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        path = folder / f"{prefix}-{i:04d}{ext}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def die_on(names: tuple[str, ...], once_marker: str | None = None) -> None:
    """Decode-worker initializer (`DecodePool(initializer=partial(die_on, ...))`): decoding a file
    whose id is in `names` ends the worker process at once, as a segfaulting decoder or the OOM
    killer would. With `once_marker` (a path), the first decode of any file does it instead, once
    for the whole test (the marker file records that it happened): a death no file is to blame for."""
    import os

    from clipengine.image import decode

    real = decode.open_image

    def open_image(data, name=None, **kwargs):  # type: ignore[no-untyped-def]
        if once_marker is not None:
            try:
                fd = os.open(once_marker, os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(70)
        if name in names:
            os._exit(70)
        return real(data, name, **kwargs)

    decode.open_image = open_image  # type: ignore[assignment]
