"""Rendering of run stats and bench results; the seed block's arithmetic."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from disk_full import failing_savefig

from clipengine.bench.timing import BatchBench, BenchResult, Timing
from clipengine.pipeline.run import RunStats
from clipengine.report import plot_throughput, render_bench, render_run_stats, seed_block


def _result(images: int, total_ms: float) -> BenchResult:
    rows = [
        BatchBench(
            b, images, total_ms / (i + 1), 1.25, 0.5 / (i + 1), Timing((1.0, 2.0, 3.0)), Timing((4.0,))
        )
        for i, b in enumerate((1, 8, 32))
    ]
    return BenchResult(images, 0, "fake", "cpu", "fp32", 2, rows, model="tiny")


def parse_seed_block(text: str) -> tuple[int, float, float, float]:
    """(images, total ms, avg ms, fps) from the seed's four lines."""
    n = int(re.search(r"^Total images: (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"^Total time use: ([\d.]+)ms$", text, re.M).group(1))  # type: ignore[union-attr]
    avg = float(re.search(r"^Avg time use: ([\d.]+)ms$", text, re.M).group(1))  # type: ignore[union-attr]
    fps = float(re.search(r"^([\d.]+) FPS$", text, re.M).group(1))  # type: ignore[union-attr]
    return n, total, avg, fps


def check_seed_arithmetic(text: str) -> None:
    """avg x N = total and FPS = 1000 / avg, up to the printed precision."""
    n, total, avg, fps = parse_seed_block(text)
    assert abs(avg * n - total) <= 0.00005 * n + 0.005
    assert abs(fps - 1000.0 / avg) <= 0.005 + 1000.0 / avg * (0.00005 / avg)


@pytest.mark.parametrize(("images", "total_ms"), [(1000, 12345.678), (3, 10.0), (7, 0.123), (1000, 987654.3)])
def test_seed_block_arithmetic_is_consistent(images: int, total_ms: float) -> None:
    text = seed_block(_result(images, total_ms))
    assert text.splitlines()[0] == f"Total images: {images}"
    check_seed_arithmetic(text)


def test_bench_text_has_seed_block_then_a_row_per_batch_size() -> None:
    text = render_bench(_result(1000, 5000.0))
    lines = text.splitlines()
    assert lines[:4] == [
        "Total images: 1000",
        "Total time use: 5000.00ms",
        "Avg time use: 5.0000ms",
        "200.00 FPS",
    ]
    header = next(line for line in lines if "decode+preprocess ms/img" in line)
    assert "inference ms/img" in header and "end-to-end img/s" in header and "text x4 ms" in header
    rows = [line.split() for line in lines[lines.index(header) + 2 :]]
    assert [r[0] for r in rows] == ["1", "8", "32"]
    assert rows[0][1:] == ["1.250", "0.500", "200.0", "4.000"]


def test_bench_json_and_markdown() -> None:
    result = _result(10, 50.0)
    data = json.loads(render_bench(result, "json"))
    assert (
        data["images"] == 10 and data["avg_ms"] == pytest.approx(5.0) and data["fps"] == pytest.approx(200.0)
    )
    assert [b["batch_size"] for b in data["batches"]] == [1, 8, 32]
    assert "| batch |" in render_bench(result, "markdown")
    with pytest.raises(ValueError, match="unknown format"):
        render_bench(result, "html")


def test_run_stats_summary_names_failures_file(tmp_path: Path) -> None:
    stats = RunStats(
        images=10, embedded=8, failed=2, failed_total=2, infer_s=0.5, wall_s=2.0, shards_written=1
    )
    text = render_run_stats(stats, failures_path=tmp_path / "failures.jsonl")
    assert "Embedded 8 images" in text and "4.0 img/s" in text
    assert f"Failed: 2 (listed in {tmp_path / 'failures.jsonl'})" in text
    data = json.loads(render_run_stats(stats, "json"))
    # Per embedded image: 0.5 s / 8 (it was / 10, the 2 failures included, which the backend never saw).
    assert data["fps"] == 4.0 and data["per_image_ms"]["infer"] == pytest.approx(62.5)


def test_a_run_that_embedded_nothing_shows_no_per_image_table() -> None:
    # Every input unreadable: "write 11.972 ms/img" over 0 embedded images (the failures were the count).
    stats = RunStats(
        images=2, embedded=0, failed=2, failed_total=2, write_s=0.024, wall_s=0.1, shards_written=1
    )
    assert render_run_stats(stats).splitlines() == [
        "Embedded 0 images in 0.10s (0.0 img/s); 1 shards written",
        "Failed: 2",
    ]
    data = json.loads(render_run_stats(stats, "json"))
    assert set(data["per_image_ms"].values()) == {0.0} and data["write_s"] == 0.024


def test_run_stats_summary_of_a_resume_tells_this_run_and_total_failures() -> None:
    """As the JSON does (`failed`, `failed_total`): the text said "Failed: 2" for a run that met none."""
    stats = RunStats(images=10, embedded=0, failed=0, skipped=10, failed_total=2, shards_skipped=1, wall_s=0.1)
    text = render_run_stats(stats, failures_path="failures.jsonl")
    assert "Failed: 0 this run, 2 in total (listed in failures.jsonl)" in text
    data = json.loads(render_run_stats(stats, "json"))
    assert (data["failed"], data["failed_total"]) == (0, 2)
    stats = RunStats(images=10, embedded=3, failed=1, skipped=6, failed_total=1, shards_skipped=1, wall_s=0.1)
    assert "Failed: 1 (listed in failures.jsonl)" in render_run_stats(stats, failures_path="failures.jsonl")


def test_run_stats_carry_and_render_the_float16_storage_cosine() -> None:
    """The worst cosine of a float16 row on disk to its float32 row: merged as the worst over
    partitions (the Ray engine adds theirs), in the JSON and run.json timings, and a text line."""
    total = RunStats(images=10, embedded=6, skipped=4, shards_skipped=1, wall_s=1.0, shards_written=2)
    total.add(RunStats(embedded=3, storage_min_cos=0.99999995))
    total.add(RunStats(embedded=3))  # a partition measured nothing (resumed, or float32)
    total.add(RunStats(embedded=0, storage_min_cos=0.99999991))
    assert total.storage_min_cos == 0.99999991
    assert RunStats(**json.loads(json.dumps(asdict(total)))) == total  # as Ray actors send their stats
    data = json.loads(render_run_stats(total, "json"))
    assert data["storage_min_cos"] == 0.99999991
    lines = render_run_stats(total).splitlines()
    assert lines[2] == (
        "Stored as float16: min cosine 0.99999991 (1 - 9.0e-08) to the float32 rows, measured over the "
        "12 rows this run wrote (not the 4 resumed inputs)"
    )
    plain = RunStats(images=2, embedded=2, wall_s=1.0, shards_written=1)
    assert "float16" not in render_run_stats(plain) and json.loads(render_run_stats(plain, "json"))["storage_min_cos"] is None


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = plot_throughput(_result(100, 1000.0), tmp_path / "plots" / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_plot_keeps_the_previous_file_and_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    path = plot_throughput(_result(100, 1000.0), tmp_path / "bench.png")
    before = path.read_bytes()
    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="No space left"):
        plot_throughput(_result(50, 1000.0), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]


def test_plot_format_follows_the_final_name_and_permissions_are_usual(tmp_path: Path) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    svg = plot_throughput(_result(100, 1000.0), tmp_path / "bench.svg")
    assert b"<svg" in svg.read_bytes()[:1000]
    assert svg.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.svg"]
