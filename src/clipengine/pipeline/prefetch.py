"""Run an iterator ahead of its consumer on a thread of its own (bounded, in order, errors passed on).

For loaders whose work is mostly outside the GIL or on a device queue: with the GPU loader
(`pipeline.gpu_loading`) the next batch's JPEGs are read, decoded and preprocessed while the
consumer waits for the model's output of the current one, instead of after it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")
_POLL_S = 0.05  # how often a blocked producer checks whether the consumer has gone


def prefetch(items: Iterable[T], depth: int = 2, name: str = "clipengine-prefetch") -> Generator[T, None, None]:
    """Yield `items` in order while a thread produces up to `depth` of them ahead.

    An exception raised by `items` is raised here, at the position it happened. When the consumer
    stops early (closes this generator), the thread stops after the item it is producing and
    closes `items` (so a generator's cleanup runs), and this generator returns once it has.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    slots: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator: Iterator[T] | None = None
        try:
            iterator = iter(items)  # may raise too: handed over like any other error
            for item in iterator:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((False, error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            is_item, value = slots.get()
            if is_item:
                yield value  # type: ignore[misc]
            elif isinstance(value, BaseException):
                raise value
            else:
                return
    finally:
        stop.set()
        thread.join()
