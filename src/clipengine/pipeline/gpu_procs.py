"""The GPU loader in several processes (`embed --gpu-decode` on large folders: `default_decode_procs`).
A loader thread of this process and `procs - 1` spawned processes decode and preprocess on the same
GPU, each taking the next block of files when it wants more; the processes hand their batches to
this process through CUDA IPC.

Why processes: torchvision's batched nvjpeg call holds one process-wide mutex and synchronises its
stream before and after, so one process decodes one call at a time, with the host work around each
call (header checks, orientation, queuing the resize) in series with it. On an H200 (session 11,
`benchmarks/gpu_decode_procs.py`, 1280x960 JPEGs from memory) one process decoded 8.2k img/s with
the JPEG engines 57 % busy; two processes 10.3k together, four 11.0k. The whole per-process loader
(decode + preprocess) went from 5.1k img/s in one process to 7.3k in two and 7.6k in four.

History (H200, 65,536 1280x960 JPEGs; docs/performance.md):
- Session 11: processes only, each dealt every `procs`-th block. Once running, 3 processes embedded
  6,553 img/s against 5,572-5,707 for the one loader thread, but they took 7.5-11.3 s to send their
  first batch, and in 3 of 4 runs one died of SIGSEGV. The likely cause (torch's `CudaIPCTypes.cpp`):
  sharing a CUDA tensor uses its reference-counter file outside the lock while `CudaIPCCollect`, which
  the caching allocator calls on a cache miss on any thread, may delete that file. Since then each
  process does all its CUDA work, sends included, on one thread, with a pipe of its own (a crash
  mid-message is an EOF here, not a hang) and two batches of credit, and this process copies each
  batch on the device before the sender may exit.
- Session 12, that design: no crash in 6 runs of 2-3 processes (4 over 65,536 files), 6.2-6.8k img/s
  once started. Whole `clipengine embed` commands, with the processes started while the model loads
  (`start_decode_processes`), still lost to one loader thread (27.1 s; 2 processes 30.1 s, 3 28.8 s):
  each process needed 9-12 s to be ready (imports 3.4-4.2 s, its decoder's first calls 4.7-7.0 s).
- So now (session 12) this process loads too, from the start, on a thread as `iter_gpu_loaded` does,
  and the processes join as they become ready: blocks are claimed, not dealt (`claimed_items`), and a
  process still starting when every block is claimed is not waited for. Measured the same way: over
  196,608 files 4 loaders ran 7,613 img/s and the command took 44.5 s against 49.7 s for one loader
  thread; over 65,536 files 24.1 s (4 loaders) and 25.9 s (3) against 23.8 s. No crash.

`shard_assembly` routes rows to their shard by id and writes each shard in input order, so the output
is the same as with one loader, whichever loader took which block.

The sending process keeps a batch's device memory until this process drops the tensor (torch's CUDA
IPC reference counting). This process copies each batch on the device and drops the shared tensor
once the copy has run, and lets the senders exit only after that.
A run that loses a process fails with a clear error and resumes like any other.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from ..image.gpu_fused import check_environment, prefer_kernels
from ..types import Batch, ImageItem
from .gpu_batching import default_decode_group
from .gpu_loading import report_assist

if TYPE_CHECKING:
    from ..image.gpu_decode import GpuJpegDecoder
    from ..image.preprocess import PreprocessConfig
    from .batching import LoadStats
    from .gpu_batching import GpuBatch

__all__ = [
    "DecodeProcesses",
    "StartedDecodeProcesses",
    "claimed_items",
    "default_decode_procs",
    "iter_gpu_loaded_procs",
    "start_decode_processes",
]

_log = logging.getLogger(__name__)
_POLL_S = 0.2  # how often a waiting side checks whether the other has gone
_START_S = 300.0  # most seconds a decode process may take to send its first message (CUDA start-up)
_QUEUED_PER_PROCESS = 2  # batches each loader may have sent ahead of the consumer
# `default_decode_procs`: where several loaders were measured faster than one (H200, 16 cores)
AUTO_PROCS, AUTO_MIN_FILES, AUTO_MIN_CORES = 4, 100_000, 8


@dataclass(frozen=True)
class DecodeProcesses:
    """What each GPU loader runs, less its files (picklable: it is sent to each process).

    Args:
        procs: GPU loaders in all, >= 2: a loader thread in this process and `procs - 1` spawned
            processes (1 is `gpu_loading.iter_gpu_loaded` alone).
        workers: CPU decode workers per loader for the files nvjpeg cannot decode (and the CPU
            share); 0: those files are decoded on the loader's thread.
        cpu_share: the CPU assist share (`pipeline.cpu_assist`), 0: off.
        fast_decode: reduced-scale decode in those workers.
        read_threads: reader threads per loader.
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
        if self.cpu_share > 0 and self.workers == 0:  # the loaders would decode every file on the GPU
            raise ValueError(f"a CPU share of the GPU decode needs CPU decode workers (workers >= 1), got "
                             f"cpu_share={self.cpu_share} with workers=0")  # fmt: skip

    @classmethod
    def for_run(
        cls, procs: int, workers: int, *, cpu_share: float = 0.0, fast_decode: bool = False, read_threads: int = 2
    ) -> DecodeProcesses:  # fmt: skip
        """`procs` loaders sharing a run's `workers` CPU decode workers (at least one each, 0: none;
        they decode what nvjpeg cannot, and the CPU share)."""
        per_process = max(1, workers // procs) if workers > 0 else 0
        return cls(procs, per_process, cpu_share, fast_decode, read_threads)


def default_decode_procs(files: int, cores: int) -> int:
    """The GPU loaders `embed --gpu-decode` runs when `--gpu-decode-procs` is not given: 4 for
    100,000 files or more on a machine with 8 usable cores or more, else 1 (the loader thread alone).

    Why (H200, 16 cores, 1280x960 JPEGs; docs/performance.md): over 196,608 files 4 loaders took
    34.6-37.3 s a whole command against 41.6-46.4 s for one loader thread (session 15; 44.5 against
    49.7 s in session 12), while over 65,536 files they tied (24.1 against 23.8 s, session 12): the
    processes' start-up is paid once per run, so they pay on large folders only; the threshold lies
    between the two measured sizes. Each loader keeps about one core busy (session 8: 75 % of the
    loader thread was in its decode calls), and the CPU decode workers need cores of their own.
    """
    return AUTO_PROCS if files >= AUTO_MIN_FILES and cores >= AUTO_MIN_CORES else 1


def claimed_items(
    items: Sequence[ImageItem], block: int, counter: Any, claims: Any, rank: int
) -> Iterator[ImageItem]:
    """The blocks of `block` items loader `rank` claims, in claim order: each loader takes the next
    unclaimed block (`counter`, a shared integer with a lock) when its read-ahead wants more files,
    so a loader that starts late or runs slow takes fewer, and every block goes to one loader.
    `claims[rank]` counts its blocks (under the same lock): a process still starting when every
    block is gone need not be waited for."""
    blocks = -(-len(items) // block)
    while True:
        with counter.get_lock():
            k = counter.value
            if k >= blocks:
                return
            counter.value = k + 1
            claims[rank] += 1
        yield from items[k * block : (k + 1) * block]


def _unneeded(rank: int, blocks: int, counter: Any, claims: Any) -> bool:
    """Whether loader `rank` has no block and will get none (every block is claimed)."""
    with counter.get_lock():
        return bool(counter.value >= blocks and claims[rank] == 0)


def iter_gpu_loaded_procs(
    items: Sequence[ImageItem],
    preprocess_cfg: PreprocessConfig | dict[str, Any],
    batch_size: int,
    device: str,
    stats: LoadStats,
    decoder: str,
    setup: DecodeProcesses,
) -> Iterator[Batch]:
    """`gpu_loading.iter_gpu_loaded`'s batches, loaded by `setup.procs` loaders (see the module
    docstring); stage seconds are summed over them into `stats`. The processes start here:
    `start_decode_processes` starts them ahead, while the model loads."""
    _check_config(preprocess_cfg)  # before any process starts
    if not items:
        return
    with start_decode_processes(setup, device, decoder) as started:
        yield from started.load(items, preprocess_cfg, batch_size, stats)


def start_decode_processes(setup: DecodeProcesses, device: str, decoder: str) -> StartedDecodeProcesses:
    """Start the `setup.procs - 1` decode processes now, before their files are known.

    Each imports torch, opens `device` and warms its decoder up (one small JPEG decoded and
    preprocessed) while the caller goes on, e.g. to load the model. Close the result (it is a
    context manager) when it is not used; `load` closes it when done.
    """
    check_environment()  # a bad kernel setting fails here, in one line, not in each process
    return StartedDecodeProcesses(setup, device, decoder)


def _check_config(preprocess_cfg: PreprocessConfig | dict[str, Any]) -> dict[str, Any]:
    """The preprocessing as plain data for the processes, checked here."""
    from ..image.preprocess import PreprocessConfig

    if isinstance(preprocess_cfg, PreprocessConfig):
        return preprocess_cfg.to_dict()
    return PreprocessConfig.from_dict(preprocess_cfg).to_dict()


class StartedDecodeProcesses:
    """Decode processes started ahead of their files (`start_decode_processes`); `load` runs them,
    with a loader thread of this process, once."""

    def __init__(self, setup: DecodeProcesses, device: str, decoder: str) -> None:
        self.setup, self.device, self.decoder = setup, device, decoder
        self._used = False
        # Plain multiprocessing, not torch's: this process need not import torch (3-4 s on a GPU
        # host) before the processes start. Each process imports torch.multiprocessing itself, which
        # registers the CUDA tensor pickling its sends use; unpickling here finds torch's rebuild
        # functions by name.
        ctx = multiprocessing.get_context("spawn")
        self._release = ctx.Event()
        self._counter = ctx.Value("q", 0)  # the next unclaimed block (`claimed_items`)
        self._claims = ctx.Array("q", setup.procs, lock=False)  # blocks per loader, under the counter's lock
        self._children: list[_Child] = []
        self._started = time.perf_counter()
        try:
            for rank in range(1, setup.procs):  # rank 0 is this process's loader thread
                ours, theirs = ctx.Pipe(duplex=True)
                credits = ctx.Semaphore(_QUEUED_PER_PROCESS)
                process = ctx.Process(
                    target=_decode_process,
                    name=f"clipengine-gpu-decode-{rank}",
                    daemon=False,
                    args=(rank, device, decoder, setup, theirs, credits, self._release, self._counter,
                          self._claims, time.time()),
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
        """`items` in batches of `batch_size` rows from all loaders (once; closes the processes at the end)."""
        if self._used:
            raise RuntimeError("these decode processes have run already: start new ones")
        self._used = True
        own: _OwnLoader | None = None
        payload: bytes | None = None
        error: str | None = None
        try:
            cfg = _check_config(preprocess_cfg)
            block = default_decode_group(batch_size)
            if self._children:
                # Plain lists (Path objects pickle ~10x slower, on this process's GIL, while it
                # loads), pickled once for all the processes (files in memory are not copied per process).
                ids, sources = [i.id for i in items], [_plain(i.source) for i in items]
                payload, error = _pickled(("work", ids, sources, cfg, batch_size, block))
                del ids, sources
            for child in self._children:
                if payload is None:  # `_receive` raises it while the process lives
                    child.send_error = error
                    continue
                # From a thread: a process still starting does not read yet, and the item list
                # fills the pipe; this thread goes on to load meanwhile. `_stop` waits for it.
                child.sender = threading.Thread(target=_send_work, args=(child, payload),
                                                name=f"clipengine-gpu-decode-send-{child.rank}", daemon=True)  # fmt: skip
                child.sender.start()
            claiming = _Claims(self._counter, self._claims, -(-len(items) // block))
            own = _OwnLoader(items, cfg, batch_size, block, claiming, self.device, self.decoder, self.setup)
            yield from _receive(self._children, own, cfg["image_size"], stats, self._started, claiming, self.setup)
        finally:
            if own is not None:
                own.close()
            self.close()

    def close(self) -> None:
        """Let the processes go, and wait for them (a stuck one is terminated)."""
        _stop(self._children, self._release)
        self._children = []

    def __enter__(self) -> StartedDecodeProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(source: str | os.PathLike[str] | bytes) -> str | bytes:
    return source if isinstance(source, bytes) else os.fspath(source)


class _ItemList(Sequence[ImageItem]):
    """ImageItems rebuilt from plain id and source lists, slice by slice (a process builds only the
    blocks it claims)."""

    def __init__(self, ids: list[str], sources: list[str | bytes]) -> None:
        self.ids, self.sources = ids, sources

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> ImageItem: ...
    @overload
    def __getitem__(self, index: slice) -> list[ImageItem]: ...
    def __getitem__(self, index: int | slice) -> ImageItem | list[ImageItem]:
        if isinstance(index, slice):
            return [ImageItem(i, s) for i, s in zip(self.ids[index], self.sources[index], strict=True)]
        return ImageItem(self.ids[index], self.sources[index])


def _pickled(msg: tuple[Any, ...]) -> tuple[bytes, None] | tuple[None, str]:
    """`msg` as `Connection.send` would pickle it, or why it does not pickle (an id that does not,
    a MemoryError)."""
    from multiprocessing.reduction import ForkingPickler

    try:
        return bytes(ForkingPickler.dumps(msg)), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _send_work(child: _Child, payload: bytes) -> None:
    """Send a process its files (`_pickled`; its `recv` unpickles them); why that failed goes to
    `child.send_error` (`_receive` raises it while the process lives: it would wait for its files
    for ever)."""
    try:
        child.conn.send_bytes(payload)
    except BaseException as e:  # the process has gone (its exit code is reported), or a MemoryError
        child.send_error = f"{type(e).__name__}: {e}"


@dataclass(frozen=True)
class _Claims:
    """The shared block counter, the blocks each loader claimed, and how many blocks there are."""

    counter: Any
    per_loader: Any
    blocks: int

    def items(self, items: Sequence[ImageItem], block: int, rank: int) -> Iterator[ImageItem]:
        return claimed_items(items, block, self.counter, self.per_loader, rank)

    def unneeded(self, rank: int) -> bool:
        return _unneeded(rank, self.blocks, self.counter, self.per_loader)


@dataclass
class _Child:
    """A decode process as its consumer sees it."""

    rank: int
    process: Any  # multiprocessing's SpawnProcess
    conn: Any  # our end of its pipe: work goes out, its messages come in
    credits: Any  # a semaphore: the batches it may send ahead of the consumer
    heard: bool = False  # a message came: it has started (`_stop` lets it end by itself)
    sender: threading.Thread | None = None  # the thread sending it the file list (`load`)
    send_error: str | None = None  # why that send failed


class _OwnLoader:
    """This process's loader: what a decode process runs, on a thread, its messages through a queue
    (its batches stay in this process: no CUDA IPC). It loads from the start, while the processes
    are still starting, so the run never waits for them."""

    def __init__(self, items: Sequence[ImageItem], cfg: dict[str, Any], batch_size: int, block: int,
                 claiming: _Claims, device: str, decoder: str, setup: DecodeProcesses) -> None:  # fmt: skip
        self.messages: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=_QUEUED_PER_PROCESS)
        # One byte per message, so the consumer can wait on it beside the processes' pipes.
        self.signal, self._signal_out = multiprocessing.Pipe(duplex=False)
        self._stop = threading.Event()
        args = (claiming.items(items, block, 0), cfg, batch_size, device, decoder, setup)
        self._thread = threading.Thread(target=self._run, args=args, name="clipengine-gpu-decode-0", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[ImageItem], cfg: dict[str, Any], batch_size: int, device: str, decoder: str,
             setup: DecodeProcesses) -> None:  # fmt: skip
        try:
            jpeg = _new_decoder(device, decoder, setup)
            with prefer_kernels():  # several loaders share the GPU: the fused kernels pay (gpu_fused)
                done = _load_claimed(items, cfg, batch_size, jpeg, setup, lambda b: self._put(("batch", b)))
            if done is not None:
                self._put(("done", done))
        except BaseException as e:  # raised in the consumer, as the in-process loader's errors are
            self._put(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))

    def _put(self, msg: tuple[Any, ...]) -> bool:
        while not self._stop.is_set():
            try:
                self.messages.put(msg, timeout=_POLL_S)
            except queue.Full:
                continue
            self._signal_out.send_bytes(b"")
            return True
        return False

    def next_message(self) -> tuple[Any, ...]:
        """The next message, once `signal` is readable."""
        self.signal.recv_bytes()
        return self.messages.get_nowait()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)  # it stops after the decode call it is in
        if self._thread.is_alive():  # stuck in a driver call: it may still signal, so its pipe stays open
            return
        self.signal.close()
        self._signal_out.close()


def _receive(
    children: list[_Child],
    own: _OwnLoader,
    image_size: int,
    stats: LoadStats,
    spawned: float,
    claiming: _Claims,
    setup: DecodeProcesses,
) -> Iterator[Batch]:
    """The loaders' batches as they come, each in memory of this process (see `_own_copy`)."""
    pending: dict[int, _Child | _OwnLoader] = {c.rank: c for c in children}
    pending[0] = own
    assist = {"cpu_assist": 0.0, "nvjpeg": 0.0, "assist_wait_s": 0.0}  # summed over the loaders' "done"
    heard: set[int] = {0}
    ready: dict[int, dict[str, float]] = {}
    held: deque[tuple[Any, Any]] = deque()
    sent = {0: 0, **{c.rank: 0 for c in children}}  # images per loader
    started = time.perf_counter()
    first: float | None = None
    try:
        while pending:
            for c in children:  # one that has gone is an EOF (`_next_message`), with its exit code
                if c.send_error is not None and c.rank in pending and c.process.is_alive():
                    raise RuntimeError(
                        f"could not send GPU decode process {c.rank} its files: {c.send_error}"
                    )
            t0 = time.perf_counter()
            got = _next_message(pending, heard)
            if got is not None and got[1][0] == "batch":  # waiting for the "done"s is not the model starving
                stats.wait_s += time.perf_counter() - t0
            if got is None:  # nothing for a while: stop waiting for processes that will get no files
                for rank in [r for r in pending if r not in heard and claiming.unneeded(r)]:
                    del pending[rank]  # still starting: `_stop` terminates it
                # Only then the start-up limit: a process dropped above holds up nothing, however
                # long the run took.
                silent = sorted(set(pending) - heard)
                if silent and time.perf_counter() - started > _START_S:
                    raise RuntimeError(f"GPU decode process {silent[0]} sent nothing in {_START_S:.0f} s")
                continue
            rank, msg = got
            source = pending[rank]
            if msg[0] == "batch" and isinstance(source, _OwnLoader):
                gpu_batch: GpuBatch = msg[1]
                del msg
                sent[0] += len(gpu_batch.ids)
                stats.images += len(gpu_batch.ids)
                stats.failures += len(gpu_batch.failures)
                yield Batch(ids=gpu_batch.ids, pixels=gpu_batch.pixels, sizes=gpu_batch.sizes,  # type: ignore[arg-type]
                            failures=gpu_batch.failures)  # fmt: skip
                del gpu_batch
            elif msg[0] == "batch":
                _, ids, pixels, failures, sizes = msg
                del msg
                if first is None:
                    first = time.perf_counter()
                    _log.info("GPU decode processes: first batch %.1f s after their start, %.1f s after their files "
                              "were sent", first - spawned, first - started)  # fmt: skip
                sent[rank] += len(ids)
                stats.images += len(ids)
                stats.failures += len(failures)
                pixels = _own_copy(pixels, image_size, held)
                yield Batch(ids=ids, pixels=pixels, sizes=sizes, failures=failures)
                del pixels
                source.credits.release()  # type: ignore[union-attr]  # the consumer is done with it: one more
            elif msg[0] == "ready":
                ready[rank] = msg[1]
                if len(ready) == len(children):
                    _log_ready(ready)
            elif msg[0] == "done":
                del pending[rank]
                done = msg[1]
                stats.read_s += done["read_s"]
                stats.decode_s += done["decode_s"]
                stats.preprocess_s += done["preprocess_s"]
                for key in assist:
                    assist[key] += done.get(key, 0)
            else:  # "error": the loader's traceback, raised here as the in-process loader would
                where = "the loader thread" if rank == 0 else f"GPU decode process {rank}"
                raise RuntimeError(f"{where} failed: {msg[1]}\n{msg[2]}")
        wall = time.perf_counter() - started
        report_assist(int(assist["cpu_assist"]), int(assist["nvjpeg"]), assist["assist_wait_s"], wall, setup.workers,
                      setup.cpu_share, loaders=len(children) + 1)  # fmt: skip
        _log.info("%d GPU loaders: %d images in %.2f s (%.0f img/s); images per loader (0: this process's "
                  "thread): %s", len(children) + 1, stats.images, wall, stats.images / wall if wall > 0 else 0.0,
                  ", ".join(f"{k}: {v}" for k, v in sorted(sent.items())))  # fmt: skip
    finally:
        for event, _ in held:  # the copies still reading a child's memory finish before it may go
            event.synchronize()
        held.clear()


def _log_ready(ready: dict[int, dict[str, float]]) -> None:
    """Where the start-up went, for the slowest process of each phase (the next device session reads it)."""
    phases = ("spawn_s", "import_s", "device_s", "warm_decode_s", "warm_preprocess_s", "ready_s")
    slowest = {k: max(r.get(k, 0.0) for r in ready.values()) for k in phases}
    _log.info("%d GPU decode processes ready %.1f s after their start (slowest: spawn %.1f s, imports %.1f s, "
              "device %.1f s, decoder warm-up %.1f s, resize warm-up %.1f s)", len(ready), slowest["ready_s"],
              slowest["spawn_s"], slowest["import_s"], slowest["device_s"], slowest["warm_decode_s"],
              slowest["warm_preprocess_s"])  # fmt: skip


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
    pending: dict[int, _Child | _OwnLoader], heard: set[int]
) -> tuple[int, tuple[Any, ...]] | None:
    """The next message from a pending loader (by rank), or None after `_POLL_S` without one; raises
    when a process died."""
    from multiprocessing.connection import wait

    by_conn = {(s.signal if isinstance(s, _OwnLoader) else s.conn): rank for rank, s in pending.items()}
    ready = wait(list(by_conn), timeout=_POLL_S)
    for ready_conn in ready:
        rank = by_conn[ready_conn]
        source = pending[rank]
        if isinstance(source, _OwnLoader):
            return rank, source.next_message()
        conn: Any = source.conn
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # it exited (or crashed) before its last message
            source.process.join(timeout=5)
            raise RuntimeError(
                f"GPU decode process {rank} exited with code {source.process.exitcode} before it "
                "finished; the files it had not sent are not embedded (run again to resume)"
            ) from None
        heard.add(rank)
        source.heard = True
        return rank, msg
    return None


def _stop(children: list[_Child], release: Any) -> None:
    """Let the children go, and wait for them (a stuck one is terminated). One still starting (not
    heard from) is terminated at once: it has shared nothing yet, and its start-up takes seconds."""
    release.set()
    for c in children:
        if not c.heard and c.process.is_alive():
            c.process.terminate()
    for c in children:
        # The thread sending its file list ends first: its write fails once the child has gone
        # (or completes, the child reading it). Closed under it, the pipe's descriptor could be
        # reused by another file, which that write would then go on to.
        if c.sender is not None:
            c.sender.join(timeout=30)
            if c.sender.is_alive():  # started, yet not reading its files: stuck
                c.process.terminate()
                c.sender.join(timeout=5)
        if c.sender is None or not c.sender.is_alive():  # else the pipe closes once that thread ends
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
    counter: Any,
    claims: Any,
    spawned_at: float,
) -> None:
    """A decode process's main: start up (imports, the device, a decoder warm-up), then take the file
    list, load the blocks it claims, and send each batch as it is ready.

    One thread does all the CUDA work here, the sends included: torch's CUDA IPC bookkeeping is
    not safe against an allocation on another thread while a tensor is being shared (module
    docstring), so there is no loader thread and no decode thread in these processes.
    """
    import faulthandler

    from .decode_pool import as_child_process

    entered = time.time()
    faulthandler.enable()  # a crash in native code prints every thread's stack
    as_child_process()  # Ctrl-C is the parent's to handle; a parent that dies takes this process with it
    working = False  # set once the files came: only then may the consumer hold this process's memory
    try:
        import torch
        import torch.multiprocessing  # registers tensor pickling (CUDA IPC) for the pipe

        imported = time.time()
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.zeros(1, device=device)  # the CUDA context
        opened = time.time()
        with prefer_kernels():  # warmed up too: their first use compiles them (or loads them from triton's cache)
            decode_s, preprocess_s = _warm_up(_new_decoder(device, decoder, setup))  # its stats are not the run's
        warm = time.time()
        conn.send(("ready", {"spawn_s": entered - spawned_at, "import_s": imported - entered,
                             "device_s": opened - imported, "warm_decode_s": decode_s,
                             "warm_preprocess_s": preprocess_s, "ready_s": warm - spawned_at}))  # fmt: skip
        _, ids, sources, cfg, batch_size, block = conn.recv()  # ("work", ...)
        with counter.get_lock():
            none_left = counter.value >= -(-len(ids) // block)
        if none_left:  # ready after every block was claimed: done, without setting up a loader
            conn.send(("done", {"read_s": 0.0, "decode_s": 0.0, "preprocess_s": 0.0}))
            return
        items = _ItemList(ids, sources)
        working = True

        def send(b: GpuBatch) -> bool:
            if not _acquire(credits, release):
                return False  # the consumer stopped early
            conn.send(("batch", b.ids, b.pixels if b.ids else None, b.failures, b.sizes))
            del b
            if cuda:
                torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]  # frees what the consumer dropped
            return True

        mine = claimed_items(items, block, counter, claims, rank)
        with prefer_kernels():
            done = _load_claimed(mine, cfg, batch_size, _new_decoder(device, decoder, setup), setup, send)
        if done is not None:
            conn.send(("done", done))
    except (BrokenPipeError, ConnectionResetError, EOFError) as e:
        if not release.is_set():  # not the consumer going away (it sets `release` first): an error like any other
            with contextlib.suppress(OSError):
                conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    except BaseException as e:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        if working:  # the consumer may still copy from this process's device memory: stay until it is done
            release.wait()
        conn.close()


