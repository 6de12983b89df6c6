"""The GPU loader in several processes (pipeline.gpu_procs), on the CPU: Pillow stands in for nvjpeg
in the spawned processes, and CPU tensors cross through shared memory where CUDA ones use CUDA IPC."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import gpu_fakes
import numpy as np
import pytest
from gpu_fakes import tiny_model_cfg

from clipengine.pipeline import gpu_procs
from clipengine.pipeline.batching import LoadStats
from clipengine.pipeline.gpu_loading import iter_gpu_loaded
from clipengine.pipeline.gpu_procs import DecodeProcesses, claimed_items, iter_gpu_loaded_procs
from clipengine.pipeline.run import embed_folder
from clipengine.pipeline.sinks import read_embeddings, read_failures
from clipengine.pipeline.sources import list_items
from clipengine.types import Batch

torch = pytest.importorskip("torch")


def _setup(procs: int = 2, **kw) -> DecodeProcesses:  # type: ignore[no-untyped-def]
    return DecodeProcesses(procs, **{"decode_batch": gpu_fakes.pil_batch_decode, **kw})


def test_loaders_claim_whole_blocks_in_order_and_each_once() -> None:
    import multiprocessing

    counter, claims = multiprocessing.Value("q", 0), multiprocessing.Array("q", 3, lock=False)
    items = list(range(10))
    first, second = claimed_items(items, 4, counter, claims, 0), claimed_items(items, 4, counter, claims, 2)  # type: ignore[arg-type]
    got = [next(first) for _ in range(4)] + [next(second) for _ in range(4)] + list(first) + list(second)
    assert got == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # loader 0 took blocks 0 and 2, loader 2 block 1
    assert list(claims) == [2, 0, 1] and counter.value == 3
    assert gpu_procs._unneeded(1, 3, counter, claims) and not gpu_procs._unneeded(0, 3, counter, claims)
    assert list(claimed_items([], 4, multiprocessing.Value("q", 0), claims, 1)) == [] and claims[1] == 0  # type: ignore[arg-type]


def test_one_process_is_refused() -> None:
    with pytest.raises(ValueError, match="decode processes must be >= 2"):
        DecodeProcesses(1)


def test_a_cpu_share_without_cpu_workers_is_refused() -> None:
    """Without workers the loaders have no CPU assist: the share was dropped without a word (the run
    recorded it, and a resume through one loader thread honours it)."""
    with pytest.raises(ValueError, match=r"CPU share of the GPU decode needs CPU decode workers.*workers=0"):
        DecodeProcesses(2, workers=0, cpu_share=0.25)
    with pytest.raises(ValueError, match="needs CPU decode workers"):
        DecodeProcesses.for_run(3, 0, cpu_share=0.25)
    assert DecodeProcesses.for_run(3, 2, cpu_share=0.25).workers == 1  # each loader gets at least one


def test_processes_give_the_in_process_loaders_pixels(photo_folder, tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import clipengine.image.gpu_decode as gd

    monkeypatch.setattr(gd, "_nvjpeg_decode", gpu_fakes.pil_batch_decode)
    root, good, bad = photo_folder
    items = list_items(root)
    cfg = tiny_model_cfg(tiny_model)
    one, many = LoadStats(), LoadStats()
    expected = {}
    expected_failures = []
    for batch in iter_gpu_loaded(items, cfg, 3, "cpu", one):
        expected.update(zip(batch.ids, batch.pixels.numpy(), strict=True))
        expected_failures += [f.id for f in batch.failures]
    got = {}
    got_failures = []
    # A decode group of 256 would give one process every file: 2 files per block spreads them.
    monkeypatch.setattr(gpu_procs, "default_decode_group", lambda batch_size: 2)
    for batch in iter_gpu_loaded_procs(items, cfg, 3, "cpu", many, "torchvision", _setup(procs=3)):
        assert len(batch.ids) <= 3
        got.update(zip(batch.ids, batch.pixels.numpy(), strict=True))
        got_failures += [f.id for f in batch.failures]
    assert sorted(got) == sorted(expected) == good
    for item_id, pixels in expected.items():
        np.testing.assert_array_equal(got[item_id], pixels, err_msg=item_id)
    assert sorted(got_failures) == sorted(expected_failures) == bad
    assert (many.images, many.failures) == (one.images, one.failures) == (len(good), len(bad))
    assert many.read_s > 0 and many.decode_s > 0 and many.preprocess_s > 0  # summed from the processes


def pixels_by_id(batches: Iterator[Batch]) -> dict[str, np.ndarray]:
    return {i: p for b in batches for i, p in zip(b.ids, b.pixels.numpy(), strict=True)}


def test_every_loader_of_a_multi_loader_run_asks_for_the_fused_kernels(photo_folder, tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Its processes and its loader thread decode (and preprocess) under `gpu_fused.prefer_kernels`
    (the fake decoder gives black images anywhere else); one loader thread alone does not ask."""
    import clipengine.image.gpu_decode as gd

    root, good, _ = photo_folder
    items = list_items(root)
    cfg = tiny_model_cfg(tiny_model)
    monkeypatch.setattr(gd, "_nvjpeg_decode", gpu_fakes.pil_batch_decode)
    expected = pixels_by_id(iter_gpu_loaded(items, cfg, 3, "cpu", LoadStats()))
    monkeypatch.setattr(gd, "_nvjpeg_decode", gpu_fakes.black_unless_kernels_preferred)
    alone = pixels_by_id(iter_gpu_loaded(items, cfg, 3, "cpu", LoadStats()))
    black = [i for i, p in alone.items() if (p == p[:, :1, :1]).all()]  # the JPEGs it sent to (fake) nvjpeg
    assert sorted(alone) == good and len(black) >= len(good) // 2
    monkeypatch.setattr(gpu_procs, "default_decode_group", lambda batch_size: 2)  # blocks for every loader
    setup = _setup(procs=3, decode_batch=gpu_fakes.black_unless_kernels_preferred)
    counts = LoadStats()
    many = pixels_by_id(iter_gpu_loaded_procs(items, cfg, 3, "cpu", counts, "torchvision", setup))
    assert sorted(many) == good
    for item_id, pixels in expected.items():
        np.testing.assert_array_equal(many[item_id], pixels, err_msg=item_id)
    assert counts.images == len(good)


