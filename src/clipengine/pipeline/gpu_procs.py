"""Experimental: the GPU loader in several processes. Each decodes and preprocesses its own blocks of
files on the same GPU, and hands its batches to this process through CUDA IPC.

Status (session 11, H200, `benchmarks/gpu_gap.py` rows C / R / S over 65,536 1280x960 JPEGs): it
does not pay, and stays a library option (`embed_folder(gpu_decode_procs=N)`) with no CLI flag.
- Once running, 3 processes embedded 6,553 img/s against 5,572-5,707 for the one loader thread
  (+16 %), but the processes took 7.5-11.3 s to send their first batch (spawn, torch and CUDA
  start-up in each): at that rate the start-up is repaid only after about 370,000 images.
- In 3 of 4 runs over 65,536 files one decode process died of SIGSEGV (exit code -11) after 5-7 s
  of decoding; runs over 4,096 files and the gpu tests passed. The likely cause, found by reading
  torch's `CudaIPCTypes.cpp` after that run: sharing a CUDA tensor (`GetNewRefCountedSentData`)
  uses its reference-counter file outside the lock, while `CudaIPCCollect`, which the caching
  allocator calls on any cache miss on any thread, may delete that file when no shared tensor is
  outstanding. That run's processes sent from one thread (a queue's feeder) while a loader thread
  allocated. Since then each process does all its CUDA work, sends included, on one thread, with
  a pipe of its own (a crash mid-message is an EOF here, not a hang) and two batches of credit;
  the consumer gets a copy of each batch on its own device memory, so no batch outlives its
  sender. Unmeasured on a GPU so far; `faulthandler` prints the stacks of any further crash.
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
IPC reference counting). This process copies each batch on the device and drops the shared tensor
once the copy has run, and lets the senders exit only after that.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..types import Batch, ImageItem
from .gpu_batching import default_decode_group

if TYPE_CHECKING:
    from ..image.preprocess import PreprocessConfig
    from .batching import LoadStats

__all__ = [
    "DecodeProcesses",
    "StartedDecodeProcesses",
    "iter_gpu_loaded_procs",
    "split_blocks",
    "start_decode_processes",
]

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
        read_threads: reader threads per process.
        decode_batch: a stand-in for nvjpeg (tests; a top-level function, so it pickles).
    """

    procs: int
    workers: int = 0
    cpu_share: float = 0.0
    fast_decode: bool = False
    read_threads: int = 2
    decode_batch: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.procs < 2:
            raise ValueError(f"decode processes must be >= 2 (1 is the in-process loader), got {self.procs}")

    @classmethod
    def for_run(
        cls, procs: int, workers: int, *, cpu_share: float = 0.0, fast_decode: bool = False, read_threads: int = 2
    ) -> DecodeProcesses:  # fmt: skip
        """`procs` processes sharing a run's `workers` CPU decode workers (at least one each, 0: none;
        they decode what nvjpeg cannot, and the CPU share)."""
        per_process = max(1, workers // procs) if workers > 0 else 0
        return cls(procs, per_process, cpu_share, fast_decode, read_threads)


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
    docstring); stage seconds are summed over the processes into `stats`. The processes start here:
    `start_decode_processes` starts them ahead, while the model loads."""
    _check_config(preprocess_cfg)  # before any process starts
    if not items:
        return
    with start_decode_processes(setup, device, decoder) as started:
        yield from started.load(items, preprocess_cfg, batch_size, stats)


def start_decode_processes(setup: DecodeProcesses, device: str, decoder: str) -> StartedDecodeProcesses:
    """Start `setup.procs` decode processes now, before their files are known.

    Each imports torch, opens `device` and warms its decoder up (one small JPEG decoded and
    preprocessed) while the caller goes on, e.g. to load the model: that start-up is what made the
    processes slower than the one loader thread over 65,536 files (see the module docstring).
    Close the result (it is a context manager) when it is not used; `load` closes it when done.
    """
    return StartedDecodeProcesses(setup, device, decoder)


def _check_config(preprocess_cfg: PreprocessConfig | dict[str, Any]) -> dict[str, Any]:
    """The preprocessing as plain data for the processes, checked here."""
    from ..image.preprocess import PreprocessConfig

    if isinstance(preprocess_cfg, PreprocessConfig):
        return preprocess_cfg.to_dict()
    return PreprocessConfig.from_dict(preprocess_cfg).to_dict()


class StartedDecodeProcesses:
    """Decode processes started ahead of their files (`start_decode_processes`); `load` runs them once."""

    def __init__(self, setup: DecodeProcesses, device: str, decoder: str) -> None:
        import torch.multiprocessing as tmp

        self.setup, self.device, self.decoder = setup, device, decoder
        self._used = False
        ctx = tmp.get_context("spawn")
        self._release = ctx.Event()
        self._children: list[_Child] = []
        self._started = time.perf_counter()
        try:
            for rank in range(setup.procs):
                ours, theirs = ctx.Pipe(duplex=True)
                credits = ctx.Semaphore(_QUEUED_PER_PROCESS)
                process = ctx.Process(
                    target=_decode_process,
                    name=f"clipengine-gpu-decode-{rank}",
                    daemon=False,
                    args=(rank, device, decoder, setup, theirs, credits, self._release, time.time()),
                )
                process.start()
                # Only the child holds its end now: its exit, even a crash mid-message, is an EOF
                # here rather than a read that waits for ever.
                theirs.close()
                self._children.append(_Child(rank, process, ours, credits))
        except BaseException:
            self.close()
            raise

    @property
    def procs(self) -> int:
        return self.setup.procs

    def load(
        self,
        items: Sequence[ImageItem],
        preprocess_cfg: PreprocessConfig | dict[str, Any],
        batch_size: int,
        stats: LoadStats,
    ) -> Iterator[Batch]:
        """`items` in batches of `batch_size` rows from the processes (once; closes them at the end)."""
        if self._used:
            raise RuntimeError("these decode processes have run already: start new ones")
        self._used = True
        try:
            cfg = _check_config(preprocess_cfg)
            shares = split_blocks(items, self.procs, default_decode_group(batch_size))
            for child, share in zip(self._children, shares, strict=True):
                # From a thread: a process still starting does not read yet, and a large share
                # fills the pipe; this thread goes on to wait for the first batch meanwhile.
                work = ("work", share, cfg, batch_size)
                threading.Thread(target=_send_quietly, args=(child.conn, work), daemon=True).start()
            yield from _receive(self._children, cfg["image_size"], stats, self._started)
        finally:
            self.close()

    def close(self) -> None:
        """Let the processes go, and wait for them (a stuck one is terminated)."""
        _stop(self._children, self._release)
        self._children = []

    def __enter__(self) -> StartedDecodeProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _send_quietly(conn: Any, msg: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError, ValueError):  # the process has gone: `_receive` says why
        conn.send(msg)


@dataclass
class _Child:
    """A decode process as its consumer sees it."""

    rank: int
    process: Any  # multiprocessing's SpawnProcess
    conn: Any  # our end of its pipe: work goes out, its messages come in
    credits: Any  # a semaphore: the batches it may send ahead of the consumer


def _receive(children: list[_Child], image_size: int, stats: LoadStats, spawned: float) -> Iterator[Batch]:
    """The children's batches as they come, each in memory of this process (see `_own_copy`)."""
    pending = {c.rank: c for c in children}
    heard: set[int] = set()
    ready: dict[int, dict[str, float]] = {}
    held: deque[tuple[Any, Any]] = deque()
    started = time.perf_counter()
    first: float | None = None
    try:
        while pending:
            t0 = time.perf_counter()
            child, msg = _next_message(pending, heard, started)
            stats.wait_s += time.perf_counter() - t0
            if msg[0] == "batch":
                _, ids, pixels, failures, sizes = msg
                del msg
                if first is None:
                    first = time.perf_counter()
                    _log.info("%d GPU decode processes: first batch %.1f s after their start, %.1f s after "
                              "their files were sent", len(children), first - spawned, first - started)  # fmt: skip
                stats.images += len(ids)
                stats.failures += len(failures)
                pixels = _own_copy(pixels, image_size, held)
                yield Batch(ids=ids, pixels=pixels, sizes=sizes, failures=failures)
                del pixels
                child.credits.release()  # the consumer is done with it: the child may send another
            elif msg[0] == "ready":
                ready[child.rank] = msg[1]
                if len(ready) == len(children):
                    _log_ready(ready)
            elif msg[0] == "done":
                del pending[child.rank]
                done = msg[1]
                stats.read_s += done["read_s"]
                stats.decode_s += done["decode_s"]
                stats.preprocess_s += done["preprocess_s"]
            else:  # "error": the child's traceback, raised here as the in-process loader would
                raise RuntimeError(f"GPU decode process {child.rank} failed: {msg[1]}\n{msg[2]}")
        if first is not None:  # the rate once started: what a long run gets (start-up is a fixed cost)
            steady = time.perf_counter() - first
            _log.info("%d GPU decode processes: %d images in %.2f s after the first batch (%.0f img/s)",
                      len(children), stats.images, steady, stats.images / steady if steady > 0 else 0.0)  # fmt: skip
    finally:
        for event, _ in held:  # the copies still reading a child's memory finish before it may go
            event.synchronize()
        held.clear()


