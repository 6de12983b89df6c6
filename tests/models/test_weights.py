"""Weights cache and download against a local HTTP server (127.0.0.1): success, resume, checksum, 404, offline."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from clipengine.errors import CheckpointError, DownloadError, DownloadNotAllowedError
from clipengine.models.registry import WeightSource, get_source
from clipengine.models.weights import cache_path, download, fetch, is_cached

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(SimpleHTTPRequestHandler):
    """Serves files from the server's folder; honours "Range: bytes=N-" when `ranges` is on."""

    ranges = False
    requests: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.requests.append(self.headers.get("Range") or "")
        path = Path(self.translate_path(self.path))
        if not (self.ranges and self.headers.get("Range") and path.is_file()):
            return super().do_GET()
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
        size = path.stat().st_size
        if start >= size:  # as real servers (S3, Azure, the HF CDN) answer, RFC 9110 15.5.17
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()[start:]
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, type[_Handler]]]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "model.bin").write_bytes(PAYLOAD)
    handler = type("H", (_Handler,), {"requests": [], "ranges": False})

    def make(*args: object, **kwargs: object) -> _Handler:
        return handler(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _source(url: str, sha256: str | None = PAYLOAD_SHA) -> WeightSource:
    return replace(get_source("ViT-B-32", "openai"), url=url, sha256=sha256, filename="model.bin")


def test_not_allowed_names_url_and_exact_path() -> None:
    src = get_source("ViT-B-32", "openai")
    with pytest.raises(DownloadNotAllowedError) as info:
        fetch(src)
    message = str(info.value)
    assert src.url in message and str(cache_path(src)) in message
    assert "clipengine download ViT-B-32@openai" in message and "\n" not in message


def test_download_verifies_checksum_and_reports_progress(server: tuple[str, type[_Handler]]) -> None:
    url, _ = server
    seen: list[tuple[int, int | None]] = []
    path = fetch(_source(f"{url}/model.bin"), allow_download=True, progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == PAYLOAD and path == cache_path(_source(url))
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert not path.with_name("model.bin.part").exists()
    assert is_cached(_source(url))
    assert fetch(_source(f"{url}/model.bin")) == path  # cached: no download needed any more


def test_download_is_durable_data_then_rename_then_folder(
    server: tuple[str, type[_Handler]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The .part file is fsynced before its rename and the folder after it, so a power loss
    leaves either no file or the whole verified one (never a renamed, empty file)."""
    import sync_log

    url, _ = server
    log = sync_log.record(monkeypatch)
    target = download(f"{url}/model.bin", tmp_path / "w" / "model.bin", sha256=PAYLOAD_SHA)
    log.assert_rename_durable(target)
    assert log.synced_before(log.renames_to(target)[-1], target)
    log.assert_rename_durable(target.with_name("model.bin.sha256"))  # the verified marker: atomic too


def test_checksum_mismatch_discards_file(server: tuple[str, type[_Handler]], tmp_path: Path) -> None:
    url, _ = server
    target = tmp_path / "out" / "model.bin"
    with pytest.raises(
        DownloadError, match=f"checksum mismatch for {url}/model.bin: got SHA-256 {PAYLOAD_SHA}"
    ):
        download(f"{url}/model.bin", target, sha256="0" * 64)
    assert not target.exists() and not target.with_name("model.bin.part").exists()


def test_http_404_is_one_clear_line(server: tuple[str, type[_Handler]], tmp_path: Path) -> None:
    url, _ = server
    target = tmp_path / "missing.bin"
    with pytest.raises(DownloadError) as info:
        download(f"{url}/missing.bin", target)
    message = str(info.value)
    assert (
        message
        == f"download failed: {url}/missing.bin: HTTP 404 File not found; put the file at {target} by hand"
    )


def test_unreachable_url_says_where_to_put_the_file(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = tmp_path / "x.bin"
    with pytest.raises(
        DownloadError, match=rf"download failed: http://127\.0\.0\.1:{port}/x\.bin: .*put the file at"
    ):
        download(f"http://127.0.0.1:{port}/x.bin", target, timeout=5)


def test_resume_appends_with_range_request(server: tuple[str, type[_Handler]], tmp_path: Path) -> None:
    url, handler = server
    handler.ranges = True
    target = tmp_path / "model.bin"
    target.with_name("model.bin.part").write_bytes(PAYLOAD[:1000])
    download(f"{url}/model.bin", target, sha256=PAYLOAD_SHA)
    assert target.read_bytes() == PAYLOAD and handler.requests == ["bytes=1000-"]


@pytest.mark.parametrize("sha256", [PAYLOAD_SHA, None], ids=["checksum", "no-checksum"])
def test_complete_part_file_from_a_killed_run_is_finished(
    server: tuple[str, type[_Handler]], tmp_path: Path, sha256: str | None
) -> None:
    # Killed after the last byte but before the rename: the rerun's Range request starts at the
    # end of the file, which servers refuse with 416; the part file is the whole download.
    url, handler = server
    handler.ranges = True
    target = tmp_path / "model.bin"
    target.with_name("model.bin.part").write_bytes(PAYLOAD)
    assert download(f"{url}/model.bin", target, sha256=sha256) == target
    assert target.read_bytes() == PAYLOAD and not target.with_name("model.bin.part").exists()


def test_part_file_longer_than_the_served_file_starts_over(
    server: tuple[str, type[_Handler]], tmp_path: Path
) -> None:
    # The release was replaced by a smaller file since the part was written: no byte of it is
    # known good, and a range past the end would be refused on every rerun.
    url, handler = server
    handler.ranges = True
    target = tmp_path / "model.bin"
    target.with_name("model.bin.part").write_bytes(PAYLOAD + b"stale tail")
    download(f"{url}/model.bin", target)
    assert target.read_bytes() == PAYLOAD and handler.requests == [f"bytes={len(PAYLOAD) + 10}-", ""]


def test_server_without_range_support_restarts(server: tuple[str, type[_Handler]], tmp_path: Path) -> None:
    url, _ = server
    target = tmp_path / "model.bin"
    target.with_name("model.bin.part").write_bytes(b"garbage")
    download(f"{url}/model.bin", target, sha256=PAYLOAD_SHA)
    assert target.read_bytes() == PAYLOAD


def test_hand_placed_file_with_wrong_checksum_is_refused(tmp_path: Path) -> None:
    src = _source("http://127.0.0.1:9/unused")
    path = cache_path(src)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the release")
    with pytest.raises(CheckpointError, match="delete it and download again"):
        fetch(src)
    path.write_bytes(PAYLOAD)
    assert fetch(src) == path  # verified once, then remembered in a sidecar
    assert path.with_name("model.bin.sha256").read_text().startswith(PAYLOAD_SHA)


def _hub_repo(server: tuple[str, type[_Handler]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """org/clip on the test server in transformers' layout (config.json + model.safetensors)."""
    from clipengine.models import weights

    url, _ = server
    repo = tmp_path / "www" / "org" / "clip"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text("{}")
    (repo / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(weights, "_HUB_URL", url + "/{repo}/{filename}")
    return repo


def test_hub_repo_falls_back_to_transformers_layout(
    server: tuple[str, type[_Handler]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipengine.models import weights

    _hub_repo(server, tmp_path, monkeypatch)
    with pytest.raises(DownloadNotAllowedError, match="hf-hub:org/clip is not in the cache"):
        weights.fetch_hub("org/clip")
    folder = weights.fetch_hub("org/clip", allow_download=True)
    assert folder == weights.hub_dir("org/clip")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("killed_at", [1, 2, 3, 4])  # open_clip config (404), config, weights, preprocessor
def test_hub_download_killed_midway_is_finished_by_the_rerun(
    server: tuple[str, type[_Handler]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed_at: int
) -> None:
    # The folder counts as complete once it holds a config and weights: a run killed after those
    # but before preprocessor_config.json would leave a model loading with default preprocessing.
    from clipengine.models import weights

    repo = _hub_repo(server, tmp_path, monkeypatch)
    (repo / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5]}')
    real, calls = weights.download, []

    def killed(*args: object, **kwargs: object) -> Path:
        calls.append(args)
        if len(calls) == killed_at:
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this point runs
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(weights, "download", killed)
    with pytest.raises(KeyboardInterrupt):
        weights.fetch_hub("org/clip", allow_download=True)
    monkeypatch.setattr(weights, "download", real)
    folder = weights.fetch_hub("org/clip", allow_download=True)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"
    ]


class _CutChunkedHandler(_Handler):
    """Promises a 4096-byte chunk of a chunked (no Content-Length) answer, sends 100 bytes and
    closes: a proxy or CDN dropping the connection mid-file."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"1000\r\n" + b"x" * 100)
        self.close_connection = True


def test_a_connection_cut_inside_a_chunk_is_a_download_error(tmp_path: Path) -> None:
    """http.client raises IncompleteRead (an HTTPException, not an OSError) there: it escaped as a
    traceback instead of the one line that says to rerun or where to put the file."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _CutChunkedHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/model.bin"
    target = tmp_path / "model.bin"
    try:
        with pytest.raises(DownloadError, match=rf"download failed: {url}: .*put the file at {target} by hand"):
            download(url, target)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    assert not target.exists()  # only the .part, which the next run resumes or restarts


def test_a_verified_file_in_a_read_only_cache_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared, read-only cache whose files were placed by hand (no `.sha256` sidecars): the file
    matched its checksum, but writing the sidecar that remembers it failed the whole load."""
    from clipengine.models import weights

    src = _source("http://127.0.0.1:9/unused")
    path = cache_path(src)
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)

    def read_only(target: object, data: bytes) -> None:
        raise PermissionError(13, "Read-only file system", str(target))

    monkeypatch.setattr(weights, "atomic_write_bytes", read_only)
    assert fetch(src) == path
    assert not path.with_name("model.bin.sha256").exists()  # checked again next time: still correct
    path.write_bytes(b"not the release")
    with pytest.raises(CheckpointError, match="delete it and download again"):
        fetch(src)


def test_an_unreachable_hub_names_every_file_to_put_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, `clipengine download hf-hub:org/clip` said to put open_clip_config.json by hand, and
    only the next try named a weights file: the message now names the whole set, as the
    not-allowed message does."""
    from clipengine.models import weights

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(weights, "_HUB_URL", f"http://127.0.0.1:{port}/{{repo}}/{{filename}}")
    with pytest.raises(DownloadError) as info:
        weights.fetch_hub("org/clip", allow_download=True)
    message = str(info.value)
    assert f"download failed: http://127.0.0.1:{port}/org/clip/open_clip_config.json: " in message
    assert message.endswith(
        "put the repo's open_clip_config.json + open_clip_model.safetensors (or config.json + "
        f"model.safetensors) in {weights.hub_dir('org/clip')} by hand"
    )
    assert "\n" not in message


class _SlowHandler(_Handler):
    """Streams PAYLOAD in 64 KiB pieces, 20 ms apart, honouring "Range: bytes=N-"."""

    def do_GET(self) -> None:
        self.requests.append(self.headers.get("Range") or "")
        start = int((self.headers.get("Range") or "bytes=0-").removeprefix("bytes=").rstrip("-"))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        for i in range(start, len(PAYLOAD), 1 << 16):
            self.wfile.write(PAYLOAD[i : i + (1 << 16)])
            self.wfile.flush()
            time.sleep(0.02)


@pytest.mark.parametrize("sha256", [PAYLOAD_SHA, None], ids=["checksum", "no-checksum"])
def test_two_processes_downloading_the_same_weights_leave_one_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sha256: str | None
) -> None:
    """Ray actors on one node (or two shells) fetching the same weights wrote into one .part file at
    once: the second resumed or truncated it while the first was writing, and the first renamed the
    mix into place (with a sidecar saying it was verified: its digest covered the bytes it received,
    not the file). Now the second waits for the first and takes its file."""
    from clipengine.models import weights

    monkeypatch.setattr(weights, "_CHUNK", 1 << 16)  # several writes per download, as for real sizes
    handler = type("Slow", (_SlowHandler,), {"requests": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serving = threading.Thread(target=httpd.serve_forever, daemon=True)
    serving.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/model.bin"
    target = tmp_path / "w" / "model.bin"
    results: list[object] = []

    def fetch_after(delay: float) -> None:
        time.sleep(delay)
        try:
            results.append(download(url, target, sha256=sha256))
        except Exception as e:  # kept for the assertion below, which shows it
            results.append(e)

    try:
        threads = [threading.Thread(target=fetch_after, args=(d,)) for d in (0.0, 0.1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        httpd.shutdown()
        httpd.server_close()
        serving.join()
    assert results == [target, target]
    assert target.read_bytes() == PAYLOAD and handler.requests == [""]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.bin"] + (["model.bin.sha256"] if sha256 else [])


def test_cache_status_tells_a_checked_file_from_one_placed_by_hand(server: tuple[str, type[_Handler]]) -> None:
    """`clipengine models` said "yes" for any file present, a damaged or wrong one included."""
    from clipengine.models.weights import cache_status

    url, _ = server
    source = _source(f"{url}/model.bin")
    assert cache_status(source) == "no"
    path = fetch(source, allow_download=True)  # downloaded and checked
    assert cache_status(source) == "yes"
    path.write_bytes(PAYLOAD + b"!")  # changed since its check
    assert cache_status(source) == "unchecked"
    assert cache_status(replace(source, sha256=None)) == "yes"  # nothing published to check against


# open_clip's GitHub release files carry only the first 8 hex digits of their SHA-256 (in the name).
PAYLOAD_PREFIX = PAYLOAD_SHA[:8]
WRONG_PREFIX = f"{(int(PAYLOAD_PREFIX, 16) ^ 1):08x}"  # differs from the payload's in the last digit


def test_download_checks_a_checksum_prefix(server: tuple[str, type[_Handler]], tmp_path: Path) -> None:
    url, _ = server
    target = download(f"{url}/model.bin", tmp_path / "ok" / "model.bin", sha256=PAYLOAD_PREFIX)
    assert target.read_bytes() == PAYLOAD
    with pytest.raises(DownloadError) as info:
        download(f"{url}/model.bin", tmp_path / "bad" / "model.bin", sha256=WRONG_PREFIX)
    assert f"got SHA-256 {PAYLOAD_SHA}, expected one starting with {WRONG_PREFIX}" in str(info.value)
    assert not (tmp_path / "bad" / "model.bin").exists()


def test_hand_placed_file_is_checked_against_a_checksum_prefix_once() -> None:
    from clipengine.models.weights import cache_status

    src = _source("http://127.0.0.1:9/unused", sha256=WRONG_PREFIX)
    path = cache_path(src)
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)
    assert cache_status(src) == "unchecked"
    with pytest.raises(CheckpointError) as info:
        fetch(src)
    assert f"expected one starting with {WRONG_PREFIX}: the file is corrupt" in str(info.value)
    src = replace(src, sha256=PAYLOAD_PREFIX)
    assert fetch(src) == path and cache_status(src) == "yes"  # verified, and remembered
