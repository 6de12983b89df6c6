"""CPU assist: a share of the GPU loader's files decoded by CPU workers (`pipeline.cpu_assist`).

Off a GPU the nvjpeg call is Pillow on CPU tensors (as in test_gpu_loading.py) and the workers are
threads or one real spawned process; the split, the order of rows and failures, the exact pixels
of the CPU share and the run.json / resume rules are what is checked, not speed.
"""

from __future__ import annotations

import copy
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipengine.errors import IndexMismatchError
from clipengine.image.gpu_decode import GpuJpegDecoder
from clipengine.image.preprocess import PreprocessConfig, crop_uint8
from clipengine.pipeline.cpu_assist import CpuAssist, default_assist_workers
from clipengine.pipeline.gpu_batching import iter_gpu_batches
from clipengine.pipeline.run import embed_folder
from clipengine.pipeline.sinks import read_embeddings, read_failures
from clipengine.pipeline.sources import list_items

CFG = PreprocessConfig(image_size=32)


def _pil_batch_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Stands in for nvjpeg; counts what it was given."""
    out = []
    for t in data:
        with Image.open(io.BytesIO(t.numpy().tobytes())) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device))
    _pil_batch_decode.calls.append(len(data))  # type: ignore[attr-defined]
    return out


_pil_batch_decode.calls = []  # type: ignore[attr-defined]


@pytest.fixture
def threads() -> ThreadPoolExecutor:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool  # type: ignore[misc]


def _assist(pool: ThreadPoolExecutor, share: float, **kw) -> CpuAssist:  # type: ignore[no-untyped-def]
    return CpuAssist(pool, workers=2, share=share, cfg=CFG.to_dict(), **kw)


def test_the_split_depends_on_the_id_alone(threads: ThreadPoolExecutor) -> None:
    ids = [f"photos/{i:05d}.jpg" for i in range(20_000)]
    for share in (0.1, 0.25, 0.5):
        taken = [i for i in ids if _assist(threads, share).takes(i)]
        assert abs(len(taken) / len(ids) - share) < 0.015
        assert taken == [i for i in ids if _assist(threads, share).takes(i)]  # a new assist, the same files
    small, large = _assist(threads, 0.2), _assist(threads, 0.4)
    assert all(large.takes(i) for i in ids if small.takes(i))  # a larger share adds files, moves none back
    assert _assist(threads, 0.5).takes("caf\udce9.jpg") in (True, False)  # undecodable file names hash too


@pytest.mark.parametrize("share", [1.0, -0.1, 1.5])
def test_share_out_of_range_is_refused(threads: ThreadPoolExecutor, share: float) -> None:
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        _assist(threads, share)


def test_share_zero_takes_no_jpeg(threads: ThreadPoolExecutor) -> None:
    assert not any(_assist(threads, 0.0).takes(f"{i}.jpg") for i in range(1000))


def test_files_nvjpeg_cannot_decode_go_to_the_workers(tmp_path: Path, fakes, threads: ThreadPoolExecutor) -> None:  # type: ignore[no-untyped-def]
    """With workers (even at share 0) PNGs are decoded there, not on the loader's thread, and come
    back with the exact path's pixels; without workers the loader's thread decodes them, as before."""
    root = tmp_path / "imgs"
    fakes.write_images(root, 9)
    fakes.write_images(root, 4, prefix="png", ext=".png", seed=3)
    items = list_items(root)
    runs = {}
    for name, assist in (("workers", _assist(threads, 0.0)), ("loader thread", None)):
        decoder = GpuJpegDecoder("cpu", decode_batch=_pil_batch_decode)
        batches = list(iter_gpu_batches(items, CFG, "cpu", batch_size=4, decoder=decoder, assist=assist))
        runs[name] = {i: p for b in batches for i, p in zip(b.ids, b.pixels, strict=True)}
        expected = (4, 0) if assist is not None else (0, 4)
        assert (decoder.stats.cpu_assist, decoder.stats.cpu_fallback) == expected, name
        assert decoder.stats.nvjpeg == 9
    assert sorted(runs["workers"]) == sorted(runs["loader thread"]) == sorted(it.id for it in items)
    for item_id, pixels in runs["loader thread"].items():
        assert torch.equal(runs["workers"][item_id], pixels), item_id


def test_default_workers_leave_the_loader_its_cores() -> None:
    assert default_assist_workers(16) == 12 and default_assist_workers(2) == 1


def test_gpu_batches_with_assist_keep_every_file_and_the_exact_pixels(
    mixed_folder, threads: ThreadPoolExecutor
) -> None:  # type: ignore[no-untyped-def]
    """Half the files go to the CPU workers: the GPU call gets only the others, every good file
    comes back once with the exact path's crop for the CPU ones, and each failure once."""
    root, good, bad = mixed_folder
    items = list_items(root)
    assist = _assist(threads, 0.5)
    on_cpu = {it.id for it in items if assist.takes(it.id)}
    assert 0 < len(on_cpu & set(good)) < len(good)  # the folder really is split
    _pil_batch_decode.calls.clear()  # type: ignore[attr-defined]
    decoder = GpuJpegDecoder("cpu", decode_batch=_pil_batch_decode)
    batches = list(iter_gpu_batches(items, CFG, "cpu", batch_size=4, decoder=decoder, assist=assist))
    ids = [i for b in batches for i in b.ids]
    assert sorted(ids) == good and len(ids) == len(set(ids))
    assert sorted(f.id for b in batches for f in b.failures) == bad
    assert sum(_pil_batch_decode.calls) == len(set(good) - on_cpu)  # type: ignore[attr-defined]
    assert decoder.stats.cpu_assist == len(on_cpu & set(good)) and decoder.stats.assist_s > 0
    assert decoder.stats.nvjpeg == len(set(good) - on_cpu)
    pixels = {i: p for b in batches for i, p in zip(b.ids, b.pixels, strict=True)}
    from clipengine.image.decode import decode_image
    from clipengine.image.preprocess import normalise_uint8

    for item_id in sorted(on_cpu & set(good)):
        exact = normalise_uint8(crop_uint8(decode_image((root / item_id).read_bytes(), item_id), CFG), CFG)
        np.testing.assert_array_equal(pixels[item_id].numpy(), exact)


