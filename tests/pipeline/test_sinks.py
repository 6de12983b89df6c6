"""Shard files: atomic writes, completeness checks used by resume, reading back."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from clipengine.errors import DatasetError
from clipengine.pipeline.sinks import (
    ShardSink,
    atomic_write_bytes,
    float16_min_cos,
    read_embeddings,
    read_failures,
    read_run_info,
)
from clipengine.types import Failure


def _vectors(n: int, d: int = 4) -> np.ndarray:
    v = np.arange(n * d, dtype=np.float32).reshape(n, d) + 1
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_failed_atomic_write_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "part-00000.npy"
    atomic_write_bytes(target, b"old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)  # clipengine.files renames the temp file
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["part-00000.npy"]


def test_write_then_read_round_trip_and_index_is_row_in_shard(tmp_path: Path) -> None:
    sink = ShardSink(tmp_path, dtype="float32")
    sink.write(0, ["a.jpg", "b.jpg"], _vectors(2), [(10, 20), (30, 40)], [Failure("bad.jpg", "empty file")])
    sink.write(1, ["c.jpg"], _vectors(1), [(5, 6)], [])
    assert sink.write_failures(2) == 1
    ids, vectors, meta = read_embeddings(tmp_path)
    assert ids == ["a.jpg", "b.jpg", "c.jpg"]
    np.testing.assert_array_equal(vectors, np.concatenate([_vectors(2), _vectors(1)]))
    assert vectors.dtype == np.float32 and meta == {}
    rows = (tmp_path / "shards" / "part-00000.jsonl").read_text().splitlines()
    assert rows[1] == '{"path": "b.jpg", "index": 1, "width": 30, "height": 40}'
    assert read_failures(tmp_path) == [Failure("bad.jpg", "empty file")]
    assert not [p for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")]


def test_float16_shards_read_back_as_float32(tmp_path: Path) -> None:
    sink = ShardSink(tmp_path, dtype="float16")
    sink.write(0, ["a"], _vectors(1), [(1, 1)], [])
    assert np.load(tmp_path / "shards" / "part-00000.npy").dtype == np.float16
    _, vectors, _ = read_embeddings(tmp_path)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, _vectors(1), atol=1e-3)


def test_float16_min_cos_is_the_worst_row_cosine_measured_in_float64() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((64, 512)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    stored = v.astype(np.float16)
    x, y = v.astype(np.float64), stored.astype(np.float64)
    expected = ((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min()
    got = float16_min_cos(v, stored)
    assert got is not None and got == pytest.approx(expected, abs=1e-12)
    assert 0.9999999 < got < 1.0  # float16 loses ~1e-8 of cosine on unit rows: float32 would read 1.0
    assert float16_min_cos(v[:0], stored[:0]) is None
    # NaN input: no direction to lose (left out); a row that overflowed (|x| > 65504) keeps none.
    bad = np.array([[np.nan, 1.0], [3.0, 4.0], [1e5, 1.0], [0.0, 0.0]], dtype=np.float32)
    assert float16_min_cos(bad[[0, 1, 3]], bad[[0, 1, 3]].astype(np.float16)) == pytest.approx(1.0)
    with np.errstate(over="ignore"):
        overflowed = bad.astype(np.float16)
    assert float16_min_cos(bad, overflowed) == 0.0
    assert float16_min_cos(bad[:1], bad[:1].astype(np.float16)) is None


def test_a_float16_sink_keeps_the_worst_cosine_of_the_shards_it_wrote(tmp_path: Path) -> None:
    """Storage in float16 states its loss (no silent accuracy loss): measured per shard as written."""
    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal((n, 64)).astype(np.float32) for n in (5, 7, 3)]
    blocks = [b / np.linalg.norm(b, axis=1, keepdims=True) for b in blocks]
    sink = ShardSink(tmp_path, dtype="float16")
    assert sink.min_cos_written() is None
    for pid, block in enumerate(blocks):
        sink.write(pid, [f"{pid}-{i}" for i in range(len(block))], block, [(1, 1)] * len(block), [])
    per_shard = [float16_min_cos(b, b.astype(np.float16)) for b in blocks]
    _, stored, _ = read_embeddings(tmp_path)
    on_disk = float16_min_cos(np.concatenate(blocks), stored.astype(np.float16))
    assert sink.min_cos_written() == min(c for c in per_shard if c is not None) < 1.0
    assert on_disk == pytest.approx(sink.min_cos_written(), abs=1e-15)  # the rows on disk
    assert sink.min_cos_written([1, 2]) == min(per_shard[1:])  # type: ignore[type-var]
    assert sink.min_cos_written([9]) is None
    sink.write(0, [], np.zeros((0, 64), np.float32), [], [])  # rewritten empty: shard 0 measures nothing now
    assert sink.min_cos_written([0]) is None
    f32 = ShardSink(tmp_path / "f32", dtype="float32")
    f32.write(0, ["a"], blocks[0][:1], [(1, 1)], [])
    assert f32.min_cos_written() is None  # nothing lost: nothing to state


def test_is_complete_checks_ids_counts_dtype_and_dim(tmp_path: Path) -> None:
    sink = ShardSink(tmp_path, dtype="float16")
    assert not sink.is_complete(0, ["a", "b", "c"])
    sink.write(0, ["a", "c"], _vectors(2), [(1, 1), (1, 1)], [Failure("b", "corrupt")])
    assert sink.is_complete(0, ["a", "b", "c"], embed_dim=4)
    assert not sink.is_complete(0, ["a", "b", "c"], embed_dim=8)  # another model's width
    assert not sink.is_complete(0, ["a", "b", "c", "d"])  # the partition grew
    assert not ShardSink(tmp_path, dtype="float32").is_complete(0, ["a", "b", "c"])
    npy, rows, _ = sink.paths(0)
    np.save(npy, _vectors(1).astype(np.float16))  # row count no longer matches the .jsonl
    assert not sink.is_complete(0, ["a", "b", "c"])
    rows.unlink()
    assert not sink.is_complete(0, ["a", "b", "c"])


def test_read_embeddings_names_a_missing_shard(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no embedding shards"):
        read_embeddings(tmp_path)
    sink = ShardSink(tmp_path)
    sink.write(0, ["a"], _vectors(1), [(1, 1)], [])
    (tmp_path / "run.json").write_text('{"partitions": 2}')
    with pytest.raises(DatasetError, match="part-00001 is missing"):
        read_embeddings(tmp_path)


def test_clean_temp_files_removes_leftovers_of_a_killed_run(tmp_path: Path) -> None:
    sink = ShardSink(tmp_path)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".part-00003.npy.k2j4x9_q.tmp").write_bytes(b"half")  # atomic_path's name
    (tmp_path / "shards" / ".tmp-part-00002.npy.abc").write_bytes(b"half")  # an older clipengine's
    (tmp_path / ".run.json.a1b2c3d4.tmp").write_bytes(b"{")
    assert sink.clean_temp_files() == 3
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]
    assert not list((tmp_path / "shards").iterdir())


def test_clean_temp_files_keeps_the_users_files_in_the_output_folder(tmp_path: Path) -> None:
    """The output folder can hold other files (``-o .``, the images' own folder, a ``shards`` folder
    of the user's): the sweep removes the temp files of what the sink writes there, nothing else."""
    sink = ShardSink(tmp_path)
    (tmp_path / "shards").mkdir()
    theirs = [
        tmp_path / "beach.tmp-2.jpg",  # an image whose name holds ".tmp-"
        tmp_path / "IMG_0001.jpg.tmp-1a2b3c4d",
        tmp_path / ".notes.tmp",  # hidden, ends in .tmp
        tmp_path / ".report.html.a1b2c3d4.tmp",  # another writer's temp file (atomic_path's shape)
        tmp_path / "shards" / "data.tmp-000.tar",
        tmp_path / "shards" / ".cache.tmp",
    ]
    ours = [
        tmp_path / ".run.json.a1b2c3d4.tmp",
        tmp_path / ".failures.jsonl.k2j4x9_q.tmp",
        tmp_path / ".tmp-run.json.abcdefgh",  # an older clipengine's
        tmp_path / "shards" / ".part-00000.jsonl.k2j4x9_q.tmp",
        tmp_path / "shards" / ".tmp-part-00001.failures.jsonl.abcdefgh",
    ]
    for p in theirs + ours:
        p.write_bytes(b"x")
    assert sink.clean_temp_files() == len(ours)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)


