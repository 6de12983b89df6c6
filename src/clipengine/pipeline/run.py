"""Run the pipeline: one partition (`run_partition`, reused by distributed engines) or a whole folder (`embed_folder`).

The embedding loop and shard bookkeeping both share live in `shard_assembly`.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..types import Backend, ImageItem
from .batching import default_workers, make_executor
from .cpu_assist import default_assist_workers
from .embed import BackendSource, LazyBackend
from .run_lock import exclusive_output
from .run_settings import check_compatible, check_cpu_share, check_decode_procs, check_output, model_files
from .shard_assembly import Loading, ProgressCallback, embed_partitions
from .sinks import RUN_FILE, SHARD_MISMATCH, ShardSink, atomic_write_json, read_run_info, shard_stem
from .sources import Partition, check_unique_ids, list_items, partitions
from .stats import RunStats

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from ..image.preprocess import PreprocessConfig
    from .gpu_procs import StartedDecodeProcesses

__all__ = [
    "ProgressCallback", "RunStats", "check_output", "embed_folder", "pending_images", "reusable_run_info",
    "run_partition", "unfinished_partitions", "warn_stale_shards",
]  # fmt: skip

_log = logging.getLogger(__name__)


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

    loading = Loading(preprocess_cfg, batch_size, workers=workers, executor=executor, fast_decode=fast_decode,
                       gpu_decode=gpu_decode, gpu_decoder=gpu_decoder, gpu_read_threads=gpu_read_threads)  # fmt: skip
    embed_partitions([Partition(partition_id, tuple(items))], lazy, sink, stats, loading, progress)
    stats.storage_min_cos = sink.min_cos_written([partition_id])  # float16 storage's measured loss
    stats.wall_s = time.perf_counter() - t_start
    return stats


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
    gpu_decode_procs: int | StartedDecodeProcesses = 1,
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
        gpu_decode_procs: with `gpu_decode`, GPU loaders in all: a loader thread in
            this process and `gpu_decode_procs - 1` processes, each decoding and preprocessing the
            next block of files when it wants more (`pipeline.gpu_procs`; the same pixels, so a
            resume may change it). 1 (default): the loader thread alone. Or processes started
            ahead with `gpu_procs.start_decode_processes`, so their start-up runs while the model
            loads (the caller closes them: a `with` block). Not with `gpu_decode_ahead`. On an
            H200, 4 loaders ran 8.3-8.5k img/s over 196,608 files (session 15), and tied with one
            loader over 65,536 (session 12; docs/performance.md). `gpu_procs.default_decode_procs`
            is the CLI's default for a file count (4 from 100,000 files on 8+ cores).
        retry_failed: recompute the complete shards that list failures too (files fixed since).

    Returns:
        RunStats for the whole run (resumed shards counted in `skipped`).

    Raises:
        IndexMismatchError: ``out_dir`` holds a run with another model, embed_dim, dtype or shard size.
        OutputBusyError: another run (process, or thread) is writing into ``out_dir`` (`run_lock`).
        DatasetError: the source does not exist, or lists an id twice.
        TypeError / ValueError: an argument of the wrong type or range (named), before anything is written.
    """
    t_start = time.perf_counter()
    _check_embed_args(
        source, out_dir, preprocess_cfg, batch_size=batch_size, shard_size=shard_size, workers=workers
    )
    # Plain ints: run.json is JSON, which takes no NumPy integers.
    batch_size, shard_size = operator.index(batch_size), operator.index(shard_size)
    workers = None if workers is None else operator.index(workers)
    check_cpu_share(gpu_cpu_share, gpu_decode, workers)
    check_decode_procs(gpu_decode_procs, gpu_decode, gpu_decode_ahead, gpu_decoder=gpu_decoder,
                       gpu_cpu_share=gpu_cpu_share, fast_decode=fast_decode, gpu_read_threads=gpu_read_threads)  # fmt: skip
    out_dir = Path(out_dir)
    items = list(source) if not isinstance(source, (str, Path)) else list_items(source)
    check_unique_ids(items)  # all of them, before run.json is touched (a resume routes only some)
    cfg = preprocess_cfg if isinstance(preprocess_cfg, dict) else preprocess_cfg.to_dict()
    parts = partitions(items, shard_size)
    sink = ShardSink(out_dir, dtype)
    # Held from before run.json is read to the last write: a second run into the folder meanwhile
    # passed the resume check and mixed its shards with this run's (`run_lock`).
    with exclusive_output(out_dir):
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
            info["precision"] = previous.get("precision")
        out_dir.mkdir(parents=True, exist_ok=True)
        sink.clean_temp_files()
        atomic_write_json(out_dir / RUN_FILE, info)

        def on_load(backend: Backend) -> None:
            # The precision too: an export folder's label is the same at fp32 and int8, and a resume at
            # another --precision mixed the two in one folder without a word.
            loaded = {"embed_dim": backend.embed_dim, "precision": getattr(backend, "precision", None)}
            check_compatible(out_dir, info, loaded)
            if info["embed_dim"] is None or info.get("precision") is None:
                info.update({k: info.get(k) or v for k, v in loaded.items()})
                atomic_write_json(out_dir / RUN_FILE, info)

        lazy = LazyBackend(backend_factory, on_load=on_load)
        total = RunStats(images=len(items))
        stale: list[tuple[int, str]] = []  # finished shards that cannot be kept: reported once, below
        todo = unfinished_partitions(parts, sink, info["embed_dim"], retry_failed, stale)
        todo_ids = {part.id for part in todo}
        for part in parts:  # complete shards are kept (a resume); the rest go through one loader
            if part.id not in todo_ids:
                total.skipped += len(part.items)
                total.shards_skipped += 1
                if progress is not None:
                    progress(len(part.items))
        warn_stale_shards(stale)
        if workers is not None:
            n_workers = workers
        else:
            n_workers = default_assist_workers(default_workers()) if gpu_decode is not None else default_workers()
        # With gpu_decode the pool decodes what nvjpeg cannot (and the CPU share); its processes start
        # only when a task comes (`DecodePool`), so a folder of plain JPEGs starts none.
        executor = make_executor(n_workers) if todo else None
        try:
            if todo:
                loading = Loading(cfg, batch_size, workers=n_workers, executor=executor, fast_decode=fast_decode,
                                   gpu_decode=gpu_decode, gpu_decoder=gpu_decoder, gpu_read_threads=gpu_read_threads,
                                   gpu_decode_ahead=gpu_decode_ahead, gpu_cpu_share=gpu_cpu_share,
                                  gpu_decode_procs=gpu_decode_procs)  # fmt: skip
                embed_partitions(todo, lazy, sink, total, loading, progress)
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        total.failed_total = sink.write_failures(len(parts))
        total.storage_min_cos = sink.min_cos_written()  # float16 storage's measured loss, over the rows written here
        total.wall_s = time.perf_counter() - t_start
        info.update(status="complete", counts=total.counts(), timings=total.to_dict())
        if not total.processed and previous is not None and "timings" in previous:
            info["timings"] = previous["timings"]  # a pure resume keeps the timings of the run that did the work
        atomic_write_json(out_dir / RUN_FILE, info)
        _log.info("embedded %d images (%d failed) into %s", total.embedded, total.failed, out_dir)
        return total


