"""Batch x Backend -> Embeddings: one backend call per batch, output checked and kept aligned with ids."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import BackendError
from ..types import Backend, Batch, Embeddings

__all__ = ["BackendSource", "LazyBackend", "embed_batch"]

# What run_partition accepts: a live backend, or a zero-argument factory that builds one (what crosses
# process boundaries: workers and Ray actors receive factories, never live models).
BackendSource = Backend | Callable[[], Backend]


class LazyBackend:
    """Builds the backend on first use, so a resumed run whose shards are all done loads no model."""

    def __init__(self, source: BackendSource, on_load: Callable[[Backend], None] | None = None) -> None:
        self._source = source
        self._on_load = on_load  # e.g. check embed_dim against an existing output before any work
        self._backend: Backend | None = None

    @property
    def loaded(self) -> bool:
        """Whether the backend has been built yet."""
        return self._backend is not None

    def get(self) -> Backend:
        """The backend, built (and checked by `on_load`) on the first call."""
        if self._backend is None:
            source = self._source
            backend = source if _is_backend(source) else source()  # type: ignore[operator]
            if not _is_backend(backend):
                raise BackendError(f"backend factory returned {type(backend).__name__}, not a Backend")
            if self._on_load is not None:
                self._on_load(backend)  # type: ignore[arg-type]
            self._backend = backend  # type: ignore[assignment]
        return self._backend  # type: ignore[return-value]


def _is_backend(obj: object) -> bool:
    return hasattr(obj, "encode_images") and hasattr(obj, "embed_dim")


def embed_batch(backend: Backend, batch: Batch) -> Embeddings:
    """Encode the pixels of `batch`; row i of the result belongs to ``batch.ids[i]``.

    Raises:
        BackendError: the images do not match the backend's input size, or it returned the wrong shape.
    """
    n = len(batch.ids)
    if n == 0:
        return Embeddings(ids=[], vectors=np.zeros((0, backend.embed_dim), dtype=np.float32))
    pixels = batch.pixels
    if pixels.shape[0] != n:
        raise BackendError(f"batch has {n} ids but {pixels.shape[0]} pixel rows")
    if pixels.shape[-1] != backend.image_size or pixels.shape[-2] != backend.image_size:
        raise BackendError(
            f"images are preprocessed to {pixels.shape[-2]}x{pixels.shape[-1]} but backend "
            f"{backend.name!r} expects {backend.image_size}x{backend.image_size}; "
            "use the preprocess config that ships with the model"
        )
    vectors = np.asarray(backend.encode_images(pixels), dtype=np.float32)
    if vectors.shape != (n, backend.embed_dim):
        raise BackendError(
            f"backend {backend.name!r} returned shape {vectors.shape} for {n} images, "
            f"expected ({n}, {backend.embed_dim})"
        )
    return Embeddings(ids=list(batch.ids), vectors=vectors)
