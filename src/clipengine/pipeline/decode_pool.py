"""The decode workers' process pool, and what happens when one of its processes dies.

A worker can die in the middle of a task: a decoder bug on a crafted file (a segfault in a C
library), the OOM killer on a huge image, a stray `kill`. `concurrent.futures` then marks the whole
pool broken: every task in flight fails with `BrokenProcessPool` and every later `submit` raises
it, so one bad file would end a run of 10,000, and a resume would die on it again. `DecodePool`
starts a new pool at the next `submit` instead, and `solo()` gives a one-process pool of the same
kind, so that the tasks that were in flight can be run again one at a time and a process that dies
there names the file that killed it (`batching` does that, and makes it that file's `Failure`).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, ParamSpec, TypeVar

__all__ = ["BrokenProcessPool", "DecodePool", "Solo", "as_child_process", "make_executor"]

_log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def make_executor(workers: int) -> DecodePool | None:
    """A process pool for `workers` > 0 (spawn context: safe beside torch/ORT threads), else None."""
    if workers <= 0:
        return None
    return DecodePool(workers)


def _init_worker() -> None:
    as_child_process()


def as_child_process() -> None:
    """Set up a helper process: Ctrl-C reaches the whole process group, so let only the parent
    handle it (it cancels queued work and shuts its helpers down) instead of every helper dying
    with its own traceback; and end this process when the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()


def _exit_with_parent() -> None:
    """End this worker when its parent dies. A pool worker waits on its task queue, a pipe whose
    write end it holds itself, so a parent killed with SIGKILL (or by the OOM killer) would leave it
    blocked there forever; the parent's sentinel becomes ready when the parent is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)  # no cleanup to run: the parent that wanted the results is gone

    threading.Thread(target=watch, name="clipengine-parent-watch", daemon=True).start()


class DecodePool(Executor):
    """A spawn-context process pool of `workers` processes that outlives the death of one of them.

    Args:
        workers: processes in the pool.
        initializer: run in each new process (default: ignore Ctrl-C, exit with the parent).
            Tests pass one that makes a chosen file kill its process.
    """

    def __init__(self, workers: int, initializer: Callable[[], None] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, got {workers}")
        self._max_workers = workers  # the name ProcessPoolExecutor uses (`batching.iter_batches` reads it)
        self._initializer = initializer if initializer is not None else _init_worker
        self._lock = threading.Lock()
        self._pool = self._new_pool(workers)
        self.restarts = 0  # pools started again after a process died

    @property
    def workers(self) -> int:
        return self._max_workers

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=self._initializer
        )

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Queue `fn(*args, **kwargs)`; after a process died, on a new pool (the old one's tasks fail
        with `BrokenProcessPool`: their callers run them again, see `batching`)."""
        with self._lock:
            try:
                return self._pool.submit(fn, *args, **kwargs)
            except BrokenProcessPool:
                _log.warning("a decode worker process died; starting a new pool of %d", self._max_workers)
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool(self._max_workers)
                self.restarts += 1
                return self._pool.submit(fn, *args, **kwargs)

    def solo(self) -> Solo:
        """A runner of tasks one at a time in a process of its own, with this pool's initializer."""
        return Solo(lambda: self._new_pool(1))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


class Solo:
    """Runs tasks one at a time in one process of its own (started on first use), so a task that
    kills that process is known to be the one that did; the next task gets a new process."""

    def __init__(self, new_pool: Callable[[], ProcessPoolExecutor]) -> None:
        self._new_pool = new_pool
        self._pool: ProcessPoolExecutor | None = None

    def run(self, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
        """(True, fn(*args)), or (False, None) when the process died running it. An exception `fn`
        raises is raised here, as with any future."""
        if self._pool is None:
            self._pool = self._new_pool()
        try:
            return True, self._pool.submit(fn, *args).result()
        except BrokenProcessPool:
            self._pool.shutdown(wait=False)
            self._pool = None
            return False, None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Solo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
