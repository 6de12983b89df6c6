"""Weights cache: where each registered file lives, and an explicit, checksummed, resumable download."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from ..errors import CheckpointError, DownloadError, DownloadNotAllowedError
from ..files import atomic_write_bytes, fsync_file, replace_durably
from ..paths import CACHE_ENV, weights_dir
from .registry import WeightSource

__all__ = [
    "ProgressCallback",
    "cache_path",
    "cache_status",
    "download",
    "fetch",
    "fetch_hub",
    "hub_dir",
    "is_cached",
    "sha256_file",
]

log = logging.getLogger(__name__)

# progress(bytes_done, bytes_total or None): called after every chunk; the CLI draws a tqdm bar.
ProgressCallback = Callable[[int, int | None], None]
_CHUNK = 1 << 20
_TIMEOUT_S = 30.0
_VERIFIED_SUFFIX = ".sha256"  # sidecar "<hex> <size> <mtime_ns>": skip re-hashing an unchanged file


def cache_path(source: WeightSource) -> Path:
    """Where `source`'s file lives: `weights_dir()/ARCH/TAG/FILENAME`, or inside the package."""
    if source.package_dir is not None:
        return Path(str(resources.files("clipengine") / source.package_dir)) / source.filename
    return weights_dir() / source.arch / source.tag / source.filename


def is_cached(source: WeightSource) -> bool:
    """True if the file is present locally (not checksummed here)."""
    return cache_path(source).is_file()


def cache_status(source: WeightSource) -> str:
    """"no"; "yes" (present, and its SHA-256 checked since it last changed, or none is published);
    or "unchecked" (present, checked at its next load: a hand-placed or damaged file). No hashing."""
    path = cache_path(source)
    if not path.is_file():
        return "no"
    if source.sha256 is None:
        return "yes"
    marker = path.with_name(path.name + _VERIFIED_SUFFIX)
    try:
        verified = marker.read_text().strip() == f"{source.sha256} {_stamp(path)}"
    except (OSError, UnicodeDecodeError):
        verified = False
    return "yes" if verified else "unchecked"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def _verify_cached(path: Path, expected: str) -> None:
    """Check a cached (maybe hand-placed) file once; remember the result in a sidecar file."""
    marker = path.with_name(path.name + _VERIFIED_SUFFIX)
    if marker.is_file() and marker.read_text().strip() == f"{expected} {_stamp(path)}":
        return
    actual = sha256_file(path)
    if not _matches(actual, expected):
        raise CheckpointError(
            f"{path} has SHA-256 {actual}, expected {_described(expected)}: the file is corrupt or a "
            "different release; delete it and download again"
        )
    try:
        _write_marker(path, expected)
    except OSError as e:  # a shared read-only cache: the file is good, it is only re-hashed next time
        log.debug("cannot remember that %s was verified (%s)", path, e)


def _matches(digest: str, expected: str) -> bool:
    """A whole SHA-256, or the leading digits a registry entry carries where only those are published
    (open_clip's GitHub release names end in 8; open_clip itself checks no more)."""
    return digest.startswith(expected)


def _described(expected: str) -> str:
    return expected if len(expected) == 64 else f"one starting with {expected}"


def _write_marker(path: Path, sha256: str) -> None:
    """The sidecar saying `path` was verified (atomic: a torn one would only cost a re-hash, but
    every file clipengine writes goes through `files`)."""
    marker = path.with_name(path.name + _VERIFIED_SUFFIX)
    atomic_write_bytes(marker, f"{sha256} {_stamp(path)}\n".encode())


