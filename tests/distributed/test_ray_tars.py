"""WebDataset tar members for the Ray engine, without Ray: listing, lazy reading, what cannot be embedded."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from clipengine.distributed import tar_members
from clipengine.distributed.ray import _PartitionEmbedder, list_source
from clipengine.distributed.ray_sources import _encode
from clipengine.distributed.tar_members import MemberRef, TarMemberPool, load_member_chunk, read_member
from clipengine.errors import DatasetError
from clipengine.pipeline import read_embeddings, read_failures


@pytest.fixture(autouse=True)
def _close_tars() -> Iterator[None]:
    yield
    tar_members.close_tars()  # this process read members (the decode ran in a thread here)


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in fields.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if data else None)


def _problems(items: list) -> dict[str, str | None]:  # type: ignore[type-arg]
    refs = {i.id: MemberRef.decode(i.source) for i in items}
    return {k: r.problem for k, r in refs.items() if r is not None}


def test_every_image_member_is_listed_and_what_cannot_be_embedded_says_why(tmp_path: Path) -> None:
    """Symlinks, directories, devices and `..` names were skipped without a word; a hard link to
    an earlier member is read as that member (as `tar -x` extracts it)."""
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as tf:
        _add(tf, "a.jpg", b"A" * 700)
        _add(tf, "a.txt", b"caption")  # not an image: WebDataset metadata, not listed
        _add(tf, "link.jpg", type=tarfile.LNKTYPE, linkname="a.jpg")
        _add(tf, "early.jpg", type=tarfile.LNKTYPE, linkname="later.jpg")
        _add(tf, "sym.jpg", type=tarfile.SYMTYPE, linkname="a.jpg")
        _add(tf, "dir.jpg", type=tarfile.DIRTYPE)
        _add(tf, "dev.png", type=tarfile.CHRTYPE)
        _add(tf, "pipe.png", type=tarfile.FIFOTYPE)
        _add(tf, "../up.jpg", b"U" * 10)
        _add(tf, "/abs/b.jpg", b"B" * 20)
        _add(tf, "later.jpg", b"L" * 5)
    items = list_source(tar)
    assert [i.id for i in items] == [
        "s.tar/a.jpg", "s.tar/link.jpg", "s.tar/early.jpg", "s.tar/sym.jpg", "s.tar/dir.jpg", "s.tar/dev.png",
        "s.tar/pipe.png", "s.tar/../up.jpg", "s.tar/abs/b.jpg", "s.tar/later.jpg",
    ]  # fmt: skip
    problems = _problems(items)
    assert problems["s.tar/sym.jpg"] == "tar member is a symlink to 'a.jpg': not followed"
    assert problems["s.tar/dir.jpg"] == "tar member is a directory: not a regular file"
    assert problems["s.tar/dev.png"] == "tar member is a character device: not a regular file"
    assert problems["s.tar/pipe.png"] == "tar member is a FIFO: not a regular file"
    assert problems["s.tar/../up.jpg"] is not None and "'..'" in problems["s.tar/../up.jpg"]
    assert (
        problems["s.tar/early.jpg"] is not None and "hard link to 'later.jpg'" in problems["s.tar/early.jpg"]
    )
    assert {k for k, v in problems.items() if v is None} == {
        "s.tar/a.jpg", "s.tar/link.jpg", "s.tar/abs/b.jpg", "s.tar/later.jpg",
    }  # fmt: skip
    by_id = {i.id: MemberRef.decode(i.source) for i in items}
    assert read_member(by_id["s.tar/link.jpg"]) == read_member(by_id["s.tar/a.jpg"]) == b"A" * 700  # type: ignore[arg-type]
    assert read_member(by_id["s.tar/abs/b.jpg"]) == b"B" * 20  # type: ignore[arg-type]


def test_a_tar_cut_short_in_a_member_keeps_the_members_before_it(tmp_path: Path) -> None:
    """The listing raised "unexpected end of data" and the whole run was refused."""
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tf:
        _add(tf, "a.jpg", b"A" * 1000)
        _add(tf, "b.jpg", b"B" * 3000)
    tar = tmp_path / "cut.tar"
    tar.write_bytes(whole.getvalue()[: 512 + 1024 + 512 + 1000])  # b.jpg: 1000 of its 3000 bytes
    items = list_source(tar)
    assert _problems(items) == {
        "cut.tar/a.jpg": None,
        "cut.tar/b.jpg": "tar member is cut short: the tar ends after 1000 of its 3000 bytes",
    }


def test_a_tar_cut_in_a_header_is_a_warning_not_silence(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tf:
        _add(tf, "a.jpg", b"A" * 1000)
        _add(tf, "b.jpg", b"B" * 10)
    tar = tmp_path / "cut.tar"
    tar.write_bytes(whole.getvalue()[: 512 + 1024 + 100])  # b.jpg's header is cut: tarfile lists a.jpg only
    assert [i.id for i in list_source(tar)] == ["cut.tar/a.jpg"]
    assert "cut.tar: damaged or cut short after byte 1536" in caplog.text


def test_a_tar_rewritten_after_listing_fails_the_job_not_its_members(
    tmp_path: Path, preprocess_cfg, fakes: ModuleType
) -> None:  # type: ignore[no-untyped-def]
    """Offsets listed before a rewrite would read other bytes: the job stops with a one-line error."""
    img = fakes.write_images(tmp_path / "img", 2)
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as tf:
        for f in img:
            tf.add(f, arcname=f.name)
    pairs = [(i.id, _encode(i)) for i in list_source(tar)]
    assert load_member_chunk(pairs, preprocess_cfg.to_dict()).ids == [
        "s.tar/img-000.jpg",
        "s.tar/img-001.jpg",
    ]
    tar_members.close_tars()
    tar.write_bytes(tar.read_bytes()[:-2048])
    with pytest.raises(
        DatasetError, match=r"s.tar: changed since it was listed \(\d+ -> \d+ bytes\); run again$"
    ):
        load_member_chunk(pairs, preprocess_cfg.to_dict())


def test_a_gzip_compressed_tar_is_read_by_offset_in_its_stream(tmp_path: Path) -> None:
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tf:
        _add(tf, "a.jpg", b"A" * 3000)
        _add(tf, "b.jpg", b"B" * 100)
    tar = tmp_path / "z.tar"
    tar.write_bytes(gzip.compress(plain.getvalue()))
    items = list_source(tar)
    refs = [MemberRef.decode(i.source) for i in items]
    assert [read_member(r) for r in refs] == [b"A" * 3000, b"B" * 100]  # type: ignore[arg-type]


class _InThisProcess(TarMemberPool):
    """The decode in a thread of the test's process, where its reads can be counted."""

    def _new_pool(self, workers: int) -> ThreadPoolExecutor:  # type: ignore[override]
        return ThreadPoolExecutor(workers)


