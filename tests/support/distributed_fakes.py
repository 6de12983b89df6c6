"""A deterministic fake backend for Ray tests; shipped to actors by value (tests are not importable there)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SUPPORT_DIR = str(Path(__file__).resolve().parent)  # so that processes an actor spawns import this module
MAX_CRASHES = 4  # `crash_decoder` deaths per test; more than the decode pool's retries of one file need


class FakeBackend:
    """Embedding = a fixed random projection of the pooled pixels, L2-normalised (input-derived, exact)."""

    name, device, precision, context_length = "fake", "cpu", "fp32", 77

    def __init__(self, embed_dim: int = 8, image_size: int = 32, exit_on_encode: bool = False) -> None:
        self.embed_dim, self.image_size, self.exit_on_encode = embed_dim, image_size, exit_on_encode
        self._proj = np.random.default_rng(0).standard_normal((3 * 4 * 4, embed_dim)).astype(np.float32)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        if self.exit_on_encode:  # as a runtime crash or the OOM killer would end the actor
            import os

            os._exit(71)
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
    crash_on: tuple[str, ...] = ()  # decoding these files ends the process decoding them (`crash_decoder`)
    crashes_dir: str | None = None  # with crash_on: one file per crash
    exit_on_encode: bool = False  # the backend ends its process on its first batch
    precision: str = "fp32"  # what the backend says it runs at (run.json records it)

    def __call__(self) -> FakeBackend:
        if self.calls_dir is not None:
            import os
            import uuid

            Path(self.calls_dir, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
        if self.crash_on:
            import sys

            sys.path.insert(0, _SUPPORT_DIR)
            import distributed_fakes  # by name (not this by-value copy): decode processes pickle its functions

            distributed_fakes.crash_decoders(self.crash_on, str(self.crashes_dir))
        backend = FakeBackend(self.embed_dim, exit_on_encode=self.exit_on_encode)
        backend.precision = self.precision
        return backend


def crash_decoders(names: tuple[str, ...], crashes_dir: str) -> None:
    """Make decoding a file of `names` end the process, here and in the decode processes this
    process starts later, as a decoder segfault would wherever the file is decoded. After
    MAX_CRASHES deaths the files decode normally: an engine that retries a file forever then embeds
    it (a failed assertion) instead of hanging the test."""
    from functools import partial

    from clipengine.pipeline import decode_pool

    crash_decoder(names, crashes_dir)
    decode_pool._init_worker = partial(_decode_worker_init, names, crashes_dir)  # type: ignore[assignment]


def _decode_worker_init(names: tuple[str, ...], crashes_dir: str) -> None:
    from clipengine.pipeline import decode_pool

    decode_pool._init_worker()  # the real one of this fresh process: ignore Ctrl-C, exit with the parent
    crash_decoder(names, crashes_dir)


def crash_decoder(names: tuple[str, ...], crashes_dir: str) -> None:
    """Patch this process' `decode.open_image`: a file of `names` ends the process (`os._exit`)."""
    import os
    import uuid

    from clipengine.image import decode

    real = decode.open_image

    def open_image(data, name=None, **kwargs):  # type: ignore[no-untyped-def]
        if name in names and len(os.listdir(crashes_dir)) < MAX_CRASHES:
            Path(crashes_dir, uuid.uuid4().hex).touch()
            os._exit(70)
        return real(data, name, **kwargs)

    decode.open_image = open_image  # type: ignore[assignment]


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
