"""Fetch the official CIFAR archives (only on explicit request): resume, checksum, atomic extract.

`clipengine download-data cifar10 --root DIR` is the only caller; library code never downloads.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError, DownloadError
from ..files import fsync_file, fsync_tree, replace_durably
from ..paths import cache_dir

__all__ = ["ARCHIVES", "Archive", "default_data_root", "download_dataset"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str  # published by the dataset authors (and torchvision)
    folder: str  # what the archive extracts to
    size: int  # bytes, for the progress bar


ARCHIVES = {
    "cifar10": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        170498071,
    ),
    "cifar100": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        169001437,
    ),
}
_CHUNK = 1 << 20
_EXTRACT_PREFIX = ".extract-"  # the temporary folder an archive is extracted into, in the root
_EXTRACT_DIR = re.compile(re.escape(_EXTRACT_PREFIX) + r"[a-z0-9_]{8}")  # as tempfile names it


def default_data_root() -> Path:
    """`$CLIPENGINE_HOME/data`."""
    return cache_dir() / "data"


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, part: Path, progress: Callable[[int, int], None] | None, timeout: float) -> None:
    """Append the rest of `url` to `part`, resuming with an HTTP Range request when it exists."""
    have = part.stat().st_size if part.exists() else 0
    by_hand = f"put it at {part.with_suffix('')} by hand"  # download_dataset then verifies and extracts it
    req = urllib.request.Request(url, headers={"User-Agent": "clipengine"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = getattr(resp, "status", 200)
            if have and status != 206:  # server ignored Range: start over
                have = 0
            length = resp.headers.get("Content-Length")
            total = have + int(length or 0)
            with part.open("ab" if have else "wb") as f:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    have += len(chunk)
                    if progress:
                        progress(have, total)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: the partial file is already complete
            return
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; {by_hand}") from e
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        kept = f"; {part.name} keeps {have} bytes for a resume" if have else ""
        raise DownloadError(f"cannot reach {url} ({reason}); are you offline?{kept}; or {by_hand}") from e
    if length and have < total:  # http.client returns b"" when the server closes early
        raise DownloadError(
            f"{url}: connection closed after {have} of {total} bytes; {part.name} keeps them, "
            f"run again to resume, or {by_hand}"
        )


def download_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download, verify (md5) and extract a dataset archive into root; returns the extracted folder.

    Already extracted -> returned at once. A partial `<archive>.part` resumes. Extraction goes to a
    temporary folder renamed into place, so a crash never leaves a half-extracted dataset.

    Raises:
        DatasetError: unknown name.
        DownloadError: offline, HTTP error or checksum mismatch (the bad file is removed).
    """
    if name not in ARCHIVES:
        raise DatasetError(f"unknown dataset {name!r}; downloadable: {', '.join(ARCHIVES)}")
    arc = ARCHIVES[name]
    root = Path(root) if root is not None else default_data_root()
    target = root / arc.folder
    if target.is_dir():
        log.info("%s already present at %s", name, target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    archive = root / arc.url.rsplit("/", 1)[-1]
    if not archive.is_file():
        part = archive.with_name(archive.name + ".part")
        _fetch(arc.url, part, progress, timeout)
        fsync_file(part)  # data before the rename, and the rename on disk (else a power loss can
        replace_durably(part, archive)  # leave a complete-looking archive of zeros)
    digest = _md5(archive)
    if digest != arc.md5:
        archive.unlink()
        raise DownloadError(f"{archive.name}: md5 {digest} != expected {arc.md5}; removed, run again")
    _extract(archive, root, arc.folder)
    return target


def _extract(archive: Path, root: Path, folder: str) -> None:
    for left in root.iterdir():  # what an extraction killed before its cleanup left (~180 MB)
        if _EXTRACT_DIR.fullmatch(left.name) and left.is_dir():
            shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_EXTRACT_PREFIX, dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")  # "data" filter: no absolute paths, links or devices
        if not (tmp / folder).is_dir():
            raise DownloadError(f"{archive.name} does not contain {folder}/")
        # Every extracted file on disk before the rename: a dataset folder that exists is taken as
        # complete (`download_dataset` returns it at once), so it must never hold unwritten files.
        fsync_tree(tmp / folder)
        replace_durably(tmp / folder, root / folder)
    except (tarfile.TarError, OSError) as e:
        raise DownloadError(f"cannot extract {archive}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