def _log_ready(ready: dict[int, dict[str, float]]) -> None:
    """Where the start-up went, for the slowest process of each phase (the next device session reads it)."""
    phases = ("spawn_s", "import_s", "device_s", "warm_s", "ready_s")
    slowest = {k: max(r.get(k, 0.0) for r in ready.values()) for k in phases}
    _log.info("%d GPU decode processes ready %.1f s after their start (slowest: spawn %.1f s, imports %.1f s, "
              "device %.1f s, decoder warm-up %.1f s)", len(ready), slowest["ready_s"], slowest["spawn_s"],
              slowest["import_s"], slowest["device_s"], slowest["warm_s"])  # fmt: skip


def _own_copy(pixels: Any, image_size: int, held: deque[tuple[Any, Any]]) -> Any:
    """A batch's pixels in this process's memory.

    A CUDA tensor from a child is the child's memory: the consumer (and a traceback or loop
    variable holding the last batch) could keep it past the child's exit, which CUDA leaves
    undefined. So it is copied on the device, and the child's tensor is dropped once the copy has
    run (`held`: the copy's event and the shared tensor, oldest first). CPU tensors come through
    shared memory, which stays valid after the sender exits.
    """
    if pixels is None:  # failures only: the child sends no tensor
        return np.zeros((0, 3, image_size, image_size), np.float32)
    if not getattr(pixels, "is_cuda", False):
        return pixels
    import torch

    own = pixels.clone()
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(pixels.device))
    held.append((event, pixels))
    while held and held[0][0].query():
        held.popleft()
    return own


