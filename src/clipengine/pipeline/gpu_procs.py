"""Experimental: the GPU loader in several processes. Each decodes and preprocesses its own blocks of
files on the same GPU, and hands its batches to this process through CUDA IPC (no copy).

Status (session 11, H200, `benchmarks/gpu_gap.py` rows C / R / S over 65,536 1280x960 JPEGs): it
does not pay, and stays a library option (`embed_folder(gpu_decode_procs=N)`) with no CLI flag.
- Once running, 3 processes embedded 6,553 img/s against 5,572-5,707 for the one loader thread
  (+16 %), but the processes took 7.5-11.3 s to send their first batch (spawn, torch and CUDA
  start-up in each): at that rate the start-up is repaid only after about 370,000 images.
- In 3 of 4 runs over 65,536 files one decode process died of SIGSEGV (exit code -11) after 5-7 s
  of decoding; runs over 4,096 files and the gpu tests passed. The crash is not located: the raw
  decode in 4 processes without IPC (`benchmarks/gpu_decode_procs.py`) never crashed, so torch's
  CUDA IPC reference counting (`torch.cuda.ipc_collect` beside the queue's feeder thread) is the
  first suspect. Each process now enables `faulthandler`, so the next crash prints its stacks.
- On the mix with 12 MP photos 2 processes ran 2,473-2,758 img/s once started, no faster than one
  loader thread (2,677).
A run that loses a process fails with a clear error and resumes like any other.

Why processes: torchvision's batched nvjpeg call holds one process-wide mutex and synchronises its
stream before and after, so one process decodes one call at a time, with the host work around each
call (header checks, orientation, queuing the resize) in series with it. On an H200 (session 11,
`benchmarks/gpu_decode_procs.py`, 1280x960 JPEGs from memory) one process decoded 8.2k img/s with
the JPEG engines 57 % busy; two processes 10.3k together, four 11.0k. The whole per-process loader
(decode + preprocess) went from 5.1k img/s in one process to 7.3k in two and 7.6k in four.

Each process runs `gpu_loading.loader_batches` on every `procs`-th block of `default_decode_group`
files (block k to process k mod procs) and sends each batch as it is ready; batches arrive here in
whatever order the processes finish them. `shard_assembly` routes rows to their shard by id and
writes each shard in input order, so the output is the same as with one process.

The sending process keeps a batch's device memory until this process drops the tensor (torch's CUDA
IPC reference counting); it is asked to exit only once the consumer is done with every batch.
"""

from __future__ import annotations

import logging
import queue
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..types import Batch, ImageItem
from .gpu_batching import default_decode_group

if TYPE_CHECKING:
    from ..image.preprocess import PreprocessConfig
    from .batching import LoadStats

__all__ = ["DecodeProcesses", "iter_gpu_loaded_procs", "split_blocks"]

_log = logging.getLogger(__name__)
_POLL_S = 0.2  # how often a waiting side checks whether the other has gone
_START_S = 300.0  # most seconds a decode process may take to send its first message (CUDA start-up)
_QUEUED_PER_PROCESS = 2  # batches each process may have sent ahead of the consumer


@dataclass(frozen=True)
class DecodeProcesses:
    """What each GPU decode process runs, less its files (picklable: it is sent to each process).

    Args:
        procs: decode processes, >= 2 (one process is `gpu_loading.iter_gpu_loaded` itself).
        workers: CPU decode workers per process for the files nvjpeg cannot decode (and the CPU
            share); 0: those files are decoded on the process's loader thread.
        cpu_share: the CPU assist share (`pipeline.cpu_assist`), 0: off.
        fast_decode: reduced-scale decode in those workers.
        decode_ahead: `gpu_loading.iter_gpu_loaded`'s option, in each process.
        read_threads: reader threads per process.
        decode_batch: a stand-in for nvjpeg (tests; a top-level function, so it pickles).
    """

    procs: int
    workers: int = 0
    cpu_share: float = 0.0
    fast_decode: bool = False
    decode_ahead: bool = False
    read_threads: int = 2
    decode_batch: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.procs < 2:
            raise ValueError(f"decode processes must be >= 2 (1 is the in-process loader), got {self.procs}")


def split_blocks(items: Sequence[ImageItem], procs: int, block: int) -> list[list[ImageItem]]:
    """Block k of `block` items goes to process k mod `procs`: each gets a share of every part of the
    list, so the shards fill from the start at all processes' pace."""
    shares: list[list[ImageItem]] = [[] for _ in range(procs)]
    for k, start in enumerate(range(0, len(items), block)):
        shares[k % procs].extend(items[start : start + block])
    return shares


