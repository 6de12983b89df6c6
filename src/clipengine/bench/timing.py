"""Benchmarks of a backend over real images: warm-up, repeats, percentiles -> BenchResult (no printing)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatasetError
from ..pipeline.batching import LoadStats, iter_batches, load_chunk, make_executor, warm_executor
from ..pipeline.embed import embed_batch
from ..types import Backend, ImageItem, IntArray

if TYPE_CHECKING:
    from ..image.preprocess import PreprocessConfig

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "BatchBench",
    "BenchResult",
    "Timing",
    "bench_pipeline",
    "percentile",
    "time_call",
]

DEFAULT_BATCH_SIZES = (1, 8, 16, 32)


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100, linear interpolation) of `samples`; 0.0 when empty."""
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q)) if len(samples) else 0.0


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one operation, in milliseconds."""

    samples_ms: tuple[float, ...]

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms)) if self.samples_ms else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p90_ms(self) -> float:
        return percentile(self.samples_ms, 90)

    @property
    def p99_ms(self) -> float:
        return percentile(self.samples_ms, 99)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": len(self.samples_ms),
            "mean_ms": self.mean_ms,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "min_ms": min(self.samples_ms, default=0.0),
            "max_ms": max(self.samples_ms, default=0.0),
        }


def time_call(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10) -> Timing:
    """Call `fn` `warmup` times untimed, then `repeats` times timed."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return Timing(tuple(samples))


@dataclass(frozen=True)
class BatchBench:
    """One batch size: a full decode -> preprocess -> infer pass over all images (median of repeats)."""

    batch_size: int
    images: int  # images embedded per pass (failures excluded)
    wall_ms: float  # end-to-end time of the pass (unreadable files' time included)
    decode_preprocess_ms_per_image: float  # read + decode + preprocess CPU time (all workers) / images
    infer_ms_per_image: float  # time inside encode_images / images
    infer_batch: Timing  # per-call latency of encode_images
    text: Timing | None  # encode_texts on a batch of 4 texts

    @property
    def end_to_end_fps(self) -> float:
        """Images per second through the whole pipeline."""
        return 1000.0 * self.images / self.wall_ms if self.wall_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "images": self.images,
            "wall_ms": self.wall_ms,
            "decode_preprocess_ms_per_image": self.decode_preprocess_ms_per_image,
            "infer_ms_per_image": self.infer_ms_per_image,
            "end_to_end_fps": self.end_to_end_fps,
            "infer_batch": self.infer_batch.to_dict(),
            "text_batch4": self.text.to_dict() if self.text else None,
        }


@dataclass(frozen=True)
class BenchResult:
    """A whole benchmark. The seed's headline is the pass at `batches[0].batch_size`."""

    images: int  # embedded by the headline pass (total_ms is its time)
    failed: int  # unreadable in that pass
    backend: str
    device: str
    precision: str
    workers: int
    batches: list[BatchBench] = field(default_factory=list)
    model: str | None = None

    @property
    def total_ms(self) -> float:
        """End-to-end time of the headline pass."""
        return self.batches[0].wall_ms if self.batches else 0.0

    @property
    def avg_ms(self) -> float:
        """total_ms / images."""
        return self.total_ms / self.images if self.images else 0.0

    @property
    def fps(self) -> float:
        """1000 / avg_ms."""
        return 1000.0 / self.avg_ms if self.avg_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.backend,
            "device": self.device,
            "precision": self.precision,
            "workers": self.workers,
            "images": self.images,
            "failed": self.failed,
            "total_ms": self.total_ms,
            "avg_ms": self.avg_ms,
            "fps": self.fps,
            "batches": [b.to_dict() for b in self.batches],
        }


def _one_pass(
    items: Sequence[ImageItem],
    backend: Backend,
    cfg: dict[str, Any],
    batch_size: int,
    executor: Any,
    fast_decode: bool,
) -> tuple[float, int, int, LoadStats, list[float]]:
    loads = LoadStats()
    infer_ms: list[float] = []
    embedded = failed = 0
    t0 = time.perf_counter()
    for batch in iter_batches(
        items, cfg, batch_size, executor=executor, stats=loads, fast_decode=fast_decode
    ):
        failed += len(batch.failures)
        if batch.ids:
            t1 = time.perf_counter()
            embed_batch(backend, batch)
            infer_ms.append((time.perf_counter() - t1) * 1000.0)
            embedded += len(batch.ids)
    return (time.perf_counter() - t0) * 1000.0, embedded, failed, loads, infer_ms