def _next_message(
    pending: dict[int, _Child], heard: set[int], started: float
) -> tuple[_Child, tuple[Any, ...]]:
    """The next message from a pending child; raises when one died or never started."""
    from multiprocessing.connection import wait

    while True:
        by_conn = {c.conn: c for c in pending.values()}
        ready = wait(list(by_conn), timeout=_POLL_S)
        for ready_conn in ready:
            child = by_conn[ready_conn]
            conn: Any = child.conn
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # it exited (or crashed) before its last message
                child.process.join(timeout=5)
                raise RuntimeError(
                    f"GPU decode process {child.rank} exited with code {child.process.exitcode} before it "
                    "finished; the files it had not sent are not embedded (run again to resume)"
                ) from None
            heard.add(child.rank)
            return child, msg
        silent = sorted(set(pending) - heard)
        if silent and time.perf_counter() - started > _START_S:
            raise RuntimeError(f"GPU decode process {silent[0]} sent nothing in {_START_S:.0f} s")


def _stop(children: list[_Child], release: Any) -> None:
    """Let the children go, and wait for them (a stuck one is terminated)."""
    release.set()
    for c in children:
        c.conn.close()  # a child blocked sending to us gets a broken pipe and ends
    for c in children:
        c.process.join(timeout=30)
        if c.process.is_alive():  # stuck (a hung driver call): it holds nothing this process still needs
            c.process.terminate()
            c.process.join(timeout=5)