@pytest.mark.parametrize("text", ["[1, 2]", '"complete"', "null"])
def test_a_run_file_that_is_not_a_json_object_is_a_clear_error(tmp_path: Path, text: str) -> None:
    """A run.json holding valid JSON of another kind (hand-edited, or another tool's file) ended a
    rerun of `embed` with "AttributeError: 'list' object has no attribute 'get'"."""
    (tmp_path / "run.json").write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError, match=r"run\.json: unreadable run file \(not a JSON object\)"):
        read_run_info(tmp_path)


@pytest.mark.parametrize("line", ["[1]", "not json"])
def test_a_damaged_shard_is_recomputed_on_resume_and_named_when_read(tmp_path: Path, line: str) -> None:
    """A shard .jsonl line that is not a row object ended a resume in AttributeError ("'list' object
    has no attribute 'get'"), and `read_embeddings` in a raw JSONDecodeError; a resume recomputes
    the shard, and reading names it."""
    sink = ShardSink(tmp_path)
    sink.write(0, ["a"], _vectors(1), [(1, 1)], [])
    (tmp_path / "run.json").write_text('{"status": "complete", "partitions": 1}')
    sink.paths(0)[1].write_text(line + "\n", encoding="utf-8")
    assert not sink.is_complete(0, ["a"])
    with pytest.raises(DatasetError, match=r"shard part-00000 is unreadable \(.+\); rerun `clipengine embed`"):
        read_embeddings(tmp_path)


