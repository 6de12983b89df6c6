"""Embed partitions through one loader and assemble their shards: rows routed to their shard by id,
each shard written in input order as soon as all its items are embedded or failed.

Separate from run.py, which decides what to run (`run_partition`: one partition; `embed_folder`: a
folder with resume and run.json); this module is the loop both share, the loader choice (CPU decode
workers or the GPU loader) and the shard bookkeeping.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..types import Backend, Batch, Failure, FloatArray, ImageItem
from .batching import LoadStats, iter_batches
from .cpu_assist import CpuAssist
from .embed import LazyBackend, embed_batch
from .sinks import ShardSink
from .sources import Partition, check_unique_ids
from .stats import RunStats

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from ..image.preprocess import PreprocessConfig
    from .gpu_procs import StartedDecodeProcesses

__all__ = ["Loading", "ProgressCallback", "embed_partitions"]

ProgressCallback = Callable[[int], None]  # called with the number of items just finished (embedded or failed)


@dataclass(frozen=True)
class Loading:
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
    # With gpu_decode: loader processes (`gpu_procs`), or processes started ahead; 1: this process's loader thread.
    gpu_decode_procs: int | StartedDecodeProcesses = 1

    def batches(self, items: Sequence[ImageItem], stats: LoadStats) -> Iterator[Batch]:
        procs = self.gpu_decode_procs
        if not isinstance(procs, int):  # started ahead, while the model loaded (`run_settings` checks them)
            return procs.load(items, self.preprocess_cfg, self.batch_size, stats)
        if self.gpu_decode is not None and procs > 1:
            from .gpu_procs import DecodeProcesses, iter_gpu_loaded_procs

            # Each process gets its part of the CPU workers (they decode what nvjpeg cannot); the
            # pool `executor` of this process then stays unused, and starts no process.
            setup = DecodeProcesses.for_run(procs, self.workers if self.executor is not None else 0,
                                            cpu_share=self.gpu_cpu_share, fast_decode=self.fast_decode,
                                            read_threads=self.gpu_read_threads)  # fmt: skip
            return iter_gpu_loaded_procs(items, self.preprocess_cfg, self.batch_size, self.gpu_decode, stats,
                                         self.gpu_decoder, setup)  # fmt: skip
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


def embed_partitions(
    parts: Sequence[Partition],
    lazy: LazyBackend,
    sink: ShardSink,
    stats: RunStats,
    loading: Loading,
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
    sink: ShardSink,
    partition_id: int,
    shard: _OpenShard,
    lazy: LazyBackend,
    stats: RunStats,
    position: dict[str, int],
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