@pytest.mark.parametrize(("name", "value"), [("CLIPENGINE_GPU_KERNELS", "tirton"), ("CLIPENGINE_GPU_KERNEL_SKIP", "gemm")])
def test_a_bad_kernel_setting_fails_before_any_process_starts(monkeypatch, name: str, value: str) -> None:  # type: ignore[no-untyped-def]
    from clipengine.errors import InputError

    monkeypatch.setenv(name, value)
    started = []
    monkeypatch.setattr(gpu_procs, "StartedDecodeProcesses", lambda *a: started.append(a))
    with pytest.raises(InputError, match=name):
        gpu_procs.start_decode_processes(DecodeProcesses(2), "cpu", "torchvision")
    assert not started


def test_embed_folder_with_decode_processes_writes_the_same_output(  # type: ignore[no-untyped-def]
    photo_folder, tmp_path: Path, tiny_model, torch_backend_factory, fake_nvjpeg, monkeypatch
) -> None:
    """Batches arrive in whatever order the processes finish them; every shard is still written in
    input order, with the same rows as one loader thread."""
    real = gpu_procs.iter_gpu_loaded_procs

    calls = []

    def with_fake_nvjpeg(*args, **kw):  # type: ignore[no-untyped-def]
        *rest, setup = args
        calls.append(setup.procs)
        return real(*rest, dataclasses.replace(setup, decode_batch=gpu_fakes.pil_batch_decode), **kw)

    monkeypatch.setattr(gpu_procs, "iter_gpu_loaded_procs", with_fake_nvjpeg)
    monkeypatch.setattr(gpu_procs, "default_decode_group", lambda batch_size: 3)
    root, good, bad = photo_folder
    cfg = tiny_model_cfg(tiny_model)
    kw = dict(model="tiny", batch_size=3, shard_size=5, dtype="float32", gpu_decode="cpu", workers=2)
    one = embed_folder(root, tmp_path / "one", torch_backend_factory, cfg, **kw)  # type: ignore[arg-type]
    two = embed_folder(root, tmp_path / "two", torch_backend_factory, cfg, gpu_decode_procs=2, **kw)  # type: ignore[arg-type]
    ids_1, vec_1, _ = read_embeddings(tmp_path / "one")
    ids_2, vec_2, _ = read_embeddings(tmp_path / "two")
    assert ids_2 == ids_1 == good
    assert float((vec_1 * vec_2).sum(axis=1).min()) >= 0.99999  # batches differ: float summation order
    assert [f.id for f in read_failures(tmp_path / "two")] == [f.id for f in read_failures(tmp_path / "one")]
    assert (two.embedded, two.failed, two.shards_written) == (one.embedded, one.failed, one.shards_written)
    assert calls == [2]  # the second run, and only it, loaded through decode processes
    # The decode processes do not change pixels: a resume with another count is allowed (nothing to do).
    again = embed_folder(root, tmp_path / "two", torch_backend_factory, cfg, **kw)  # type: ignore[arg-type]
    assert again.skipped == len(good) + len(bad)


