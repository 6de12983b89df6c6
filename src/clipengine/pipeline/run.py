"""Run the pipeline: one partition (`run_partition`, reused by distributed engines) or a whole folder (`embed_folder`)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..types import Backend, Batch, Failure, FloatArray, ImageItem
from .batching import LoadStats, default_workers, iter_batches, make_executor
from .cpu_assist import CpuAssist, default_assist_workers
from .embed import BackendSource, LazyBackend, embed_batch
from .run_settings import check_compatible, check_cpu_share, check_output, model_files
from .sinks import RUN_FILE, ShardSink, atomic_write_json, read_run_info
from .sources import Partition, check_unique_ids, list_items, partitions
from .stats import RunStats

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from ..image.preprocess import PreprocessConfig

__all__ = ["ProgressCallback", "RunStats", "check_output", "embed_folder", "run_partition"]

_log = logging.getLogger(__name__)

ProgressCallback = Callable[[int], None]  # called with the number of items just finished (embedded or failed)


def run_partition(
    items: Sequence[ImageItem],
    backend: BackendSource | LazyBackend,
    sink: ShardSink,
    *,
    partition_id: int,
    preprocess_cfg: PreprocessConfig | dict[str, Any],
    batch_size: int = 32,
    workers: int = 0,
    executor: Executor | None = None,
    progress: ProgressCallback | None = None,
    skip_complete: bool = True,
    fast_decode: bool = False,
    gpu_decode: str | None = None,
    gpu_decoder: str = "torchvision",
    gpu_read_threads: int = 2,
) -> RunStats:
    """Embed one partition and write its shard (idempotent: a complete shard is kept, not recomputed).

    Args:
        items: the partition's items, in order (see `sources.partitions`).
        backend: a Backend, or a zero-argument factory building one (built only if work is needed).
        sink: where the shard goes.
        partition_id: names the shard (``part-<id>``).
        preprocess_cfg: the model's PreprocessConfig, or its `to_dict()`.
        batch_size: images per backend call.
        workers: decode processes when `executor` is None (0: decode in this process).
        executor: a shared process pool (see `batching.make_executor`).
        progress: called with the number of items finished after each batch.
        skip_complete: keep an existing valid shard instead of recomputing it.
        fast_decode: reduced-scale JPEG decoding (faster on large photos, not bit-exact).
        gpu_decode: a CUDA device ("cuda", "cuda:1"): decode JPEGs with nvjpeg and preprocess on
            that GPU instead of in CPU workers (`pipeline.gpu_loading`); the backend must accept
            device tensors (the torch backend on that device). The resize is bit-exact; the
            decoders differ from libjpeg on 4:2:0 chroma (see docs).
        gpu_decoder: with `gpu_decode`, the JPEG decoder: "torchvision" (nvjpeg through
            torchvision) or "nvimgcodec" (NVIDIA nvImageCodec; closer to the exact path's pixels).
        gpu_read_threads: with `gpu_decode`, threads reading files and parsing JPEG headers.

    Returns:
        RunStats for this partition.

    Raises:
        DatasetError: an id is listed twice (rows are routed to their shard by id).

    Example:
        >>> stats = run_partition(items, make_backend, ShardSink("out"), partition_id=3,
        ...                       preprocess_cfg=cfg.to_dict())  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    lazy = backend if isinstance(backend, LazyBackend) else LazyBackend(backend)
    stats = RunStats(images=len(items))
    expected = [item.id for item in items]
    dim = lazy.get().embed_dim if lazy.loaded else None
    if skip_complete and sink.is_complete(partition_id, expected, embed_dim=dim):
        stats.skipped, stats.shards_skipped = len(items), 1
        if progress is not None:
            progress(len(items))
        stats.wall_s = time.perf_counter() - t_start
        return stats

    loading = _Loading(preprocess_cfg, batch_size, workers=workers, executor=executor, fast_decode=fast_decode,
                       gpu_decode=gpu_decode, gpu_decoder=gpu_decoder, gpu_read_threads=gpu_read_threads)  # fmt: skip
    _embed_partitions([Partition(partition_id, tuple(items))], lazy, sink, stats, loading, progress)
    stats.wall_s = time.perf_counter() - t_start
    return stats


@dataclass(frozen=True)
class _Loading:
    """How images are loaded: CPU decode workers (`batching`) or the GPU loader (`gpu_loading`)."""

    preprocess_cfg: PreprocessConfig | dict[str, Any]
    batch_size: int
    workers: int = 0
    executor: Executor | None = None
    fast_decode: bool = False
    gpu_decode: str | None = None
    gpu_decoder: str = "torchvision"
    gpu_read_threads: int = 2
    gpu_decode_ahead: bool = False
    gpu_cpu_share: float = 0.0  # with gpu_decode: the share of files `executor` decodes (`cpu_assist`)

    def batches(self, items: Sequence[ImageItem], stats: LoadStats) -> Iterator[Batch]:
        if self.gpu_decode is not None:
            from .gpu_loading import iter_gpu_loaded

            return iter_gpu_loaded(items, self.preprocess_cfg, self.batch_size, self.gpu_decode, stats,
                                   decoder=self.gpu_decoder, read_threads=self.gpu_read_threads,
                                   decode_ahead=self.gpu_decode_ahead, assist=self._assist())  # fmt: skip
        return iter_batches(items, self.preprocess_cfg, self.batch_size, executor=self.executor,
                            workers=self.workers, stats=stats, fast_decode=self.fast_decode)  # fmt: skip

    def _assist(self) -> CpuAssist | None:
        """The GPU loader's CPU workers: the files nvjpeg cannot decode, and `gpu_cpu_share`."""
        if self.executor is None:  # workers=0: those files are decoded on the loader's thread
            if self.gpu_cpu_share > 0:  # `embed_folder` refuses this earlier (`run_settings.check_cpu_share`)
                raise ValueError("a CPU share of the GPU decode needs decode worker processes (workers >= 1)")
            return None
        cfg = self.preprocess_cfg if isinstance(self.preprocess_cfg, dict) else self.preprocess_cfg.to_dict()
        assist = CpuAssist(self.executor, self.workers, self.gpu_cpu_share, cfg, fast_decode=self.fast_decode)
        if self.gpu_cpu_share > 0:  # workers needed from the first group: start them now
            assist.prime()
        return assist


@dataclass
class _OpenShard:
    """A partition whose rows and failures are still arriving (a batch may hold the end of one
    partition and the start of the next)."""

    remaining: int  # items not yet embedded or failed
    ids: list[str] = field(default_factory=list)
    blocks: list[FloatArray] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def add_rows(self, ids: Sequence[str], vectors: FloatArray, sizes: Sequence[tuple[int, int]]) -> None:
        self.ids.extend(ids)
        self.blocks.append(vectors)
        self.sizes.extend(sizes)
        self.remaining -= len(ids)

    def add_failure(self, failure: Failure) -> None:
        self.failures.append(failure)
        self.remaining -= 1


def _runs_by_partition(ids: Sequence[str], owner: dict[str, int]) -> Iterator[tuple[int, int, int]]:
    """(partition id, start, end) for each run of consecutive rows of one partition: rows come in
    input order, so each partition's rows in a batch are consecutive."""
    start = 0
    while start < len(ids):
        pid = owner[ids[start]]
        end = start + 1
        while end < len(ids) and owner[ids[end]] == pid:
            end += 1
        yield pid, start, end
        start = end


def _embed_partitions(
    parts: Sequence[Partition],
    lazy: LazyBackend,
    sink: ShardSink,
    stats: RunStats,
    loading: _Loading,
    progress: ProgressCallback | None,
) -> None:
    """Embed `parts` through one loader, writing each shard as soon as all its items are in.

    One loader for all partitions, not one per partition: the decode pipeline (CPU workers or the
    GPU loader) fills once and stays full across shard boundaries instead of draining and refilling
    at each. Emulated GPU loader (benchmarks/gpu_loader_host.py --embed-folder, 8192 files): 9
    shards of 1000 ran at 3.9-4.4k img/s with a loader per shard, 5.3k with one (one shard: 5.1-5.3k).
    On 2 CPU cores, 96-image shards: the model's wait for images fell from 9.3 to 2.3 ms per image.
    """
    owner = {item.id: part.id for part in parts for item in part.items}
    position = {item.id: i for part in parts for i, item in enumerate(part.items)}
    items = [item for part in parts for item in part.items]
    if len(owner) < len(items):  # rows are routed to their shard by id
        check_unique_ids(items)
    shards = {part.id: _OpenShard(remaining=len(part.items)) for part in parts}
    for part in parts:
        if not part.items:  # no row or failure will come for it (`run_partition` of no items)
            _write_shard(sink, part.id, shards.pop(part.id), lazy, stats, position)
    loads = LoadStats()
    batches = loading.batches(items, loads)
    try:
        for batch in batches:
            touched: set[int] = set()
            for failure in batch.failures:
                shards[owner[failure.id]].add_failure(failure)
                touched.add(owner[failure.id])
            if batch.ids:
                model = _get_backend(lazy, stats)
                t0 = time.perf_counter()
                emb = embed_batch(model, batch)
                stats.infer_s += time.perf_counter() - t0
                stats.batch_sizes.append(len(emb.ids))
                for pid, start, end in _runs_by_partition(emb.ids, owner):
                    shards[pid].add_rows(emb.ids[start:end], emb.vectors[start:end], batch.sizes[start:end])
                    touched.add(pid)
            for pid in sorted(touched):
                if shards[pid].remaining == 0:
                    _write_shard(sink, pid, shards.pop(pid), lazy, stats, position)
            if progress is not None:
                progress(len(batch.ids) + len(batch.failures))
    finally:
        # Closed here, not when the caller drops an error whose traceback holds the loader: its
        # reader and prefetch threads would go on reading until then.
        close = getattr(batches, "close", None)  # the loaders are generators
        if close is not None:
            close()
    if shards:  # the loaders account for every item; a gap here is a bug, not bad input
        raise RuntimeError(f"the loader did not return every item of partition(s) {sorted(shards)}")
    stats.read_s, stats.decode_s, stats.preprocess_s = loads.read_s, loads.decode_s, loads.preprocess_s
    stats.wait_s = loads.wait_s


def _write_shard(
    sink: ShardSink, partition_id: int, shard: _OpenShard, lazy: LazyBackend, stats: RunStats, position: dict[str, int]
) -> None:
    """Write a complete shard, its rows and failures in input order (`position`: each id's index in
    its partition) whatever order the loader delivered them in (CPU assist workers return their
    share of a decode group after the GPU's)."""
    dim = _get_backend(lazy, stats).embed_dim
    vectors = np.concatenate(shard.blocks) if shard.blocks else np.zeros((0, dim), dtype=np.float32)
    ids, sizes = shard.ids, shard.sizes
    rows = [position[i] for i in ids]
    if any(b < a for a, b in itertools.pairwise(rows)):
        order = np.argsort(rows, kind="stable")
        ids, sizes, vectors = [ids[k] for k in order], [sizes[k] for k in order], vectors[order]
    failures = sorted(shard.failures, key=lambda f: position[f.id])
    stats.write_s += sink.write(partition_id, ids, vectors, sizes, failures)
    stats.embedded += len(shard.ids)
    stats.failed += len(shard.failures)
    stats.shards_written += 1


def _get_backend(lazy: LazyBackend, stats: RunStats) -> Backend:
    if lazy.loaded:
        return lazy.get()
    t0 = time.perf_counter()
    backend = lazy.get()
    stats.load_s += time.perf_counter() - t0
    return backend


def embed_folder(
    source: str | Path | Sequence[ImageItem],
    out_dir: str | Path,
    backend_factory: BackendSource,
    preprocess_cfg: PreprocessConfig | dict[str, Any],
    *,
    model: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    shard_size: int = 1000,
    dtype: str = "float16",
    progress: ProgressCallback | None = None,
    source_label: str | None = None,
    fast_decode: bool = False,
    gpu_decode: str | None = None,
    gpu_decoder: str = "torchvision",
    gpu_read_threads: int = 2,
    gpu_decode_ahead: bool = False,
    gpu_cpu_share: float = 0.0,
    retry_failed: bool = False,
) -> RunStats:
    """Embed every image of a folder or file list into ``out_dir`` (see `sinks` for the layout).

    Re-running on the same ``out_dir`` resumes: complete shards are kept, the partitions that were
    still being filled when the run stopped are recomputed, and failures are merged without duplicates.
    With `retry_failed`, complete shards that list failures are recomputed too (files fixed since).

    Args:
        source: a folder (walked recursively), a file list, or ImageItems.
        out_dir: output folder; created if needed.
        backend_factory: zero-argument callable returning a Backend (or a Backend); built lazily.
        preprocess_cfg: the model's PreprocessConfig (or its dict).
        model: the model's name, recorded in run.json; a resume with another model is refused.
        batch_size: images per backend call.
        workers: decode processes (default: one per core; with `gpu_decode` the cores less four,
            for the files nvjpeg cannot decode and the CPU share; 0 decodes in this process).
        shard_size: images per partition / shard.
        dtype: "float16" or "float32" on disk.
        progress: called with the number of items finished, as they finish.
        source_label: what run.json records as the source when `source` is a list of items.
        fast_decode: reduced-scale JPEG decoding (faster on large photos, not bit-exact); a resume
            must use the same setting.
        gpu_decode: a CUDA device: nvjpeg decode + GPU preprocessing (see `run_partition`); no CPU
            decode workers are started. A resume must use the same decode mode.
        gpu_decoder: with `gpu_decode`: "torchvision" or "nvimgcodec" (see `run_partition`); a
            resume must use the same one.
        gpu_read_threads: with `gpu_decode`, threads reading files and parsing JPEG headers (2
            measured best from local storage on an H200 machine; more for high-latency storage).
        gpu_decode_ahead: experimental: with `gpu_decode`, the decode calls run on a thread of
            their own (`gpu_loading.iter_gpu_loaded`'s `decode_ahead`; the same batches, bit for
            bit). Off: on an H200 it ran 1-6 % slower than the default on 1280x960 (session 8).
        gpu_cpu_share: experimental: with `gpu_decode`, this fraction of the files (chosen by id,
            `pipeline.cpu_assist`) is decoded by `workers` CPU processes (default: the cores less
            four) on the exact path (or `fast_decode`'s) while the GPU decodes the rest. 0: off.
            A resume must use the same share.
        retry_failed: recompute the complete shards that list failures too (files fixed since).

    Returns:
        RunStats for the whole run (resumed shards counted in `skipped`).

    Raises:
        IndexMismatchError: ``out_dir`` holds a run with another model, embed_dim, dtype or shard size.
        DatasetError: the source does not exist, or lists an id twice.
    """
    t_start = time.perf_counter()
    check_cpu_share(gpu_cpu_share, gpu_decode, workers)
    out_dir = Path(out_dir)
    items = list(source) if not isinstance(source, (str, Path)) else list_items(source)
    check_unique_ids(items)  # all of them, before run.json is touched (a resume routes only some)
    cfg = preprocess_cfg if isinstance(preprocess_cfg, dict) else preprocess_cfg.to_dict()
    parts = partitions(items, shard_size)
    sink = ShardSink(out_dir, dtype)
    previous = read_run_info(out_dir)
    info: dict[str, Any] = {
        "model": model,
        "model_files": model_files(model),
        "embed_dim": None,
        "dtype": dtype,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "source": str(Path(source).resolve()) if isinstance(source, (str, Path)) else source_label,
        "preprocess": cfg,
        "fast_decode": fast_decode,
        "gpu_decode": gpu_decode is not None,
        "gpu_decoder": gpu_decoder if gpu_decode is not None else None,
        "gpu_cpu_share": gpu_cpu_share if gpu_decode is not None else None,
        "partitions": len(parts),
        "images": len(items),
        "status": "running",
    }
    if previous is not None:
        check_compatible(out_dir, previous, info)
        info["embed_dim"] = previous.get("embed_dim")
    out_dir.mkdir(parents=True, exist_ok=True)
    sink.clean_temp_files()
    atomic_write_json(out_dir / RUN_FILE, info)

    def on_load(backend: Backend) -> None:
        check_compatible(out_dir, info, {"embed_dim": backend.embed_dim})
        if info["embed_dim"] is None:
            info["embed_dim"] = backend.embed_dim
            atomic_write_json(out_dir / RUN_FILE, info)

    lazy = LazyBackend(backend_factory, on_load=on_load)
    total = RunStats(images=len(items))
    todo = []
    for part in parts:  # complete shards are kept (a resume); the rest go through one loader
        ids = [item.id for item in part.items]
        retry = retry_failed and sink.has_failures(part.id)
        if not retry and sink.is_complete(part.id, ids, embed_dim=info["embed_dim"]):
            total.skipped += len(part.items)
            total.shards_skipped += 1
            if progress is not None:
                progress(len(part.items))
        else:
            todo.append(part)
    if workers is not None:
        n_workers = workers
    else:
        n_workers = default_assist_workers(default_workers()) if gpu_decode is not None else default_workers()
    # With gpu_decode the pool decodes what nvjpeg cannot (and the CPU share); its processes start
    # only when a task comes (`DecodePool`), so a folder of plain JPEGs starts none.
    executor = make_executor(n_workers) if todo else None
    try:
        if todo:
            loading = _Loading(cfg, batch_size, workers=n_workers, executor=executor, fast_decode=fast_decode,
                               gpu_decode=gpu_decode, gpu_decoder=gpu_decoder, gpu_read_threads=gpu_read_threads,
                               gpu_decode_ahead=gpu_decode_ahead, gpu_cpu_share=gpu_cpu_share)  # fmt: skip
            _embed_partitions(todo, lazy, sink, total, loading, progress)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    total.failed_total = sink.write_failures(len(parts))
    total.wall_s = time.perf_counter() - t_start
    info.update(status="complete", counts=total.counts(), timings=total.to_dict())
    if not total.processed and previous is not None and "timings" in previous:
        info["timings"] = previous["timings"]  # a pure resume keeps the timings of the run that did the work
    atomic_write_json(out_dir / RUN_FILE, info)
    _log.info("embedded %d images (%d failed) into %s", total.embedded, total.failed, out_dir)
    return total