def fetch(
    source: WeightSource, *, allow_download: bool = False, progress: ProgressCallback | None = None
) -> Path:
    """Local path of `source`'s weights, downloading them only if `allow_download` is True.

    A cached file with a known checksum is verified (once; the result is remembered).

    Raises:
        DownloadNotAllowedError: not cached and downloading was not allowed; the message gives the
            URL and the exact path to put the file by hand.
        DownloadError: the download failed (offline, HTTP error, checksum mismatch).
        CheckpointError: a cached file fails its checksum, or packaged weights are missing.
    """
    path = cache_path(source)
    if path.is_file():
        if source.sha256:
            _verify_cached(path, source.sha256)
        return path
    if source.url is None:
        raise CheckpointError(f"weights for {source.key} should ship with clipengine but {path} is missing")
    if not allow_download:
        raise DownloadNotAllowedError(
            f"weights for {source.key} are not in the cache; run `clipengine download {source.key}` "
            f"(or pass --download / allow_download=True), or put {source.url} at {path} by hand "
            f"(cache root: ${CACHE_ENV})"
        )
    return download(source.url, path, sha256=source.sha256, progress=progress)


def download(
    url: str,
    target: Path,
    *,
    sha256: str | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = _TIMEOUT_S,
    by_hand: str | None = None,
) -> Path:
    """Download `url` to `target` via `target.part` (resumed with an HTTP Range request when the
    server supports it), check the SHA-256 if known (whole, or its leading hex digits), then rename
    atomically.

    `by_hand` ends the error message: what to put where instead (default: the file at `target`).

    Raises:
        DownloadError: one line naming the URL, the reason and where to put the file by hand.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _download_lock(target.parent) as waited:
        if waited and target.is_file():  # the process this one waited for fetched this very file
            if sha256:
                _verify_cached(target, sha256)
            return target
        return _download_locked(url, target, sha256, progress, timeout, by_hand)


@contextmanager
def _download_lock(folder: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `folder` while downloading into it; yield whether another process
    held it first (its download may have brought the file meanwhile).

    Two processes fetching the same weights at once (Ray actors on one node, two shells) wrote into
    one .part file: the second resumed or truncated it while the first was writing, and the first
    renamed the mix into place, with a sidecar saying it was verified (its digest covered the bytes
    it received, not the file). A lock on the folder, not a lock file: nothing is left behind.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock, so downloads there are not serialised
        yield False
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        waited = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process downloading into %s", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        except OSError as e:  # a file system without flock (some NFS mounts): go on unserialised
            log.debug("cannot lock %s (%s); downloading without a lock", folder, e)
        yield waited
    finally:
        os.close(fd)  # releases the lock


def _download_locked(
    url: str,
    target: Path,
    sha256: str | None,
    progress: ProgressCallback | None,
    timeout: float,
    by_hand: str | None,
) -> Path:
    """`download`'s work, run while this process alone downloads into `target`'s folder."""
    part = target.with_name(target.name + ".part")
    by_hand = by_hand or f"put the file at {target} by hand"
    try:
        digest = _stream(url, part, progress, timeout)
    except urllib.error.HTTPError as e:
        e.close()  # an HTTPError holds the open response
        raise DownloadError(f"download failed: {url}: HTTP {e.code} {e.reason}; {by_hand}") from e
    # HTTPException: http.client's IncompleteRead (a connection cut inside a chunk) and malformed
    # answers are not OSErrors.
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"download failed: {url}: {reason}; {by_hand}") from e
    if sha256 and not _matches(digest, sha256):
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {url}: got SHA-256 {digest}, expected {_described(sha256)}; the file "
            f"was discarded; retry, or {by_hand}"
        )
    fsync_file(part)  # the rename must not reach the disk before the data does
    replace_durably(part, target)  # and the rename must reach it (a folder fsync)
    if sha256:
        _write_marker(target, sha256)
    log.info("downloaded %s -> %s", url, target)
    return target


_HUB_URL = "https://huggingface.co/{repo}/resolve/main/{filename}"
# Alternatives per hub layout, tried in order; the first file of each group must exist.
_HUB_LAYOUTS = (
    (("open_clip_config.json",), ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")),
    (("config.json",), ("model.safetensors", "pytorch_model.bin"), ("preprocessor_config.json",)),
)


def hub_dir(repo: str) -> Path:
    """Cache folder for `hf-hub:ORG/NAME`: `weights_dir()/hf-hub/ORG--NAME/`."""
    return weights_dir() / "hf-hub" / repo.replace("/", "--")


def _is_404(error: DownloadError) -> bool:
    cause = error.__cause__
    return isinstance(cause, urllib.error.HTTPError) and cause.code == 404


def fetch_hub(repo: str, *, allow_download: bool = False, progress: ProgressCallback | None = None) -> Path:
    """Local folder for a Hugging Face hub repo holding open_clip or transformers CLIP weights.

    Downloads `open_clip_config.json` + weights, else `config.json` + weights (+ preprocessor
    config) into `hub_dir(repo)`, only if `allow_download`. No checksums are published for these.

    Raises:
        DownloadNotAllowedError, DownloadError: as for `fetch`.
    """
    folder = hub_dir(repo)
    if _hub_complete(folder):
        return folder
    # A download failing on its first file must not say to put that one file there: the set is needed.
    by_hand = (
        "put the repo's open_clip_config.json + open_clip_model.safetensors (or config.json + "
        f"model.safetensors) in {folder} by hand"
    )
    if not allow_download:
        raise DownloadNotAllowedError(
            f"hf-hub:{repo} is not in the cache; pass --download / allow_download=True, or {by_hand}"
        )
    for layout in _HUB_LAYOUTS:
        try:
            _download_group(repo, folder, layout[0], progress, by_hand)
        except DownloadError as e:
            if _is_404(e):
                continue
            raise
        # Weights last: a config plus weights is what marks the folder complete (`_hub_complete`),
        # so a run killed before the optional preprocessor config must not look finished.
        for group in layout[2:]:
            _download_group(repo, folder, group, progress, by_hand, optional=True)
        _download_group(repo, folder, layout[1], progress, by_hand)
        return folder
    raise DownloadError(
        f"hf-hub:{repo} has neither open_clip_config.json nor config.json; put files in {folder}"
    )


def _hub_complete(folder: Path) -> bool:
    """A config plus a weights file of the same layout (an interrupted download is not complete)."""
    for layout in _HUB_LAYOUTS:
        config, weights = layout[0][0], layout[1]
        if (folder / config).is_file() and any((folder / name).is_file() for name in weights):
            return True
    return (folder / "config.json").is_file() and (folder / "model.safetensors.index.json").is_file()


def _download_group(
    repo: str,
    folder: Path,
    names: tuple[str, ...],
    progress: ProgressCallback | None,
    by_hand: str,
    optional: bool = False,
) -> None:
    """Download the first of `names` that exists on the hub (404 -> try the next)."""
    for name in names:
        try:
            download(_HUB_URL.format(repo=repo, filename=name), folder / name, progress=progress, by_hand=by_hand)
            return
        except DownloadError as e:
            if not _is_404(e):
                raise
            last = e
    if not optional:
        raise last


def _stream(url: str, part: Path, progress: ProgressCallback | None, timeout: float) -> str:
    """Append the remaining bytes of `url` to `part`; return the SHA-256 of the whole file."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "clipengine"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        opened = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        # The range starts at or past the end of the file: a run killed after its last byte but
        # before the rename left the whole file here, or the file served now is shorter (replaced).
        total = _range_total(e.headers.get("Content-Range"))
        e.close()
        if total == have:
            return sha256_file(part)
        part.unlink()  # none of it is known good; refused again on every rerun if kept
        return _stream(url, part, progress, timeout)
    with opened as response:
        resumed = have > 0 and response.status == 206
        digest = hashlib.sha256()
        if resumed:
            with part.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        else:
            have = 0  # server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        done = have
        with part.open("ab" if resumed else "wb") as out:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    if total is not None and done != total:
        raise OSError(f"connection closed after {done} of {total} bytes (rerun to resume)")
    return digest.hexdigest()


def _range_total(content_range: str | None) -> int | None:
    """The file size a 416 answer states ("bytes */SIZE"), or None when it states none."""
    size = (content_range or "").rpartition("/")[2].strip()
    return int(size) if size.isdigit() else None
