"""A decode worker process that dies mid-run (`pipeline.decode_pool`, `batching.settle`).

The workers are real spawned processes; `pipeline_fakes.die_on` makes decoding a chosen file end
its process with `os._exit`, as a decoder segfault or the OOM killer would. The file that kills its
process must become that file's Failure, every other file must be embedded, and the run must go on.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from clipengine.pipeline import decode_pool
from clipengine.pipeline.batching import iter_batches
from clipengine.pipeline.decode_pool import DecodePool
from clipengine.pipeline.run import embed_folder
from clipengine.pipeline.sinks import read_embeddings, read_failures
from clipengine.pipeline.sources import list_items


def _pool(fakes: ModuleType, *names: str, once_marker: Path | None = None) -> DecodePool:
    marker = None if once_marker is None else str(once_marker)
    return DecodePool(2, initializer=partial(fakes.die_on, names, marker))


def _load(items, pool: DecodePool, preprocess_cfg):  # type: ignore[no-untyped-def]
    batches = list(iter_batches(items, preprocess_cfg, batch_size=4, executor=pool, chunk_size=4))
    ids = [i for b in batches for i in b.ids]
    failures = [f for b in batches for f in b.failures]
    return ids, failures, np.concatenate([b.pixels for b in batches if len(b.ids)])


def test_a_file_that_kills_its_worker_is_its_own_failure(tmp_path: Path, fakes: ModuleType, preprocess_cfg) -> None:  # type: ignore[no-untyped-def]
    items = list_items(fakes.write_images(tmp_path / "imgs", 24)[0].parent)
    killers = ("img-0005.jpg", "img-0017.jpg")  # in two different chunks
    pool = _pool(fakes, *killers)
    try:
        ids, failures, pixels = _load(items, pool, preprocess_cfg)
    finally:
        pool.shutdown()
    assert ids == [it.id for it in items if it.id not in killers]  # all the others, in input order
    assert [f.id for f in failures] == list(killers)
    assert all("ended the decoder process" in f.reason for f in failures)
    assert pool.restarts >= 1
    # Files decoded again after a death get the same pixels as in an undisturbed run.
    clean = DecodePool(2)
    try:
        ids_clean, _, pixels_clean = _load([it for it in items if it.id not in killers], clean, preprocess_cfg)
    finally:
        clean.shutdown()
    assert ids_clean == ids
    np.testing.assert_array_equal(pixels, pixels_clean)


def test_a_death_no_file_caused_loses_nothing(tmp_path: Path, fakes: ModuleType, preprocess_cfg) -> None:  # type: ignore[no-untyped-def]
    """A worker killed once, whatever it was decoding (a stray kill, memory pressure): its files are
    decoded again and nothing is reported as failed."""
    items = list_items(fakes.write_images(tmp_path / "imgs", 16)[0].parent)
    marker = tmp_path / "died-once"
    pool = _pool(fakes, once_marker=marker)
    try:
        ids, failures, _ = _load(items, pool, preprocess_cfg)
    finally:
        pool.shutdown()
    assert marker.exists()  # a worker did die
    assert ids == [it.id for it in items] and failures == []


def test_embed_folder_goes_on_past_a_killer_file(tmp_path: Path, fakes: ModuleType, fake_factory, preprocess_cfg,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    """End to end: the run completes, the file is in failures.jsonl with the reason, the rest is embedded."""
    import clipengine.pipeline.run as run

    root = tmp_path / "imgs"
    fakes.write_images(root, 30)
    monkeypatch.setattr(run, "make_executor", lambda workers: _pool(fakes, "img-0011.jpg"))
    stats = embed_folder(root, tmp_path / "out", fake_factory, preprocess_cfg, workers=2, batch_size=4,
                         shard_size=8, dtype="float32")  # fmt: skip
    ids, _, meta = read_embeddings(tmp_path / "out")
    assert ids == [f"img-{i:04d}.jpg" for i in range(30) if i != 11]
    assert [(f.id, "ended the decoder process" in f.reason) for f in read_failures(tmp_path / "out")] == [
        ("img-0011.jpg", True)
    ]
    assert (stats.embedded, stats.failed, meta["status"]) == (29, 1, "complete")


def test_a_pool_of_no_workers_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        DecodePool(0)
    assert decode_pool.make_executor(0) is None
