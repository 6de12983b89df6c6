"""A deterministic fake backend for Ray tests; shipped to actors by value (tests are not importable there)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class FakeBackend:
    """Embedding = a fixed random projection of the pooled pixels, L2-normalised (input-derived, exact)."""

    name, device, precision, context_length = "fake", "cpu", "fp32", 77

    def __init__(self, embed_dim: int = 8, image_size: int = 32) -> None:
        self.embed_dim, self.image_size = embed_dim, image_size
        self._proj = np.random.default_rng(0).standard_normal((3 * 4 * 4, embed_dim)).astype(np.float32)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        n, c, h, w = pixels.shape
        pooled = pixels.reshape(n, c, 4, h // 4, 4, w // 4).mean(axis=(3, 5)).reshape(n, -1)
        x = pooled @ self._proj
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def encode_texts(self, tokens: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class FakeFactory:
    """Picklable builder, as the real BackendFactory; with `calls_dir`, each build leaves a file there."""

    embed_dim: int = 8
    calls_dir: str | None = None  # counts model loads across processes

    def __call__(self) -> FakeBackend:
        if self.calls_dir is not None:
            import os
            import uuid

            Path(self.calls_dir, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
        return FakeBackend(self.embed_dim)


def write_images(root: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` small JPEGs of random colour blocks, named img-000.jpg ..."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = np.kron(rng.integers(0, 256, (4, 6, 3)), np.ones((10, 10, 1))).astype(np.uint8)
        path = root / f"img-{i:03d}.jpg"
        Image.fromarray(arr).save(path, quality=95)
        paths.append(path)
    return paths