def iter_gpu_loaded_procs(
    items: Sequence[ImageItem],
    preprocess_cfg: PreprocessConfig | dict[str, Any],
    batch_size: int,
    device: str,
    stats: LoadStats,
    decoder: str,
    setup: DecodeProcesses,
) -> Iterator[Batch]:
    """`gpu_loading.iter_gpu_loaded`'s batches, loaded by `setup.procs` processes (see the module
    docstring); stage seconds are summed over the processes into `stats`."""
    import torch.multiprocessing as tmp

    from ..image.preprocess import PreprocessConfig

    config = (
        preprocess_cfg
        if isinstance(preprocess_cfg, PreprocessConfig)
        else PreprocessConfig.from_dict(preprocess_cfg)
    )
    cfg = config.to_dict()  # checked here, sent as plain data
    shares = [s for s in split_blocks(items, setup.procs, default_decode_group(batch_size)) if s]
    if not shares:
        return
    ctx = tmp.get_context("spawn")
    out = ctx.Queue(maxsize=_QUEUED_PER_PROCESS * len(shares))
    release = ctx.Event()
    procs = [
        ctx.Process(
            target=_decode_process,
            name=f"clipengine-gpu-decode-{rank}",
            daemon=False,
            args=(rank, share, cfg, batch_size, device, decoder, setup, out, release),
        )
        for rank, share in enumerate(shares)
    ]
    for p in procs:
        p.start()
    pending = set(range(len(procs)))
    started = time.perf_counter()
    heard: set[int] = set()
    first: float | None = None
    try:
        while pending:
            t0 = time.perf_counter()
            msg = _next_message(out, procs, pending, heard, started)
            stats.wait_s += time.perf_counter() - t0
            kind, rank = msg[0], msg[1]
            heard.add(rank)
            if kind == "batch":
                _, _, ids, pixels, failures, sizes = msg
                if first is None:
                    first = time.perf_counter()
                    _log.info(
                        "%d GPU decode processes: first batch after %.1f s", len(procs), first - started
                    )
                stats.images += len(ids)
                stats.failures += len(failures)
                if pixels is None:  # failures only: no rows, so no device memory to share
                    pixels = np.zeros((0, 3, config.image_size, config.image_size), np.float32)
                yield Batch(ids=ids, pixels=pixels, sizes=sizes, failures=failures)
                del pixels, msg  # this process's last reference: the sender may reuse the memory
            elif kind == "done":
                pending.discard(rank)
                done = msg[2]
                stats.read_s += done["read_s"]
                stats.decode_s += done["decode_s"]
                stats.preprocess_s += done["preprocess_s"]
            else:  # "error": the process's traceback, raised here as the in-process loader would
                raise RuntimeError(f"GPU decode process {rank} failed: {msg[2]}\n{msg[3]}")
        if first is not None:  # the rate once started: what a long run gets (start-up is a fixed cost)
            steady = time.perf_counter() - first
            _log.info("%d GPU decode processes: %d images in %.2f s after the first batch (%.0f img/s)",
                      len(procs), stats.images, steady, stats.images / steady if steady > 0 else 0.0)  # fmt: skip
    finally:
        release.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # stuck (a hung driver call): it holds nothing this process still needs
                p.terminate()
                p.join(timeout=5)
        out.close()


def _next_message(
    out: Any, procs: list[Any], pending: set[int], heard: set[int], started: float
) -> tuple[Any, ...]:
    """The next message from the decode processes; raises when one died or never started."""
    while True:
        try:
            return out.get(timeout=_POLL_S)  # type: ignore[no-any-return]
        except queue.Empty:
            pass
        for rank in sorted(pending):
            code = procs[rank].exitcode
            if code is not None:
                try:  # it may have sent its last words just before it went
                    return out.get(timeout=_POLL_S)  # type: ignore[no-any-return]
                except queue.Empty:
                    raise RuntimeError(
                        f"GPU decode process {rank} exited with code {code} before it finished; "
                        "the files it had not sent are not embedded (run again to resume)"
                    ) from None
            if rank not in heard and time.perf_counter() - started > _START_S:
                raise RuntimeError(f"GPU decode process {rank} sent nothing in {_START_S:.0f} s")


def _decode_process(
    rank: int,
    items: list[ImageItem],
    cfg: dict[str, Any],
    batch_size: int,
    device: str,
    decoder: str,
    setup: DecodeProcesses,
    out: Any,
    release: Any,
) -> None:
    """A decode process's main: its files through the in-process loader, each batch sent as it is ready."""
    import faulthandler

    from .decode_pool import as_child_process

    faulthandler.enable()  # a crash in native code (see the module docstring) prints every thread's stack
    as_child_process()  # Ctrl-C is the parent's to handle; a parent that dies takes this process with it
    executor = None
    try:
        import torch

        from ..image.gpu_decode import GpuJpegDecoder
        from ..image.preprocess import PreprocessConfig
        from .cpu_assist import CpuAssist
        from .decode_pool import make_executor
        from .gpu_loading import loader_batches
        from .prefetch import prefetch

        config = PreprocessConfig.from_dict(cfg)
        jpeg = (GpuJpegDecoder(device, library=decoder) if setup.decode_batch is None
                else GpuJpegDecoder(device, decode_batch=setup.decode_batch))  # fmt: skip
        executor = make_executor(setup.workers) if setup.workers > 0 else None
        assist = (CpuAssist(executor, setup.workers, setup.cpu_share, cfg, fast_decode=setup.fast_decode)
                  if executor is not None else None)  # fmt: skip
        if assist is not None and setup.cpu_share > 0:
            assist.prime()
        batches = loader_batches(items, config, batch_size, jpeg, read_threads=setup.read_threads,
                                 decode_ahead=setup.decode_ahead, assist=assist)  # fmt: skip
        cuda = torch.device(device).type == "cuda"
        loaded = prefetch(batches, depth=2)
        try:
            for b in loaded:
                pixels = b.pixels if b.ids else None  # an empty tensor has no memory to share
                if not _put(out, ("batch", rank, b.ids, pixels, b.failures, b.sizes), release):
                    return  # the consumer stopped early
                del b, pixels
                if cuda:
                    torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]  # frees the batches the consumer dropped
        finally:
            loaded.close()
        done = asdict(jpeg.stats)
        _put(out, ("done", rank, done), release)
    except BaseException as e:
        _put(out, ("error", rank, f"{type(e).__name__}: {e}", traceback.format_exc()), release)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        # The consumer may still hold this process's device memory: stay until it is done with it.
        release.wait()
        out.cancel_join_thread()  # what is left unread is not wanted


def _put(out: Any, msg: tuple[Any, ...], release: Any) -> bool:
    """Queue `msg` unless the consumer has gone (`release` set); whether it was queued."""
    while not release.is_set():
        try:
            out.put(msg, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False
