"""run_partition / embed_folder: exact batching, failures, resume, refusing mixed runs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipengine.errors import DatasetError, IndexMismatchError
from clipengine.pipeline import sinks
from clipengine.pipeline.run import RunStats, embed_folder, pending_images, run_partition
from clipengine.pipeline.sinks import ShardSink, read_embeddings, read_failures
from clipengine.pipeline.sources import list_items, partitions


def test_run_partition_batch_sizes_per_partition(image_folder: Path, preprocess_cfg, fake_backend) -> None:  # type: ignore[no-untyped-def]
    items = list_items(image_folder)  # 25 images
    sink = ShardSink(image_folder.parent / "out")
    per_partition = []
    for part in partitions(items, 10):
        before = len(fake_backend.calls)
        stats = run_partition(
            part.items, fake_backend, sink, partition_id=part.id, preprocess_cfg=preprocess_cfg, batch_size=4
        )
        per_partition.append(fake_backend.calls[before:])
        assert stats.batch_sizes == per_partition[-1]
        assert stats.embedded == len(part.items) and stats.shards_written == 1
    assert per_partition == [[4, 4, 2], [4, 4, 2], [4, 1]]


def test_run_partition_skips_a_complete_shard_without_building_the_backend(
    image_folder: Path, preprocess_cfg, fake_factory
) -> None:  # type: ignore[no-untyped-def]
    items = list_items(image_folder)[:6]
    sink = ShardSink(image_folder.parent / "out")
    run_partition(items, fake_factory, sink, partition_id=0, preprocess_cfg=preprocess_cfg)
    assert len(fake_factory.built) == 1
    stats = run_partition(items, fake_factory, sink, partition_id=0, preprocess_cfg=preprocess_cfg)
    assert (stats.shards_skipped, stats.skipped, stats.embedded) == (1, 6, 0)
    assert len(fake_factory.built) == 1


def test_embed_folder_embeds_every_good_image_and_lists_every_bad_one(
    mixed_folder, tmp_path: Path, preprocess_cfg, fake_factory
) -> None:  # type: ignore[no-untyped-def]
    root, good_ids, bad_ids = mixed_folder
    out = tmp_path / "out"
    stats = embed_folder(root, out, fake_factory, preprocess_cfg, model="fake", workers=0, shard_size=4)
    ids, vectors, meta = read_embeddings(out)
    assert ids == good_ids and len(set(ids)) == len(ids)
    assert vectors.shape == (12, 8)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)  # float16 on disk
    failures = read_failures(out)
    assert sorted(f.id for f in failures) == bad_ids and all(f.reason for f in failures)
    assert (stats.embedded, stats.failed, stats.failed_total) == (12, 3, 3)
    assert meta["status"] == "complete" and meta["model"] == "fake" and meta["embed_dim"] == 8
    assert meta["counts"] == {"images": 15, "embedded": 12, "failed": 3}
    assert meta["partitions"] == 4
    rows = [json.loads(line) for line in (out / "shards" / "part-00000.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"path", "index", "width", "height"}


def test_rerun_of_a_finished_output_recomputes_nothing(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    first = fakes.FakeBackendFactory()
    embed_folder(image_folder, out, first, preprocess_cfg, model="fake", workers=0, shard_size=10)
    again = fakes.FakeBackendFactory()
    stats = embed_folder(image_folder, out, again, preprocess_cfg, model="fake", workers=0, shard_size=10)
    assert (stats.shards_written, stats.shards_skipped, stats.skipped) == (0, 3, 25)
    assert read_embeddings(out)[2]["timings"]["embedded"] == 25  # the working run's timings are kept
    assert again.built == []  # no model loaded when there is nothing to do
    assert read_embeddings(out)[0] == [i.id for i in list_items(image_folder)]


def test_pending_images_counts_what_a_run_would_embed(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes
) -> None:  # type: ignore[no-untyped-def]
    """What the CLI asks before loading a model: the same shards `embed_folder` then keeps."""
    items, out = list_items(image_folder), tmp_path / "out"

    def pending(**kw: bool) -> int:
        return pending_images(items, out, shard_size=10, **kw)

    assert pending() == 25 and not out.exists()  # no run yet: everything (and nothing written)
    embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0, shard_size=10)  # fmt: skip
    assert pending() == 0 and pending(retry_failed=True) == 0  # no failures to retry
    (out / "shards" / "part-00002.npy").unlink()
    assert pending() == 5  # the last partition holds 5
    assert pending_images(items[1:], out, shard_size=10) == 24  # the source changed: every shard stale
    stats = embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0, shard_size=10)  # fmt: skip
    assert (stats.shards_written, stats.shards_skipped) == (1, 2) and pending() == 0


def test_interrupted_run_resumes_to_the_same_result(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes
) -> None:  # type: ignore[no-untyped-def]
    reference = tmp_path / "ref"
    embed_folder(image_folder, reference, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0, shard_size=10, batch_size=4)  # fmt: skip
    out = tmp_path / "out"
    seen = []

    def stop_in_second_partition(n: int) -> None:
        seen.append(n)
        if sum(seen) > 14:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0, shard_size=10, batch_size=4, progress=stop_in_second_partition)  # fmt: skip
    stats = embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0, shard_size=10, batch_size=4)  # fmt: skip
    assert (stats.shards_skipped, stats.shards_written) == (1, 2)
    ref_ids, ref_vectors, _ = read_embeddings(reference)
    ids, vectors, _ = read_embeddings(out)
    assert ids == ref_ids
    np.testing.assert_array_equal(vectors, ref_vectors)


def test_workers_do_not_change_the_result(image_folder: Path, tmp_path: Path, preprocess_cfg, fakes) -> None:  # type: ignore[no-untyped-def]
    embed_folder(
        image_folder, tmp_path / "a", fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=7
    )
    stats = embed_folder(image_folder, tmp_path / "b", fakes.FakeBackendFactory(), preprocess_cfg, workers=2, shard_size=7)  # fmt: skip
    a, b = read_embeddings(tmp_path / "a"), read_embeddings(tmp_path / "b")
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    assert stats.fps > 0 and stats.decode_s > 0 and stats.infer_s > 0


def test_output_of_another_model_or_dim_is_refused(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0)
    with pytest.raises(IndexMismatchError, match=r"model='fake'.*model='other'"):
        embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model="other", workers=0)
    (out / "shards" / "part-00000.jsonl").unlink()  # force work so the backend gets built
    with pytest.raises(IndexMismatchError, match=r"embed_dim=8.*embed_dim=16"):
        embed_folder(image_folder, out, fakes.FakeBackendFactory(embed_dim=16), preprocess_cfg, model="fake", workers=0)  # fmt: skip
    with pytest.raises(IndexMismatchError, match="--shard-size 1000"):
        embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0, shard_size=5)  # fmt: skip


def test_a_model_path_whose_files_changed_is_refused_on_resume(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes
) -> None:  # type: ignore[no-untyped-def]
    """The label of a checkpoint or export folder is its path: a checkpoint saved over with other
    weights, or a folder re-exported from another model, kept it, and a resume mixed two models."""
    from clipengine.pipeline.run_settings import check_output

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    out = tmp_path / "out"

    def run() -> RunStats:
        return embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model=str(checkpoint), workers=0)  # fmt: skip

    run()
    (out / "shards" / "part-00000.jsonl").unlink()  # an unfinished run: a resume has work to do
    assert run().embedded > 0  # same files: resumed
    data = bytearray(checkpoint.read_bytes())
    data[600_000] ^= 1  # one byte deep inside, as a fine-tune saved over it would change many
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(IndexMismatchError, match=r"model.safetensors differs\): a resume would mix"):
        run()
    with pytest.raises(IndexMismatchError, match="whose files have changed"):
        check_output(out, model=str(checkpoint))  # the CLI's check before it loads the model

    export = tmp_path / "export"
    export.mkdir()
    engines = [{"tower": "image", "file": "image_fp32.onnx", "sha256": "aa"}, {"tower": "text", "file": "t.onnx", "sha256": "bb"}]  # fmt: skip
    (export / "manifest.json").write_text(json.dumps({"engines": engines}))
    out2 = tmp_path / "out2"
    embed_folder(image_folder, out2, fakes.FakeBackendFactory(), preprocess_cfg, model=str(export), workers=0)
    engines += [{"tower": "image", "file": "image_int8.onnx", "sha256": "cc"}]  # another precision added
    engines[1]["sha256"] = "dd"  # and the text engine re-exported: the image embeddings do not change
    (export / "manifest.json").write_text(json.dumps({"engines": engines}))
    check_output(out2, model=str(export))
    engines[0]["sha256"] = "ee"  # the image engine re-exported from other weights
    (export / "manifest.json").write_text(json.dumps({"engines": engines}))
    with pytest.raises(IndexMismatchError, match=r"image_fp32.onnx differs"):
        check_output(out2, model=str(export))


def test_retry_failed_recomputes_only_the_shards_that_list_failures(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes
) -> None:  # type: ignore[no-untyped-def]
    """A plain rerun of a finished run keeps every shard, so a file fixed since was never read again."""
    good = (image_folder / "img-0003.jpg").read_bytes()
    (image_folder / "img-0003.jpg").write_bytes(good[:50])  # cut: fails; in partition 0 of 3
    out = tmp_path / "out"

    def run(**kw: bool) -> RunStats:
        return embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=10, **kw)  # fmt: skip

    assert run().failed_total == 1
    (image_folder / "img-0003.jpg").write_bytes(good)  # fixed
    assert (run().shards_skipped, read_failures(out)[0].id) == (3, "img-0003.jpg")  # a plain rerun: kept
    stats = run(retry_failed=True)
    assert (stats.shards_skipped, stats.embedded, stats.failed_total) == (2, 10, 0)
    ids, _, _ = read_embeddings(out)
    assert "img-0003.jpg" in ids and len(ids) == 25 and read_failures(out) == []


def test_fast_decode_is_recorded_and_a_mixed_resume_refused(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, fast_decode=True)
    assert read_embeddings(out)[2]["fast_decode"] is True
    with pytest.raises(IndexMismatchError, match="use --fast-decode"):
        embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0)


def test_file_names_that_are_not_utf8_round_trip(tmp_path: Path, preprocess_cfg, fakes) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "images"
    good = fakes.write_images(root, 3)
    raw = os.fsencode(root)
    try:  # Linux names are bytes: os.fsdecode turns b"\xff" into the lone surrogate "\udcff"
        os.rename(good[1], os.fsdecode(raw + b"/caf\xe9 1.jpg"))  # Latin-1, not UTF-8
        open(os.fsdecode(raw + b"/bad\xff.jpg"), "wb").close()
    except (OSError, UnicodeError):
        pytest.skip("this file system only takes UTF-8 names")
    out = tmp_path / "out"
    stats = embed_folder(root, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=10)
    assert (stats.embedded, stats.failed) == (3, 1)
    ids, vectors, _ = read_embeddings(out)
    assert ids == sorted(i.id for i in list_items(root) if i.id != "bad\udcff.jpg")
    assert "caf\udce9 1.jpg" in ids and vectors.shape == (3, 8)
    assert [f.id for f in read_failures(out)] == ["bad\udcff.jpg"]
    again = embed_folder(root, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=10)
    assert (again.shards_skipped, again.shards_written) == (1, 0)


def test_output_of_a_crashed_rerun_is_refused_until_resumed(
    tmp_path: Path, preprocess_cfg, fakes, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "images"
    fakes.write_images(root, 3)
    out = tmp_path / "out"
    embed_folder(root, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=10)
    shutil.move(root / "img-0002.jpg", root / "img-0000a.jpg")  # same count, new order: the shard is redone
    real = sinks.atomic_write_bytes

    def crash_before_rows(path: str | Path, data: bytes) -> None:
        if Path(path).name == "part-00000.jsonl":
            raise KeyboardInterrupt  # killed after the new .npy, before the new .jsonl
        real(path, data)

    monkeypatch.setattr(sinks, "atomic_write_bytes", crash_before_rows)
    with pytest.raises(KeyboardInterrupt):
        embed_folder(root, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=10)
    monkeypatch.undo()
    # The old .jsonl (img-0000, 0001, 0002) now sits beside the new .npy (img-0000, 0000a, 0001).
    with pytest.raises(DatasetError, match="not finished"):
        read_embeddings(out)
    embed_folder(root, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=10)
    embed_folder(root, tmp_path / "ref", fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=10)
    ids, vectors, _ = read_embeddings(out)
    ref_ids, ref_vectors, _ = read_embeddings(tmp_path / "ref")
    assert ids == ref_ids == ["img-0000.jpg", "img-0000a.jpg", "img-0001.jpg"]
    np.testing.assert_array_equal(vectors, ref_vectors)


def _spy_loaders(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the ids each loader `run` creates is asked for (one list per `iter_batches` call)."""
    from clipengine.pipeline import shard_assembly as run_module

    loaders: list[list[str]] = []
    real = run_module.iter_batches

    def spy(items, *args, **kwargs):  # type: ignore[no-untyped-def]
        loaders.append([item.id for item in items])
        return real(items, *args, **kwargs)

    monkeypatch.setattr(run_module, "iter_batches", spy)
    return loaders