def _warm_decoder(cfg: dict[str, Any], executor: Any, workers: int, fast_decode: bool) -> None:
    """Decode and preprocess a generated JPEG untimed where the passes will decode, so the first timed
    image does not pay for loading the decoder (with --workers 0 that was 25 ms on a 1-image benchmark
    whose image then took under 1 ms). Not a user's file: one that crashed a worker here would end
    the benchmark, where the timed passes would just list it as a failure."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, format="JPEG")
    pair = [("warm-up.jpg", buffer.getvalue())]
    if executor is None:
        load_chunk(pair, cfg, fast_decode)
        return
    for fut in [executor.submit(load_chunk, pair, cfg, fast_decode) for _ in range(2 * workers)]:
        fut.result()


def bench_pipeline(
    items: Sequence[ImageItem],
    backend: Backend,
    preprocess_cfg: PreprocessConfig | dict[str, Any],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    workers: int = 0,
    warmup: int = 2,
    repeats: int = 1,
    text_tokens: IntArray | None = None,
    model: str | None = None,
    progress: Callable[[int], None] | None = None,
    fast_decode: bool = False,
) -> BenchResult:
    """Time the full pipeline over `items` once per batch size (after warm-up), keeping the median pass.

    Args:
        items: the images (decode failures are counted, not timed).
        backend: the runtime under test.
        preprocess_cfg: the model's preprocessing.
        batch_sizes: one row per size; the first one gives the seed's headline numbers.
        workers: decode processes (0: in this process). The pool starts before timing begins.
        warmup: untimed backend calls per batch size (on zeros) before its passes.
        repeats: passes per batch size; the pass with the median wall time is reported.
        text_tokens: (4, L) tokens for the text-encode timing (skipped if None).
        model: a label for reports.
        progress: called with a batch size as each one finishes.
        fast_decode: reduced-scale JPEG decoding (see `pipeline.batching.load_chunk`).

    Returns:
        BenchResult (no printing; see `clipengine.report`).

    Raises:
        ValueError: no items or a batch size below 1. DatasetError: none of the images could be decoded.
    """
    if not items:
        raise ValueError("nothing to benchmark: no images")
    if any(b < 1 for b in batch_sizes) or not batch_sizes:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    cfg = preprocess_cfg if isinstance(preprocess_cfg, dict) else preprocess_cfg.to_dict()
    size = backend.image_size
    executor = make_executor(workers)
    rows: list[BatchBench] = []
    head_images = head_failed = 0
    try:
        if executor is not None:
            warm_executor(executor, workers, cfg)
        _warm_decoder(cfg, executor, workers, fast_decode)
        for b in batch_sizes:
            # No bigger than a pass's batches: --batch 100000 over 6 images ran 2 x 100000 zeros (1.2 GB
            # even at 32 px; 60 GB at 224) through the model for batches that never hold more than 6.
            zeros = np.zeros((min(b, len(items)), 3, size, size), dtype=np.float32)
            for _ in range(warmup):
                backend.encode_images(zeros)
            passes = sorted(
                (_one_pass(items, backend, cfg, b, executor, fast_decode) for _ in range(max(1, repeats))),
                key=lambda p: p[0],
            )
            wall_ms, n_images, n_failed, loads, infer_ms = passes[len(passes) // 2]
            if not n_images:
                raise DatasetError(f"nothing to benchmark: none of the {n_failed} images could be decoded")
            if not rows:  # the headline's counts are its own pass's: a file may be readable by a later one
                head_images, head_failed = n_images, n_failed
            text = None
            if text_tokens is not None:
                text = time_call(lambda: backend.encode_texts(text_tokens), warmup=warmup, repeats=10)
            rows.append(
                BatchBench(
                    batch_size=b,
                    images=n_images,
                    wall_ms=wall_ms,
                    # Over the embedded images only: an unreadable file's time is never added to
                    # `loads` (dividing by all inputs, as it did, understated every image's cost).
                    decode_preprocess_ms_per_image=1000.0
                    * (loads.read_s + loads.decode_s + loads.preprocess_s)
                    / n_images,
                    infer_ms_per_image=sum(infer_ms) / n_images,
                    infer_batch=Timing(tuple(infer_ms)),
                    text=text,
                )
            )
            if progress is not None:
                progress(b)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return BenchResult(
        images=head_images,
        failed=head_failed,
        backend=backend.name,
        device=backend.device,
        precision=backend.precision,
        workers=workers,
        batches=rows,
        model=model,
    )
