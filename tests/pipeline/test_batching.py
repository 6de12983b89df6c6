"""Parallel decode + preprocess into fixed-size batches; bad inputs become Failure records."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from clipengine.pipeline.batching import LoadStats, iter_batches, load_chunk
from clipengine.pipeline.sources import list_items
from clipengine.types import Failure


def test_batches_have_exact_sizes_and_keep_input_order(image_folder: Path, preprocess_cfg) -> None:  # type: ignore[no-untyped-def]
    items = list_items(image_folder)
    batches = list(iter_batches(items, preprocess_cfg, batch_size=8))
    assert [len(b.ids) for b in batches] == [8, 8, 8, 1]
    assert [i for b in batches for i in b.ids] == [i.id for i in items]
    for b in batches:
        assert b.pixels.shape == (len(b.ids), 3, 32, 32) and b.pixels.dtype == np.float32
        assert len(b.sizes) == len(b.ids) and not b.failures


def test_worker_processes_give_the_same_batches_as_in_process(image_folder: Path, preprocess_cfg) -> None:  # type: ignore[no-untyped-def]
    items = list_items(image_folder)
    inline = list(iter_batches(items, preprocess_cfg, batch_size=8, workers=0))
    stats = LoadStats()
    pooled = list(iter_batches(items, preprocess_cfg.to_dict(), batch_size=8, workers=2, stats=stats))
    assert [b.ids for b in pooled] == [b.ids for b in inline]
    assert [b.sizes for b in pooled] == [b.sizes for b in inline]
    for a, b in zip(inline, pooled, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)
    assert stats.images == len(items) and stats.failures == 0
    assert stats.decode_s > 0 and stats.preprocess_s > 0


def test_bad_inputs_become_failures_and_do_not_shrink_batches(mixed_folder, preprocess_cfg) -> None:  # type: ignore[no-untyped-def]
    root, good_ids, bad_ids = mixed_folder
    stats = LoadStats()
    batches = list(iter_batches(list_items(root), preprocess_cfg, batch_size=5, stats=stats))
    assert [len(b.ids) for b in batches] == [5, 5, 2]  # 12 good images, batches refilled past the bad ones
    assert [i for b in batches for i in b.ids] == good_ids
    failures = [f for b in batches for f in b.failures]
    assert sorted(f.id for f in failures) == bad_ids
    assert all(isinstance(f, Failure) and f.reason for f in failures)
    assert stats.failures == 3 and stats.images == 12


def test_missing_file_and_bytes_sources(tmp_path: Path, image_folder: Path, preprocess_cfg) -> None:  # type: ignore[no-untyped-def]
    good = next(image_folder.glob("*.jpg"))
    chunk = load_chunk(
        [("gone.jpg", str(tmp_path / "gone.jpg")), ("bytes.jpg", good.read_bytes()), ("junk", b"\x00\x01")],
        preprocess_cfg.to_dict(),
    )
    assert chunk.ids == ["bytes.jpg"] and chunk.pixels.shape == (1, 3, 32, 32)
    reasons = {f.id: f.reason for f in chunk.failures}
    assert set(reasons) == {"gone.jpg", "junk"}
    assert reasons["gone.jpg"] == "file not found"  # as predict (decode_image) words it


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.timeout(60)
def test_named_pipe_becomes_a_failure_without_blocking(tmp_path: Path, image_folder: Path, preprocess_cfg) -> None:  # type: ignore[no-untyped-def]
    """A FIFO named like an image in the folder: the loader waited for a writer forever and
    `embed` hung. It is this file's failure; the others load."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    good = next(image_folder.glob("*.jpg"))
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(load_chunk, [("pipe.jpg", str(fifo)), ("good.jpg", str(good))], preprocess_cfg.to_dict())
        try:
            chunk = future.result(timeout=10)
        finally:
            if not future.done():  # unblock the reader so the test ends
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert chunk.ids == ["good.jpg"]
    assert chunk.failures == [Failure("pipe.jpg", "not a regular file but a named pipe (FIFO); only files are read")]


