"""`clipengine embed` end to end: fake backend through the load hook, and the tiny CLIP checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pipeline_fakes
import pytest
from typer.testing import CliRunner

from clipengine.cli import model_options
from clipengine.cli.app import app, main
from clipengine.pipeline.sinks import read_embeddings, read_failures


@pytest.fixture
def fake_load(monkeypatch: pytest.MonkeyPatch) -> list[model_options.ModelOptions]:
    """Replace model loading with the fake backend; returns the options each load was asked for."""
    from clipengine.image.preprocess import PreprocessConfig

    asked: list[model_options.ModelOptions] = []

    def load(opts: model_options.ModelOptions) -> SimpleNamespace:
        asked.append(opts)
        backend = pipeline_fakes.FakeBackend(embed_dim=8, image_size=32)
        return SimpleNamespace(backend=backend, preprocess_cfg=PreprocessConfig(image_size=32), name="fake")

    monkeypatch.setattr(model_options, "load_clip", load)
    # The Ray path reads the preprocessing from the model's files where they tell; none here: load it.
    monkeypatch.setattr("clipengine.distributed.model_info.preprocess_config", lambda *a, **k: None)
    return asked


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    pipeline_fakes.write_images(root, 9)
    pipeline_fakes.write_images(root / "NESTED", 2, prefix="UP", ext=".JPG")
    (root / "empty.jpg").write_bytes(b"")
    (root / "readme.txt").write_text("not listed: not an image extension")
    return root


def test_embed_writes_shards_and_summary(folder: Path, tmp_path: Path, fake_load) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    args = ["embed", str(folder), "-o", str(out), "--workers", "0", "--shard-size", "4", "--batch", "3"]
    result = CliRunner().invoke(app, [*args, "--no-progress", "--model", "RN50", "--pretrained", "openai"])
    assert result.exit_code == 0, result.output
    assert "Embedded 11 images" in result.output
    assert f"Failed: 1 (listed in {out / 'failures.jsonl'})" in result.output
    assert fake_load[0].model == "RN50" and fake_load[0].label == "RN50@openai"
    ids, vectors, meta = read_embeddings(out)
    assert ids[:2] == ["NESTED/UP-0000.JPG", "NESTED/UP-0001.JPG"] and len(ids) == 11
    assert vectors.shape == (11, 8) and meta["model"] == "RN50@openai" and meta["dtype"] == "float16"
    assert meta["source"] == str(folder.resolve())
    assert [(f.id, f.reason) for f in read_failures(out)] == [("empty.jpg", "empty file (0 bytes)")]  # as predict says
    assert sorted(p.name for p in (out / "shards").glob("*.npy")) == [f"part-0000{i}.npy" for i in range(3)]


def test_embed_json_and_float32(folder: Path, tmp_path: Path, fake_load) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["embed", str(folder), "-o", str(out), "--workers", "1", "--dtype", "float32", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (
        data["embedded"] == 11
        and data["failed_total"] == 1
        and data["failures_file"].endswith("failures.jsonl")
    )
    assert np.load(out / "shards" / "part-00000.npy").dtype == np.float32


def test_resumed_run_text_and_json_count_failures_alike(folder: Path, tmp_path: Path, fake_load) -> None:  # type: ignore[no-untyped-def]
    """A rerun resumes every shard: it met no failure, failures.jsonl lists one. The text said
    "Failed: 1" while --json said failed 0: both now tell this run's count and the total."""
    out = tmp_path / "out"
    args = ["embed", str(folder), "-o", str(out), "--workers", "0", "--shard-size", "4", "--no-progress"]
    assert CliRunner().invoke(app, args).exit_code == 0
    text = CliRunner().invoke(app, args)
    assert text.exit_code == 0 and "12 inputs resumed from 3 finished shards" in text.output
    assert f"Failed: 0 this run, 1 in total (listed in {out / 'failures.jsonl'})" in text.output
    data = json.loads(CliRunner().invoke(app, [*args, "--json"]).output)
    assert (data["failed"], data["failed_total"]) == (0, 1)