def test_one_loader_feeds_every_partition_and_batches_cross_shard_edges(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    loaders = _spy_loaders(monkeypatch)
    factory = fakes.FakeBackendFactory()
    out = tmp_path / "out"
    stats = embed_folder(image_folder, out, factory, preprocess_cfg, workers=0, shard_size=10, batch_size=4)
    items = list_items(image_folder)  # 25: shards of 10, 10, 5
    assert loaders == [[i.id for i in items]]  # the decode pipeline is not drained at each shard
    assert factory.built[0].calls == [4, 4, 4, 4, 4, 4, 1]  # a batch may hold the end of one shard and the next
    assert (stats.shards_written, stats.embedded, stats.batch_sizes) == (3, 25, [4, 4, 4, 4, 4, 4, 1])
    sink = ShardSink(out)
    for part in partitions(items, 10):
        assert sink.is_complete(part.id, [i.id for i in part.items], embed_dim=8)
    one_shard = tmp_path / "one"
    embed_folder(image_folder, one_shard, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, batch_size=4)
    ids, vectors, _ = read_embeddings(out)
    ref_ids, ref_vectors, _ = read_embeddings(one_shard)
    assert ids == ref_ids
    np.testing.assert_array_equal(vectors, ref_vectors)


def test_failures_at_shard_edges_land_in_their_own_shard(
    mixed_folder, tmp_path: Path, preprocess_cfg, fakes
) -> None:  # type: ignore[no-untyped-def]
    root, good_ids, bad_ids = mixed_folder  # sorted: the 3 bad files first, then 12 good ones
    out = tmp_path / "out"
    embed_folder(root, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=2, batch_size=3)
    sink = ShardSink(out)
    items = list_items(root)
    for part in partitions(items, 2):  # shard 0: two failures only; shard 1: a failure and a row
        assert sink.is_complete(part.id, [i.id for i in part.items], embed_dim=8)
        shard_failures = [json.loads(line)["path"] for line in sink.paths(part.id)[2].read_text().splitlines()]
        assert shard_failures == [i.id for i in part.items if i.id in bad_ids]
    assert read_embeddings(out)[0] == good_ids
    assert sorted(f.id for f in read_failures(out)) == bad_ids


def test_a_resume_loads_only_the_unfinished_partitions(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=10)
    (out / "shards" / "part-00001.jsonl").unlink()
    loaders = _spy_loaders(monkeypatch)
    stats = embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=10)
    assert loaders == [[i.id for i in list_items(image_folder)[10:20]]]
    assert (stats.shards_skipped, stats.shards_written, stats.skipped, stats.embedded) == (2, 1, 15, 10)
    assert read_embeddings(out)[0] == [i.id for i in list_items(image_folder)]


