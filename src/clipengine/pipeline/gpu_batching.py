"""Files -> batches of preprocessed pixels on the GPU: read, decode in large calls, preprocess, cut.

Reader threads read files and check their headers (`image.gpu_decode.inspect_encoded`) a few
groups ahead; each group is decoded in calls of a bounded number of pixels
(`image.gpu_decode.GpuJpegDecoder`), preprocessed on the device (`image.gpu_preprocess`), and cut
into batches of the model's size. The GPU counterpart of `pipeline.batching` (CPU decode
workers); `pipeline.gpu_loading` runs it for `embed --gpu-decode`. torch is imported inside
functions: importing this module does not need it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from clipengine.errors import DecodeError
from clipengine.image.decode import open_image_file_to_read_whole, read_error_reason
from clipengine.image.gpu_decode import Decoded, EncodedImage, GpuDecodeStats, GpuJpegDecoder, inspect_encoded
from clipengine.image.gpu_preprocess import preprocess_tensors
from clipengine.image.preprocess import PreprocessConfig
from clipengine.types import Failure, ImageItem

if TYPE_CHECKING:
    import torch

    from clipengine.pipeline.batching import Task
    from clipengine.pipeline.cpu_assist import CpuAssist

__all__ = [
    "DecodedChunk",
    "GpuBatch",
    "assemble_batches",
    "default_decode_group",
    "iter_decoded_chunks",
    "iter_gpu_batches",
]

_DECODE_GROUP = 256  # default smallest number of files per decode call (see `iter_gpu_batches`)
# At most this many decoded pixels per decode call (1.5 GB as RGB uint8 on the device): 256
# 1280x960 photos fit in one call, 12 MP ones go 42 at a time, so small GPUs are not flooded.
_DECODE_PIXELS = 512_000_000
_READ_SLICE = 32  # most files per reader-thread task (see `_read_ahead`)


class GpuBatch(NamedTuple):
    """Preprocessed images on the device; ids align with rows of pixels."""

    ids: list[str]
    pixels: torch.Tensor  # (n, 3, S, S) on the decoder's device
    failures: list[Failure]  # inputs met while filling this batch that could not be used
    sizes: list[tuple[int, int]]  # original (width, height) per row, EXIF-oriented


def _read(item: ImageItem) -> EncodedImage | Failure:
    """Runs on a reader thread: file bytes plus the header check, or the read error as a Failure."""
    if isinstance(item.source, bytes):
        return inspect_encoded(item.id, item.source)
    try:
        # np.fromfile: no zero-filled buffer, and the read runs without the GIL, so reader threads
        # scale (550 kB files, 2 cores: 10k files/s on 2 threads vs 2.1k with bytearray + readinto,
        # which did not scale); torch.from_numpy then wraps it without a copy. Opened through
        # `open_image_file_to_read_whole`: regular files only (a named pipe named like a JPEG
        # blocked forever), and a multi-GB one that is no image is refused before it is read.
        with open_image_file_to_read_whole(item.source, item.id) as f:
            data = np.fromfile(f, dtype=np.uint8)
    except DecodeError as e:
        return Failure(item.id, e.reason)
    except OSError as e:
        return Failure(item.id, read_error_reason(e))
    except Exception as e:  # e.g. a NUL byte in a listed path: this file's failure, as in the CPU loader
        return Failure(item.id, f"{type(e).__name__}: {e}")
    return inspect_encoded(item.id, data)


def iter_gpu_batches(
    items: Iterable[ImageItem],
    cfg: PreprocessConfig,
    device: str | torch.device = "cuda",
    batch_size: int = 256,
    *,
    read_threads: int = 2,
    prefetch_batches: int = 2,
    out_dtype: torch.dtype | None = None,
    decoder: GpuJpegDecoder | None = None,
    decode_group: int | None = None,
    assist: CpuAssist | None = None,
) -> Iterator[GpuBatch]:
    """Files -> batches of preprocessed pixels on the GPU, exactly `batch_size` rows (the last may be short).

    Reader threads read and inspect up to `prefetch_batches` groups of files ahead; this thread
    decodes and preprocesses (GPU work is queued asynchronously, so it overlaps the consumer's
    model as long as the consumer does not synchronise on every batch). As in
    `pipeline.batching.iter_batches`, failures do not shrink a batch: later images fill it, and each
    Failure rides on the batch being filled when it was met.

    The two stages are `iter_decoded_chunks` and `assemble_batches`; `pipeline.gpu_loading` can
    run them on threads of their own.

    Args:
        items: what to load, in order (ids are kept in this order).
        cfg: the model's preprocessing settings.
        device: where pixels are decoded and returned (ignored when `decoder` is given).
        batch_size: rows per batch.
        read_threads: threads reading files and parsing JPEG headers, in slices of up to 32
            files per task. More is slower from page cache: they hold the GIL for the header
            parse and starve this thread, which issues the GPU work (H200, 16 cores, 4096
            1280x960 JPEGs, twice each, one file per task: 1 thread 3.8-3.9k img/s, 2: 4.7-4.9k,
            4: 3.8-4.0k, 8: 4.0-4.5k, 16: 3.9k). Network storage with high latency may want more.
        prefetch_batches: groups of files read ahead of the decoder.
        out_dtype: pixel dtype (float32 when None); float16 halves the memory traffic for an fp16 model.
        decoder: a decoder to use (its `stats` fill in); default a new `GpuJpegDecoder(device)`.
        decode_group: files per decode call (default `max(batch_size, 256)`): nvjpeg's batched
            decode gets faster with larger calls (H200, 1280x960: 7,549 img/s at 64 per call,
            8,062 at 1024) and each call has a fixed cost (a stream wait), so small model batches
            (the CLI's default 32) are cut from larger decoded groups. A group is decoded in
            chunks of at most `_DECODE_PIXELS` header pixels, which bounds the device memory of
            full-size images held at once.
        assist: CPU decode workers taking a share of the files (`pipeline.cpu_assist`); None: the
            GPU decodes every file it can.

    Yields:
        GpuBatch(ids, pixels, failures, sizes).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    decoder = decoder if decoder is not None else GpuJpegDecoder(device)
    group_size = decode_group if decode_group is not None else default_decode_group(batch_size)
    chunks = iter_decoded_chunks(items, cfg, decoder, group_size=group_size, read_threads=read_threads,
                                 prefetch_groups=prefetch_batches, assist=assist)  # fmt: skip
    return _closing(assemble_batches(chunks, cfg, decoder, batch_size, out_dtype=out_dtype), chunks)


def _closing(batches: Iterator[GpuBatch], chunks: Iterator[DecodedChunk]) -> Iterator[GpuBatch]:
    """`batches`, with `chunks` (and so the reader threads) closed however they end. An error raised
    in `assemble_batches` keeps its frame, which holds `chunks`, alive for as long as the caller
    holds the error: without this the reader threads would go on reading until it is dropped."""
    try:
        yield from batches
    finally:
        close = getattr(chunks, "close", None)  # a generator (`iter_decoded_chunks`)
        if close is not None:
            close()


def default_decode_group(batch_size: int) -> int:
    """Files per decode call for a model batch of `batch_size` (see `iter_gpu_batches`)."""
    return max(batch_size, _DECODE_GROUP)


class DecodedChunk(NamedTuple):
    """One decode call's result, in input order, and where it sits in its group of files."""

    decoded: Decoded  # full-size images on the device (or S x S ones the CPU decoder resized)
    unread: list[Failure]  # files of the group that could not be read (on the group's first chunk)
    group_order: dict[str, int] | None  # on the group's last chunk only: each id's input position


def iter_decoded_chunks(
    items: Iterable[ImageItem],
    cfg: PreprocessConfig,
    decoder: GpuJpegDecoder,
    *,
    group_size: int = _DECODE_GROUP,
    read_threads: int = 2,
    prefetch_groups: int = 2,
    assist: CpuAssist | None = None,
) -> Iterator[DecodedChunk]:
    """Stage 1 of `iter_gpu_batches`: files -> decode calls.

    Reader threads read `prefetch_groups` groups of `group_size` files ahead; each group is
    decoded in chunks of at most `_DECODE_PIXELS` header pixels, so one chunk's full-size images
    are on the device at a time (plus what the next stage still holds). With `assist`, the files
    it takes go to its CPU workers when their group is read, and come back as the group's last
    chunk (so within a group they follow the GPU's images; `run` writes shards in input order).
    """
    if group_size < 1:
        raise ValueError(f"decode_group must be >= 1, got {group_size}")
    stats = decoder.stats
    groups = _read_ahead(items, group_size, max(1, read_threads), max(1, prefetch_groups), stats, assist)
    for group in groups:
        unread = [r for r in group.read if isinstance(r, Failure)]
        stats.failures += len(unread)
        order = {item_id: i for i, item_id in enumerate(group.ids)}
        parts: list[Callable[[], Decoded]] = [
            partial(decoder.decode, chunk, cfg)
            for chunk in _pixel_chunks([r for r in group.read if isinstance(r, EncodedImage)], _DECODE_PIXELS)
        ]
        if assist is not None and group.assisted:
            parts.append(partial(assist.collect, group.assisted, decoder.device, stats))
        if not parts:  # nothing readable: the group still reports its failures
            parts.append(lambda: Decoded([], [], [], []))
        for i, decode in enumerate(parts):  # each part decoded when its turn comes: one on the device at a time
            last = i == len(parts) - 1
            yield DecodedChunk(decode(), unread if i == 0 else [], order if last else None)


def assemble_batches(
    chunks: Iterable[DecodedChunk],
    cfg: PreprocessConfig,
    decoder: GpuJpegDecoder,
    batch_size: int,
    *,
    out_dtype: torch.dtype | None = None,
) -> Iterator[GpuBatch]:
    """Stage 2 of `iter_gpu_batches`: decoded chunks -> preprocessed batches of `batch_size` rows.

    `decoder` gives the device and the stats (`preprocess_s`). A group's batches are yielded once
    its last chunk is in, with the group's failures in input order.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = decoder.stats
    ids: list[str] = []
    sizes: list[tuple[int, int]] = []
    pieces: list[torch.Tensor] = []
    failures: list[Failure] = []
    met: list[Failure] = []
    for decoded, unread, group_order in chunks:
        met += unread
        met += decoded.failures
        if decoded.ids:
            t0 = time.perf_counter()
            pieces.append(preprocess_tensors(decoded.images, cfg, out_dtype=out_dtype))
            stats.preprocess_s += time.perf_counter() - t0
            ids.extend(decoded.ids)
            sizes.extend(decoded.sizes)
        del decoded  # the full-size images: freed once preprocessed
        if group_order is None:
            continue
        failures.extend(sorted(met, key=lambda f: group_order.get(f.id, 0)))
        met = []
        while len(ids) >= batch_size:
            pixels = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            yield GpuBatch(ids[:batch_size], pixels[:batch_size], failures, sizes[:batch_size])
            ids, failures, sizes = ids[batch_size:], [], sizes[batch_size:]
            pieces = [pixels[batch_size:]] if ids else []
    if ids or failures or met:
        empty = (0, 3, cfg.image_size, cfg.image_size)
        pixels = torch.cat(pieces) if pieces else torch.empty(empty, dtype=out_dtype, device=decoder.device)
        yield GpuBatch(ids, pixels, failures + met, sizes)


def _pixel_chunks(encoded: list[EncodedImage], budget: int) -> Iterator[list[EncodedImage]]:
    """Consecutive runs of `encoded` whose header pixel counts add up to at most `budget` (one
    image at least): what one decode call may hold on the device at full size."""
    chunk: list[EncodedImage] = []
    total = 0
    for e in encoded:
        if chunk and total + e.pixels > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(e)
        total += e.pixels
    if chunk:
        yield chunk


class _ReadGroup(NamedTuple):
    """One group of files, read ahead of its decode."""

    ids: list[str]  # every file of the group, in input order
    read: list[EncodedImage | Failure]  # the files the GPU decoder takes, read and inspected
    assisted: list[Task]  # the CPU assist workers' tasks for the others


class _ReadSlice(NamedTuple):
    """What a reader task returns: the files for the GPU decoder, its seconds, and the tasks that
    took the files nvjpeg cannot decode to the CPU workers."""

    read: list[EncodedImage | Failure]
    seconds: float
    handed: list[Task]


class _PendingGroup(NamedTuple):
    ids: list[str]
    reads: list[Future[_ReadSlice]]
    assisted: list[Task]


def _read_ahead(
    items: Iterable[ImageItem],
    group_size: int,
    threads: int,
    prefetch: int,
    stats: GpuDecodeStats,
    assist: CpuAssist | None = None,
) -> Iterator[_ReadGroup]:
    """Groups of `group_size` files in input order, with up to `prefetch` groups in flight.

    Each reader task reads a slice of a group, not one file: a thread-pool task costs tens of
    microseconds of GIL-held bookkeeping and a thread wake-up, which per file capped the loader's
    host side below the decoder's rate (see `_read_slice_size`). The files `assist` takes are not
    read here: its workers read them. With `assist`, the files nvjpeg cannot decode (PNG, CMYK, ...)
    go to its workers too, from the reader threads, a few groups ahead of their decode.
    """
    slice_size = _read_slice_size(group_size, threads)
    pending: deque[_PendingGroup] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="clipengine-read") as pool:
        try:
            for group in _batched(items, group_size):
                on_gpu, on_cpu = group, []
                if assist is not None:
                    on_cpu = [item for item in group if assist.takes(item.id)]
                    on_gpu = [item for item in group if not assist.takes(item.id)] if on_cpu else group
                reads = [pool.submit(_read_slice, on_gpu[i : i + slice_size], assist)
                         for i in range(0, len(on_gpu), slice_size)]  # fmt: skip
                assisted = assist.submit(on_cpu) if assist is not None else []
                pending.append(_PendingGroup([item.id for item in group], reads, assisted))
                if len(pending) > prefetch:
                    yield _collect(pending.popleft(), stats)
            while pending:
                yield _collect(pending.popleft(), stats)
        finally:
            for group_left in pending:  # consumer stopped early: drop work not yet started
                for fut in group_left.reads:
                    fut.cancel()
                for task in group_left.assisted:
                    task.future.cancel()


def _read_slice_size(group_size: int, threads: int) -> int:
    """Files per reader task: at least 4 tasks per thread in a group (so threads share the work and
    the first results come early), at most 32 files (about 7 MB of 1280x960 JPEGs)."""
    return max(1, min(_READ_SLICE, -(-group_size // (4 * threads))))


def _read_slice(items: Sequence[ImageItem], assist: CpuAssist | None = None) -> _ReadSlice:
    """Runs on a reader thread: `_read` for each item, and the seconds it took. With `assist`, the
    files nvjpeg cannot decode go to its workers (one task for the slice's), not to this loader's
    thread, whose CPU decode of them would stall the GPU: with every 10th file a 1280x960 PNG, an
    emulated 8k img/s loader fell from 3.9k to 230 img/s (docs/performance.md, session 9)."""
    t0 = time.perf_counter()
    read = [_read(item) for item in items]
    handed: list[Task] = []
    if assist is not None:
        cpu = {r.id for r in read if isinstance(r, EncodedImage) and not r.nvjpeg}
        if cpu:
            handed = assist.submit([item for item in items if item.id in cpu])
            read = [r for r in read if r.id not in cpu]
    return _ReadSlice(read, time.perf_counter() - t0, handed)


def _batched(items: Iterable[ImageItem], size: int) -> Iterator[list[ImageItem]]:
    group: list[ImageItem] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _collect(group: _PendingGroup, stats: GpuDecodeStats) -> _ReadGroup:
    results: list[EncodedImage | Failure] = []
    handed: list[Task] = []
    for fut in group.reads:
        done = fut.result()
        stats.read_s += done.seconds
        results.extend(done.read)
        handed.extend(done.handed)
    return _ReadGroup(group.ids, results, group.assisted + handed)