def _decode_process(
    rank: int,
    device: str,
    decoder: str,
    setup: DecodeProcesses,
    conn: Any,
    credits: Any,
    release: Any,
    spawned_at: float,
) -> None:
    """A decode process's main: start up (imports, the device, a decoder warm-up), then take its files
    and send each batch as it is ready.

    One thread does all the CUDA work here, the sends included: torch's CUDA IPC bookkeeping is
    not safe against an allocation on another thread while a tensor is being shared (module
    docstring), so there is no loader thread and no decode thread in these processes.
    """
    import faulthandler

    from .decode_pool import as_child_process

    entered = time.time()
    faulthandler.enable()  # a crash in native code prints every thread's stack
    as_child_process()  # Ctrl-C is the parent's to handle; a parent that dies takes this process with it
    executor = None
    working = False  # set once the files came: only then may the consumer hold this process's memory
    try:
        import torch
        import torch.multiprocessing  # registers tensor pickling (CUDA IPC) for the pipe

        from ..image.gpu_decode import GpuJpegDecoder
        from ..image.preprocess import PreprocessConfig
        from .cpu_assist import CpuAssist
        from .decode_pool import make_executor
        from .gpu_loading import loader_batches

        imported = time.time()
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.zeros(1, device=device)  # the CUDA context: the slow part of a process's start
        opened = time.time()

        def new_decoder() -> GpuJpegDecoder:
            if setup.decode_batch is None:
                return GpuJpegDecoder(device, library=decoder)
            return GpuJpegDecoder(device, decode_batch=setup.decode_batch)

        _warm_up(new_decoder())  # a decoder of its own: its stats are not the run's
        warm = time.time()
        conn.send(("ready", {"spawn_s": entered - spawned_at, "import_s": imported - entered,
                             "device_s": opened - imported, "warm_s": warm - opened, "ready_s": warm - spawned_at}))  # fmt: skip
        msg = conn.recv()  # ("work", items, preprocess config, batch size)
        working = True
        _, items, cfg, batch_size = msg
        config = PreprocessConfig.from_dict(cfg)
        jpeg = new_decoder()
        executor = make_executor(setup.workers) if setup.workers > 0 else None
        assist = (CpuAssist(executor, setup.workers, setup.cpu_share, cfg, fast_decode=setup.fast_decode)
                  if executor is not None else None)  # fmt: skip
        if assist is not None and setup.cpu_share > 0:
            assist.prime()
        batches = loader_batches(items, config, batch_size, jpeg, read_threads=setup.read_threads,
                                 decode_ahead=False, assist=assist)  # fmt: skip
        try:
            for b in batches:
                if not _acquire(credits, release):
                    return  # the consumer stopped early
                conn.send(("batch", b.ids, b.pixels if b.ids else None, b.failures, b.sizes))
                del b
                if cuda:
                    torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]  # frees what the consumer dropped
        finally:
            close = getattr(batches, "close", None)  # stops the reader threads
            if close is not None:
                close()
        conn.send(("done", asdict(jpeg.stats)))
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass  # the consumer has gone (or stopped before sending the files): nobody to tell
    except BaseException as e:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if working:  # the consumer may still copy from this process's device memory: stay until it is done
            release.wait()
        conn.close()


def _warm_up(jpeg: Any) -> None:
    """Decode and preprocess one small JPEG: the decoder's and the resize's first calls set up their
    libraries (nvjpeg, cuBLAS), which would otherwise delay the first batch."""
    import io

    from PIL import Image

    from ..image.gpu_preprocess import preprocess_tensors
    from ..image.preprocess import PreprocessConfig

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 60, 30)).save(buffer, format="JPEG")
    cfg = PreprocessConfig(image_size=32)
    decoded = jpeg.decode([("warm-up.jpg", buffer.getvalue())], cfg)
    if decoded.images:
        preprocess_tensors(decoded.images, cfg)


def _acquire(credits: Any, release: Any) -> bool:
    """Wait for the consumer to take a batch (a credit), unless it has gone; whether one was got."""
    while not release.is_set():
        if credits.acquire(timeout=_POLL_S):
            return True
    return False
