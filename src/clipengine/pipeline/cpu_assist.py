"""CPU decode workers beside the GPU loader: the files nvjpeg cannot decode, and a share of the rest.

Files nvjpeg does not take (PNG, WebP, CMYK or truncated JPEGs, ...) always go to these workers
when the loader has them (`gpu_batching._read_slice`); decoded on the loader's own thread, a few
of them stall the GPU (every 10th file a PNG: 3.9k -> 230 img/s, emulated). The rest of this
docstring is about the optional share of the JPEGs.

With `embed --gpu-decode` the GPU's JPEG decode call is the bottleneck (session 8 on an H200: 75 %
of the loader thread, 5.3-5.6k img/s end to end against 8.1k for the raw decode) while the host's
other cores idle (the loader uses about three). `CpuAssist` sends a share of each decode group to
worker processes instead (`batching.load_chunk`: the exact path, or its reduced-scale decode with
`fast_decode`); their S x S uint8 crops are copied to the device and join their group
(`gpu_batching.iter_decoded_chunks`). If the GPU loader runs at R img/s alone and the workers at
C, a share s gives min(R / (1 - s), C / s); s = C / (R + C) balances them.

Which files go to the CPU depends on the file's id alone (a CRC-32 below `share` of its range),
not on its position or on timing: a run is reproducible, and a resumed run decodes each file
where the first run did. Those files get the exact path's pixels (the reference), the others
nvjpeg's (within cosine 0.99999 of it, docs/performance.md).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..image.gpu_decode import Decoded, GpuDecodeStats
from ..types import ImageItem
from .batching import Task, load_chunk, settle, sources_of, submit_chunk

if TYPE_CHECKING:
    import torch

__all__ = ["GPU_LOADER_CORES", "CpuAssist", "default_assist_workers"]

# Cores the GPU loader itself keeps busy: its loader thread, the consumer (model) thread and two
# reader threads. Assist workers default to the rest, so they do not slow the loader they help.
GPU_LOADER_CORES = 4
_MAX_TASK = 32  # most files per worker task (as the CPU loader's chunks)


def default_assist_workers(cores: int) -> int:
    """Assist worker processes for a machine with `cores` usable cores."""
    return max(1, cores - GPU_LOADER_CORES)


@dataclass(frozen=True)
class CpuAssist:
    """Decodes the files whose id `takes` on `executor`'s processes (`workers` of them).

    Args:
        executor: a process pool (`batching.make_executor`).
        workers: its process count: each group's share is cut into about that many tasks.
        share: the fraction of files decoded on the CPU, in [0, 1); 0: only the files nvjpeg
            cannot decode (PNG, CMYK, ...), which go to the workers whatever the share.
        cfg: the model's `PreprocessConfig.to_dict()`.
        fast_decode: reduced-scale JPEG decode in the workers (see `batching.load_chunk`).
    """

    executor: Executor
    workers: int
    share: float
    cfg: dict[str, Any]
    fast_decode: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.share < 1.0:
            raise ValueError(f"the CPU share must be in [0, 1), got {self.share}")
        if self.workers < 1:
            raise ValueError(f"CPU assist needs at least one worker, got {self.workers}")

    def takes(self, item_id: str) -> bool:
        """Whether the file `item_id` is decoded on the CPU (a function of the id alone)."""
        return self.share > 0 and zlib.crc32(item_id.encode("utf-8", "surrogatepass")) < self.share * 2**32

    def prime(self) -> None:
        """Start the worker processes now (a pool spawns them on demand), so their start-up
        overlaps the model's load instead of stalling the first group."""
        for _ in range(self.workers):
            self.executor.submit(load_chunk, [], self.cfg)

    def submit(self, items: Sequence[ImageItem]) -> list[Task]:
        """Queue `items` on the workers, in about `workers` tasks; their order is kept."""
        if not items:
            return []
        per_task = max(1, min(_MAX_TASK, -(-len(items) // self.workers)))
        pairs = sources_of(items)
        return [
            submit_chunk(self.executor, pairs[i : i + per_task], self.cfg, self.fast_decode)
            for i in range(0, len(pairs), per_task)
        ]

    def collect(self, tasks: Sequence[Task], device: torch.device, stats: GpuDecodeStats) -> Decoded:
        """The workers' results for one group, as S x S uint8 images on `device`, in submission order.

        `stats.assist_wait_s` grows by the time spent waiting for them: the share is too large for
        the workers when it is more than a small part of the run.
        """
        import torch

        decoded = Decoded([], [], [], [])
        for task in tasks:
            t0 = time.perf_counter()
            chunk = settle(self.executor, task)  # a worker that died: its files again, apart
            stats.assist_wait_s += time.perf_counter() - t0
            stats.assist_s += chunk.read_s + chunk.decode_s + chunk.preprocess_s
            stats.failures += len(chunk.failures)
            decoded.failures.extend(chunk.failures)
            if chunk.ids:
                stats.cpu_assist += len(chunk.ids)
                crops = torch.from_numpy(chunk.pixels).to(device)  # (n, 3, S, S): one copy per task
                decoded.ids.extend(chunk.ids)
                decoded.images.extend(crops.unbind(0))
                decoded.sizes.extend(chunk.sizes)
        return decoded
