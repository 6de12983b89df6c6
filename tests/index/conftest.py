"""Fixtures for index tests: seeded unit vectors (random and clustered) and a fake query model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, seed: int, centers: int = 200, noise: float = 1.5) -> np.ndarray:
    """Gaussian-mixture unit vectors: structured like real embeddings, unlike uniform random ones.

    The mixture centres are fixed (seed 1234); `seed` draws the points, so two calls with different
    seeds sample the same distribution without sharing points.
    """
    c = np.random.default_rng(1234).standard_normal((centers, d))
    rng = np.random.default_rng(seed)
    return unit(c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, d)))


@pytest.fixture
def vectors() -> np.ndarray:
    return unit(np.random.default_rng(0).standard_normal((500, 32)))


@pytest.fixture
def ids(vectors: np.ndarray) -> list[str]:
    return [f"img/{i:04d}.jpg" for i in range(len(vectors))]


class FakeModel:
    """Deterministic stand-in for ClipModel: a text or image name maps to a fixed unit vector."""

    def __init__(self, table: dict[str, np.ndarray], name: str = "fake", embed_dim: int = 32) -> None:
        self.table, self.name, self.embed_dim = table, name, embed_dim

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.table[t] for t in texts])

    def encode_images(self, images: Any, batch_size: int = 32) -> np.ndarray:
        return np.stack([self.table[str(i)] for i in images])
