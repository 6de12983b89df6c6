"""Batch x Backend -> Embeddings: alignment and shape checks, lazy backend construction."""

from __future__ import annotations

import numpy as np
import pytest

from clipengine.errors import BackendError
from clipengine.pipeline.embed import LazyBackend, embed_batch
from clipengine.types import Batch


def _batch(n: int, size: int = 32) -> Batch:
    rng = np.random.default_rng(n)
    return Batch([f"{i}.jpg" for i in range(n)], rng.standard_normal((n, 3, size, size)).astype(np.float32))


def test_embed_batch_keeps_ids_aligned_and_is_deterministic(fake_backend) -> None:  # type: ignore[no-untyped-def]
    batch = _batch(5)
    first, again = embed_batch(fake_backend, batch), embed_batch(fake_backend, batch)
    assert first.ids == batch.ids
    assert first.vectors.shape == (5, 8) and first.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first.vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(first.vectors, again.vectors)
    one = embed_batch(fake_backend, Batch(batch.ids[2:3], batch.pixels[2:3]))
    np.testing.assert_allclose(one.vectors[0], first.vectors[2], rtol=1e-6)


def test_empty_batch_does_not_call_the_backend(fake_backend) -> None:  # type: ignore[no-untyped-def]
    emb = embed_batch(fake_backend, Batch([], np.zeros((0, 3, 0, 0), np.float32)))
    assert emb.vectors.shape == (0, 8) and fake_backend.calls == []


def test_wrong_image_size_names_both_sizes(fake_backend) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackendError, match="64x64 but backend 'fake' expects 32x32"):
        embed_batch(fake_backend, _batch(2, size=64))


def test_lazy_backend_builds_once_on_first_use(fake_factory) -> None:  # type: ignore[no-untyped-def]
    lazy = LazyBackend(fake_factory)
    assert not lazy.loaded and fake_factory.built == []
    assert lazy.get() is lazy.get()
    assert len(fake_factory.built) == 1


def test_lazy_backend_rejects_a_factory_returning_junk() -> None:
    with pytest.raises(BackendError, match="returned int"):
        LazyBackend(lambda: 3).get()  # type: ignore[arg-type,return-value]


def test_pipeline_imports_no_backend_runtime() -> None:
    """The pipeline knows only the Backend protocol: importing it pulls in neither torch nor onnxruntime."""
    import subprocess
    import sys

    code = (
        "import sys, clipengine.pipeline.run, clipengine.pipeline.batching, clipengine.bench.timing, "
        "clipengine.report; print(sorted({'torch', 'onnxruntime', 'ray'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
