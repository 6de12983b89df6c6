"""A multi-GB file named like an image is refused by its first bytes, not read whole, on every reader of
`embed` (CPU decode workers, GPU reader threads, the whole run); the other images embed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipengine.image import decode
from clipengine.pipeline.batching import load_chunk
from clipengine.types import Failure

GIB = 1024**3
READ_LIMIT = 64 * 1024 * 1024  # more than any test image, far less than the sparse file
NOT_AN_IMAGE = "not a recognised image format: starts with b'\\x00\\x00\\x00\\x18ftypisom\\x00\\x00\\x00\\x00'"


class _BoundedFile:
    """A file whose read of more than READ_LIMIT bytes fails the test instead of reading them."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def read(self, n: int = -1) -> bytes:
        left = os.fstat(self._f.fileno()).st_size - self._f.tell()
        if (n is None or n < 0 or n > READ_LIMIT) and left > READ_LIMIT:
            raise AssertionError(f"a whole read of {left:,} bytes")
        data: bytes = self._f.read(n)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _BoundedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


@pytest.fixture
def bounded_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file the decoder opens, read as bytes (CPU workers) or by np.fromfile (GPU readers),
    fails on a read of more than READ_LIMIT bytes: a whole read of the sparse file costs nothing."""
    real_open, real_fromfile = open, np.fromfile
    monkeypatch.setattr(decode, "open", lambda *a, **k: _BoundedFile(real_open(*a, **k)), raising=False)

    def fromfile(f: Any, *args: Any, **kwargs: Any) -> Any:
        left = os.fstat(f.fileno()).st_size - f.tell()
        if left > READ_LIMIT:
            raise AssertionError(f"np.fromfile of {left:,} bytes")
        return real_fromfile(f, *args, **kwargs)

    monkeypatch.setattr(np, "fromfile", fromfile)


@pytest.fixture
def folder_with_a_video(image_folder: Path) -> tuple[Path, Path]:
    """The 25 good JPEGs plus a 3 GiB sparse file starting like an MP4, named movie.jpg."""
    video = image_folder / "movie.jpg"
    with open(video, "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypisom")
        f.truncate(3 * GIB)
    return image_folder, video


def test_cpu_worker_refuses_it_by_its_first_bytes(folder_with_a_video, preprocess_cfg, bounded_reads) -> None:  # type: ignore[no-untyped-def]
    root, video = folder_with_a_video
    good = sorted(root.glob("img-000*.jpg"))[:2]
    pairs = [(good[0].name, str(good[0])), ("movie.jpg", str(video)), (good[1].name, str(good[1]))]
    chunk = load_chunk(pairs, preprocess_cfg.to_dict())
    assert chunk.failures == [Failure("movie.jpg", NOT_AN_IMAGE)]
    assert chunk.ids == [good[0].name, good[1].name]


def test_gpu_reader_refuses_it_by_its_first_bytes(folder_with_a_video, bounded_reads) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("torch")
    from clipengine.image.gpu_decode import EncodedImage
    from clipengine.pipeline import gpu_batching
    from clipengine.types import ImageItem

    root, video = folder_with_a_video
    assert gpu_batching._read(ImageItem("movie.jpg", str(video))) == Failure("movie.jpg", NOT_AN_IMAGE)
    good = next(root.glob("*.jpg"))
    read = gpu_batching._read(ImageItem(good.name, str(good)))
    assert isinstance(read, EncodedImage) and bytes(read.data) == good.read_bytes()


def test_embed_records_it_as_a_failure_and_embeds_the_rest(folder_with_a_video, tmp_path: Path, fake_factory, preprocess_cfg, bounded_reads) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    from clipengine.pipeline.run import embed_folder
    from clipengine.pipeline.sinks import read_embeddings, read_failures

    root, _ = folder_with_a_video
    embed_folder(root, tmp_path / "out", fake_factory, preprocess_cfg, batch_size=8, workers=0)
    ids, vectors, _ = read_embeddings(tmp_path / "out")
    assert len(ids) == 25 and "movie.jpg" not in ids and vectors.shape == (25, 8)
    assert read_failures(tmp_path / "out") == [Failure("movie.jpg", NOT_AN_IMAGE)]