def test_a_rerun_of_a_finished_folder_loads_no_model(folder: Path, tmp_path: Path, fake_load, caplog) -> None:  # type: ignore[no-untyped-def]
    """Every shard complete: the rerun says so without loading the model (seconds to minutes for a
    large one, for nothing); a shard left to compute loads it as before."""
    out = tmp_path / "out"
    args = ["embed", str(folder), "-o", str(out), "--workers", "0", "--shard-size", "4", "--no-progress"]
    assert CliRunner().invoke(app, args).exit_code == 0 and len(fake_load) == 1
    ids, vectors, _ = read_embeddings(out)
    with caplog.at_level("INFO", logger="clipengine"):
        again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "12 inputs resumed from 3 finished shards" in again.output
    assert f"{out}: every shard is complete; no model loaded" in caplog.messages and len(fake_load) == 1
    (out / "shards" / "part-00001.npy").unlink()
    assert CliRunner().invoke(app, args).exit_code == 0 and len(fake_load) == 2  # 4 files to embed
    assert CliRunner().invoke(app, [*args, "--retry-failed"]).exit_code == 0 and len(fake_load) == 3
    info = json.loads((out / "run.json").read_text())  # edited by hand: no preprocessing recorded
    (out / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "preprocess"}))
    assert CliRunner().invoke(app, args).exit_code == 0 and len(fake_load) == 4  # loaded, as before
    ids2, vectors2, _ = read_embeddings(out)
    assert ids2 == ids
    np.testing.assert_array_equal(vectors2, vectors)