def test_items_listed_twice_are_refused_before_any_work(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes
) -> None:  # type: ignore[no-untyped-def]
    items = list_items(image_folder)
    factory = fakes.FakeBackendFactory()
    with pytest.raises(DatasetError, match=r"'img-0003.jpg' is listed twice"):
        embed_folder([*items[:5], items[3]], tmp_path / "out", factory, preprocess_cfg, workers=0)
    assert factory.built == []


def test_run_stats_counts_cover_resumed_shards() -> None:
    """run.json "counts": rows on disk (this run's + resumed shards' minus their failures), all failures."""
    # 14 items: this run embedded 4 and failed 1; 9 were skipped in complete shards holding 1 failure.
    stats = RunStats(images=14, embedded=4, failed=1, skipped=9, failed_total=2)
    assert stats.counts() == {"images": 14, "embedded": 12, "failed": 2}
    assert RunStats().counts() == {"images": 0, "embedded": 0, "failed": 0}


@pytest.mark.parametrize("repeated", [3, 22], ids=["in-a-complete-shard", "in-the-shard-to-redo"])
def test_items_listed_twice_are_refused_before_a_finished_output_is_touched(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes, repeated: int
) -> None:  # type: ignore[no-untyped-def]
    """Every id is checked, not only those of the shards a resume redoes, and before run.json is
    rewritten: a refused run must not leave a finished output marked unfinished."""
    items = list_items(image_folder)  # 25: shards of 10, 10, 5 (a 26th item changes only the last)
    out = tmp_path / "out"
    embed_folder(items, out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=10)
    run_json = (out / "run.json").read_bytes()
    with pytest.raises(DatasetError, match=rf"'{items[repeated].id}' is listed twice"):
        embed_folder([*items, items[repeated]], out, fakes.FakeBackendFactory(), preprocess_cfg, workers=0, shard_size=10)  # fmt: skip
    assert (out / "run.json").read_bytes() == run_json
    assert read_embeddings(out)[0] == [i.id for i in items]


