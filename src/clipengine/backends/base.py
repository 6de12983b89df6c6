"""Shared pieces of every backend: the L2 normalisation and the fixed-batch chunking helper."""

from __future__ import annotations

import operator
import os
from collections.abc import Callable

import numpy as np

from ..errors import InputError
from ..types import Backend, FloatArray

__all__ = [
    "TEXT_LENGTH_BUCKET",
    "THREADS_PER_CPU",
    "Backend",
    "check_thread_count",
    "l2_normalize",
    "run_in_chunks",
    "truncated_text_length",
]

THREADS_PER_CPU = 4  # a thread-count option above this many per CPU is refused (see check_thread_count)
TEXT_LENGTH_BUCKET = 8  # truncated text lengths are rounded up to a multiple of this (few shapes)


def truncated_text_length(tokens: np.ndarray, bucket: int = TEXT_LENGTH_BUCKET) -> int:
    """Positions a batch of (N, L) token rows needs: its longest end-of-text (the highest id) + 1,
    rounded up to `bucket`, at most L. Exact under CLIP's causal mask: no position after a text's
    EOT can change the EOT state, so dropping the columns after the batch's last EOT changes nothing.
    """
    length = int(tokens.shape[1])
    if tokens.shape[0] == 0:
        return length
    needed = int(tokens.astype(np.int32).argmax(axis=-1).max()) + 1
    return min(-(-needed // bucket) * bucket, length)


def check_thread_count(option: str, value: object) -> int | None:
    """A runtime thread-count option: None or an integer >= 0 (0 and None: the runtime's choice), at
    most THREADS_PER_CPU x the CPUs here.

    Raises:
        InputError: a negative, non-integer or boolean count (runtimes fail late or obscurely on
            those), or one above the limit: ONNX Runtime starts every thread when it opens an engine
            (1,000 on 2 cores took 51 s per engine, 10**6 never finished, 2**40 was a TypeError).
    """
    if value is None:
        return None
    try:
        count = -1 if isinstance(value, bool | np.bool_) else operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        count = -1
    if count < 0:
        raise InputError(f"{option} must be an integer >= 0 (0: the runtime's choice), got {value!r}")
    cpus = os.cpu_count() or 1
    if count > THREADS_PER_CPU * cpus:
        raise InputError(
            f"{option}={count} is more than {THREADS_PER_CPU} threads per CPU ({cpus} CPUs here); "
            "use at most the CPU count, or 0 for the runtime's choice"
        )
    return count


def l2_normalize(x: FloatArray) -> FloatArray:
    """Row-wise unit L2 norm in float32; an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    out: FloatArray = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return out


def run_in_chunks(
    fn: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch: int, pad: bool
) -> np.ndarray:
    """Call `fn` on slices of `inputs` of at most `batch` rows and concatenate the outputs.

    With `pad=True` (fixed-batch engines) the last slice is padded to exactly `batch` rows by
    repeating its last row, and the padding rows are dropped from the output.
    """
    n = inputs.shape[0]
    outs = []
    for start in range(0, n, batch):
        chunk = inputs[start : start + batch]
        rows = chunk.shape[0]
        if pad and rows < batch:
            filler = np.repeat(chunk[-1:], batch - rows, axis=0)
            chunk = np.concatenate([chunk, filler], axis=0)
        outs.append(np.asarray(fn(chunk))[:rows])
    return np.concatenate(outs, axis=0) if outs else np.zeros((0,), dtype=np.float32)
