"""Read + decode + preprocess images in worker processes, ahead of the backend, into fixed-size Batches.

Workers receive plain data only (ids, paths, the PreprocessConfig as a dict) and return stacked
uint8 crops, which the parent normalises into float32 batches (a quarter of the bytes through the
pool's pipes; the same values as normalising in the worker), so any backend can run in the parent
while the next batches are decoded. Chunks come
back in submission order, so batches are identical whatever the worker count or timing. A bad input
becomes a `Failure(id, reason)` on the batch where it was met; it never ends the run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

from ..errors import DecodeError
from ..image.decode import read_error_reason
from ..types import Batch, Failure, FloatArray, ImageItem
from .decode_pool import BrokenProcessPool, DecodePool, make_executor

if TYPE_CHECKING:
    from ..image.preprocess import PreprocessConfig

__all__ = [
    "LoadStats",
    "default_workers",
    "iter_batches",
    "load_chunk",
    "make_executor",
    "settle",
    "sources_of",
    "submit_chunk",
    "warm_executor",
]

_log = logging.getLogger(__name__)

# Chunks in flight per worker: one being decoded, one waiting, so a worker never idles between chunks.
_PREFETCH_PER_WORKER = 2


@dataclass
class LoadStats:
    """Seconds spent on each loading stage, summed over all workers (CPU cost, not wall time)."""

    read_s: float = 0.0  # reading file bytes
    decode_s: float = 0.0  # bytes -> RGB PIL image
    preprocess_s: float = 0.0  # PIL image -> (3, H, W) float32
    wait_s: float = 0.0  # parent blocked waiting for a decoded chunk (> 0 means the model starved)
    images: int = 0  # items loaded successfully
    failures: int = 0  # items turned into Failure records


@dataclass
class _Chunk:
    """What a worker sends back for one chunk of items: plain, picklable data."""

    ids: list[str]  # successfully loaded, aligned with rows of pixels
    pixels: np.ndarray  # (n, 3, H, W): float32, or uint8 crops with normalise=False
    sizes: list[tuple[int, int]]  # original (width, height) per row
    failures: list[Failure] = field(default_factory=list)
    read_s: float = 0.0
    decode_s: float = 0.0
    preprocess_s: float = 0.0


def default_workers() -> int:
    """The CPU cores this process may use (the default for --workers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def warm_executor(executor: Executor, workers: int, cfg: dict[str, Any]) -> None:
    """Start every worker and import the image modules there, so timings exclude process start-up."""
    for fut in [executor.submit(load_chunk, [], cfg) for _ in range(2 * workers)]:
        fut.result()


@lru_cache(maxsize=4)
def _config_from_json(cfg_json: str) -> PreprocessConfig:
    from ..image.preprocess import PreprocessConfig

    return PreprocessConfig.from_dict(json.loads(cfg_json))


def load_chunk(
    items: Sequence[tuple[str, str | bytes]], cfg: dict[str, Any], fast_decode: bool = False, normalise: bool = True
) -> _Chunk:
    """Read, decode and preprocess `(id, path_or_bytes)` pairs (top-level: runs in spawned workers).

    Args:
        items: ids and sources; a source is a file path or the encoded bytes.
        cfg: `PreprocessConfig.to_dict()`.
        fast_decode: let libjpeg decode large JPEGs at a reduced scale that keeps at least twice
            the model's resolution (several times faster on photos; not bit-exact, see
            docs/tokenizer_preprocess.md). The recorded width/height stay the original ones.
        normalise: float32 model input; False: the uint8 RGB crops before normalisation
            (`image.preprocess.normalise_uint8` turns them into the same float32 values).

    Returns:
        A chunk with the stacked pixels of the good items and a Failure per bad one.
    """
    from ..image.preprocess import draft_size

    config = _config_from_json(json.dumps(cfg, sort_keys=True))  # parsed once per worker
    draft = draft_size(config, fast_decode)
    dtype = np.float32 if normalise else np.uint8
    chunk = _Chunk(ids=[], pixels=np.zeros((0, 3, 0, 0), dtype=dtype), sizes=[])
    rows: list[np.ndarray] = []
    for item_id, source in items:
        try:
            pixels, size = _load_one(item_id, source, config, draft, chunk, normalise)
        except DecodeError as e:
            chunk.failures.append(Failure(item_id, e.reason))
        except OSError as e:
            chunk.failures.append(Failure(item_id, read_error_reason(e)))
        except Exception as e:  # any other per-image error is this image's failure, never the run's
            _log.debug("failed to load %s", item_id, exc_info=True)
            chunk.failures.append(Failure(item_id, f"{type(e).__name__}: {e}"))
        else:
            chunk.ids.append(item_id)
            chunk.sizes.append(size)
            rows.append(pixels)
    if rows:
        chunk.pixels = np.stack(rows)
    return chunk


def _load_one(
    item_id: str,
    source: str | bytes,
    config: PreprocessConfig,
    draft: tuple[int, int] | None,
    chunk: _Chunk,
    normalise: bool = True,
) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> ((3, H, W) pixels, original (width, height)); stage times added to `chunk`."""
    from ..image.decode import open_image, open_image_file_to_read_whole
    from ..image.preprocess import crop_uint8, preprocess_image

    t0 = time.perf_counter()
    if isinstance(source, bytes):
        data = source
    else:
        # Regular files only (a named pipe would block), and a multi-GB one that is no image (a
        # video named .jpg) is refused by its first bytes instead of being read whole.
        with open_image_file_to_read_whole(source, item_id) as f:
            data = f.read()
    t1 = time.perf_counter()
    # open_image keeps the decoded mode: preprocessing resizes before converting to RGB, as
    # OpenAI's transform does (it matters for alpha and palette images).
    image = open_image(data, name=item_id, draft_size=draft)
    size = (int(image.width), int(image.height)) if draft is None else _original_size(data, image)
    t2 = time.perf_counter()
    pixels = np.asarray(preprocess_image(image, config), dtype=np.float32) if normalise else crop_uint8(image, config)
    chunk.read_s += t1 - t0
    chunk.decode_s += t2 - t1
    chunk.preprocess_s += time.perf_counter() - t2
    return pixels, size


def _original_size(data: bytes, decoded: Image.Image) -> tuple[int, int]:
    """(width, height) before a reduced-scale JPEG decode, oriented like `decoded` (EXIF rotation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_image already checked
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            w, h = header.size
    return (w, h) if (decoded.width >= decoded.height) == (w >= h) else (h, w)


def _source(item: ImageItem) -> tuple[str, str | bytes]:
    """What a worker task carries for an item: its id and its path (as a str) or bytes."""
    return item.id, item.source if isinstance(item.source, bytes) else os.fspath(item.source)


def sources_of(items: Iterable[ImageItem]) -> list[tuple[str, str | bytes]]:
    """`(id, path_or_bytes)` pairs for `load_chunk`: plain data a worker process can take."""
    return [_source(item) for item in items]


def _chunks(items: Iterable[ImageItem], size: int) -> Iterator[list[tuple[str, str | bytes]]]:
    chunk: list[tuple[str, str | bytes]] = []
    for item in items:
        chunk.append(_source(item))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _loaded_chunks(
    items: Iterable[ImageItem],
    cfg: dict[str, Any],
    chunk_size: int,
    executor: Executor | None,
    prefetch: int,
    stats: LoadStats,
    fast_decode: bool,
) -> Iterator[_Chunk]:
    """Chunks of uint8 crops in input order; with an executor, up to `prefetch` are decoded ahead."""
    source = _chunks(items, chunk_size)
    if executor is None:
        for chunk in source:
            yield load_chunk(chunk, cfg, fast_decode, False)
        return
    pending: deque[Task] = deque()
    try:
        for chunk in source:
            pending.append(submit_chunk(executor, chunk, cfg, fast_decode))
            if len(pending) >= prefetch:
                yield _result(executor, pending.popleft(), stats)
        while pending:
            yield _result(executor, pending.popleft(), stats)
    finally:
        for task in pending:  # consumer stopped early (error or interrupt): drop queued work
            task.future.cancel()


def _result(executor: Executor, task: Task, stats: LoadStats) -> _Chunk:
    t0 = time.perf_counter()
    chunk = settle(executor, task)
    stats.wait_s += time.perf_counter() - t0
    return chunk


class Task(NamedTuple):
    """A chunk queued on the decode workers: what `load_chunk` was asked, and its future."""

    pairs: list[tuple[str, str | bytes]]
    cfg: dict[str, Any]
    fast_decode: bool
    future: Future[_Chunk]


def submit_chunk(
    executor: Executor, pairs: list[tuple[str, str | bytes]], cfg: dict[str, Any], fast_decode: bool
) -> Task:
    """Queue `load_chunk(pairs, cfg, fast_decode, normalise=False)` (uint8 crops) on `executor`."""
    return Task(pairs, cfg, fast_decode, executor.submit(load_chunk, pairs, cfg, fast_decode, False))


def settle(executor: Executor, task: Task) -> _Chunk:
    """The task's chunk. If a worker process died meanwhile (on one of these files, or on another
    task's: the pool cannot tell), the files are decoded again in a process of their own, all at
    once and then, if that process dies too, one at a time: the file that kills its process becomes
    that file's Failure and the others are kept (`decode_pool`)."""
    try:
        return task.future.result()
    except BrokenProcessPool:
        if not isinstance(executor, DecodePool):
            raise
    _log.warning("a decode worker process died; decoding its %d files again, apart", len(task.pairs))
    with executor.solo() as solo:
        ok, chunk = solo.run(load_chunk, task.pairs, task.cfg, task.fast_decode, False)
        if ok and chunk is not None:
            return chunk
        parts: list[_Chunk] = []
        for item_id, source in task.pairs:
            ok, part = solo.run(load_chunk, [(item_id, source)], task.cfg, task.fast_decode, False)
            if ok and part is not None:
                parts.append(part)
            else:
                _log.warning("%s killed its decode process; it is listed as a failure", item_id)
                parts.append(_Chunk([], np.zeros((0, 3, 0, 0), dtype=np.uint8), [], [Failure(item_id, _KILLED)]))
    return _joined(parts)


# Why a file that kills its decode process (`settle`) failed: seen as the process' sudden end.
_KILLED = "decoding it ended the decoder process (a crash in a decoding library, or out of memory)"


def _joined(parts: list[_Chunk]) -> _Chunk:
    """Chunks of consecutive files as one, in order (each holds one file here)."""
    rows = [p.pixels for p in parts if p.ids]
    return _Chunk(
        ids=[i for p in parts for i in p.ids],
        pixels=np.concatenate(rows) if rows else np.zeros((0, 3, 0, 0), dtype=np.uint8),
        sizes=[size for p in parts for size in p.sizes],
        failures=[f for p in parts for f in p.failures],
        read_s=sum(p.read_s for p in parts),
        decode_s=sum(p.decode_s for p in parts),
        preprocess_s=sum(p.preprocess_s for p in parts),
    )


def iter_batches(
    items: Iterable[ImageItem],
    preprocess_cfg: PreprocessConfig | dict[str, Any],
    batch_size: int = 32,
    *,
    executor: Executor | None = None,
    workers: int = 0,
    chunk_size: int | None = None,
    stats: LoadStats | None = None,
    fast_decode: bool = False,
) -> Iterator[Batch]:
    """Decode + preprocess `items` into Batches of exactly `batch_size` good images (the last may be short).

    Failed items do not shrink a batch: later images fill it, and each Failure rides on the batch
    being filled when it was met (a final batch may hold only failures and zero rows).

    Args:
        items: what to load, in order.
        preprocess_cfg: a PreprocessConfig or its `to_dict()`; sent to workers as plain data.
        batch_size: rows per Batch.
        executor: a process pool to decode in (see `make_executor`); shared across calls by callers
            that run many partitions. If None, `workers` > 0 creates one for this call.
        workers: used only when `executor` is None; 0 decodes in this process.
        chunk_size: items per worker task (default: `batch_size`, clamped to 4..64).
        stats: filled in with stage timings and counts.
        fast_decode: reduced-scale JPEG decoding (see `load_chunk`).

    Yields:
        Batch(ids, pixels (n, 3, H, W) float32, sizes (width, height), failures).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = preprocess_cfg if isinstance(preprocess_cfg, dict) else preprocess_cfg.to_dict()
    stats = stats if stats is not None else LoadStats()
    chunk_size = chunk_size or max(4, min(batch_size, 64))
    own = executor is None and workers > 0
    pool = make_executor(workers) if own else executor
    n_workers = getattr(pool, "_max_workers", 1) if pool is not None else 0
    prefetch = max(2, _PREFETCH_PER_WORKER * n_workers)
    try:
        yield from _rebatch(
            _loaded_chunks(items, cfg, chunk_size, pool, prefetch, stats, fast_decode),
            batch_size,
            stats,
            _config_from_json(json.dumps(cfg, sort_keys=True)),
        )
    finally:
        if own and pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _rebatch(chunks: Iterable[_Chunk], batch_size: int, stats: LoadStats, config: PreprocessConfig) -> Iterator[Batch]:
    from ..image.preprocess import normalise_uint8

    ids: list[str] = []
    rows: list[FloatArray] = []
    sizes: list[tuple[int, int]] = []
    failures: list[Failure] = []
    n_rows = 0
    for chunk in chunks:
        stats.read_s += chunk.read_s
        stats.decode_s += chunk.decode_s
        stats.preprocess_s += chunk.preprocess_s
        stats.images += len(chunk.ids)
        stats.failures += len(chunk.failures)
        failures.extend(chunk.failures)
        if chunk.ids:
            t0 = time.perf_counter()
            rows.append(normalise_uint8(chunk.pixels, config))  # in this process: see the module doc
            stats.preprocess_s += time.perf_counter() - t0
            ids.extend(chunk.ids)
            sizes.extend(chunk.sizes)
            n_rows += len(chunk.ids)
        while n_rows >= batch_size:
            pixels = np.concatenate(rows) if len(rows) > 1 else rows[0]
            yield Batch(ids[:batch_size], pixels[:batch_size], sizes[:batch_size], failures)
            ids, sizes, failures = ids[batch_size:], sizes[batch_size:], []
            rest = pixels[batch_size:]
            rows = [rest] if len(rest) else []
            n_rows -= batch_size
    if n_rows or failures:
        pixels = np.concatenate(rows) if rows else np.zeros((0, 3, 0, 0), dtype=np.float32)
        yield Batch(ids, pixels, sizes, failures)