def test_a_decode_process_that_dies_fails_the_run(photo_folder, tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Blocks of one file, one file per decode call in this process's (slow) loader thread: files are
    # left unclaimed when the process dies.
    monkeypatch.setattr(gpu_procs, "default_decode_group", lambda batch_size: 1)
    monkeypatch.setattr("clipengine.pipeline.gpu_batching.default_decode_group", lambda batch_size: 1)
    root, _, _ = photo_folder
    setup = DecodeProcesses(2, decode_batch=gpu_fakes.exit_at_decode)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"GPU decode process \d exited with code 3 before it finished"):
        list(iter_gpu_loaded_procs(list_items(root), tiny_model_cfg(tiny_model), 4, "cpu", LoadStats(),
                                   "torchvision", setup))  # fmt: skip
    assert time.perf_counter() - t0 < 120


def test_an_error_in_a_decode_process_is_raised_with_its_traceback(photo_folder, tiny_model) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = photo_folder
    with pytest.raises(RuntimeError, match=r"(?s)(GPU decode process \d|the loader thread) failed: .*bogus.*Traceback"):
        list(iter_gpu_loaded_procs(list_items(root), tiny_model_cfg(tiny_model), 4, "bogus", LoadStats(),
                                   "torchvision", _setup()))  # fmt: skip


def test_a_bad_preprocess_config_is_refused_before_any_process_starts(photo_folder) -> None:  # type: ignore[no-untyped-def]
    import multiprocessing

    root, _, _ = photo_folder
    with pytest.raises((TypeError, ValueError), match="image_size"):
        list(iter_gpu_loaded_procs(list_items(root), {"image_size": "big"}, 4, "cpu", LoadStats(), "torchvision",
                                   _setup()))  # fmt: skip
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("clipengine-gpu-decode")]