def test_run_partition_of_no_items_writes_an_empty_shard(tmp_path: Path, preprocess_cfg, fakes) -> None:  # type: ignore[no-untyped-def]
    sink = ShardSink(tmp_path / "out")
    stats = run_partition([], fakes.FakeBackendFactory(), sink, partition_id=0, preprocess_cfg=preprocess_cfg)
    assert (stats.shards_written, stats.embedded, stats.failed) == (1, 0, 0)
    assert sink.is_complete(0, [], embed_dim=8)


def test_run_partition_refuses_an_id_listed_twice_and_writes_no_shard(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes
) -> None:  # type: ignore[no-untyped-def]
    """Rows are routed to their shard by id: a repeated id (a tar holding a member twice) is refused,
    as embed_folder and embed_with_ray refuse it before calling this."""
    items = list_items(image_folder)[:3]
    sink = ShardSink(tmp_path / "out")
    with pytest.raises(DatasetError, match=rf"'{items[1].id}' is listed twice"):
        run_partition([*items, items[1]], fakes.FakeBackendFactory(), sink, partition_id=0,
                      preprocess_cfg=preprocess_cfg)  # fmt: skip
    assert not any(path.exists() for path in sink.paths(0))


def test_embedding_into_the_image_folder_keeps_images_named_like_temp_files(
    tmp_path: Path, preprocess_cfg, fakes
) -> None:  # type: ignore[no-untyped-def]
    """`-o` may be the images' own folder: its leftover sweep must not take an image whose name
    holds ".tmp-" (it was listed, then deleted before it was read)."""
    root = tmp_path / "images"
    (good,) = fakes.write_images(root, 1)
    odd = good.rename(root / "beach.tmp-2.jpg")
    stats = embed_folder(root, root, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0)
    assert odd.is_file() and stats.embedded == 1 and stats.failed == 0