def test_a_finished_folder_rerun_on_ray_starts_no_job(folder: Path, tmp_path: Path, fake_load, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The Ray driver's preprocessing comes from run.json then (it could cost a model load), and no job starts."""
    pytest.importorskip("ray")
    import clipengine.distributed.ray as ray_engine

    out = tmp_path / "out"
    args = ["embed", str(folder), "-o", str(out), "--workers", "0", "--shard-size", "4", "--no-progress"]
    assert CliRunner().invoke(app, args).exit_code == 0 and len(fake_load) == 1

    def must_not_run(*a: object, **k: object) -> None:
        raise AssertionError("called for a finished folder")

    monkeypatch.setattr(ray_engine, "_run_job", must_not_run)
    monkeypatch.setattr(model_options, "preprocess_only", must_not_run)
    again = CliRunner().invoke(app, [*args, "--engine", "ray"])
    assert again.exit_code == 0, again.output
    assert "12 inputs resumed from 3 finished shards" in again.output and len(fake_load) == 1


def test_the_default_gpu_loaders_follow_the_files_left(folder: Path, tmp_path: Path, fake_load, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A resume with a few files left is not a large folder: 3 idle decode processes started for it."""
    from clipengine.cli import embed as embed_cli

    out = tmp_path / "out"
    args = ["embed", str(folder), "-o", str(out), "--workers", "0", "--shard-size", "4", "--no-progress"]
    assert CliRunner().invoke(app, args).exit_code == 0
    (out / "shards" / "part-00002.npy").unlink()  # the last shard: 4 of the 12 files
    info = json.loads((out / "run.json").read_text())  # as a --gpu-decode run records it (no GPU here)
    (out / "run.json").write_text(json.dumps({**info, "gpu_decode": True, "gpu_decoder": "torchvision", "gpu_cpu_share": 0.0}))
    asked: list[int] = []

    def default_procs(files: int) -> int:
        asked.append(files)
        raise KeyboardInterrupt  # enough: what it was asked for

    monkeypatch.setattr(embed_cli, "_default_decode_procs", default_procs)
    monkeypatch.setattr(embed_cli, "_check_gpu_decode", lambda *a: None)
    assert main([*args, "--gpu-decode"]) == 130 and asked == [4]


def test_file_list_source(folder: Path, tmp_path: Path, fake_load) -> None:  # type: ignore[no-untyped-def]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'img-0003.jpg'}\nphotos/img-0001.jpg\nphotos/missing.jpg\n")
    out = tmp_path / "out"
    assert main(["embed", str(listing), "-o", str(out), "--workers", "0", "--no-progress"]) == 0
    ids, _, _ = read_embeddings(out)
    assert ids == [str(folder / "img-0003.jpg"), "photos/img-0001.jpg"]
    assert [f.id for f in read_failures(out)] == ["photos/missing.jpg"]


def test_other_model_in_same_output_is_a_one_line_error(
    folder: Path, tmp_path: Path, fake_load, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "out")
    assert main(["embed", str(folder), "-o", out, "--workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert (
        main(["embed", str(folder), "-o", out, "--workers", "0", "--no-progress", "--model", "ViT-L-14"]) == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model='ViT-B-32'" in err and "model='ViT-L-14'" in err
    assert len(fake_load) == 1  # refused before loading the second model


def test_source_without_images_is_an_error_before_loading(tmp_path: Path, fake_load, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    # Was exit 0 ("Embedded 0 images"), and `index build` then said to run `clipengine embed` first.
    assert main(["embed", str(tmp_path / "empty"), "-o", str(out), "--no-progress"]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'empty'}: no images to embed\n"
    assert fake_load == [] and not out.exists()


def test_bad_options_are_usage_errors(folder: Path, tmp_path: Path, fake_load, capsys) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "out")
    runner = CliRunner()
    bad_dtype = runner.invoke(app, ["embed", str(folder), "-o", out, "--dtype", "int8"])
    assert bad_dtype.exit_code == 2 and "float16, float32" in bad_dtype.output
    assert runner.invoke(app, ["embed", str(folder), "-o", out, "--engine", "spark"]).exit_code == 2
    assert main(["embed", str(tmp_path / "nowhere"), "-o", out]) == 1
    assert "nowhere: no such folder or file list" in capsys.readouterr().err
    gpu_on_cpu = runner.invoke(app, ["embed", str(folder), "-o", out, "--gpu-decode"])
    assert gpu_on_cpu.exit_code == 2 and "--gpu-decode needs --backend torch --device cuda" in gpu_on_cpu.output
    decoder_alone = runner.invoke(app, ["embed", str(folder), "-o", out, "--gpu-decoder", "nvimgcodec"])
    assert decoder_alone.exit_code == 2 and "--gpu-decoder needs --gpu-decode" in decoder_alone.output
    bad_decoder = runner.invoke(app, ["embed", str(folder), "-o", out, "--gpu-decode", "--gpu-decoder", "dali"])
    assert bad_decoder.exit_code == 2 and "torchvision, nvimgcodec" in bad_decoder.output
    threads_alone = runner.invoke(app, ["embed", str(folder), "-o", out, "--gpu-read-threads", "4"])
    assert threads_alone.exit_code == 2 and "--gpu-read-threads needs --gpu-decode" in threads_alone.output
    zero_threads = runner.invoke(app, ["embed", str(folder), "-o", out, "--gpu-decode", "--gpu-read-threads", "0"])
    assert zero_threads.exit_code == 2
    share_alone = runner.invoke(app, ["embed", str(folder), "-o", out, "--gpu-cpu-share", "0.2"])
    assert share_alone.exit_code == 2 and "--gpu-cpu-share needs --gpu-decode" in share_alone.output
    share_no_workers = runner.invoke(app, ["embed", str(folder), "-o", out, "--gpu-decode", "--gpu-cpu-share", "0.2",
                                           "--workers", "0"])  # fmt: skip
    assert share_no_workers.exit_code == 2 and "--workers 1 or more" in share_no_workers.output
    share_too_big = runner.invoke(app, ["embed", str(folder), "-o", out, "--gpu-decode", "--gpu-cpu-share", "1"])
    assert share_too_big.exit_code == 2
    cuda = ["--backend", "torch", "--device", "cuda"]  # accepted as far as the option checks go
    fast_gpu = runner.invoke(app, ["embed", str(folder), "-o", out, *cuda, "--gpu-decode", "--fast-decode"])
    assert fast_gpu.exit_code == 2 and "--fast-decode with --gpu-decode needs --gpu-cpu-share" in fast_gpu.output
    for name in ("paths.parquet", "shard-000.tar"):  # Ray-only sources name the option that reads them
        (tmp_path / name).write_bytes(b"PAR1")
        ray_only = runner.invoke(app, ["embed", str(tmp_path / name), "-o", out])
        assert ray_only.exit_code == 2 and "add --engine ray" in ray_only.output
    help_text = runner.invoke(app, ["embed", "--help"]).output
    assert "nvidia-nvimgcodec-cu13[nvjpeg]" in help_text  # rich markup must not eat the extra's brackets
    (tmp_path / "a-file").write_text("not a folder")
    output_file = runner.invoke(app, ["embed", str(folder), "-o", str(tmp_path / "a-file")])
    assert output_file.exit_code == 2 and "a-file" in output_file.output
    assert fake_load == []  # nothing loaded for invalid input


def test_embed_with_tiny_checkpoint(tiny_model, folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The real path: a torch.save(state_dict) checkpoint through clipengine.api.load."""
    import torch

    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), ckpt)
    out = tmp_path / "out"
    code = main(
        ["embed", str(folder), "-o", str(out), "--checkpoint", str(ckpt), "--workers", "0", "--no-progress"]
    )
    assert code == 0
    ids, vectors, meta = read_embeddings(out)
    assert len(ids) == 11 and vectors.shape == (11, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    assert meta["embed_dim"] == 32 and meta["model"] == str(ckpt.resolve())
    result = CliRunner().invoke(
        app, ["embed", str(folder), "-o", str(out), "--checkpoint", str(ckpt), "--workers", "0"]
    )
    assert (
        result.exit_code == 0 and "12 inputs resumed from 1 finished shards" in result.output
    )  # nothing recomputed
    np.testing.assert_array_equal(read_embeddings(out)[1], vectors)


def test_engine_ray_dispatches_with_a_picklable_factory(
    folder: Path, tmp_path: Path, fake_load, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import pickle

    import clipengine.distributed.ray as ray_engine
    from clipengine.pipeline.run import RunStats

    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def fake_embed_with_ray(*args: object, **kwargs: object) -> RunStats:
        calls.append((args, kwargs))
        return RunStats(images=12, embedded=11, failed=1, failed_total=1, wall_s=1.0)

    monkeypatch.setattr(ray_engine, "embed_with_ray", fake_embed_with_ray)
    out = tmp_path / "out"
    args = ["embed", str(folder), "-o", str(out), "--engine", "ray", "--checkpoint", str(tmp_path / "c.pt")]
    result = CliRunner().invoke(app, [*args, "--shard-size", "7", "--no-progress"])
    assert result.exit_code == 0, result.output
    (items, out_dir, factory, _cfg), kwargs = calls[0]
    assert len(items) == 12 and out_dir == out  # type: ignore[arg-type]
    assert kwargs["shard_size"] == 7 and kwargs["source_label"] == str(folder.resolve())
    restored = pickle.loads(pickle.dumps(factory))
    assert restored.opts.checkpoint == str(tmp_path / "c.pt")
    assert "Embedded 11 images" in result.output


def test_engine_ray_gpus_per_actor_runs_the_actors_on_cuda(
    folder: Path, tmp_path: Path, fake_load, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """`--gpus-per-actor 1` without `--device` (README's cluster example) reserved a GPU per actor and
    ran the model on the CPU; the model the driver loads (for its preprocessing) stays on --device."""
    import clipengine.distributed.ray as ray_engine
    from clipengine.pipeline.run import RunStats

    factories: list[model_options.BackendFactory] = []

    def fake_embed_with_ray(items: object, out: object, factory: model_options.BackendFactory, *args: object, **kwargs: object) -> RunStats:
        factories.append(factory)
        return RunStats(images=1, embedded=1, wall_s=1.0)

    monkeypatch.setattr(ray_engine, "embed_with_ray", fake_embed_with_ray)
    args = ["embed", str(folder), "-o", str(tmp_path / "out"), "--engine", "ray", "--no-progress"]
    for extra, device in ((["--gpus-per-actor", "1"], "cuda"), (["--gpus-per-actor", "1", "--device", "cuda:1"], "cuda:1"), ([], "cpu")):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        assert factories[-1].opts.device == device and fake_load[-1].device == ("cuda:1" if "cuda:1" in extra else "cpu")


def test_engine_ray_unreachable_address_is_a_one_line_error(folder: Path, tmp_path: Path, fake_load, capsys) -> None:  # type: ignore[no-untyped-def]
    """Nothing listens there: `ray.init` retried it for ever (a hang), or raised a traceback."""
    pytest.importorskip("ray")
    args = ["embed", str(folder), "-o", str(tmp_path / "out"), "--engine", "ray", "--no-progress"]
    assert main([*args, "--address", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach the Ray cluster at 127.0.0.1:1 (") and "\n" not in err


def test_engine_ray_takes_parquet_and_webdataset_sources(
    folder: Path, tmp_path: Path, fake_load, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The sources the README lists for Ray (a Parquet `path` column, WebDataset .tar shards) work from the CLI."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    import clipengine.distributed.ray as ray_engine
    from clipengine.pipeline.run import RunStats

    seen: list[list[str]] = []

    def fake_embed_with_ray(items: list, *args: object, **kwargs: object) -> RunStats:  # type: ignore[type-arg]
        seen.append([item.id for item in items])
        return RunStats(images=len(items), embedded=len(items), wall_s=1.0)

    monkeypatch.setattr(ray_engine, "embed_with_ray", fake_embed_with_ray)
    images = sorted(p.name for p in folder.glob("*.jpg") if p.stat().st_size)[:3]
    assert len(images) == 3
    parquet = tmp_path / "photos.parquet"
    pq.write_table(pa.table({"path": [str(folder / name) for name in images]}), parquet)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tf:
        for name in images:
            tf.add(folder / name, arcname=name)
    for source, ids in ((parquet, [str(folder / n) for n in images]), (shard, [f"shard-000.tar/{n}" for n in images])):
        out = tmp_path / f"out-{source.suffix[1:]}"
        result = CliRunner().invoke(app, ["embed", str(source), "-o", str(out), "--engine", "ray", "--no-progress"])
        assert result.exit_code == 0, result.output
        assert seen[-1] == ids
    local = CliRunner().invoke(app, ["embed", str(parquet), "-o", str(tmp_path / "local"), "--no-progress"])
    # The local engine reads folders and .txt lists: a usage error naming the engine that reads Parquet.
    assert local.exit_code == 2 and "add --engine ray" in local.output


def test_a_folder_of_only_unreadable_images_is_an_error(  # type: ignore[no-untyped-def]
    tmp_path: Path, fake_load, capsys
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    out = tmp_path / "out"
    # It was exit 0, "Embedded 0 images": `embed ... && index build` went on to an empty index.
    assert main(["embed", str(bad), "-o", str(out), "--workers", "0", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "Failed: 2" in captured.out  # the summary still says what happened
    assert captured.err.splitlines() == [
        f"error: {bad}: none of the 2 images could be read, nothing was embedded; "
        f"the reasons are in {out / 'failures.jsonl'}"
    ]
    assert len(read_failures(out)) == 2
    # One readable image among them is a normal run with failures.
    pipeline_fakes.write_images(bad, 1)
    assert main(["embed", str(bad), "-o", str(tmp_path / "out2"), "--workers", "0", "--no-progress"]) == 0


def test_retry_failed_rereads_a_fixed_file(folder: Path, tmp_path: Path, fake_load) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    args = ["embed", str(folder), "-o", str(out), "--workers", "0", "--shard-size", "4", "--no-progress"]
    assert CliRunner().invoke(app, args).exit_code == 0
    pipeline_fakes.write_images(tmp_path / "fix", 1)
    (folder / "empty.jpg").write_bytes((tmp_path / "fix" / "img-0000.jpg").read_bytes())
    assert CliRunner().invoke(app, args).exit_code == 0 and len(read_failures(out)) == 1  # kept
    result = CliRunner().invoke(app, [*args, "--retry-failed", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert read_failures(out) == [] and "empty.jpg" in read_embeddings(out)[0]
    assert stats["shards_skipped"] == 2  # only the shard that listed the failure was recomputed


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_model_loads(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "afile").write_text("x")
    code = main(["embed", str(folder), "-o", str(tmp_path / "afile" / "out"), "--workers", "0", "--no-progress"])
    assert code == 2 and fake_load == []  # was found by the first shard write, after the model load
    assert f"--output: {tmp_path / 'afile'}: a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("given", [True, False], ids=["flag", "default-for-a-large-folder"])
def test_gpu_decode_procs_start_before_the_model_loads(folder: Path, tmp_path: Path, fake_load, monkeypatch, given) -> None:  # type: ignore[no-untyped-def]
    """`--gpu-decode-procs 2`: the processes start (torch, the device, a decoder warm-up) before the
    model loads, so that start-up overlaps it; the run then loads through them, and the output is the
    CPU workers' (Pillow stands in for nvjpeg in the processes, on the CPU). Without the flag, a
    folder of `AUTO_MIN_FILES` files or more on enough cores gets the processes too (here the
    threshold is this folder's 12 files and the count 2, so that the test stays small)."""
    import dataclasses

    import gpu_fakes

    from clipengine.cli import embed as embed_cli
    from clipengine.pipeline import gpu_procs

    events: list[str] = []
    real_start, real_load = gpu_procs.start_decode_processes, model_options.load_clip

    def start(setup, device, decoder):  # type: ignore[no-untyped-def]
        events.append(f"start {setup.procs} {device} {decoder} workers={setup.workers}")
        return real_start(dataclasses.replace(setup, decode_batch=gpu_fakes.pil_batch_decode), device, decoder)

    def load(opts):  # type: ignore[no-untyped-def]
        events.append("load")
        return real_load(opts)

    monkeypatch.setattr(gpu_procs, "start_decode_processes", start)
    monkeypatch.setattr(model_options, "load_clip", load)
    monkeypatch.setattr(embed_cli, "_check_gpu_decode", lambda *a: None)  # --device cpu stands in for cuda
    monkeypatch.setattr(gpu_procs, "default_decode_group", lambda batch_size: 2)  # both processes get files
    from clipengine.pipeline import batching

    monkeypatch.setattr(batching, "default_workers", lambda: gpu_procs.AUTO_MIN_CORES)
    monkeypatch.setattr(gpu_procs, "AUTO_MIN_FILES", 12)
    monkeypatch.setattr(gpu_procs, "AUTO_PROCS", 2)
    out = tmp_path / "procs"
    args = ["embed", str(folder), "-o", str(out), "--backend", "torch", "--device", "cpu", "--batch", "3",
            "--dtype", "float32", "--no-progress"]  # fmt: skip
    flag = ["--gpu-decode-procs", "2"] if given else []
    result = CliRunner().invoke(app, [*args, "--gpu-decode", *flag, "--workers", "4"])
    assert result.exit_code == 0, result.output
    assert events == ["start 2 cpu torchvision workers=2", "load"]  # started first; the 4 workers shared
    assert CliRunner().invoke(app, [*args[:3], str(tmp_path / "cpu"), *args[4:], "--workers", "0"]).exit_code == 0
    ids, vectors, _ = read_embeddings(out)
    cpu_ids, cpu_vectors, _ = read_embeddings(tmp_path / "cpu")
    assert ids == cpu_ids and len(ids) == 11
    np.testing.assert_allclose(vectors, cpu_vectors, atol=1e-5)
    assert [f.id for f in read_failures(out)] == ["empty.jpg"]
    assert not [p for p in __import__("multiprocessing").active_children() if p.name.startswith("clipengine-gpu")]
    before = list(events)
    rerun = CliRunner().invoke(app, [*args, "--gpu-decode", *flag, "--workers", "4"])
    assert rerun.exit_code == 0 and events == before  # nothing left: no process started, no model loaded
    alone = CliRunner().invoke(app, [*args, "--gpu-decode-procs", "2"])
    assert alone.exit_code == 2 and "--gpu-decode-procs needs --gpu-decode" in alone.output


def test_gpu_decode_procs_stop_when_the_model_load_fails(folder: Path, tmp_path: Path, fake_load, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """The processes start before the model loads; a load that fails stops them (none is left
    running, and the command does not wait out their start-up)."""
    import dataclasses
    import multiprocessing
    import time

    import gpu_fakes

    from clipengine.cli import embed as embed_cli
    from clipengine.errors import CheckpointError
    from clipengine.pipeline import gpu_procs

    real_start = gpu_procs.start_decode_processes
    monkeypatch.setattr(gpu_procs, "start_decode_processes", lambda setup, device, decoder: real_start(
        dataclasses.replace(setup, decode_batch=gpu_fakes.slow_in_children), device, decoder))  # fmt: skip

    def bad_load(opts):  # type: ignore[no-untyped-def]
        raise CheckpointError("model.pt: not a checkpoint")

    monkeypatch.setattr(model_options, "load_clip", bad_load)
    monkeypatch.setattr(embed_cli, "_check_gpu_decode", lambda *a: None)
    t0 = time.perf_counter()
    code = main(["embed", str(folder), "-o", str(tmp_path / "out"), "--device", "cpu", "--gpu-decode",
                 "--gpu-decode-procs", "3", "--no-progress"])  # fmt: skip
    assert code == 1 and "model.pt: not a checkpoint" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30  # their start-up sleeps 60 s: they were terminated, not joined
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("clipengine-gpu")]
