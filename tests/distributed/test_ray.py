"""Ray engine: same shards as the local run, resume after interruption, tar / Parquet sources."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from clipengine.distributed.ray import ModelSpec, SpecBackendFactory, embed_with_ray, list_source
from clipengine.errors import BackendError, DatasetError, IndexMismatchError, InputError
from clipengine.files import is_temp_name
from clipengine.pipeline import embed_folder, read_embeddings, read_failures
from clipengine.pipeline.sinks import read_run_info
from clipengine.types import ImageItem


def _shard_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "shards").iterdir())


@pytest.mark.integration
def test_ray_run_equals_local_run_and_resumes(
    ray_local: None, fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    factory = fakes.FakeFactory()
    local = tmp_path / "local"
    embed_folder(mixed_folder, local, factory, preprocess_cfg, model="fake", shard_size=5, workers=0)
    out = tmp_path / "ray"
    seen: list[int] = []
    stats = embed_with_ray(
        mixed_folder,
        out,
        factory,
        preprocess_cfg,
        model="fake",
        shard_size=5,
        num_actors=2,
        progress=seen.append,
    )
    assert (stats.embedded, stats.failed, stats.shards_written) == (12, 2, 3) and sum(seen) == 14
    assert _shard_names(out) == _shard_names(local)
    ids_l, vec_l, _ = read_embeddings(local)
    ids_r, vec_r, meta_r = read_embeddings(out)
    assert ids_r == ids_l and np.array_equal(vec_r, vec_l)
    assert read_failures(out) == read_failures(local) and len(read_failures(out)) == 2
    assert meta_r["model"] == "fake" and meta_r["embed_dim"] == 8 and meta_r["status"] == "complete"

    # Interruption: one shard lost its commit marker, another left a temp file behind.
    (out / "shards" / "part-00001.jsonl").unlink()
    (out / "shards" / ".part-00002.npy.x1y2z3w4.tmp").write_bytes(b"partial")
    again = embed_with_ray(mixed_folder, out, factory, preprocess_cfg, model="fake", shard_size=5)
    assert (again.shards_written, again.shards_skipped, again.embedded) == (1, 2, 5)
    ids_2, vec_2, _ = read_embeddings(out)
    assert ids_2 == ids_l and np.array_equal(vec_2, vec_l)
    assert not [p for p in (out / "shards").iterdir() if is_temp_name(p.name)]

    # The local engine resumes a Ray folder (and vice versa): nothing left to do.
    assert (
        embed_folder(mixed_folder, out, factory, preprocess_cfg, model="fake", shard_size=5).shards_written
        == 0
    )
    # --retry-failed: the shards that list failures are recomputed (their files still fail here).
    with_failures = sum(p.stat().st_size > 0 for p in (out / "shards").glob("*.failures.jsonl"))
    retried = embed_with_ray(mixed_folder, out, factory, preprocess_cfg, model="fake", shard_size=5, retry_failed=True)  # fmt: skip
    assert 0 < with_failures == retried.shards_written and retried.shards_skipped == 3 - with_failures
    assert read_failures(out) == read_failures(local) and read_embeddings(out)[0] == ids_l

    # Damaged finished shards are recomputed with one warning for all, as the local engine does (a
    # warning per shard flooded the terminal when a changed source moved every shard).
    for stem in ("part-00000", "part-00002"):
        (out / "shards" / f"{stem}.jsonl").write_text("{not json\n")
    with caplog.at_level("WARNING", logger="clipengine"):
        damaged = embed_with_ray(mixed_folder, out, factory, preprocess_cfg, model="fake", shard_size=5)
    assert damaged.shards_written == 2 and read_embeddings(out)[0] == ids_l
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("clipengine") and r.levelno >= logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("recomputing 2 finished shard(s): part-00000, part-00002"), warned


@pytest.mark.integration
def test_ray_records_the_precision_and_a_resume_at_another_is_refused(
    ray_local: None, fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    """An export folder is one model label at fp32 and int8: as the local engine, Ray records the
    backend's precision, and a resume at another (by either engine) is refused, not mixed in."""
    out = tmp_path / "ray"
    embed_with_ray(mixed_folder, out, fakes.FakeFactory(), preprocess_cfg, model="fake", shard_size=5, num_actors=1)
    assert read_run_info(out)["precision"] == "fp32"
    (out / "shards" / "part-00001.jsonl").unlink()  # an unfinished shard: a rerun has work to do
    with pytest.raises(IndexMismatchError, match=r"precision='fp32'.*precision='int8'.*--precision fp32"):
        embed_with_ray(mixed_folder, out, fakes.FakeFactory(precision="int8"), preprocess_cfg, model="fake",
                       shard_size=5, num_actors=1)  # fmt: skip
    assert not (out / "shards" / "part-00001.jsonl").exists()  # the refused actor embedded nothing
    with pytest.raises(IndexMismatchError, match="precision"):
        embed_folder(mixed_folder, out, fakes.FakeFactory(precision="int8"), preprocess_cfg, model="fake",
                     shard_size=5, workers=0)  # fmt: skip
    assert not (out / "shards" / "part-00001.jsonl").exists()  # nothing embedded at int8