def unfinished_partitions(
    parts: Sequence[Partition],
    sink: ShardSink,
    embed_dim: int | None,
    retry_failed: bool,
    stale: list[tuple[int, str]],
) -> list[Partition]:
    """The partitions a run must (re)compute: those without a complete shard, and with `retry_failed`
    those whose shard lists failures. Finished shards that cannot be kept are added to `stale`.
    One rule for both engines and for `pending_images` (the CLI's check before a model load)."""
    todo = []
    for part in parts:
        retry = retry_failed and sink.has_failures(part.id)
        if retry or not sink.is_complete(part.id, [item.id for item in part.items], embed_dim=embed_dim, stale=stale):
            todo.append(part)
    return todo


def pending_images(
    source: Sequence[ImageItem],
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    dtype: str = "float16",
    retry_failed: bool = False,
) -> int:
    """How many of `source`'s items a run into `out_dir` would embed: those outside its complete
    shards (all of them when it holds no run). Reads only; `embed_folder` decides again, under its lock.

    The CLI asks before loading a model: a rerun of a finished folder then loads none, and the
    default number of GPU loaders follows the files left, not the folder's size.

    Example:
        >>> pending_images(list_items("photos"), "out")  # doctest: +SKIP
        0
    """
    previous = read_run_info(out_dir)
    if previous is None:
        return len(source)
    todo = unfinished_partitions(partitions(source, shard_size), ShardSink(out_dir, dtype), previous.get("embed_dim"),
                       retry_failed, stale=[])  # fmt: skip
    return sum(len(part.items) for part in todo)


