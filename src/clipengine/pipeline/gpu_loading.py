"""Files -> Batches decoded and preprocessed on a GPU (nvjpeg), for backends that take device tensors.

The alternative to `batching.iter_batches` (CPU decode workers) when the model runs on a CUDA GPU:
reader threads fetch file bytes, nvjpeg decodes the JPEGs in batches, and resize / crop / normalise
run on the GPU, so pixels never cross back to the host (`pipeline.gpu_batching`). Anything nvjpeg
does not take (PNG, CMYK, odd or truncated JPEGs) goes through the exact CPU decoder; what neither
can decode becomes a `Failure` on its batch, as in the CPU path. Batch.pixels is then a torch tensor
on the GPU: only backends that accept one (the torch backend) can consume these batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..image.gpu_decode import GpuJpegDecoder
from ..types import Batch, ImageItem
from .gpu_batching import (
    GpuBatch,
    assemble_batches,
    default_decode_group,
    iter_decoded_chunks,
    iter_gpu_batches,
)
from .prefetch import prefetch

if TYPE_CHECKING:
    from ..image.preprocess import PreprocessConfig
    from .batching import LoadStats
    from .cpu_assist import CpuAssist

__all__ = ["iter_gpu_loaded", "loader_batches"]

_log = logging.getLogger(__name__)
# Warn when the loader spent more than this fraction of its run waiting for CPU assist workers.
_ASSIST_WAIT_WARNING = 0.1


def iter_gpu_loaded(
    items: Sequence[ImageItem],
    preprocess_cfg: PreprocessConfig | dict[str, Any],
    batch_size: int,
    device: str,
    stats: LoadStats,
    decoder: str = "torchvision",
    *,
    read_threads: int = 2,
    decode_ahead: bool = False,
    assist: CpuAssist | None = None,
) -> Iterator[Batch]:
    """Batches of `batch_size` rows with pixels on `device`; stage times are added to `stats`.

    Loading runs one batch or two ahead on a thread (`prefetch`): its GPU work goes to the same
    (default) stream as the consumer's model, so the device keeps the order; only the host work
    overlaps.

    `decoder` picks the batched JPEG decoder: "torchvision" or "nvimgcodec" (`GpuJpegDecoder`'s
    `library`); `read_threads` read the files and parse their headers (see `iter_gpu_batches`).

    `decode_ahead` (experimental, off: 1-6 % slower on 1280x960 on an H200 in session 8,
    benchmarks/gpu_gap.py, though a 2-core emulation had shown +35 %): the decode calls run on a thread of
    their own, one chunk ahead of the preprocessing, so the JPEG engines need not wait for the
    host work between calls (on an H200 the decode calls took 0.56 s of a 0.73 - 0.85 s loader
    for 4096 1280x960 files). It holds up to one more decoded chunk (at most `gpu_batching._DECODE_PIXELS`
    pixels) on the device.

    `assist`: CPU decode worker processes (`pipeline.cpu_assist`) for the files nvjpeg cannot decode
    (without it they are decoded on the loader thread, which then stalls the GPU) and, experimental
    and unmeasured on a GPU, a fixed share of the others; a warning says when the loader waited
    for them long enough to matter.

    `stats.decode_s` / `preprocess_s` are wall seconds spent in decode calls and queuing the GPU
    preprocessing (the GPU runs it asynchronously); `read_s` sums the reader threads' time;
    `wait_s` is the time the consumer waited for the next batch (the model starved).
    """
    from ..image.preprocess import PreprocessConfig

    cfg = preprocess_cfg if isinstance(preprocess_cfg, PreprocessConfig) else PreprocessConfig.from_dict(preprocess_cfg)
    jpeg_decoder = GpuJpegDecoder(device, library=decoder)
    batches = loader_batches(items, cfg, batch_size, jpeg_decoder, read_threads=read_threads,
                             decode_ahead=decode_ahead, assist=assist)  # fmt: skip
    # A loader thread keeps the next batch decoding while the consumer waits for the model's output.
    loaded = prefetch(batches, depth=2)
    t_start = time.perf_counter()
    try:
        while True:
            t0 = time.perf_counter()
            gpu_batch = next(loaded, None)
            stats.wait_s += time.perf_counter() - t0  # the consumer (the model) starved for pixels
            if gpu_batch is None:
                break
            stats.images += len(gpu_batch.ids)
            stats.failures += len(gpu_batch.failures)
            yield Batch(
                ids=gpu_batch.ids,
                pixels=gpu_batch.pixels,  # type: ignore[arg-type]  # a device tensor, not a NumPy array
                sizes=gpu_batch.sizes,
                failures=gpu_batch.failures,
            )
    finally:
        loaded.close()  # stops and joins the loader thread (and the decode thread) first, so its stats are final
        done = jpeg_decoder.stats
        stats.read_s += done.read_s
        stats.decode_s += done.decode_s
        stats.preprocess_s += done.preprocess_s
        if assist is not None:
            report_assist(done.cpu_assist, done.nvjpeg, done.assist_wait_s, time.perf_counter() - t_start,
                          assist.workers, assist.share)  # fmt: skip


def loader_batches(
    items: Iterable[ImageItem],
    cfg: PreprocessConfig,
    batch_size: int,
    jpeg_decoder: GpuJpegDecoder,
    *,
    read_threads: int,
    decode_ahead: bool,
    assist: CpuAssist | None,
) -> Iterator[GpuBatch]:
    """The loader's batches, not yet run ahead: decode and preprocessing on the consuming thread, or
    with `decode_ahead` the decode calls on a thread of their own (see `iter_gpu_loaded`)."""
    if not decode_ahead:
        return iter_gpu_batches(items, cfg, batch_size=batch_size, decoder=jpeg_decoder, read_threads=read_threads,
                                assist=assist)  # fmt: skip
    return _decoded_ahead(items, cfg, batch_size, jpeg_decoder, read_threads, assist)


def _decoded_ahead(
    items: Iterable[ImageItem],
    cfg: PreprocessConfig,
    batch_size: int,
    jpeg_decoder: GpuJpegDecoder,
    read_threads: int,
    assist: CpuAssist | None,
) -> Iterator[GpuBatch]:
    decoding = iter_decoded_chunks(items, cfg, jpeg_decoder, group_size=default_decode_group(batch_size),
                                   read_threads=read_threads, assist=assist)  # fmt: skip
    chunks = prefetch(decoding, depth=1, name="clipengine-decode")
    try:
        yield from assemble_batches(chunks, cfg, jpeg_decoder, batch_size)
    finally:
        chunks.close()  # the decode thread (closed already, unless the loader stopped early)


def report_assist(assisted: int, on_gpu: int, waited_s: float, wall_s: float, workers: int, share: float,
                  loaders: int = 1) -> None:  # fmt: skip
    """Log how the CPU assist went, and warn when the GPU loader(s) waited for its workers for more
    than a tenth of the run (`waited_s` summed over `loaders`, each with `workers` workers)."""
    if not assisted:
        return
    who = "the loader" if loaders == 1 else f"the {loaders} loaders"
    _log.info("CPU assist: %d images on %d CPU workers, %d on the GPU decoder; %s waited %.2f s of %.2f s "
              "for the workers", assisted, workers * loaders, on_gpu, who, waited_s, wall_s)  # fmt: skip
    if wall_s > 0 and waited_s > _ASSIST_WAIT_WARNING * wall_s * loaders:
        advice = (f"a CPU share of {share:g} is more than they keep up with; a lower one will be faster"
                  if share > 0 else "they decode the files nvjpeg cannot (PNG, CMYK, ...): more --workers, "
                  "or CPU decode workers alone (no --gpu-decode), suit such a folder")  # fmt: skip
        _log.warning("the GPU %s waited %.1f s of %.1f s for %s %d CPU decode workers: %s",
                     "loader" if loaders == 1 else f"loaders ({loaders})", waited_s / loaders, wall_s,
                     "its" if loaders == 1 else "their", workers * loaders, advice)  # fmt: skip
