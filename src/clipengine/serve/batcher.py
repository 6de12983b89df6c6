"""Dynamic micro-batching: gather items from concurrent requests into one backend call per batch.

Each request submits its items and awaits one future per item, so every row of a batch result goes
back to exactly the request that sent it. The backend runs in one worker thread per batcher; the
event loop only collects and dispatches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from .metrics import ServeMetrics

__all__ = ["BatcherClosedError", "MicroBatcher", "QueueFullError"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class QueueFullError(Exception):
    """The batcher's queue has no room for this request's items (answered with 429 + Retry-After)."""


class BatcherClosedError(Exception):
    """The batcher is shutting down and takes no new items (answered with 503)."""


@dataclass
class _Entry(Generic[T]):
    item: T
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[T]):
    """Collects items into batches of at most `max_batch`, waiting at most `max_wait_s` for the first.

    Args:
        name: queue name used in metrics and thread names ("image", "text").
        fn: backend call, list of N items -> (N, D) array; runs in this batcher's worker thread.
        max_batch: most items per call.
        max_wait_s: how long the oldest waiting item may wait for the batch to fill.
        max_queue: most items waiting; a request that does not fit raises QueueFullError (a request
            larger than the whole queue is still admitted when the queue is empty).
        metrics: where batch sizes, call times, queue depth and rejections are recorded.
        others_active: optional hint, called with the number of requests waiting in this batcher;
            True when other requests are in flight elsewhere in the app and may soon add items.
            When it says False the batch is sent at once instead of waiting `max_wait_s`, so a lone
            client never pays the batching delay.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[list[T]], np.ndarray],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        metrics: ServeMetrics | None = None,
        others_active: Callable[[int], bool] | None = None,
    ) -> None:
        self.name = name
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._metrics = metrics
        self._pending: deque[_Entry[T]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._others_active = others_active
        self._waiting_requests = 0  # submit() calls not yet answered
        if metrics is not None:
            metrics.queue_depth.set_function(lambda: float(self.depth), queue=name)

    @property
    def depth(self) -> int:
        """Items waiting for a backend call (not counting the batch being computed)."""
        return len(self._pending)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    def start(self) -> None:
        """Start the collector on the running event loop (call from inside the loop)."""
        if self._task is not None:
            raise RuntimeError(f"batcher {self.name!r} already started")
        self._closing = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"clipengine-{self.name}")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop taking items, finish every item already queued, then stop the worker thread."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, items: Sequence[T]) -> np.ndarray:
        """Queue `items` and wait for their rows: returns (len(items), D) in the order given."""
        if not items:
            raise ValueError("submit() needs at least one item")
        if self._task is None or self._closing or self._wakeup is None:
            raise BatcherClosedError(f"the {self.name} queue is not accepting work")
        if self._pending and len(self._pending) + len(items) > self.max_queue:
            if self._metrics is not None:
                self._metrics.rejected.inc(len(items), queue=self.name)
            raise QueueFullError(
                f"the {self.name} queue is full ({len(self._pending)} of {self.max_queue} items waiting)"
            )
        loop = asyncio.get_running_loop()
        entries = [_Entry(item, loop.create_future()) for item in items]
        self._pending.extend(entries)
        self._waiting_requests += 1
        self._wakeup.set()
        try:
            rows = await asyncio.gather(*(e.future for e in entries))
        except BaseException:
            for e in entries:  # timeout or client gone: the collector skips cancelled entries
                e.future.cancel()
            # ... and they leave the queue now: left in it while the backend is busy, they counted
            # towards max_queue (429 for live requests) and the depth gauge for work nobody awaits.
            mine = {id(e) for e in entries}
            self._pending = deque(e for e in self._pending if id(e) not in mine)
            raise
        finally:
            self._waiting_requests -= 1
        return np.stack(rows)

    async def _run(self) -> None:
        assert self._wakeup is not None  # set by start()
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_for_company()
            batch: list[_Entry[T]] = []
            while self._pending and len(batch) < self.max_batch:
                entry = self._pending.popleft()
                if not entry.future.done():  # cancelled by a timed-out request
                    batch.append(entry)
            if batch:
                await self._dispatch(batch)

    async def _wait_for_company(self) -> None:
        """Wait until the batch is full or the oldest item has waited max_wait_s."""
        assert self._wakeup is not None
        deadline = self._pending[0].enqueued + self.max_wait_s
        while len(self._pending) < self.max_batch and not self._closing:
            if self._others_active is not None and not self._others_active(self._waiting_requests):
                return  # every request in flight is already queued here: waiting cannot help
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _dispatch(self, batch: list[_Entry[T]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self._call, [e.item for e in batch])
        except Exception as error:  # delivered to the waiting requests, never swallowed
            if len(batch) > 1:
                # One bad item must not fail its neighbours: retry one by one, so each request gets
                # its own result or its own error.
                log.warning(
                    "%s batch of %d failed (%s); retrying items one by one", self.name, len(batch), error
                )
                for entry in batch:
                    await self._dispatch([entry])
                return
            _deliver_error(batch[0], error)
            return
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch), queue=self.name)
            self._metrics.batch_latency.observe(time.perf_counter() - started, queue=self.name)
        for entry, row in zip(batch, out, strict=True):
            if not entry.future.done():
                entry.future.set_result(row)

    def _call(self, items: list[T]) -> np.ndarray:
        out = np.asarray(self._fn(items), dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(items):
            raise RuntimeError(f"{self.name} backend returned shape {out.shape} for {len(items)} items")
        return out


def _deliver_error(entry: _Entry[Any], error: BaseException) -> None:
    if not entry.future.done():
        entry.future.set_exception(error)