def test_failure_only_batches_carry_no_shared_pixels(tmp_path: Path, fakes, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """A process whose files all fail sends no tensor (an empty one has no memory to share)."""
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(3):
        (root / f"bad-{i}.jpg").write_bytes(b"not a jpeg")
    stats = LoadStats()
    batches = list(iter_gpu_loaded_procs(list_items(root), tiny_model_cfg(tiny_model), 4, "cpu", stats,
                                         "torchvision", _setup()))  # fmt: skip
    assert sorted(f.id for b in batches for f in b.failures) == ["bad-0.jpg", "bad-1.jpg", "bad-2.jpg"]
    assert all(not b.ids and b.pixels.shape[0] == 0 for b in batches)
    assert (stats.images, stats.failures) == (0, 3)


def test_a_consumer_that_stops_early_stops_the_processes(photo_folder, tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import multiprocessing

    monkeypatch.setattr(gpu_procs, "default_decode_group", lambda batch_size: 1)
    root, _, _ = photo_folder
    batches = iter_gpu_loaded_procs(list_items(root), tiny_model_cfg(tiny_model), 1, "cpu", LoadStats(), "torchvision",
                                    _setup())  # fmt: skip
    first = next(batches)
    assert len(first.ids) + len(first.failures) >= 1
    assert [p.name for p in multiprocessing.active_children() if p.name.startswith("clipengine-gpu-decode")]
    t0 = time.perf_counter()
    batches.close()  # the processes are asked to stop, and joined
    assert time.perf_counter() - t0 < 30
    assert not [
        p.name for p in multiprocessing.active_children() if p.name.startswith("clipengine-gpu-decode")
    ]


def test_many_small_batches_from_three_processes_each_arrive_once(tmp_path: Path, fakes, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Batch 1 and blocks of 2 over 3 processes: ~90 messages, each process held to two batches
    ahead of a slow consumer (its credits), every item exactly once."""
    from clipengine.image.preprocess import PreprocessConfig

    monkeypatch.setattr(gpu_procs, "default_decode_group", lambda batch_size: 2)
    fakes.write_images(tmp_path / "many", 90)
    items = list_items(tmp_path / "many")
    seen = []
    for i, batch in enumerate(iter_gpu_loaded_procs(items, PreprocessConfig(image_size=16), 1, "cpu", LoadStats(),
                                                     "torchvision", _setup(procs=3))):  # fmt: skip
        assert len(batch.ids) == 1 and tuple(batch.pixels.shape) == (1, 3, 16, 16)
        seen += batch.ids
        if i % 30 == 0:
            time.sleep(0.3)  # the processes fill their credits and wait
    assert sorted(seen) == sorted(item.id for item in items) and len(seen) == 90


@pytest.mark.gpu
def test_real_nvjpeg_in_decode_processes_matches_one_loader(
    photo_folder, tmp_path: Path, tiny_model, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """`embed --gpu-decode --gpu-decode-procs 2 --compile` on CUDA: batches reach this process through
    CUDA IPC and feed the model under CUDA graphs; the output equals one loader thread's, and the
    CPU workers' within nvjpeg's chroma differences."""
    import copy

    from clipengine.backends.torch_backend import TorchBackend

    monkeypatch.setattr(gpu_procs, "default_decode_group", lambda batch_size: 2)  # every process gets files
    root, good, bad = photo_folder
    cfg = tiny_model_cfg(tiny_model)

    def graphs() -> TorchBackend:
        return TorchBackend(copy.deepcopy(tiny_model), device="cuda", precision="fp16", cuda_graphs=True)

    embed_folder(root, tmp_path / "cpu", graphs, cfg, model="tiny", workers=0, dtype="float32")
    kw = dict(model="tiny", dtype="float32", gpu_decode="cuda", workers=2, batch_size=2, shard_size=5)
    embed_folder(root, tmp_path / "one", graphs, cfg, **kw)  # type: ignore[arg-type]
    stats = embed_folder(root, tmp_path / "two", graphs, cfg, gpu_decode_procs=2, **kw)  # type: ignore[arg-type]
    ids_c, vec_c, _ = read_embeddings(tmp_path / "cpu")
    ids_1, vec_1, _ = read_embeddings(tmp_path / "one")
    ids_2, vec_2, _ = read_embeddings(tmp_path / "two")
    assert ids_2 == ids_1 == ids_c == good and stats.embedded == len(good)
    assert float((vec_2 * vec_1).sum(axis=1).min()) >= 0.99999
    assert float((vec_2 * vec_c).sum(axis=1).min()) >= 0.99
    assert sorted(f.id for f in read_failures(tmp_path / "two")) == bad


@pytest.mark.parametrize(
    ("procs", "gpu_decode", "message"),
    [(0, "cpu", "must be an integer >= 1"), (True, "cpu", "must be an integer >= 1"), (2.0, "cpu", "must be an integer"),
     (2, None, "need gpu_decode"), (2, "ahead", "cannot be combined")],
)  # fmt: skip
def test_bad_decode_process_counts_are_refused_before_anything_is_written(  # type: ignore[no-untyped-def]
    image_folder, tmp_path: Path, fake_factory, preprocess_cfg, procs, gpu_decode, message
) -> None:
    ahead = gpu_decode == "ahead"
    with pytest.raises(ValueError, match=message):
        embed_folder(image_folder, tmp_path / "out", fake_factory, preprocess_cfg, gpu_decode="cpu" if ahead else gpu_decode,
                     gpu_decode_procs=procs, gpu_decode_ahead=ahead)  # fmt: skip
    assert not (tmp_path / "out").exists()


def _decode_children() -> list[str]:
    import multiprocessing

    return [p.name for p in multiprocessing.active_children() if p.name.startswith("clipengine-gpu-decode")]


def test_processes_started_ahead_load_once_and_stop_unused(photo_folder, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """`start_decode_processes` starts them before their files are known (while a model loads); they
    run one load, and processes closed without work stop at once."""
    root, good, bad = photo_folder
    cfg = tiny_model_cfg(tiny_model)
    with gpu_procs.start_decode_processes(_setup(procs=3), "cpu", "torchvision") as started:
        assert len(_decode_children()) == 2  # and this process's loader thread: 3 loaders
        stats = LoadStats()
        batches = list(started.load(list_items(root), cfg, 4, stats))
        assert sorted(i for b in batches for i in b.ids) == good and (stats.images, stats.failures) == (len(good), len(bad))
        assert not _decode_children()  # the load closed them
        with pytest.raises(RuntimeError, match="have run already"):
            list(started.load(list_items(root), cfg, 4, LoadStats()))
    t0 = time.perf_counter()
    with gpu_procs.start_decode_processes(_setup(), "cpu", "torchvision"):
        pass  # never used: each is told to stop while it starts, or while it waits for files
    assert not _decode_children() and time.perf_counter() - t0 < 30


def test_processes_started_with_other_settings_are_refused(image_folder, tmp_path: Path, fake_factory, preprocess_cfg) -> None:  # type: ignore[no-untyped-def]
    with gpu_procs.start_decode_processes(_setup(), "cpu", "torchvision") as started:
        with pytest.raises(ValueError, match=r"gpu_decoder 'torchvision' \(the run: 'nvimgcodec'\)"):
            embed_folder(image_folder, tmp_path / "out", fake_factory, preprocess_cfg, gpu_decode="cpu",
                         gpu_decoder="nvimgcodec", gpu_decode_procs=started)  # fmt: skip
        with pytest.raises(ValueError, match="need gpu_decode"):
            embed_folder(image_folder, tmp_path / "out", fake_factory, preprocess_cfg, gpu_decode_procs=started)
        with pytest.raises(ValueError, match=r"gpu_read_threads 2 \(the run: 4\)"):  # it used to be ignored
            embed_folder(image_folder, tmp_path / "out", fake_factory, preprocess_cfg, gpu_decode="cpu",
                         gpu_read_threads=4, gpu_decode_procs=started)  # fmt: skip
    assert not (tmp_path / "out").exists() and not _decode_children()


def test_decode_processes_take_blocks_as_they_come(tmp_path: Path, fakes, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """Blocks are claimed, not dealt: with this process's loader slow, the processes load most of
    the files once started, and each file arrives once."""
    import logging

    from clipengine.image.preprocess import PreprocessConfig

    monkeypatch.setattr(gpu_procs, "default_decode_group", lambda batch_size: 1)
    monkeypatch.setattr("clipengine.pipeline.gpu_batching.default_decode_group", lambda batch_size: 1)
    from clipengine.types import ImageItem

    fakes.write_images(tmp_path / "many", 40)
    items = list_items(tmp_path / "many")
    # Half of them in memory (bytes), half as str paths: the processes get both as plain lists.
    items = [ImageItem(it.id, Path(it.source).read_bytes() if k % 2 else str(it.source)) for k, it in enumerate(items)]  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="clipengine.pipeline.gpu_procs"):
        got = [i for b in iter_gpu_loaded_procs(items, PreprocessConfig(image_size=16), 2, "cpu", LoadStats(),
                                                 "torchvision", _setup(procs=3, decode_batch=gpu_fakes.slow_here))
               for i in b.ids]  # fmt: skip
    assert sorted(got) == sorted(item.id for item in items) and len(got) == 40
    line = next(r.getMessage() for r in caplog.records if "images per loader" in r.getMessage())
    per_loader = {int(k): int(v) for k, v in (part.split(": ") for part in line.split("thread): ")[1].split(", "))}
    assert sum(per_loader.values()) == 40 and per_loader[1] + per_loader[2] > per_loader[0], line


def test_a_process_still_starting_when_the_files_are_done_does_not_hold_the_run(photo_folder, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """This process's loader thread loads from the start; a process that is still starting when every
    file is claimed is not waited for (it is terminated)."""
    root, good, _ = photo_folder
    t0 = time.perf_counter()
    batches = list(iter_gpu_loaded_procs(list_items(root), tiny_model_cfg(tiny_model), 4, "cpu", LoadStats(),
                                         "torchvision", _setup(decode_batch=gpu_fakes.slow_in_children)))  # fmt: skip
    assert sorted(i for b in batches for i in b.ids) == good
    assert time.perf_counter() - t0 < 30 and not _decode_children()  # the process sleeps 60 s in its start-up


def test_a_file_list_still_being_sent_to_a_process_that_is_dropped_ends_quietly(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Files in memory fill the pipe to a process still starting; when it is dropped (every block
    claimed) the thread sending them must end by itself, not write on after its pipe was closed
    (it raised a TypeError, printed on stderr, and could write into a reused file descriptor)."""
    import io
    import threading

    from PIL import Image

    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.types import ImageItem

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(buffer, format="JPEG")
    # ~4 MB for the process's pipe (distinct objects: pickle sends a repeated one once); a JPEG
    # reader stops at its end marker.
    items = [ImageItem(f"mem-{k}.jpg", buffer.getvalue() + bytes(200_000)) for k in range(20)]
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    before = set(threading.enumerate())
    got = [i for b in iter_gpu_loaded_procs(items, PreprocessConfig(image_size=16), 4, "cpu", LoadStats(), "torchvision",
                                            _setup(decode_batch=gpu_fakes.slow_in_children)) for i in b.ids]  # fmt: skip
    assert sorted(got) == sorted(item.id for item in items) and not _decode_children()
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline and [t for t in set(threading.enumerate()) - before if t.is_alive()]:
        time.sleep(0.05)
    assert errors == []


def test_a_process_that_never_started_does_not_fail_a_run_it_is_not_needed_for(  # type: ignore[no-untyped-def]
    photo_folder, tiny_model, monkeypatch
) -> None:
    """A process silent for longer than the start-up limit fails the run only while it could still
    take files; once every block is claimed it is dropped, however long the run took."""
    monkeypatch.setattr(gpu_procs, "_START_S", 0.0)  # every run outlasts it
    # The first quiet poll comes after this process's loader sent its last batch.
    monkeypatch.setattr(gpu_procs, "_POLL_S", 3.0)
    root, good, _ = photo_folder
    batches = list(iter_gpu_loaded_procs(list_items(root), tiny_model_cfg(tiny_model), 4, "cpu", LoadStats(),
                                         "torchvision", _setup(decode_batch=gpu_fakes.slow_in_children)))  # fmt: skip
    assert sorted(i for b in batches for i in b.ids) == good and not _decode_children()


def test_a_file_list_that_cannot_be_sent_fails_the_run_instead_of_hanging(  # type: ignore[no-untyped-def]
    photo_folder, tiny_model, monkeypatch
) -> None:
    """A process that never gets its files (their list does not pickle here; a MemoryError would do
    the same) would wait for them for ever, and the run for it once it has started."""
    from clipengine.types import ImageItem

    class LocalId(str):  # a class of a function's own does not pickle
        pass

    monkeypatch.setattr(gpu_procs, "default_decode_group", lambda batch_size: 1)
    monkeypatch.setattr("clipengine.pipeline.gpu_batching.default_decode_group", lambda batch_size: 1)
    items = [ImageItem(LocalId(item.id), item.source) for item in list_items(photo_folder[0])]
    with pytest.raises(RuntimeError, match=r"could not send GPU decode process 1 its files: .*LocalId"):
        list(iter_gpu_loaded_procs(items, tiny_model_cfg(tiny_model), 2, "cpu", LoadStats(), "torchvision",
                                   _setup(decode_batch=gpu_fakes.slow_here)))  # fmt: skip
    assert not _decode_children()


def test_starting_the_processes_does_not_import_torch_here() -> None:
    """The processes start before the model loads so that their start-up overlaps it; importing
    torch first (3-4 s on a GPU host) would delay them by that much."""
    import subprocess
    import sys

    code = ("import sys\nfrom clipengine.pipeline.gpu_procs import DecodeProcesses, start_decode_processes\n"
            "started = start_decode_processes(DecodeProcesses(2), 'cpu', 'torchvision')\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nstarted.close()\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_a_broken_pipe_inside_the_work_is_an_error_not_a_silent_wait(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A BrokenPipeError (or EOFError) from the work itself, e.g. a CPU decode worker's pipe, was
    taken for the consumer going away: the process said nothing and waited for its release, and
    the run for it. Only with the consumer gone (`release` set) is it silent."""
    import multiprocessing
    import threading

    from clipengine.pipeline import decode_pool

    monkeypatch.setattr(decode_pool, "as_child_process", lambda: None)  # run here, in a thread

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise BrokenPipeError(32, "a CPU decode worker's pipe")

    monkeypatch.setattr(gpu_procs, "_load_claimed", broken)
    ours, theirs = multiprocessing.Pipe(duplex=True)
    release = threading.Event()
    counter, claims = multiprocessing.Value("q", 0), multiprocessing.Array("q", 2, lock=False)
    child = threading.Thread(target=gpu_procs._decode_process, args=(
        1, "cpu", "torchvision", _setup(), theirs, threading.Semaphore(2), release, counter, claims, time.time()))  # fmt: skip
    child.start()
    assert ours.recv()[0] == "ready"
    ours.send(("work", ["a.jpg"], ["a.jpg"], {"image_size": 16}, 1, 1))
    assert ours.poll(60)
    msg = ours.recv()
    assert msg[0] == "error" and "BrokenPipeError" in msg[1] and "a CPU decode worker's pipe" in msg[1]
    release.set()
    child.join(timeout=30)
    assert not child.is_alive()


def test_the_cpu_assist_is_reported_over_all_loaders(tmp_path: Path, fakes, caplog) -> None:  # type: ignore[no-untyped-def]
    """The one loader thread logs what its CPU workers decoded and warns when it waited for them;
    with decode processes nothing was said (helper 62's review). Now the loaders' figures are summed."""
    import logging

    from clipengine.image.preprocess import PreprocessConfig

    fakes.write_images(tmp_path / "mix", 6)
    fakes.write_images(tmp_path / "mix", 4, prefix="png", ext=".png")  # nvjpeg cannot: the CPU workers decode them
    with caplog.at_level(logging.INFO, logger="clipengine.pipeline"):
        batches = list(iter_gpu_loaded_procs(list_items(tmp_path / "mix"), PreprocessConfig(image_size=16), 4, "cpu",
                                             LoadStats(), "torchvision", _setup(procs=2, workers=1)))  # fmt: skip
    assert sum(len(b.ids) for b in batches) == 10
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU assist:"))
    assert line.startswith("CPU assist: 4 images on 2 CPU workers, 6 on the GPU decoder; the 2 loaders waited"), line


def test_report_assist_warns_when_the_loaders_waited_for_their_workers(caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    from clipengine.pipeline.gpu_loading import report_assist

    with caplog.at_level(logging.INFO, logger="clipengine.pipeline"):
        report_assist(40, 960, 3.0, 10.0, 2, 0.0, loaders=4)  # 0.75 s each of 10 s: under a tenth
        report_assist(40, 960, 6.0, 10.0, 2, 0.2, loaders=4)  # 1.5 s each: over
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["the GPU loaders (4) waited 1.5 s of 10.0 s for their 8 CPU decode workers: a CPU share of "
                        "0.2 is more than they keep up with; a lower one will be faster"]  # fmt: skip


@pytest.mark.parametrize(
    ("files", "cores", "procs"),
    [(0, 64, 1), (65_536, 16, 1), (99_999, 16, 1), (100_000, 16, 4), (196_608, 8, 4), (196_608, 7, 1)],
)
def test_the_default_loader_count_is_several_only_for_large_folders_on_enough_cores(files: int, cores: int, procs: int) -> None:
    """`embed --gpu-decode` without `--gpu-decode-procs`: 4 loaders where they were measured faster
    (196,608 files, 16 cores), one where they tied (65,536 files) or would starve for cores."""
    assert gpu_procs.default_decode_procs(files, cores) == procs