def test_a_consumer_that_stops_early_leaves_cpu_tasks_unrun(mixed_folder, threads: ThreadPoolExecutor,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    import clipengine.pipeline.cpu_assist as ca

    root, _, _ = mixed_folder
    items = list_items(root) * 40  # 600 items: groups of 4, 150 of them
    started: list[int] = []
    real = ca.load_chunk
    monkeypatch.setattr(ca, "load_chunk", lambda pairs, *a: (started.append(len(pairs)), real(pairs, *a))[1])
    decoder = GpuJpegDecoder("cpu", decode_batch=_pil_batch_decode)
    unique = [type(it)(f"{k}-{it.id}", it.source) for k, it in enumerate(items)]  # ids must be unique
    batches = iter_gpu_batches(unique, CFG, "cpu", batch_size=4, decoder=decoder, decode_group=4,
                               assist=_assist(threads, 0.5))  # fmt: skip
    next(batches)
    batches.close()  # type: ignore[attr-defined]
    assert sum(started) < len(unique) // 4


@pytest.fixture
def torch_backend_factory(tiny_model):  # type: ignore[no-untyped-def]
    from clipengine.backends.torch_backend import TorchBackend

    return lambda: TorchBackend(copy.deepcopy(tiny_model), precision="fp32")


def test_embed_folder_with_a_cpu_share_equals_cpu_workers(
    mixed_folder, tmp_path: Path, tiny_model, torch_backend_factory, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """gpu_cpu_share with one real worker process: rows in input order in the shards (the CPU's
    share comes back after the GPU's), the same embeddings and failures as the CPU loader, the share
    in run.json, and a resume with another share refused."""
    import clipengine.image.gpu_decode as gd

    monkeypatch.setattr(gd, "_nvjpeg_decode", _pil_batch_decode)
    root, good, bad = mixed_folder
    cfg = PreprocessConfig(image_size=tiny_model.config.vision.image_size)
    embed_folder(root, tmp_path / "cpu", torch_backend_factory, cfg, model="tiny", workers=0, batch_size=4,
                 dtype="float32", shard_size=5)  # fmt: skip
    stats = embed_folder(root, tmp_path / "mix", torch_backend_factory, cfg, model="tiny", batch_size=4,
                         dtype="float32", shard_size=5, gpu_decode="cpu", gpu_cpu_share=0.5, workers=1)  # fmt: skip
    ids_c, vec_c, _ = read_embeddings(tmp_path / "cpu")
    ids_m, vec_m, meta = read_embeddings(tmp_path / "mix")
    assert ids_m == ids_c == good
    assert float((vec_m * vec_c).sum(axis=1).min()) >= 0.99999
    assert [f.id for f in read_failures(tmp_path / "mix")] == bad  # in input order too
    assert (stats.embedded, stats.failed) == (len(good), len(bad))
    assert meta["gpu_cpu_share"] == 0.5
    with pytest.raises(IndexMismatchError, match=r"gpu_cpu_share=0.5.*--gpu-cpu-share 0.5"):
        embed_folder(root, tmp_path / "mix", torch_backend_factory, cfg, model="tiny", batch_size=4,
                     dtype="float32", shard_size=5, gpu_decode="cpu", gpu_cpu_share=0.25, workers=1)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpu_cpu_share": 0.3}, "needs gpu_decode"),
        ({"gpu_cpu_share": 0.3, "gpu_decode": "cpu", "workers": 0}, "needs CPU decode workers"),
        ({"gpu_cpu_share": 1.0, "gpu_decode": "cpu"}, r"in \[0, 1\)"),
    ],
)
def test_embed_folder_refuses_a_share_it_cannot_run(tmp_path: Path, fake_factory, preprocess_cfg, kwargs,
                                                    message) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    with pytest.raises(ValueError, match=message):
        embed_folder(tmp_path, tmp_path / "out", fake_factory, preprocess_cfg, **kwargs)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_file_that_kills_an_assist_worker_is_its_own_failure(mixed_folder, fakes) -> None:  # type: ignore[no-untyped-def]
    """The assist workers recover as the CPU loader's do (`batching.settle`): the file whose decode
    ends its process is that file's Failure, and every other file still comes back."""
    from functools import partial

    from clipengine.pipeline.decode_pool import DecodePool

    root, good, bad = mixed_folder
    items = list_items(root)
    probe = CpuAssist(ThreadPoolExecutor(1), workers=1, share=0.5, cfg=CFG.to_dict())
    killer = next(i for i in good if probe.takes(i))
    pool = DecodePool(1, initializer=partial(fakes.die_on, (killer,), None))
    try:
        assist = CpuAssist(pool, workers=1, share=0.5, cfg=CFG.to_dict())
        decoder = GpuJpegDecoder("cpu", decode_batch=_pil_batch_decode)
        batches = list(iter_gpu_batches(items, CFG, "cpu", batch_size=4, decoder=decoder, assist=assist))
    finally:
        pool.shutdown()
    assert sorted(i for b in batches for i in b.ids) == sorted(set(good) - {killer})
    failures = {f.id: f.reason for b in batches for f in b.failures}
    assert sorted(failures) == sorted([*bad, killer]) and "ended the decoder process" in failures[killer]
