"""Render run and benchmark results as plain text, Markdown or JSON, and plot throughput (no printing)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import atomic_path

if TYPE_CHECKING:
    from .bench.timing import BenchResult
    from .pipeline.run import RunStats

__all__ = [
    "FORMATS",
    "plot_throughput",
    "render_bench",
    "render_run_stats",
    "seed_block",
]

FORMATS = ("text", "markdown", "json")

_BENCH_COLUMNS = (
    "batch",
    "decode+preprocess ms/img",
    "inference ms/img",
    "end-to-end img/s",
    "text x4 ms",
)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def fmt_row(r: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))

    return "\n".join([fmt_row(header), fmt_row(tuple("-" * w for w in widths)), *map(fmt_row, rows)])


def render_run_stats(stats: RunStats, fmt: str = "text", *, failures_path: str | Path | None = None) -> str:
    """Summary of an embedding run: counts, FPS, per-stage ms per image.

    Args:
        stats: the run's stats.
        fmt: "text", "markdown" or "json".
        failures_path: where the failures are listed (named in the summary when there are any).
    """
    _check_format(fmt)
    if fmt == "json":
        d: dict[str, Any] = stats.to_dict()
        d["failures_file"] = str(failures_path) if failures_path else None
        return json.dumps(d, indent=2, sort_keys=True)
    per = stats.per_image_ms()
    stage_rows = [(s, f"{getattr(stats, f'{s}_s'):.3f}", f"{per[s]:.3f}") for s in per]
    head = (
        f"Embedded {stats.embedded} images in {stats.wall_s:.2f}s ({stats.fps:.1f} img/s); "
        f"{stats.shards_written} shards written"
    )
    if stats.shards_skipped:
        head += f"; {stats.skipped} inputs resumed from {stats.shards_skipped} finished shards"
    # As the JSON: `failed` is this run's, `failed_total` all listed in failures.jsonl (resumed shards too).
    n_failed = max(stats.failed_total, stats.failed)
    fail = f"Failed: {stats.failed} this run, {n_failed} in total" if n_failed != stats.failed else f"Failed: {n_failed}"
    fail += f" (listed in {failures_path})" if n_failed and failures_path else ""
    if not stats.embedded:  # everything resumed or unreadable: no per-image timings to show
        return "\n".join([head, fail])
    table = _table(("stage", "total s", "ms/img"), stage_rows, markdown=fmt == "markdown")
    return "\n".join([head, fail, "", table])


def seed_block(result: BenchResult) -> str:
    """The seed's four headline lines: total images, total ms, average ms per image, FPS.

    Printed values are consistent: avg = total / images and FPS = 1000 / avg (up to the last digit).
    """
    total = round(result.total_ms, 2)
    avg = total / result.images if result.images else 0.0
    fps = 1000.0 / avg if avg > 0 else 0.0
    return "\n".join(
        [
            f"Total images: {result.images}",
            f"Total time use: {total:.2f}ms",
            f"Avg time use: {avg:.4f}ms",
            f"{fps:.2f} FPS",
        ]
    )


def render_bench(result: BenchResult, fmt: str = "text") -> str:
    """The seed block then one row per batch size (text/Markdown), or the full result as JSON."""
    _check_format(fmt)
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2, sort_keys=True)
    rows = [
        (
            str(b.batch_size),
            f"{b.decode_preprocess_ms_per_image:.3f}",
            f"{b.infer_ms_per_image:.3f}",
            f"{b.end_to_end_fps:.1f}",
            f"{b.text.p50_ms:.3f}" if b.text else "-",
        )
        for b in result.batches
    ]
    title = (
        f"{result.model or 'model'} on {result.backend} {result.device} {result.precision}, "
        f"{result.workers} decode worker{'' if result.workers == 1 else 's'}"
    )
    if result.failed:
        title += f", {result.failed} unreadable image{'' if result.failed == 1 else 's'} skipped"
    block = seed_block(result)
    if fmt == "markdown":
        block = "```\n" + block + "\n```"
    return "\n".join([block, "", title, _table(_BENCH_COLUMNS, rows, markdown=fmt == "markdown")])


def plot_throughput(result: BenchResult, path: str | Path) -> Path:
    """Write a throughput-vs-batch-size PNG (end-to-end and inference-only img/s)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state touched

    sizes = [b.batch_size for b in result.batches]
    e2e = [b.end_to_end_fps for b in result.batches]
    infer = [1000.0 / b.infer_ms_per_image if b.infer_ms_per_image > 0 else 0.0 for b in result.batches]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(sizes, e2e, marker="o", label="end-to-end")
    ax.plot(sizes, infer, marker="s", linestyle="--", label="inference only")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    label = Path(result.model).name if result.model else "model"  # a checkpoint path -> its file name
    ax.set_title(f"{label}: {result.backend} {result.device} {result.precision}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through a temp file renamed over `path`: a failed save never leaves a truncated plot over a
    # previous one. The temp name ends in .tmp, so the format comes from the final name.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix[1:].lower() or "png")  # Agg canvas by default
    return path
