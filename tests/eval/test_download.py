"""download-data: resume with HTTP Range, md5 check, atomic extraction, one clear offline error (no network)."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import urllib.error
from pathlib import Path

import pytest

from clipengine.errors import DatasetError, DownloadError
from clipengine.eval import download


def _archive_bytes(folder: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"fake batch"
        info = tarfile.TarInfo(f"{folder}/test_batch")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Response(io.BytesIO):
    def __init__(self, body: bytes, status: int) -> None:
        super().__init__(body)
        self.status = status
        self.headers = {"Content-Length": str(len(body))}

    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Serve a tiny archive as 'cifar10', honouring Range; records the Range headers it saw."""
    body = _archive_bytes("cifar-10-batches-py")
    arc = download.Archive(
        "https://example.invalid/cifar-10-python.tar.gz",
        hashlib.md5(body).hexdigest(),
        "cifar-10-batches-py",
        len(body),
    )
    monkeypatch.setitem(download.ARCHIVES, "cifar10", arc)
    seen: list[str | None] = []

    def urlopen(req, timeout=None):  # type: ignore[no-untyped-def]
        rng = req.get_header("Range")
        seen.append(rng)
        if rng:
            start = int(rng.split("=")[1].rstrip("-"))
            return _Response(body[start:], 206)
        return _Response(body, 200)

    monkeypatch.setattr(download.urllib.request, "urlopen", urlopen)
    return body, seen


def test_download_verifies_and_extracts(tmp_path: Path, fake_server) -> None:  # type: ignore[no-untyped-def]
    folder = download.download_dataset("cifar10", tmp_path)
    assert folder == tmp_path / "cifar-10-batches-py"
    assert (folder / "test_batch").read_bytes() == b"fake batch"
    assert not list(tmp_path.glob(".extract-*")) and not list(tmp_path.glob("*.part"))
    # Already there: returns without fetching again.
    _, seen = fake_server
    download.download_dataset("cifar10", tmp_path)
    assert len(seen) == 1


def test_download_and_extraction_are_durable(
    tmp_path: Path, fake_server: tuple[bytes, list[str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing dataset folder is taken as complete, so its files reach the disk before the
    rename that publishes it, and the rename (like the archive's) before download_dataset returns."""
    import sync_log

    log = sync_log.record(monkeypatch)
    folder = download.download_dataset("cifar10", tmp_path)
    archive = tmp_path / "cifar-10-python.tar.gz"
    for published in (archive, folder):
        log.assert_rename_durable(published)
    assert log.synced_before(log.renames_to(archive)[-1], archive)
    rename = log.renames_to(folder)[-1]
    assert log.synced_before(rename, folder / "test_batch") and log.synced_before(rename, folder)


def test_extraction_killed_midway_is_cleaned_up_by_the_rerun(tmp_path: Path, fake_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real_extract, real_rmtree = tarfile.TarFile.extractall, shutil.rmtree

    def killed(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_extract(self, path, *args, **kwargs)
        raise KeyboardInterrupt  # stands for SIGKILL: the cleanup below never runs

    monkeypatch.setattr(tarfile.TarFile, "extractall", killed)
    monkeypatch.setattr(download.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        download.download_dataset("cifar10", tmp_path)
    assert list(tmp_path.glob(".extract-*"))  # what the killed run left
    monkeypatch.setattr(tarfile.TarFile, "extractall", real_extract)
    monkeypatch.setattr(download.shutil, "rmtree", real_rmtree)
    download.download_dataset("cifar10", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_partial_download_resumes_with_range(tmp_path: Path, fake_server) -> None:  # type: ignore[no-untyped-def]
    body, seen = fake_server
    (tmp_path / "cifar-10-python.tar.gz.part").write_bytes(body[:100])
    download.download_dataset("cifar10", tmp_path)
    assert seen == ["bytes=100-"]
    assert (tmp_path / "cifar-10-python.tar.gz").read_bytes() == body


def test_checksum_mismatch_removes_the_file(tmp_path: Path, fake_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    arc = download.ARCHIVES["cifar10"]
    monkeypatch.setitem(
        download.ARCHIVES, "cifar10", download.Archive(arc.url, "0" * 32, arc.folder, arc.size)
    )
    with pytest.raises(DownloadError, match="md5"):
        download.download_dataset("cifar10", tmp_path)
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_offline_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(req, timeout=None):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    with pytest.raises(DownloadError, match=r"cannot reach https://www.cs.toronto.edu/.*offline") as e:
        download.download_dataset("cifar100", tmp_path)
    assert "\n" not in str(e.value)


def test_official_checksums_are_the_published_ones() -> None:
    assert download.ARCHIVES["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
    assert download.ARCHIVES["cifar100"].md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert download.ARCHIVES["cifar10"].url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cifar10, cifar100"):
        download.download_dataset("imagenet", tmp_path)


def test_offline_error_says_where_to_put_the_archive_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(req, timeout=None):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    with pytest.raises(DownloadError) as e:
        download.download_dataset("cifar10", tmp_path)
    assert f"put it at {tmp_path / 'cifar-10-python.tar.gz'} by hand" in str(e.value)
    assert "\n" not in str(e.value)


def test_connection_closed_early_keeps_the_part_file_for_a_resume(
    tmp_path: Path, fake_server, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """http.client returns b"" (no error) when the server closes early: not a complete archive."""
    body, _ = fake_server

    def short(req, timeout=None):  # type: ignore[no-untyped-def]
        response = _Response(body[:100], 200)
        response.headers = {"Content-Length": str(len(body))}
        return response

    monkeypatch.setattr(download.urllib.request, "urlopen", short)
    with pytest.raises(DownloadError, match=rf"100 of {len(body)} bytes"):
        download.download_dataset("cifar10", tmp_path)
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()
    assert (tmp_path / "cifar-10-python.tar.gz.part").read_bytes() == body[:100]


def test_truncated_chunked_response_is_a_download_error(
    tmp_path: Path, fake_server, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import http.client

    class Broken(_Response):
        def read(self, size: int | None = -1) -> bytes:
            raise http.client.IncompleteRead(b"partial")

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda req, timeout=None: Broken(b"", 200))
    with pytest.raises(DownloadError, match="cannot reach"):
        download.download_dataset("cifar10", tmp_path)
