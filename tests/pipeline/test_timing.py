"""Benchmark primitives and the full-pipeline benchmark with the fake backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipengine.bench.timing import bench_pipeline, percentile, time_call
from clipengine.pipeline.sources import list_items


def test_time_call_warms_up_then_repeats() -> None:
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=3, repeats=5)
    assert len(calls) == 8 and len(timing.samples_ms) == 5
    assert timing.p50_ms <= timing.p90_ms <= timing.p99_ms <= max(timing.samples_ms)


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([], 90) == 0.0


def test_bench_pipeline_rows_per_batch_size(image_folder: Path, preprocess_cfg, fake_backend) -> None:  # type: ignore[no-untyped-def]
    items = list_items(image_folder)
    tokens = np.ones((4, 77), dtype=np.int64)
    result = bench_pipeline(items, fake_backend, preprocess_cfg, [1, 8], warmup=1, text_tokens=tokens)
    assert [b.batch_size for b in result.batches] == [1, 8]
    assert result.images == 25 and result.failed == 0
    assert result.total_ms == result.batches[0].wall_ms
    assert result.avg_ms * 25 == pytest.approx(result.total_ms)
    assert result.fps == pytest.approx(1000.0 / result.avg_ms)
    eight = result.batches[1]
    assert len(eight.infer_batch.samples_ms) == 4  # 8 + 8 + 8 + 1
    assert eight.text is not None and len(eight.text.samples_ms) == 10
    assert eight.decode_preprocess_ms_per_image > 0 and eight.end_to_end_fps > 0
    # warm-up calls run on zeros of each batch size before the timed pass
    assert fake_backend.calls[:1] == [1] and fake_backend.calls[26:27] == [8]


def test_bench_rejects_bad_input(fake_backend) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="no images"):
        bench_pipeline([], fake_backend, {})


def test_bench_with_only_unreadable_images_is_an_error(mixed_folder, preprocess_cfg, fake_backend) -> None:  # type: ignore[no-untyped-def]
    from clipengine.errors import DatasetError

    root, _, bad = mixed_folder
    items = [i for i in list_items(root) if i.id in bad]
    # Nothing was embedded: a "0 images, N ms, 0 FPS" report would be a measurement of nothing.
    with pytest.raises(DatasetError, match="none of the 3 images could be decoded"):
        bench_pipeline(items, fake_backend, preprocess_cfg, [1], warmup=0)


def test_per_image_times_are_over_embedded_images_not_failures(monkeypatch, fake_backend) -> None:  # type: ignore[no-untyped-def]
    """The loaders add no time for an unreadable file, so /(embedded + failed) understated every image."""
    from clipengine.bench import timing
    from clipengine.types import Batch, Failure, ImageItem

    def fake_batches(items, cfg, batch_size, *, executor, stats, fast_decode):  # type: ignore[no-untyped-def]
        stats.read_s, stats.decode_s, stats.preprocess_s = 0.03, 0.21, 0.06  # 3 good images
        pixels = np.zeros((3, 3, 32, 32), dtype=np.float32)
        yield Batch(ids=["a", "b", "c"], pixels=pixels, failures=[Failure("bad", "not an image")])

    decoded: list[object] = []
    monkeypatch.setattr(timing, "iter_batches", fake_batches)
    monkeypatch.setattr(timing, "load_chunk", lambda pairs, cfg, fast: decoded.append(pairs))
    items = [ImageItem(i, b"") for i in ("a", "b", "c", "bad")]
    result = bench_pipeline(items, fake_backend, {}, [4], warmup=0)
    row = result.batches[0]
    assert (result.images, result.failed, row.images) == (3, 1, 3)
    assert row.decode_preprocess_ms_per_image == pytest.approx(100.0)  # 300 ms / 3, was / 4 = 75
    assert row.infer_ms_per_image == pytest.approx(sum(row.infer_batch.samples_ms) / 3)
    assert result.avg_ms == pytest.approx(row.wall_ms / 3)
    # One untimed decode in this process (--workers 0) before the pass, so the first image does not
    # pay for loading the decoder: a generated JPEG, not a user's file.
    assert len(decoded) == 1 and [i for i, _ in decoded[0]] == ["warm-up.jpg"]  # type: ignore[attr-defined]