def test_float16_storage_states_its_measured_loss(image_folder: Path, tmp_path: Path, preprocess_cfg, fake_factory) -> None:  # type: ignore[no-untyped-def]
    """float16 shards (the default) were stored with no figure for their rounding; the run now
    states the worst cosine of a stored row to its float32 row, over the rows it wrote."""
    half = embed_folder(image_folder, tmp_path / "f16", fake_factory, preprocess_cfg, workers=0, shard_size=4)
    assert half.storage_min_cos is not None and 0.9999 < half.storage_min_cos < 1.0
    _, stored, _ = read_embeddings(tmp_path / "f16")
    full = embed_folder(image_folder, tmp_path / "f32", fake_factory, preprocess_cfg, workers=0, shard_size=4,
                        dtype="float32")  # fmt: skip
    assert full.storage_min_cos is None
    _, exact, _ = read_embeddings(tmp_path / "f32")
    a, b = stored.astype(np.float64), exact.astype(np.float64)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert half.storage_min_cos == pytest.approx(float(cos.min()), abs=1e-9)  # what it says is what was stored
    timings = json.loads((tmp_path / "f16" / "run.json").read_text())["timings"]
    assert timings["storage_min_cos"] == half.storage_min_cos
    items = list_items(image_folder)
    part = run_partition(items[:3], fake_factory, ShardSink(tmp_path / "one"), partition_id=0,
                         preprocess_cfg=preprocess_cfg)  # fmt: skip
    assert part.storage_min_cos is not None and 0.9999 < part.storage_min_cos < 1.0