def test_pure_resume_keeps_the_timings_of_the_run_that_did_the_work(
    fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    # Everything is done already, so no Ray job starts: this runs without a Ray instance.
    out = tmp_path / "out"
    embed_folder(
        mixed_folder, out, fakes.FakeFactory(), preprocess_cfg, model="fake", shard_size=5, workers=0
    )
    first = read_run_info(out)
    assert first is not None and first["timings"]["embedded"] == 12
    again = embed_with_ray(mixed_folder, out, fakes.FakeFactory(), preprocess_cfg, model="fake", shard_size=5)
    assert (again.shards_skipped, again.skipped, again.processed) == (3, 14, 0)
    info = read_run_info(out)
    assert info is not None and info["engine"] == "ray" and info["status"] == "complete"
    assert info["timings"] == first["timings"]  # as embed_folder does on a pure resume
    assert info["counts"] == first["counts"] == {"images": 14, "embedded": 12, "failed": 2}


def test_run_json_counts_come_from_the_shared_run_stats_counts(
    fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The Ray engine records the same "counts" as embed_folder by calling RunStats.counts, not a copy."""
    from clipengine.pipeline.run import RunStats

    out = tmp_path / "out"
    embed_folder(mixed_folder, out, fakes.FakeFactory(), preprocess_cfg, model="fake", shard_size=5, workers=0)
    marker = {"images": -1, "embedded": -2, "failed": -3}
    monkeypatch.setattr(RunStats, "counts", lambda self: marker)
    embed_with_ray(mixed_folder, out, fakes.FakeFactory(), preprocess_cfg, model="fake", shard_size=5)
    info = read_run_info(out)
    assert info is not None and info["counts"] == marker


@pytest.mark.integration
def test_tar_shards_embed_like_the_files(
    ray_local: None, fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    shards = tmp_path / "wds"
    shards.mkdir()
    files = sorted(mixed_folder.iterdir())
    for k, chunk in enumerate((files[:7], files[7:])):
        with tarfile.open(shards / f"shard-{k:03d}.tar", "w") as tf:
            for f in chunk:
                tf.add(f, arcname=f.name)
                info = tarfile.TarInfo(f.stem + ".txt")  # WebDataset caption beside the image: ignored
                info.size = 3
                tf.addfile(info, io.BytesIO(b"cap"))
    out = tmp_path / "out"
    stats = embed_with_ray(shards, out, fakes.FakeFactory(), preprocess_cfg, model="fake", shard_size=4)
    assert (stats.embedded, stats.failed) == (12, 2)
    ids, vectors, _ = read_embeddings(out)
    ref_ids, ref, _ = read_embeddings(_local(fakes, mixed_folder, tmp_path, preprocess_cfg))
    by_name = dict(zip([i.split("/", 1)[1] for i in ids], vectors, strict=True))
    assert ids[0].startswith("shard-000.tar/") and ids[-1].startswith("shard-001.tar/")
    assert np.array_equal(np.stack([by_name[i] for i in ref_ids]), ref)


@pytest.mark.integration
def test_tar_members_that_cannot_be_embedded_are_failures_and_the_rest_is_embedded(
    ray_local: None, fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    """Symlinks, directories and devices were dropped without a word, and a tar cut short in a
    member was refused whole; a hard link is embedded as the member it links to."""
    good = sorted(mixed_folder.glob("img-*.jpg"))[:3]
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as tf:
        for f in good:
            tf.add(f, arcname=f.name)
        for name, kind in (
            ("hard.jpg", tarfile.LNKTYPE),
            ("soft.jpg", tarfile.SYMTYPE),
            ("dir.jpg", tarfile.DIRTYPE),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, good[1].name
            tf.addfile(info)
        tf.add(good[2], arcname="last.jpg")
    data = tar.read_bytes()
    tar.write_bytes(data[: data.rindex(good[2].read_bytes()) + 100])  # last.jpg cut in its data
    out = tmp_path / "out"
    stats = embed_with_ray(tar, out, fakes.FakeFactory(), preprocess_cfg, model="fake", shard_size=4)
    assert (stats.embedded, stats.failed) == (4, 3)
    ids, vectors, _ = read_embeddings(out)
    assert ids == [f"s.tar/{f.name}" for f in good] + ["s.tar/hard.jpg"]
    assert np.array_equal(vectors[3], vectors[1])  # the link's bytes are its target's
    failures = {f.id: f.reason for f in read_failures(out)}
    assert failures == {
        "s.tar/soft.jpg": "tar member is a symlink to 'img-001.jpg': not followed",
        "s.tar/dir.jpg": "tar member is a directory: not a regular file",
        "s.tar/last.jpg": f"tar member is cut short: the tar ends after 100 of its {good[2].stat().st_size} bytes",
    }


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_partition_that_kills_its_actor_fails_the_job_instead_of_retrying_forever(
    ray_local: None, fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    """An actor process that dies (the OOM killer, a crash in the model runtime) was restarted and
    its partition retried without end (Ray Data's default): the job hung. Now it is retried twice."""
    factory = fakes.FakeFactory(exit_on_encode=True)
    with pytest.raises(BackendError, match=r"an actor process died running one partition 3 times") as e:
        embed_with_ray(mixed_folder, tmp_path / "out", factory, preprocess_cfg, model="fake", num_actors=1)
    assert "\n" not in str(e.value)


@pytest.mark.integration
def test_a_file_that_kills_its_decoder_is_its_failure_and_the_rest_is_embedded(
    ray_local: None, fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    """As with the local engine (`pipeline.decode_pool`): a file whose decoding ends its process (a
    decoder segfault, the OOM killer) is listed as that file's failure. Decoded inside the actor, it
    killed the actor, and Ray restarted it and retried the partition forever."""
    (tmp_path / "crashes").mkdir()
    killer = "img-006.jpg"
    factory = fakes.FakeFactory(crash_on=(killer,), crashes_dir=str(tmp_path / "crashes"))
    out = tmp_path / "out"
    stats = embed_with_ray(mixed_folder, out, factory, preprocess_cfg, model="fake", shard_size=5)
    assert (stats.embedded, stats.failed) == (11, 3)
    local = _local_shards_of_5(fakes, mixed_folder, tmp_path / "local", preprocess_cfg)
    ids_l, vec_l, _ = read_embeddings(local)
    ids_r, vec_r, _ = read_embeddings(out)
    assert ids_r == [i for i in ids_l if i != killer]
    assert np.array_equal(vec_r, np.delete(vec_l, ids_l.index(killer), axis=0))  # nothing else lost
    failures = {f.id: f.reason for f in read_failures(out)}
    assert sorted(failures) == ["bad-empty.jpg", "bad-truncated.jpg", killer]
    assert "ended the decoder process" in failures[killer]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_more_gpus_per_actor_than_the_cluster_has_is_an_error_not_a_hang(
    ray_local: None, fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    """The 2-CPU test instance has no GPU: no actor could ever start, and the job waited forever."""
    with pytest.raises(BackendError, match=r"1 GPU\(s\) per actor, but the Ray cluster has 0"):
        embed_with_ray(
            mixed_folder, tmp_path / "out", fakes.FakeFactory(), preprocess_cfg, model="fake", num_gpus=1
        )


@pytest.mark.integration
def test_an_error_inside_an_actor_is_one_line_naming_its_cause(
    ray_local: None, fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    """A shard deleted after listing: the actor's error, not Ray's 30-line, colour-coded remote
    traceback (the CLI prints the message as its one-line error)."""
    gone = tmp_path / "gone.tar"
    with tarfile.open(gone, "w") as tf:
        tf.add(mixed_folder / "img-001.jpg", arcname="x.jpg")
    items = [ImageItem("img-000.jpg", str(mixed_folder / "img-000.jpg")), *list_source(gone)]
    gone.unlink()
    with pytest.raises(
        BackendError,
        match=r"^Ray embedding job failed on partition 0: DatasetError: .*gone\.tar: cannot read the tar shard "
        r"listed when the job started \(\[Errno 2\] No such file or directory: .*\); moved, deleted or unmounted since\?$",
    ) as e:
        embed_with_ray(items, tmp_path / "out", fakes.FakeFactory(), preprocess_cfg, model="fake")
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)


@pytest.mark.integration
def test_a_model_an_actor_cannot_load_is_the_load_error_itself(
    ray_local: None, fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    """Raised in the actor's constructor, it ended the job with Ray's remote traceback squeezed onto
    one line. Now the driver raises the loader's own error, as a load on the driver would."""
    import clipengine
    from clipengine.errors import CheckpointError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(CheckpointError) as local:
        clipengine.load(str(bad))
    with pytest.raises(CheckpointError) as remote:
        embed_with_ray(
            mixed_folder, tmp_path / "out", {"name": str(bad)}, preprocess_cfg, model="m", num_actors=1
        )
    assert str(remote.value) == str(local.value)
    # The same for an output folder of another embedding width (checked once the model is loaded).
    out = _local_shards_of_5(fakes, mixed_folder, tmp_path / "out8", preprocess_cfg)
    (out / "shards" / "part-00001.jsonl").unlink()
    with pytest.raises(IndexMismatchError, match=r"holds 8-d embeddings but the model makes 16-d"):
        embed_with_ray(
            mixed_folder, out, fakes.FakeFactory(embed_dim=16), preprocess_cfg, model="fake", shard_size=5
        )
    assert not (out / "shards" / "part-00001.jsonl").exists()  # no 16-d shard among the 8-d ones


@pytest.mark.integration
def test_real_model_spec_matches_local_run_and_direct_encoding(
    ray_local: None, tiny_model_dir: Path, mixed_folder: Path, tmp_path: Path
) -> None:
    import clipengine

    spec = ModelSpec(name=str(tiny_model_dir))  # plain data: each actor runs clipengine.load itself
    clip = clipengine.load(str(tiny_model_dir))
    local = tmp_path / "local"
    embed_folder(mixed_folder, local, SpecBackendFactory(spec), clip.preprocess_cfg, model=clip.name,
                 shard_size=7, workers=0, dtype="float32")  # fmt: skip
    out = tmp_path / "ray"
    stats = embed_with_ray(mixed_folder, out, {"name": str(tiny_model_dir)}, clip.preprocess_cfg,
                           model=clip.name, shard_size=7, dtype="float32", num_actors=2)  # fmt: skip
    assert stats.load_s > 0 and stats.shards_written == 2
    ids_l, vec_l, _ = read_embeddings(local)
    ids_r, vec_r, meta = read_embeddings(out)
    assert ids_r == ids_l and meta["embed_dim"] == 32
    np.testing.assert_allclose(vec_r, vec_l, atol=1e-5)
    direct = clip.encode_images([mixed_folder / i for i in ids_l[:3]])
    np.testing.assert_allclose(vec_r[:3], direct, atol=1e-5)


def _local(fakes: ModuleType, folder: Path, tmp_path: Path, cfg) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path / "local-ref"
    embed_folder(folder, out, fakes.FakeFactory(), cfg, model="fake", workers=0)
    return out


def _local_shards_of_5(fakes: ModuleType, folder: Path, out: Path, cfg) -> Path:  # type: ignore[no-untyped-def]
    """A finished local run of model "fake" in shards of 5: what a Ray resume must check against."""
    embed_folder(folder, out, fakes.FakeFactory(), cfg, model="fake", shard_size=5, workers=0)
    return out


def test_another_model_in_the_same_folder_is_refused_before_ray_starts(
    fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    out = _local_shards_of_5(fakes, mixed_folder, tmp_path / "out", preprocess_cfg)
    with pytest.raises(IndexMismatchError, match="model='fake'"):
        embed_with_ray(mixed_folder, out, fakes.FakeFactory(), preprocess_cfg, model="other", shard_size=5)


def test_resuming_a_gpu_decoded_folder_is_refused_before_ray_starts(
    fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    import json

    out = _local_shards_of_5(fakes, mixed_folder, tmp_path / "out", preprocess_cfg)
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "gpu_decode": True, "gpu_decoder": "torchvision"}))
    # Ray actors decode on the CPU: resuming would mix nvjpeg and libjpeg pixels in one folder.
    with pytest.raises(IndexMismatchError, match="gpu_decode=True"):
        embed_with_ray(mixed_folder, out, fakes.FakeFactory(), preprocess_cfg, model="fake", shard_size=5)


def test_an_id_listed_twice_is_refused_before_ray_starts(
    fakes: ModuleType, tmp_path: Path, preprocess_cfg
) -> None:  # type: ignore[no-untyped-def]
    """As `embed_folder`: every id names one output row. A tar may hold a member twice (`tar -r`);
    the actors refused it, inside a failed Ray job, and only when both fell in one partition."""
    files = fakes.write_images(tmp_path / "img", 3)
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as tf:
        for f in [*files, files[1]]:
            tf.add(f, arcname=f.name)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=r"'s.tar/img-001.jpg' is listed twice"):
        embed_with_ray(tar, out, fakes.FakeFactory(), preprocess_cfg, model="fake", shard_size=10)
    assert not (out / "run.json").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("resources", "named"), [({"num_gpus": 1.5}, "num_gpus=1.5"), ({"num_cpus": 2.5}, "num_cpus=2.5"),
                             ({"num_gpus": -1}, "num_gpus=-1"), ({"num_gpus": float("nan")}, "num_gpus=nan")],
)  # fmt: skip
def test_resources_ray_cannot_reserve_are_refused_before_ray_starts(
    fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg, resources, named
) -> None:  # type: ignore[no-untyped-def]
    """Ray reserves a fraction of one GPU or CPU, or whole ones: `--gpus-per-actor 1.5` on a
    cluster with GPUs ended in Ray Data's ValueError and its traceback, after Ray had started."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"^{named} per actor: ") as e:
        embed_with_ray(mixed_folder, out, fakes.FakeFactory(), preprocess_cfg, model="fake", **resources)
    assert "\n" not in str(e.value)
    assert not out.exists()


@pytest.mark.timeout(120)
def test_an_unreachable_ray_address_in_the_environment_is_a_one_line_error_not_a_wait(
    fakes: ModuleType, mixed_folder: Path, tmp_path: Path, preprocess_cfg, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """RAY_ADDRESS is --address by another name (docs/search_scale.md); nothing listening there,
    `ray.init` tried it for minutes, where --address is refused after a 10 s connect."""
    ray = pytest.importorskip("ray")
    inits: list[object] = []
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a test module's instance may be up
    monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append(k))
    with pytest.raises(BackendError, match=r"^cannot reach the Ray cluster at 127\.0\.0\.1:1 \(.*RAY_ADDRESS") as e:
        embed_with_ray(mixed_folder, tmp_path / "out", fakes.FakeFactory(), preprocess_cfg, model="fake")
    assert "\n" not in str(e.value) and inits == []


def test_parquet_source_resolves_relative_paths(tmp_path: Path, fakes: ModuleType) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fakes.write_images(tmp_path / "imgs", 3)
    pq.write_table(
        pa.table({"path": ["imgs/img-000.jpg", "imgs/img-002.jpg"], "x": [1, 2]}), tmp_path / "l.parquet"
    )
    items = list_source(tmp_path / "l.parquet")
    assert [i.id for i in items] == ["imgs/img-000.jpg", "imgs/img-002.jpg"]
    assert Path(str(items[1].source)) == tmp_path / "imgs" / "img-002.jpg"
    with pytest.raises(DatasetError, match="column 'file'"):
        list_source(tmp_path / "l.parquet", path_column="file")


def test_a_parquet_row_without_a_path_is_refused_not_skipped(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["a.jpg", None, "b.jpg", None]}), tmp_path / "l.parquet")
    with pytest.raises(DatasetError, match=r"l.parquet: column 'path' is empty \(null\) in rows 1, 3"):
        list_source(tmp_path / "l.parquet")


def test_a_parquet_file_without_the_path_column_names_its_columns_in_one_line(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"file": ["a.jpg"], "label": [1]}), tmp_path / "l.parquet")
    with pytest.raises(DatasetError, match=r"l.parquet: no column 'path' \(its columns: file, label\)") as e:
        list_source(tmp_path / "l.parquet")
    assert "\n" not in str(e.value)


def test_a_file_that_is_not_a_tar_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(DatasetError, match=r"a.tar: not a readable tar shard \(.*invalid header") as e:
        list_source(tmp_path / "a.tar")
    assert "\n" not in str(e.value)  # tarfile lists each compression it tried on a line of its own


def test_a_folder_of_shards_with_images_only_in_hidden_folders_is_read_as_shards(tmp_path: Path) -> None:
    """Images in hidden folders (`.cache/`) are not listed, so they must not make a folder of
    .tar shards count as a folder of images (which would then list nothing)."""
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "thumb.jpg").write_bytes(b"x")
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        info = tarfile.TarInfo("1.jpg")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"abcd"))
    assert [item.id for item in list_source(tmp_path)] == ["a.tar/1.jpg"]


def test_model_spec_is_plain_data() -> None:
    import pickle

    factory = SpecBackendFactory(ModelSpec(name="tiny-synth", precision="fp32"))
    assert pickle.loads(pickle.dumps(factory)) == factory
