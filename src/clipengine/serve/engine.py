"""The inference side of the service: decode pool, image/text micro-batchers, zero-shot and search."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from ..errors import DecodeError, IndexMismatchError
from ..index.index import same_model  # faiss is imported lazily there
from ..zeroshot import label_prompts, mean_unit, rank_labels
from .batcher import MicroBatcher
from .http_errors import ApiError
from .inputs import NamedImage, check_image_header
from .metrics import ServeMetrics
from .settings import ServeSettings

__all__ = ["InferenceService", "SearchableIndex", "ServableModel", "check_index"]

log = logging.getLogger(__name__)


class ServableModel(Protocol):
    """What the service needs from a model: `clipengine.api.ClipModel` satisfies it."""

    name: str
    logit_scale: float  # the multiplier itself (about 100 for trained CLIPs), not its log

    @property
    def embed_dim(self) -> int: ...

    def preprocess(self, image: Any) -> np.ndarray:
        """Encoded bytes -> (3, H, W) float32; raises DecodeError for bad images."""
        ...

    def encode_images(self, images: Any) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, D) unit-norm float32."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """N texts -> (N, D) unit-norm float32."""
        ...


class SearchableIndex(Protocol):
    """What the service needs from an index: `clipengine.index.Index` satisfies it."""

    @property
    def model(self) -> str | None:
        """Name of the model that built the index."""
        ...

    @property
    def dim(self) -> int: ...

    @property
    def image_roots(self) -> Any:
        """The folders ids are relative to (one path or a sequence)."""
        ...

    def search_vectors(self, q: Any, k: int, /) -> list[list[tuple[str, float]]]:
        """(M, D) unit queries -> per query, up to k (id, cosine) best first."""
        ...


def check_index(model: ServableModel, index: SearchableIndex) -> None:
    """Refuse an index built with another embedding size or another model than the one served."""
    dim = int(model.embed_dim)
    if int(index.dim) != dim:
        raise IndexMismatchError(
            f"index vectors have {index.dim} dimensions but model {model.name!r} has {dim}"
        )
    if index.model and model.name and not same_model(str(index.model), str(model.name)):
        raise IndexMismatchError(
            f"index was built with model {index.model!r} but the server loaded {model.name!r}; "
            "serve the same model the index was built with"
        )


class InferenceService:
    """Owns the decode thread pool and the two micro-batchers; every method is called on the event loop."""

    def __init__(
        self,
        model: ServableModel,
        settings: ServeSettings,
        metrics: ServeMetrics,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        """`in_flight()` counts the app's API requests in progress: the batchers wait for company only
        while some of those are not queued yet (MicroBatcher `others_active`)."""
        self.model = model
        self.settings = settings
        wait = settings.max_wait_ms / 1000.0
        hint = (lambda waiting: in_flight() > waiting) if in_flight is not None else None
        common: dict[str, Any] = {
            "max_batch": settings.max_batch,
            "max_wait_s": wait,
            "max_queue": settings.max_queue,
            "metrics": metrics,
            "others_active": hint,
        }
        self.images: MicroBatcher[np.ndarray] = MicroBatcher("image", self._encode_pixels, **common)
        self.texts: MicroBatcher[str] = MicroBatcher("text", self._encode_texts, **common)
        self._pool: ThreadPoolExecutor | None = None
        self._label_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _encode_pixels(self, pixels: list[np.ndarray]) -> np.ndarray:
        return np.asarray(self.model.encode_images(np.stack(pixels)), dtype=np.float32)

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode_texts(list(texts)), dtype=np.float32)

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(
            self.settings.preprocess_threads, thread_name_prefix="clipengine-decode"
        )
        self.images.start()
        self.texts.start()

    async def stop(self) -> None:
        """Finish queued work, then stop the worker threads."""
        await asyncio.gather(self.images.close(), self.texts.close())
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def run_in_pool(self, fn: Any, *args: Any) -> Any:
        """Run blocking work (decode, thumbnails, index search) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _prepare(self, image: NamedImage) -> np.ndarray:
        check_image_header(image, self.settings.max_pixels)
        try:
            return np.asarray(self.model.preprocess(image.data), dtype=np.float32)
        except DecodeError as e:
            raise ApiError(400, "invalid_image", f"{image.name}: {e.reason}") from e
        except (OSError, SyntaxError, ValueError) as e:
            # A header that parsed but pixel data that does not (truncated file, corrupt stream).
            raise ApiError(400, "invalid_image", f"{image.name}: cannot decode ({e})") from e

    async def embed_images(self, images: Sequence[NamedImage]) -> np.ndarray:
        """Encoded images -> (N, D); decode and preprocess run in the pool, the model in the batcher."""
        pixels = await asyncio.gather(*(self.run_in_pool(self._prepare, img) for img in images))
        return await self.images.submit(list(pixels))

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, D) through the text batcher."""
        return await self.texts.submit(list(texts))

    async def label_weights(self, labels: Sequence[str], templates: Sequence[str] | None) -> np.ndarray:
        """Zero-shot classifier weights (C, D): per label, the normalised mean of its template prompts."""
        prompts = dict(zip(labels, label_prompts(labels, templates), strict=True))
        wanted = list(dict.fromkeys(p for ps in prompts.values() for p in ps))
        known = {p: self._label_cache[p] for p in wanted if p in self._label_cache}
        missing = [p for p in wanted if p not in known]
        if missing:
            vectors = await self.embed_texts(missing)
            known.update(zip(missing, vectors, strict=True))
        for prompt in wanted:  # refresh LRU order, add new prompts, evict the oldest
            self._label_cache[prompt] = known[prompt]
            self._label_cache.move_to_end(prompt)
        while len(self._label_cache) > self.settings.label_cache_size:
            self._label_cache.popitem(last=False)
        return mean_unit(np.stack([[known[p] for p in prompts[label]] for label in labels]))

    async def classify(
        self,
        images: Sequence[NamedImage],
        labels: Sequence[str],
        templates: Sequence[str] | None,
        top_k: int | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Per image, (label, probability) sorted by probability descending: the softmax over all the
        labels, of which only the `top_k` most probable are kept (None: all)."""
        image_vectors, weights = await asyncio.gather(
            self.embed_images(images), self.label_weights(labels, templates)
        )
        return rank_labels(image_vectors, weights, float(self.model.logit_scale), labels, top_k)

    async def search(self, index: SearchableIndex, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Top-k (id, score) for one (D,) query vector."""
        started = time.perf_counter()
        hits = await self.run_in_pool(index.search_vectors, query[None, :].astype(np.float32), k)
        log.debug("index search k=%d took %.1f ms", k, (time.perf_counter() - started) * 1e3)
        return [(str(i), float(s)) for i, s in hits[0]]