def _new_decoder(device: str, decoder: str, setup: DecodeProcesses) -> GpuJpegDecoder:
    from ..image.gpu_decode import GpuJpegDecoder

    if setup.decode_batch is None:
        return GpuJpegDecoder(device, library=decoder)
    return GpuJpegDecoder(device, decode_batch=setup.decode_batch)


def _load_claimed(
    items: Iterator[ImageItem],
    cfg: dict[str, Any],
    batch_size: int,
    jpeg: GpuJpegDecoder,
    setup: DecodeProcesses,
    emit: Callable[[GpuBatch], bool],
) -> dict[str, Any] | None:
    """One loader's work, in a decode process or on this process's loader thread: the blocks it
    claims (`items`) through `gpu_loading.loader_batches`, each batch to `emit` (False: the consumer has
    gone). Returns the decoder's stats, or None when stopped early."""
    from ..image.preprocess import PreprocessConfig
    from .cpu_assist import CpuAssist
    from .decode_pool import make_executor
    from .gpu_loading import loader_batches

    executor = make_executor(setup.workers) if setup.workers > 0 else None
    try:
        assist = (CpuAssist(executor, setup.workers, setup.cpu_share, cfg, fast_decode=setup.fast_decode)
                  if executor is not None else None)  # fmt: skip
        if assist is not None and setup.cpu_share > 0:
            assist.prime()
        batches = loader_batches(items, PreprocessConfig.from_dict(cfg), batch_size, jpeg,
                                 read_threads=setup.read_threads, decode_ahead=False, assist=assist)  # fmt: skip
        try:
            for b in batches:
                if not emit(b):
                    return None
        finally:
            close = getattr(batches, "close", None)  # stops the reader threads
            if close is not None:
                close()
        return asdict(jpeg.stats)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _warm_up(jpeg: GpuJpegDecoder) -> tuple[float, float]:
    """Decode and preprocess one small JPEG: the decoder's and the resize's first calls set up their
    libraries (nvjpeg, cuBLAS), which would otherwise delay the first batch. Returns their seconds."""
    import io

    from PIL import Image

    from ..image.gpu_preprocess import preprocess_tensors
    from ..image.preprocess import PreprocessConfig

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 60, 30)).save(buffer, format="JPEG")
    cfg = PreprocessConfig(image_size=32)
    t0 = time.perf_counter()
    decoded = jpeg.decode([("warm-up.jpg", buffer.getvalue())], cfg)
    t1 = time.perf_counter()
    if decoded.images:
        preprocess_tensors(decoded.images, cfg).sum().item()  # .item(): the kernels have run
    return t1 - t0, time.perf_counter() - t1


def _acquire(credits: Any, release: Any) -> bool:
    """Wait for the consumer to take a batch (a credit), unless it has gone; whether one was got."""
    while not release.is_set():
        if credits.acquire(timeout=_POLL_S):
            return True
    return False