def reusable_run_info(out_dir: str | Path) -> dict[str, Any] | None:
    """OUT/run.json when it records the preprocessing its shards were made with, else None: what a
    rerun that computes nothing (`pending_images` 0) needs in place of a model. A run.json without it
    (edited by hand, or damaged) makes the caller load the model as before, not fail on a KeyError."""
    info = read_run_info(out_dir)
    return info if info is not None and isinstance(info.get("preprocess"), dict) else None


# Shards named per reason in the one warning of `warn_stale_shards`; the rest are counted.
_STALE_NAMED = 3


def warn_stale_shards(stale: Sequence[tuple[int, str]]) -> None:
    """One warning for the finished shards a rerun recomputes (`ShardSink.is_complete`'s `stale`),
    whatever their number (both engines): a file added at the top of a 200,000-file folder moves every shard."""
    if not stale:
        return
    by_reason: dict[str, list[int]] = {}
    for partition_id, reason in stale:
        by_reason.setdefault(reason, []).append(partition_id)
    groups = []
    for reason, ids in list(by_reason.items())[:_STALE_NAMED]:  # damaged shards may each say another thing
        named = ", ".join(shard_stem(i) for i in ids[:_STALE_NAMED])
        more = f" and {len(ids) - _STALE_NAMED} more" if len(ids) > _STALE_NAMED else ""
        groups.append(f"{named}{more} ({reason})")
    others = sum(len(ids) for ids in list(by_reason.values())[_STALE_NAMED:])
    if others:
        groups.append(f"{others} more (other reasons)")
    hint = (
        "; the source lists other files than when they were written (a file added, removed or renamed "
        "moves every later shard)"
        if SHARD_MISMATCH in by_reason
        else ""
    )
    _log.warning("recomputing %d finished shard(s): %s%s", len(stale), "; ".join(groups), hint)


def _check_embed_args(source: object, out_dir: object, preprocess_cfg: object, **counts: object) -> None:
    """Arguments of the wrong type named up front: they were bare errors from deep inside ("'<' not
    supported between 'str' and 'int'", "'NoneType' object has no attribute 'to_dict'")."""
    from ..image.preprocess import PreprocessConfig

    if not isinstance(source, str | Path | Sequence):
        raise TypeError(
            f"source must be a folder, a file list or a list of ImageItems, got {type(source).__name__}"
        )
    if not isinstance(out_dir, str | Path):
        raise TypeError(f"out_dir must be a folder path (str or Path), got {type(out_dir).__name__}")
    if not isinstance(preprocess_cfg, PreprocessConfig | dict):
        raise TypeError(
            f"preprocess_cfg must be the model's PreprocessConfig (model.preprocess_cfg) or its dict, "
            f"got {type(preprocess_cfg).__name__}"
        )
    for name, value in counts.items():
        if value is None and name == "workers":  # the default: one per core
            continue
        smallest = 0 if name == "workers" else 1  # workers=0: decode in this process
        try:
            number = operator.index(value)  # type: ignore[arg-type]  # NumPy integers too
        except TypeError:
            raise TypeError(f"{name} must be an integer >= {smallest}, got {value!r}") from None
        if isinstance(value, bool) or number < smallest:
            raise ValueError(f"{name} must be an integer >= {smallest}, got {value!r}")
