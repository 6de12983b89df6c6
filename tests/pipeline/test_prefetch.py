"""prefetch: order, errors at their position, bounded read-ahead, clean early stop."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from clipengine.pipeline.prefetch import prefetch


def test_yields_everything_in_order() -> None:
    assert list(prefetch(range(100), depth=3)) == list(range(100))
    assert list(prefetch([], depth=1)) == []


def test_error_is_raised_at_its_position() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise RuntimeError("disk gone")

    got = []
    with pytest.raises(RuntimeError, match="disk gone"):
        for x in prefetch(source()):
            got.append(x)
    assert got == [1, 2]


def test_error_from_iter_itself_is_raised_not_hung() -> None:
    """An iterable whose __iter__ raises: the error reaches the consumer (it used to wait forever)."""

    class Broken:
        def __iter__(self) -> Iterator[int]:
            raise RuntimeError("cannot list")

    outcome: list[BaseException] = []

    def consume() -> None:
        try:
            list(prefetch(Broken()))
        except BaseException as e:
            outcome.append(e)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=5)  # returns at once unless the consumer hangs
    assert not consumer.is_alive(), "prefetch hung on an iterable whose __iter__ raised"
    assert [str(e) for e in outcome] == ["cannot list"] and isinstance(outcome[0], RuntimeError)


def test_reads_at_most_depth_ahead_and_runs_on_another_thread() -> None:
    consumed = 0
    lead = []
    threads = set()

    def source() -> Iterator[int]:
        for i in range(50):
            threads.add(threading.current_thread().name)
            lead.append(i - consumed)  # items produced ahead of the consumer when this one starts
            yield i

    for x in prefetch(source(), depth=2):
        assert x == consumed
        consumed += 1
    # at most `depth` waiting in the queue plus the one the producer holds while the queue is full
    assert consumed == 50 and max(lead) <= 3
    assert threads == {"clipengine-prefetch"}


def test_early_stop_closes_the_source_and_joins() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            closed.set()

    it = prefetch(source(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert closed.is_set()  # the source's cleanup ran before close() returned
    assert not any(t.name == "clipengine-prefetch" and t.is_alive() for t in threading.enumerate())


def test_rejects_depth_below_one() -> None:
    with pytest.raises(ValueError, match="depth must be >= 1"):
        next(prefetch([1], depth=0))
