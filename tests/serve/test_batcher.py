"""MicroBatcher: batches form under load, rows go back to their own request, limits and shutdown hold."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from clipengine.serve.batcher import BatcherClosedError, MicroBatcher, QueueFullError
from clipengine.serve.metrics import ServeMetrics


class _Backend:
    """Row i of the output is [item, len(batch)]; optionally blocks until `gate` opens."""

    def __init__(self, gate: threading.Event | None = None, fail_on: int | None = None) -> None:
        self.gate = gate
        self.fail_on = fail_on
        self.batches: list[list[int]] = []
        self.entered = threading.Event()

    def __call__(self, items: list[int]) -> np.ndarray:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        self.batches.append(list(items))
        return np.array([[x, len(items)] for x in items], dtype=np.float32)


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def _until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.005)


def _batcher(backend: _Backend, **kw: Any) -> MicroBatcher[int]:
    opts = {"max_batch": 8, "max_wait_s": 0.05, "max_queue": 64, **kw}
    return MicroBatcher("test", backend, **opts)


def test_concurrent_submits_share_batches_and_get_their_own_rows() -> None:
    gate = threading.Event()
    backend = _Backend(gate)

    async def main() -> list[np.ndarray]:
        b = _batcher(backend, max_batch=8)
        b.start()
        first = asyncio.create_task(b.submit([0]))
        await _until(backend.entered.is_set)  # item 0 is in the backend; the rest must queue
        rest = [asyncio.create_task(b.submit([i, 100 + i])) for i in range(1, 9)]
        await _until(lambda: b.depth == 16)
        gate.set()
        out = [await first] + [await t for t in rest]
        await b.close()
        return out

    outs = _run(main())
    assert outs[0][:, 0].tolist() == [0]
    for i, rows in enumerate(outs[1:], start=1):
        assert rows[:, 0].tolist() == [i, 100 + i]
    assert [len(x) for x in backend.batches] == [1, 8, 8]  # 16 queued items -> two full batches


def test_lone_item_is_sent_after_max_wait_without_company() -> None:
    backend = _Backend()

    async def main() -> np.ndarray:
        b = _batcher(backend, max_wait_s=0.001)
        b.start()
        out = await b.submit([7])
        await b.close()
        return out

    assert _run(main()).tolist() == [[7, 1]]


def test_full_queue_raises_and_counts_rejections() -> None:
    gate = threading.Event()
    backend = _Backend(gate)
    metrics = ServeMetrics()

    async def main() -> None:
        b = _batcher(backend, max_batch=1, max_queue=2, metrics=metrics)
        b.start()
        first = asyncio.create_task(b.submit([1]))
        await _until(backend.entered.is_set)
        queued = asyncio.create_task(b.submit([2, 3]))
        await _until(lambda: b.depth == 2)
        with pytest.raises(QueueFullError, match="full"):
            await b.submit([4])
        assert "clipengine_queue_depth" in metrics.render()
        gate.set()
        await first
        await queued
        await b.close()

    _run(main())
    assert metrics.rejected.value(queue="test") == 1


def test_a_failing_item_fails_only_its_own_request() -> None:
    gate = threading.Event()
    backend = _Backend(gate, fail_on=13)

    async def main() -> tuple[Any, ...]:
        b = _batcher(backend)
        b.start()
        blocker = asyncio.create_task(b.submit([0]))
        await _until(backend.entered.is_set)
        good = asyncio.create_task(b.submit([1]))
        bad = asyncio.create_task(b.submit([13]))
        await _until(lambda: b.depth == 2)
        gate.set()
        results = await asyncio.gather(blocker, good, bad, return_exceptions=True)
        await b.close()
        return tuple(results)

    _blocker, good, bad = _run(main())
    assert good.tolist() == [[1, 1]]  # retried alone after the shared batch failed
    assert isinstance(bad, ValueError)


def test_cancelled_items_are_skipped() -> None:
    gate = threading.Event()
    backend = _Backend(gate)

    async def main() -> None:
        b = _batcher(backend)
        b.start()
        blocker = asyncio.create_task(b.submit([0]))
        await _until(backend.entered.is_set)
        doomed = asyncio.create_task(b.submit([5]))
        kept = asyncio.create_task(b.submit([6]))
        await _until(lambda: b.depth == 2)
        doomed.cancel()
        gate.set()
        await blocker
        assert (await kept).tolist() == [[6, 1]]
        await b.close()

    _run(main())
    assert [5] not in backend.batches and all(5 not in batch for batch in backend.batches)


def test_close_finishes_queued_work_then_refuses_new_items() -> None:
    gate = threading.Event()
    backend = _Backend(gate)

    async def main() -> None:
        b = _batcher(backend)
        b.start()
        tasks = [asyncio.create_task(b.submit([i])) for i in range(3)]
        await _until(backend.entered.is_set)
        closing = asyncio.create_task(b.close())
        await _until(lambda: not b.running)
        with pytest.raises(BatcherClosedError):
            await b.submit([9])
        gate.set()
        await closing
        assert sorted(int(r[0, 0]) for r in await asyncio.gather(*tasks)) == [0, 1, 2]

    _run(main())


def test_backend_returning_wrong_shape_is_an_error() -> None:
    async def main() -> None:
        b = MicroBatcher(
            "bad", lambda items: np.zeros((len(items) + 1, 2)), max_batch=4, max_wait_s=0, max_queue=4
        )
        b.start()
        with pytest.raises(RuntimeError, match="returned shape"):
            await b.submit([1])
        await b.close()

    _run(main())


def test_lone_request_skips_the_wait_when_no_one_else_is_in_flight() -> None:
    backend = _Backend()
    seen: list[int] = []

    def others_active(waiting: int) -> bool:
        seen.append(waiting)
        return False  # the app has no other request in progress

    async def main() -> np.ndarray:
        b = _batcher(backend, max_wait_s=1000.0, others_active=others_active)  # would wait ~forever
        b.start()
        out = await b.submit([3])
        await b.close()
        return out

    assert _run(main()).tolist() == [[3, 1]]
    assert seen == [1]