def test_workers_ship_uint8_and_batches_equal_the_exact_path(image_folder: Path, preprocess_cfg) -> None:  # type: ignore[no-untyped-def]
    """Workers return uint8 crops (a quarter of float32's bytes through the pool); the batches the
    parent builds from them hold exactly `preprocess`'s float32 values."""
    from clipengine.image.preprocess import normalise_uint8, preprocess

    items = list_items(image_folder)
    pairs = [(i.id, str(i.source)) for i in items[:5]]
    crops = load_chunk(pairs, preprocess_cfg.to_dict(), normalise=False)
    floats = load_chunk(pairs, preprocess_cfg.to_dict())
    assert crops.pixels.dtype == np.uint8 and floats.pixels.dtype == np.float32
    np.testing.assert_array_equal(normalise_uint8(crops.pixels, preprocess_cfg), floats.pixels)
    batches = list(iter_batches(items, preprocess_cfg, batch_size=8, workers=2))
    rows = np.concatenate([b.pixels for b in batches])
    assert rows.dtype == np.float32
    for row, item in zip(rows, items, strict=True):
        np.testing.assert_array_equal(row, preprocess(item.source, preprocess_cfg))


def test_batch_size_must_be_positive(preprocess_cfg) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches([], preprocess_cfg, batch_size=0))


class _RecordingExecutor(ThreadPoolExecutor):
    """A thread pool that counts submitted chunks (the decode work queued ahead of the consumer)."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_decode_runs_ahead_of_the_consumer_with_a_bounded_queue(image_folder: Path, preprocess_cfg) -> None:  # type: ignore[no-untyped-def]
    items = list_items(image_folder)  # 25 images -> 7 chunks of 4
    with _RecordingExecutor() as pool:
        batches = iter_batches(items, preprocess_cfg, batch_size=4, chunk_size=4, executor=pool)
        first = next(batches)
        # While the backend works on batch 0, later chunks are already being decoded...
        assert len(first.ids) == 4 and pool.submitted >= 3
        # ...but the read-ahead is bounded (2 chunks per worker), so memory stays flat on huge folders.
        assert pool.submitted <= 2 * 2 + 1
        rest = list(batches)
    assert pool.submitted == 7 and [len(b.ids) for b in rest] == [4, 4, 4, 4, 4, 1]


def _photo(path: Path, size: tuple[int, int], orientation: int | None = None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)  # smooth, photo-like
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation  # EXIF Orientation tag
    img.save(path, quality=92, exif=exif)
    return path


@pytest.mark.parametrize("orientation", [None, 6])
def test_fast_decode_keeps_original_size_and_stays_close(tmp_path: Path, preprocess_cfg, orientation) -> None:  # type: ignore[no-untyped-def]
    path = _photo(tmp_path / "big.jpg", (800, 600), orientation)
    exact = load_chunk([("big.jpg", str(path))], preprocess_cfg.to_dict())
    fast = load_chunk([("big.jpg", str(path))], preprocess_cfg.to_dict(), fast_decode=True)
    assert fast.sizes == exact.sizes == [(600, 800) if orientation == 6 else (800, 600)]
    assert fast.pixels.shape == exact.pixels.shape == (1, 3, 32, 32)
    # Within about one grey level on average (pixels are normalised by std ~0.27 -> x255*0.27).
    assert float(np.abs(fast.pixels - exact.pixels).mean()) * 0.27 * 255 < 1.5


# A parent that starts and warms a decode pool, says so, then waits to be killed.
_POOL_PARENT = """
import sys, time
from clipengine.image.preprocess import PreprocessConfig
from clipengine.pipeline.batching import make_executor, warm_executor
if __name__ == "__main__":
    pool = make_executor(2)
    warm_executor(pool, 2, PreprocessConfig(image_size=32).to_dict())
    print("ready", flush=True)
    time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie no one has reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux /proc")
def test_decode_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "pool_parent.py"
    script.write_text(_POOL_PARENT)
    # Only the parent is killed (as the OOM killer picks the process holding the model), not its group.
    with open(tmp_path / "stderr.txt", "wb") as stderr:  # the orphaned resource tracker reports there
        parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline() == "ready\n", (tmp_path / "stderr.txt").read_text()
        # The pool's processes: its 2 workers and multiprocessing's resource tracker.
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text()
        pool_processes = [int(pid) for pid in children.split()]
        assert len(pool_processes) >= 2 and all(_running(pid) for pid in pool_processes), pool_processes
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in pool_processes) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval, not a timing assumption
        left = [pid for pid in pool_processes if _running(pid)]
        for pid in left:  # don't leak them into the rest of the session
            os.kill(pid, signal.SIGKILL)
        assert left == [], "decode workers outlived their killed parent (they block on the task queue forever)"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