def test_read_embeddings_holds_the_vectors_once_not_twice(tmp_path: Path) -> None:
    """A float32 copy of each shard joined by np.concatenate peaked at twice the vectors' size (6 GB
    for 1,000,000 768-d rows); the shards are now copied into one array as they are read."""
    import tracemalloc

    sink = ShardSink(tmp_path, dtype="float16")
    n_shards, rows, dim = 8, 500, 256  # 4 MB of float32 vectors in all
    rng = np.random.default_rng(0)
    for pid in range(n_shards):
        block = rng.standard_normal((rows, dim)).astype(np.float32)
        sink.write(pid, [f"{pid}/{k}.jpg" for k in range(rows)], block, [(1, 1)] * rows, [])
    tracemalloc.start()
    try:
        ids, vectors, _ = read_embeddings(tmp_path)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ids) == n_shards * rows and vectors.shape == (n_shards * rows, dim)
    assert peak - held < vectors.nbytes / 4  # was ~vectors.nbytes: every row held twice at the end


def test_read_embeddings_names_a_shard_of_another_width(tmp_path: Path) -> None:
    """Shards of two widths in one folder (written by hand or another tool) were np.concatenate's
    bare ValueError; now an error naming the shard."""
    sink = ShardSink(tmp_path, dtype="float32")
    sink.write(0, ["a"], _vectors(1, d=4), [(1, 1)], [])
    sink.write(1, ["b"], _vectors(1, d=8), [(1, 1)], [])
    with pytest.raises(DatasetError, match=r"part-00001\.npy: 8-d vectors, but 4-d in part-00000\.npy"):
        read_embeddings(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts this process's descriptors in /proc")
def test_read_embeddings_keeps_at_most_one_shard_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each memory-mapped shard holds a file descriptor until dropped: mapping every shard before
    copying them out held one per shard (a 1,000,000-image run has 1,000 shards, at or above the
    common limit of 1,024, and the error read "shard is unreadable")."""
    from clipengine.pipeline import sinks

    sink = ShardSink(tmp_path, dtype="float16")
    for pid in range(40):
        sink.write(pid, [f"{pid}.jpg"], _vectors(1, d=4), [(1, 1)], [])
    real_load, open_fds = np.load, []

    def counting_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        open_fds.append(len(os.listdir("/proc/self/fd")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(sinks.np, "load", counting_load)
    ids, vectors, _ = read_embeddings(tmp_path)
    assert len(ids) == 40 and vectors.shape == (40, 4)
    assert max(open_fds) - min(open_fds) <= 2  # was 39: every shard mapped at once


@pytest.mark.parametrize("embed_dim", ["null", '"64"', "[4]"])
def test_read_embeddings_takes_the_width_from_the_shards_not_run_json(tmp_path: Path, embed_dim: str) -> None:
    """The two-pass reader started from `int(run.json's embed_dim)`: a finished folder whose run.json
    holds null there (or a damaged value) ended in a bare TypeError / ValueError, where the reader
    before it never needed that field."""
    sink = ShardSink(tmp_path, dtype="float32")
    sink.write(0, ["a", "b"], _vectors(2), [(1, 1)] * 2, [])
    (tmp_path / "run.json").write_text(f'{{"status": "complete", "partitions": 1, "embed_dim": {embed_dim}}}')
    ids, vectors, _ = read_embeddings(tmp_path)
    assert ids == ["a", "b"]
    np.testing.assert_array_equal(vectors, _vectors(2))


@pytest.mark.parametrize(
    "array",
    [np.array(1.0, dtype=np.float32), np.zeros(1, dtype=np.float32), np.array([["x", "y", "z", "w"]])],
    ids=["0-d", "1-d", "strings"],
)
def test_read_embeddings_names_a_shard_that_holds_no_vectors(tmp_path: Path, array: np.ndarray) -> None:
    """A shard .npy replaced by an array that is not (N, D) floats is named, with its shape and
    dtype; strings were a bare ValueError from the copy into the float32 result."""
    sink = ShardSink(tmp_path, dtype="float32")
    sink.write(0, ["a"], _vectors(1), [(1, 1)], [])
    np.save(sink.paths(0)[0], array)
    with pytest.raises(DatasetError, match=r"shard part-00000 is unreadable \(part-00000\.npy holds a .+ not vectors\)"):
        read_embeddings(tmp_path)


def test_read_embeddings_reads_empty_shards_of_any_dtype(tmp_path: Path) -> None:
    """A shard whose every file failed holds (0, D) vectors; beside float16 and float32 shards it
    adds no rows and keeps the width."""
    ShardSink(tmp_path, dtype="float16").write(0, ["a"], _vectors(1), [(1, 1)], [])
    ShardSink(tmp_path, dtype="float32").write(1, [], _vectors(0), [], [Failure("bad.jpg", "empty file")])
    ShardSink(tmp_path, dtype="float32").write(2, ["c"], _vectors(1), [(1, 1)], [])
    ids, vectors, _ = read_embeddings(tmp_path)
    assert ids == ["a", "c"] and vectors.shape == (2, 4) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, np.concatenate([_vectors(1), _vectors(1)]), atol=1e-3)


def test_read_embeddings_reads_shards_whole_where_they_cannot_be_memory_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some FUSE and network file systems refuse mmap (ENODEV): the shards are read whole there,
    one at a time, rather than every shard reported as unreadable."""
    import errno

    from clipengine.pipeline import sinks

    sink = ShardSink(tmp_path, dtype="float16")
    for pid in range(3):
        sink.write(pid, [f"{pid}.jpg"], _vectors(1, d=4), [(1, 1)], [])
    expected = read_embeddings(tmp_path)
    real_load = np.load

    def no_mmap(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("mmap_mode"):
            raise OSError(errno.ENODEV, "No such device")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(sinks.np, "load", no_mmap)
    ids, vectors, _ = read_embeddings(tmp_path)
    assert ids == expected[0] and np.array_equal(vectors, expected[1])