def test_a_source_changed_since_the_run_is_warned_about_once_not_per_shard(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    # A file added at the top of the folder moves every shard; at 200,000 files that was 200
    # warning lines, one per shard, before the run's summary.
    out = tmp_path / "out"
    embed_folder(
        image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0, shard_size=4
    )
    fakes.write_images(image_folder, 1, prefix="aaa")  # sorts first: 7 finished shards no longer match
    with caplog.at_level("WARNING", logger="clipengine.pipeline"):
        stats = embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0, shard_size=4)  # fmt: skip
    assert (stats.shards_skipped, stats.shards_written) == (0, 7)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    assert warned[0].startswith(
        "recomputing 7 finished shard(s): part-00000, part-00001, part-00002 and 4 more"
    )
    assert "a file added, removed or renamed" in warned[0]
    assert read_embeddings(out)[0] == [i.id for i in list_items(image_folder)]


def test_a_damaged_shard_is_named_with_its_reason_in_the_one_warning(
    image_folder: Path, tmp_path: Path, preprocess_cfg, fakes, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    embed_folder(
        image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0, shard_size=10
    )
    (out / "shards" / "part-00001.jsonl").write_text("{not json\n")
    (out / "shards" / "part-00002.jsonl").unlink()  # never finished: recomputed without a word
    with caplog.at_level("WARNING", logger="clipengine.pipeline"):
        stats = embed_folder(image_folder, out, fakes.FakeBackendFactory(), preprocess_cfg, model="fake", workers=0, shard_size=10)  # fmt: skip
    assert (stats.shards_skipped, stats.shards_written) == (1, 2)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    assert warned[0].startswith("recomputing 1 finished shard(s): part-00001 (is unreadable (")
    assert "a file added" not in warned[0]
