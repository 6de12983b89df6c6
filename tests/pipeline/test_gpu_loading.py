"""embed_folder with gpu_decode: the nvjpeg loader wired into the pipeline (plumbing checked on CPU).

Off a GPU, torchvision's nvjpeg call is replaced by a fake batched decoder (Pillow, on CPU tensors),
so everything else runs for real: reader threads, routing to the CPU decoder, torch preprocessing,
failures, sizes, run.json, and the torch backend taking device tensors. The real nvjpeg path is
the `gpu` test at the end.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gpu_fakes import pil_batch_decode as _pil_batch_decode
from gpu_fakes import tiny_model_cfg

from clipengine.errors import IndexMismatchError
from clipengine.pipeline.run import embed_folder
from clipengine.pipeline.sinks import read_embeddings, read_failures


def test_gpu_decode_path_matches_cpu_workers(photo_folder, tmp_path: Path, tiny_model, torch_backend_factory,
                                             fake_nvjpeg) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    root, good, bad = photo_folder
    cfg = tiny_model_cfg(tiny_model)
    cpu_stats = embed_folder(root, tmp_path / "cpu", torch_backend_factory, cfg, model="tiny", workers=0,
                             batch_size=4, dtype="float32")  # fmt: skip
    gpu_stats = embed_folder(root, tmp_path / "gpu", torch_backend_factory, cfg, model="tiny", batch_size=4,
                             dtype="float32", gpu_decode="cpu")  # fmt: skip
    ids_c, vec_c, meta_c = read_embeddings(tmp_path / "cpu")
    ids_g, vec_g, meta_g = read_embeddings(tmp_path / "gpu")
    assert ids_g == ids_c == good
    # The fake decoder is Pillow and the GPU resize is Pillow's: the same pixels, so the same
    # embeddings up to float summation order (batches are built differently).
    assert float((vec_g * vec_c).sum(axis=1).min()) >= 0.99999
    assert sorted(f.id for f in read_failures(tmp_path / "gpu")) == bad
    assert (gpu_stats.embedded, gpu_stats.failed) == (cpu_stats.embedded, cpu_stats.failed) == (len(good), 3)
    assert meta_g["gpu_decode"] is True and meta_c["gpu_decode"] is False
    assert gpu_stats.read_s > 0 and gpu_stats.decode_s > 0
    sizes_c = _sizes(tmp_path / "cpu")
    assert _sizes(tmp_path / "gpu") == sizes_c and sizes_c["photo-1.jpg"] == [70, 200]


def test_gpu_read_threads_reach_the_readers(photo_folder, tmp_path: Path, tiny_model, torch_backend_factory,
                                            fake_nvjpeg, monkeypatch) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    import clipengine.pipeline.gpu_batching as gb

    seen = []
    read_ahead = gb._read_ahead

    def spy(items, group_size, threads, prefetch, stats, assist=None):  # type: ignore[no-untyped-def]
        seen.append(threads)
        return read_ahead(items, group_size, threads, prefetch, stats, assist)

    monkeypatch.setattr(gb, "_read_ahead", spy)
    root, good, _ = photo_folder
    stats = embed_folder(root, tmp_path / "out", torch_backend_factory, tiny_model_cfg(tiny_model), model="tiny",
                         gpu_decode="cpu", gpu_read_threads=5)  # fmt: skip
    assert stats.embedded == len(good) and seen and set(seen) == {5}


def test_resume_refuses_another_decode_mode(photo_folder, tmp_path: Path, tiny_model, torch_backend_factory,
                                            fake_nvjpeg) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    root, _, _ = photo_folder
    cfg = tiny_model_cfg(tiny_model)
    embed_folder(root, tmp_path / "out", torch_backend_factory, cfg, model="tiny", gpu_decode="cpu")
    with pytest.raises(IndexMismatchError, match=r"gpu_decode=True.*--gpu-decode"):
        embed_folder(root, tmp_path / "out", torch_backend_factory, cfg, model="tiny", workers=0)


@pytest.mark.skipif(not __import__("clipengine.image.nvimgcodec_decode", fromlist=["x"]).available(),
                    reason="nvidia-nvimgcodec not installed")  # fmt: skip
def test_nvimgcodec_decoder_in_the_pipeline(photo_folder, tmp_path: Path, tiny_model, torch_backend_factory) -> None:  # type: ignore[no-untyped-def]
    """gpu_decoder="nvimgcodec" end to end (nvImageCodec's CPU backend here): its JPEGs decode as
    libjpeg-turbo's, so the embeddings equal the CPU workers'; run.json records the decoder and a
    resume with the other one is refused."""
    root, good, bad = photo_folder
    cfg = tiny_model_cfg(tiny_model)
    embed_folder(root, tmp_path / "cpu", torch_backend_factory, cfg, model="tiny", workers=0, dtype="float32")
    stats = embed_folder(root, tmp_path / "nv", torch_backend_factory, cfg, model="tiny", batch_size=4,
                         dtype="float32", gpu_decode="cpu", gpu_decoder="nvimgcodec")  # fmt: skip
    ids_c, vec_c, _ = read_embeddings(tmp_path / "cpu")
    ids_n, vec_n, meta_n = read_embeddings(tmp_path / "nv")
    assert ids_n == ids_c == good and stats.failed == len(bad)
    assert float((vec_n * vec_c).sum(axis=1).min()) >= 0.9999
    assert meta_n["gpu_decoder"] == "nvimgcodec"
    with pytest.raises(IndexMismatchError, match=r"gpu_decoder='nvimgcodec'.*--gpu-decoder nvimgcodec"):
        embed_folder(root, tmp_path / "nv", torch_backend_factory, cfg, model="tiny", batch_size=4,
                     dtype="float32", gpu_decode="cpu", gpu_decoder="torchvision")  # fmt: skip


def test_torch_backend_takes_tensors_like_arrays(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from clipengine.backends.torch_backend import TorchBackend
    from clipengine.errors import BackendError

    backend = TorchBackend(copy.deepcopy(tiny_model), precision="fp32")
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(backend.encode_images(torch.from_numpy(pixels)), backend.encode_images(pixels),
                               atol=1e-6)  # fmt: skip
    with pytest.raises(BackendError, match="pixels must be float"):
        backend.encode_images(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def _sizes(out: Path) -> dict[str, list[int]]:
    import json

    rows = []
    for path in sorted((out / "shards").glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return {r["path"]: [r["width"], r["height"]] for r in rows if "width" in r}  # not the failure lists


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["torchvision", "nvimgcodec"])
def test_real_nvjpeg_embed_folder_matches_cpu_workers(photo_folder, tmp_path: Path, tiny_model, decoder) -> None:  # type: ignore[no-untyped-def]
    from clipengine.backends.torch_backend import TorchBackend

    root, good, bad = photo_folder
    cfg = tiny_model_cfg(tiny_model)
    factory = lambda: TorchBackend(copy.deepcopy(tiny_model), device="cuda", precision="fp16")  # noqa: E731
    embed_folder(root, tmp_path / "cpu", factory, cfg, model="tiny", workers=0, dtype="float32")
    if decoder == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec")
    embed_folder(root, tmp_path / "gpu", factory, cfg, model="tiny", dtype="float32", gpu_decode="cuda",
                 gpu_decoder=decoder)  # fmt: skip
    ids_c, vec_c, _ = read_embeddings(tmp_path / "cpu")
    ids_g, vec_g, _ = read_embeddings(tmp_path / "gpu")
    assert ids_g == ids_c == good
    # nvjpeg's 4:2:0 chroma upsampling differs from libjpeg-turbo by a few levels per pixel.
    assert float((vec_g * vec_c).sum(axis=1).min()) >= 0.99
    assert sorted(f.id for f in read_failures(tmp_path / "gpu")) == bad


@pytest.mark.gpu
def test_real_nvjpeg_with_a_cpu_share_matches_cpu_workers(photo_folder, tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """gpu_cpu_share on CUDA: half the files decoded by a CPU worker process, their crops copied to
    the GPU beside nvjpeg's images; every file once, in input order, failures as the CPU loader's."""
    from clipengine.backends.torch_backend import TorchBackend

    root, good, bad = photo_folder
    cfg = tiny_model_cfg(tiny_model)
    factory = lambda: TorchBackend(copy.deepcopy(tiny_model), device="cuda", precision="fp16")  # noqa: E731
    embed_folder(root, tmp_path / "cpu", factory, cfg, model="tiny", workers=0, dtype="float32")
    stats = embed_folder(root, tmp_path / "gpu", factory, cfg, model="tiny", dtype="float32", gpu_decode="cuda",
                         gpu_cpu_share=0.5, workers=1, batch_size=4)  # fmt: skip
    ids_c, vec_c, _ = read_embeddings(tmp_path / "cpu")
    ids_g, vec_g, _ = read_embeddings(tmp_path / "gpu")
    assert ids_g == ids_c == good and stats.embedded == len(good)
    assert float((vec_g * vec_c).sum(axis=1).min()) >= 0.99
    assert sorted(f.id for f in read_failures(tmp_path / "gpu")) == bad


@pytest.mark.gpu
def test_real_nvjpeg_with_cuda_graphs_matches_cpu_workers(photo_folder, tmp_path: Path, tiny_model,
                                                          monkeypatch) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    """What `embed --device cuda --gpu-decode --compile` runs (there compiled too): the model under
    CUDA graphs, each batch shape captured when it first comes, while the loader thread decodes the
    next groups (2 files each here, so it is at work during the captures)."""
    import clipengine.pipeline.gpu_batching as gb
    from clipengine.backends.torch_backend import TorchBackend

    root, good, bad = photo_folder
    cfg = tiny_model_cfg(tiny_model)
    plain = lambda: TorchBackend(copy.deepcopy(tiny_model), device="cuda", precision="fp16")  # noqa: E731

    def graphs() -> TorchBackend:
        return TorchBackend(copy.deepcopy(tiny_model), device="cuda", precision="fp16", cuda_graphs=True)

    embed_folder(root, tmp_path / "cpu", plain, cfg, model="tiny", workers=0, dtype="float32")
    monkeypatch.setattr(gb, "_DECODE_GROUP", 2)
    stats = embed_folder(root, tmp_path / "gpu", graphs, cfg, model="tiny", dtype="float32", gpu_decode="cuda",
                         workers=0, batch_size=2)  # fmt: skip
    ids_c, vec_c, _ = read_embeddings(tmp_path / "cpu")
    ids_g, vec_g, _ = read_embeddings(tmp_path / "gpu")
    assert ids_g == ids_c == good and stats.embedded == len(good)
    assert float((vec_g * vec_c).sum(axis=1).min()) >= 0.99
    assert sorted(f.id for f in read_failures(tmp_path / "gpu")) == bad


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_decode_ahead_gives_the_same_batches(photo_folder, tiny_model, fake_nvjpeg, monkeypatch,
                                             batch_size: int) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    """The decode stage on its own thread: same ids, pixels, sizes and failures (in the same batches)
    as the one-thread loader, with groups of 3 files and decode calls split by pixel budget."""
    import threading

    import clipengine.pipeline.gpu_batching as gb
    from clipengine.pipeline.batching import LoadStats
    from clipengine.pipeline.gpu_loading import iter_gpu_loaded
    from clipengine.pipeline.sources import list_folder

    monkeypatch.setattr(gb, "_DECODE_GROUP", 3)
    monkeypatch.setattr(gb, "_DECODE_PIXELS", 20_000)  # the 160x90 and 70x200 photos get calls of their own
    root, good, bad = photo_folder
    items = list_folder(root)
    cfg = tiny_model_cfg(tiny_model)
    runs = {}
    for ahead in (False, True):
        stats = LoadStats()
        runs[ahead] = list(iter_gpu_loaded(items, cfg, batch_size, "cpu", stats, decode_ahead=ahead))
        assert stats.images == len(good) and stats.decode_s > 0 and stats.read_s > 0
    assert len(runs[True]) == len(runs[False])
    for one, two in zip(runs[False], runs[True], strict=True):
        assert one.ids == two.ids and one.sizes == two.sizes and one.failures == two.failures
        assert torch.equal(one.pixels, two.pixels)
    assert [i for b in runs[True] for i in b.ids] == good
    assert sorted(f.id for b in runs[True] for f in b.failures) == bad
    # Stopping early stops both threads.
    loader = iter_gpu_loaded(items, cfg, batch_size, "cpu", LoadStats(), decode_ahead=True)
    next(loader)
    loader.close()
    assert not [t for t in threading.enumerate() if t.name in ("clipengine-decode", "clipengine-prefetch")]


@pytest.mark.parametrize("ahead", [False, True])
def test_load_stats_count_failures(photo_folder, tiny_model, fake_nvjpeg, ahead: bool) -> None:  # type: ignore[no-untyped-def]
    """LoadStats.failures counts the Failure records, as the CPU loader's does."""
    from clipengine.pipeline.batching import LoadStats
    from clipengine.pipeline.gpu_loading import iter_gpu_loaded
    from clipengine.pipeline.sources import list_folder

    root, good, bad = photo_folder
    stats = LoadStats()
    batches = list(iter_gpu_loaded(list_folder(root), tiny_model_cfg(tiny_model), 4, "cpu", stats, decode_ahead=ahead))
    assert sum(len(b.failures) for b in batches) == len(bad)
    assert (stats.images, stats.failures) == (len(good), len(bad))
    assert stats.wait_s > 0  # the first batch is waited for at least


def test_wait_counts_the_time_the_consumer_waits(photo_folder, tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """wait_s is the time the consumer blocks for batches: a decoder that takes 0.05 s per call makes
    the consumer wait at least that long for the first batch."""
    import time

    import clipengine.image.gpu_decode as gd
    from clipengine.pipeline.batching import LoadStats
    from clipengine.pipeline.gpu_loading import iter_gpu_loaded
    from clipengine.pipeline.sources import list_folder

    def slow(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        time.sleep(0.05)
        return _pil_batch_decode(data, device)

    monkeypatch.setattr(gd, "_nvjpeg_decode", slow)
    root, good, _ = photo_folder
    stats = LoadStats()
    batches = list(iter_gpu_loaded(list_folder(root), tiny_model_cfg(tiny_model), 4, "cpu", stats))
    assert sum(len(b.ids) for b in batches) == len(good)
    assert stats.wait_s >= 0.05


@pytest.mark.parametrize("ahead", [False, True])
def test_loader_error_stops_every_thread(photo_folder, tiny_model, monkeypatch, ahead: bool) -> None:  # type: ignore[no-untyped-def]
    """An error while preprocessing reaches the consumer with the reader, decode and loader threads
    all stopped, while the consumer still holds the exception."""
    import threading

    import clipengine.image.gpu_decode as gd
    import clipengine.pipeline.gpu_batching as gb
    from clipengine.pipeline.batching import LoadStats
    from clipengine.pipeline.gpu_loading import iter_gpu_loaded
    from clipengine.pipeline.sources import list_folder

    def wrong_shape(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return [torch.zeros((1, 8, 8), dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(gd, "_nvjpeg_decode", wrong_shape)
    monkeypatch.setattr(gb, "_DECODE_GROUP", 2)
    root, _, _ = photo_folder
    items = list_folder(root) * 20  # many groups still to read when the first one fails
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="expected a") as raised:
        list(iter_gpu_loaded(items, tiny_model_cfg(tiny_model), 1, "cpu", LoadStats(), decode_ahead=ahead))
    # The premise: `raised` still holds the error, and through its traceback the loader's frames.
    assert "iter_gpu_loaded" in [entry.name for entry in raised.traceback]
    names = ("clipengine-read", "clipengine-decode", "clipengine-prefetch")
    assert not [t.name for t in set(threading.enumerate()) - before if t.name.startswith(names)]


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["torchvision", "nvimgcodec"])
def test_real_decode_ahead_equals_one_thread_loader(photo_folder, tiny_model, monkeypatch, decoder: str) -> None:  # type: ignore[no-untyped-def]
    """On CUDA, decode calls on their own thread (a second thread issuing GPU work on the default
    stream) give the very pixels of the one-thread loader, with a busy GPU in between."""
    import clipengine.pipeline.gpu_batching as gb
    from clipengine.pipeline.batching import LoadStats
    from clipengine.pipeline.gpu_loading import iter_gpu_loaded
    from clipengine.pipeline.sources import list_folder

    if decoder == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec")
    monkeypatch.setattr(gb, "_DECODE_GROUP", 3)
    root, good, _ = photo_folder
    items = list_folder(root)
    cfg = tiny_model_cfg(tiny_model)
    busy = torch.randn(2048, 2048, device="cuda")
    runs = {}
    for ahead in (False, True):
        pixels = []
        for batch in iter_gpu_loaded(items, cfg, 4, "cuda", LoadStats(), decoder, decode_ahead=ahead):
            for _ in range(3):
                busy = busy @ busy / 2048  # queued work the decoded memory must outlive
            pixels.append(batch.pixels.cpu())
        runs[ahead] = torch.cat(pixels)
    assert runs[True].shape[0] == len(good)
    assert torch.equal(runs[True], runs[False])


def test_a_backend_error_in_embed_folder_stops_the_loader_threads(
    tmp_path: Path, tiny_model, fakes, fake_nvjpeg, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """The loader is closed when embedding fails, not when the caller drops the exception (whose
    traceback holds the loader): its reader and prefetch threads must not go on reading."""
    import threading

    import clipengine.pipeline.gpu_batching as gb

    class Failing:
        name, embed_dim, image_size = "failing", 8, tiny_model_cfg(tiny_model).image_size

        def encode_images(self, pixels: object) -> object:
            raise RuntimeError("boom")

    monkeypatch.setattr(gb, "_DECODE_GROUP", 2)
    root = tmp_path / "many"
    fakes.write_images(root, 60)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="boom") as raised:
        embed_folder(root, tmp_path / "out", Failing(), tiny_model_cfg(tiny_model), batch_size=1,
                     shard_size=10, gpu_decode="cpu")  # fmt: skip
    # The premise: `raised` still holds the error, and through its traceback the frame that holds the loader.
    assert "embed_partitions" in [entry.name for entry in raised.traceback]
    names = ("clipengine-read", "clipengine-decode", "clipengine-prefetch")
    assert not [t.name for t in set(threading.enumerate()) - before if t.name.startswith(names)]


def test_embed_folder_with_decode_ahead_writes_the_same_output(photo_folder, tmp_path: Path, tiny_model,
                                                               torch_backend_factory, fake_nvjpeg) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    root, good, bad = photo_folder
    cfg = tiny_model_cfg(tiny_model)
    for ahead in (False, True):
        embed_folder(root, tmp_path / str(ahead), torch_backend_factory, cfg, batch_size=4, shard_size=5,
                     dtype="float32", gpu_decode="cpu", gpu_decode_ahead=ahead)  # fmt: skip
    (ids, vectors, _), (ids_ahead, vectors_ahead, _) = (read_embeddings(tmp_path / str(a)) for a in (False, True))
    assert ids == ids_ahead == good
    np.testing.assert_array_equal(vectors, vectors_ahead)
    assert sorted(f.id for f in read_failures(tmp_path / "True")) == bad


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.timeout(60)
def test_gpu_reader_fails_a_named_pipe_without_blocking(photo_folder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The GPU loader's reader threads read with np.fromfile(path), which waited for a writer on a
    FIFO named like a JPEG forever (`embed --gpu-decode` hung); it is now that file's failure."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from clipengine.image.gpu_decode import EncodedImage
    from clipengine.pipeline import gpu_batching as gb
    from clipengine.types import Failure, ImageItem

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    root, good, _ = photo_folder
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(gb._read, ImageItem("pipe.jpg", str(fifo)))
        try:
            result = future.result(timeout=10)
        finally:
            if not future.done():  # unblock the reader so the test ends
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert result == Failure("pipe.jpg", "not a regular file but a named pipe (FIFO); only files are read")
    read = gb._read(ImageItem(good[0], str(root / good[0])))
    assert isinstance(read, EncodedImage)
    assert bytes(read.data) == (root / good[0]).read_bytes()