def test_an_actor_reads_a_partition_a_chunk_at_a_time(
    tmp_path: Path, preprocess_cfg, fakes: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The actor read every member of its partition into memory before embedding (GBs for a
    partition of camera JPEGs). Now the decode reads a chunk's members when the pipeline asks for
    that chunk: at each backend call at most two chunks (the pipeline's prefetch) are read ahead."""
    n, batch = 24, 4  # chunks of 4 (`batching.iter_batches`: batch_size clamped to 4..64), 2 in flight
    img = fakes.write_images(tmp_path / "img", n)
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as tf:
        for f in img:
            tf.add(f, arcname=f.name)
    reads: list[str] = []
    real_read = tar_members.read_member
    monkeypatch.setattr(tar_members, "read_member", lambda ref: reads.append(ref.member) or real_read(ref))
    ahead: list[int] = []  # members read but not yet embedded, at each backend call
    backend = fakes.FakeBackend()
    real_encode, embedded = backend.encode_images, [0]

    def encode(pixels: np.ndarray) -> np.ndarray:
        ahead.append(len(reads) - embedded[0])
        embedded[0] += len(pixels)
        return real_encode(pixels)

    backend.encode_images = encode
    actor = _PartitionEmbedder(
        lambda: backend, preprocess_cfg.to_dict(), str(tmp_path / "out"), "float32", batch, None
    )
    actor.decoder.shutdown()
    actor.decoder = _InThisProcess(1)
    rows = [[i.id, _encode(i)] for i in list_source(tar)]
    result = actor({"partition_id": np.array([0]), "items": np.array([json.dumps(rows)], dtype=object), "retry": np.array([False])})
    actor.decoder.shutdown()
    assert list(result["error"]) == [""]
    assert sorted(reads) == [f.name for f in img] and len(ahead) == n // batch
    assert max(ahead) <= 2 * batch, ahead
    ids, vectors, _ = read_embeddings(tmp_path / "out")
    assert (
        ids == [f"s.tar/{f.name}" for f in img]
        and vectors.shape == (n, 8)
        and not read_failures(tmp_path / "out")
    )


def _spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes asked of the tars' streams, as the decode process reads members."""
    sizes: list[int] = []
    real_stream = tar_members._tar_stream

    class _Counting:
        def __init__(self, stream: io.BufferedIOBase) -> None:
            self._stream = stream

        def seek(self, offset: int) -> int:
            return self._stream.seek(offset)

        def read(self, size: int) -> bytes:
            sizes.append(size)
            return self._stream.read(size)

    monkeypatch.setattr(tar_members, "_tar_stream", lambda ref: _Counting(real_stream(ref)))
    return sizes


def test_a_large_member_that_is_no_image_is_refused_by_its_first_bytes(
    tmp_path: Path, preprocess_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A multi-GB video named .jpg in a shard was read whole into the decode process before the
    decoder refused it; now it is refused by its first bytes, as a loose file is (and with the
    same reason), and the shard's other members are embedded."""
    video = b"\x00\x00\x00\x18ftypisom" + b"\x00" * (17 * 1024 * 1024)  # over the 16 MiB check
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * (17 * 4096)  # looks like an image: read whole
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as tf:
        _add(tf, "clip.jpg", video)
        _add(tf, "big.png", png)
    items = list_source(tar)
    sizes = _spy_reads(monkeypatch)
    chunk = load_member_chunk([(i.id, i.source) for i in items[:1]], preprocess_cfg.to_dict())
    assert [(f.id, f.reason) for f in chunk.failures] == [
        ("s.tar/clip.jpg", "not a recognised image format: starts with " + repr(video[:16]))
    ]
    assert max(sizes) <= 1 << 16, sizes  # the head only, not 17 MiB
    assert read_member(MemberRef.decode(items[1].source)) == png  # type: ignore[arg-type]


def test_a_member_over_max_file_bytes_is_refused_by_its_size(
    tmp_path: Path, preprocess_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from clipengine.image import decode

    monkeypatch.setattr(decode, "MAX_FILE_BYTES", 100_000)
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w") as tf:
        _add(tf, "huge.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 200_000)
    items = list_source(tar)
    sizes = _spy_reads(monkeypatch)
    chunk = load_member_chunk([(i.id, i.source) for i in items], preprocess_cfg.to_dict())
    assert len(chunk.failures) == 1 and "larger than MAX_FILE_BYTES = 100,000" in chunk.failures[0].reason
    assert sizes == [1 << 16]
