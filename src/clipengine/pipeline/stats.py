"""RunStats: what a run did (counts and per-stage seconds), as reported by the CLI and run.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RunStats"]


@dataclass
class RunStats:
    """Counts and stage timings of a run. Stage seconds are summed over workers; `wall_s` is elapsed time."""

    images: int = 0  # input items covered (including resumed ones)
    embedded: int = 0  # rows embedded by this run
    failed: int = 0  # failures met by this run
    skipped: int = 0  # items in shards already complete, not recomputed
    failed_total: int = 0  # failures listed in OUT/failures.jsonl (this run + resumed shards)
    shards_written: int = 0
    shards_skipped: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # rows per backend call, in order
    read_s: float = 0.0
    decode_s: float = 0.0
    preprocess_s: float = 0.0
    infer_s: float = 0.0  # time inside backend.encode_images
    write_s: float = 0.0
    wait_s: float = 0.0  # time the backend sat idle waiting for decoded images
    load_s: float = 0.0  # building the backend (model load)
    wall_s: float = 0.0
    # float16 storage: the worst cosine of a row as written to the float32 row it came from, over
    # the shards this run wrote (`sinks.float16_min_cos`); None: float32 storage, or no shard written.
    storage_min_cos: float | None = None

    @property
    def processed(self) -> int:
        """Items handled by this run (embedded + failed)."""
        return self.embedded + self.failed

    @property
    def fps(self) -> float:
        """Embedded images per wall-clock second."""
        return self.embedded / self.wall_s if self.wall_s > 0 else 0.0

    def per_image_ms(self) -> dict[str, float]:
        """Milliseconds per embedded image for each stage (0.0 when none was embedded).

        Failures are not in the count: the loaders add no time for an unreadable file, so dividing
        by embedded + failed understated every stage (and gave ms/img for runs that embedded nothing).
        """
        n = self.embedded
        stages = ("read", "decode", "preprocess", "infer", "write", "wait")
        return {s: 1000.0 * getattr(self, f"{s}_s") / n if n else 0.0 for s in stages}

    def add(self, other: RunStats) -> None:
        """Accumulate another partition's stats into this one (wall time excluded; the worst
        `storage_min_cos` of the two kept)."""
        for name, value in asdict(other).items():
            if name == "wall_s":
                continue
            if name == "storage_min_cos":
                measured = [c for c in (self.storage_min_cos, value) if c is not None]
                self.storage_min_cos = min(measured) if measured else None
            elif isinstance(value, list):
                getattr(self, name).extend(value)
            else:
                setattr(self, name, getattr(self, name) + value)

    def counts(self) -> dict[str, int]:
        """run.json "counts" of a finished run: every input item, the rows on disk and the failures.

        "embedded" counts rows in every shard, the resumed ones included: this run's rows plus the
        skipped items, less the failures listed by the skipped shards (`failed_total` - `failed`).
        Both engines (`embed_folder` and the Ray one) record exactly this.
        """
        return {
            "images": self.images,
            "embedded": self.embedded + self.skipped - (self.failed_total - self.failed),
            "failed": self.failed_total,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (batch sizes summarised), with per-image ms and FPS."""
        d = asdict(self)
        sizes = d.pop("batch_sizes")
        d["batches"] = len(sizes)
        d["per_image_ms"] = self.per_image_ms()
        d["fps"] = self.fps
        return d
