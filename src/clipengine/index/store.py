"""On-disk layout of an index folder, written atomically: data files first, then the header that names them.

    photos.index/
      header.json            format, version, model, dim, kind, params, count, image_roots, files, ...
      vectors-000003.faiss   the faiss structure (faiss.write_index)
      meta-000003.jsonl      one row per vector, in faiss order: {"id": ..., "width": ..., "height": ...}

A save writes the data files of a new *generation* (`clipengine.files`: temp name + fsync +
os.replace), then replaces header.json the same way; the header is the commit point. A crash at any
moment leaves either the old header with its complete files or the new one with its complete files.
Files of older generations and temp leftovers are removed after the commit (or on the next save).
A brand-new index is assembled in a hidden sibling folder and renamed into place (its files and
entries flushed by then, the parent folder flushed after), so a half-written index folder is never
visible under the final name; one left by a killed save goes at the next save. Saves of an existing
folder hold an exclusive lock on it (`_one_writer`), and one from an index loaded at an older
generation than the folder's is refused: two writers never mix or drop each other's files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import IndexFileError
from ..files import atomic_path, fsync_dir, is_temp_name, temp_target

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "HEADER_NAME",
    "check_digest",
    "generation_of",
    "peek_generation",
    "read_header",
    "read_meta",
    "remove_leftovers",
    "write_generation",
]

log = logging.getLogger(__name__)

FORMAT = "clipengine-index"
FORMAT_VERSION = 1
HEADER_NAME = "header.json"


def _write_atomic(path: Path, write: Callable[[Path], None]) -> int:
    """Write via `write(tmp)` to a temp name beside `path`, fsync, os.replace; return the size."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path.stat().st_size


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_text(text: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return write


def _dumps(obj: Any, **kwargs: Any) -> str:
    """JSON with non-ASCII text as is, unless it holds a name that is not UTF-8 (lone surrogates
    from os.fsdecode): that one is escaped (\\udcff), which reads back to the same str."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, **kwargs)
    return text


def _meta_lines(rows: Iterator[dict[str, Any]]) -> str:
    return "".join(_dumps(r, separators=(",", ":")) + "\n" for r in rows)


def _check_target(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise IndexFileError(f"{root} exists and is not an index folder; choose another output path")
    if (
        root.is_dir()
        and not (root / HEADER_NAME).exists()
        and any(not p.name.startswith((".", "vectors-", "meta-", HEADER_NAME)) for p in root.iterdir())
    ):
        raise IndexFileError(
            f"{root} is a folder with other files in it, not an index; refusing to write into it"
        )


@contextmanager
def _one_writer(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the existing folder `root` while a save or a sweep changes it;
    another writer waits. Two `index add` at once both wrote generation N+1 under the same names
    and swept each other's files: the index came out unreadable, or with one add's vectors under
    the other's ids."""
    fd = _lock_folder(root)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock_folder(root: Path) -> int | None:
    """An open descriptor of `root` holding flock(LOCK_EX) on it: the folder itself, so no lock
    file sits in the index. None where folders cannot be locked (no fcntl on Windows, some network
    filesystems): writers are not kept apart there."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        log.debug("could not open %s to lock it (%s): concurrent saves are not kept apart", root, e)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        os.close(fd)
        log.debug("could not lock %s (%s): concurrent saves are not kept apart", root, e)
        return None
    return fd


def write_generation(
    root: Path,
    header: dict[str, Any],
    write_faiss: Callable[[Path], None],
    meta_rows: Iterator[dict[str, Any]],
    loaded_generation: int | None = None,
) -> dict[str, Any]:
    """Save one generation of the index at `root` atomically; return the header as written.

    Args:
        root: the index folder (created if missing).
        header: header fields; "generation", "files", "format" and "version" are filled in here.
        write_faiss: writes the faiss structure to the path it is given.
        meta_rows: one JSON-able dict per vector, in faiss order.
        loaded_generation: the generation of `root` the index being saved was read from (None: a
            new index, which replaces whatever is there).

    Raises:
        IndexFileError: `root` is no index folder, or another process saved it since generation
            `loaded_generation` (saving over that would drop its changes).
    """
    root = Path(root)
    _check_target(root)
    if not root.exists():
        return _write(root, header, write_faiss, meta_rows, fresh=True)
    with _one_writer(root):
        current = peek_generation(root)
        if loaded_generation is not None and current != loaded_generation:
            raise IndexFileError(
                f"{root} was saved by another process since it was loaded (generation {current}, "
                f"loaded at {loaded_generation}); saving would drop those changes: load it again "
                "and redo yours (`clipengine index add`: rerun it)"
            )
        return _write(root, header, write_faiss, meta_rows, fresh=False, previous=current)


def _write(
    root: Path,
    header: dict[str, Any],
    write_faiss: Callable[[Path], None],
    meta_rows: Iterator[dict[str, Any]],
    *,
    fresh: bool,
    previous: int = 0,
) -> dict[str, Any]:
    generation = previous + 1
    # Named like atomic_path's temp files: one temp-name pattern for everything renamed into place.
    workdir = root.with_name(f".{root.name}.{uuid.uuid4().hex[:8]}.tmp") if fresh else root
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        files = {"vectors": f"vectors-{generation:06d}.faiss", "meta": f"meta-{generation:06d}.jsonl"}
        sizes = {
            "vectors": _write_atomic(workdir / files["vectors"], write_faiss),
            "meta": _write_atomic(workdir / files["meta"], _write_text(_meta_lines(meta_rows))),
        }
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            **header,
            "generation": generation,
            "files": files,
            "sizes": sizes,
            # read back from the page cache: ~0.2 s per 200 MB, checked before faiss reads the file
            "sha256": {role: _sha256(workdir / name) for role, name in files.items()},
        }
        _write_atomic(workdir / HEADER_NAME, _write_text(_dumps(header, indent=2) + "\n"))
        if fresh:
            os.rename(workdir, root)  # fails (and we clean up) if someone created `root` meanwhile
            fsync_dir(root.parent)  # the rename is the commit of a first save: on disk before we return
    except BaseException:
        if fresh:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    _remove_stale(root, keep=set(files.values()) | {HEADER_NAME})
    _remove_work_folders(root)
    return header


def remove_leftovers(root: Path) -> None:
    """Remove what a save killed after its commit left: older generations' files, temp files and
    first-save work folders. A writer that ends without a save of its own calls it (a save does
    this itself); readers never do, since another process may be saving meanwhile."""
    with _one_writer(Path(root)):  # not the files of a save in progress
        files = read_header(root)["files"]
        _remove_stale(root, keep=set(files.values()) | {HEADER_NAME})
    _remove_work_folders(root)


def peek_generation(root: Path) -> int:
    """The generation number header.json names now (0 when there is no readable header)."""
    try:
        return generation_of(json.loads((root / HEADER_NAME).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return 0


def generation_of(header: Any) -> int:
    """The generation number a parsed header names (0 when it names none, or not as a number)."""
    try:
        return int(header.get("generation", 0))
    except (TypeError, ValueError, AttributeError):
        return 0


def _remove_stale(root: Path, keep: set[str]) -> None:
    for p in root.iterdir():
        if p.name in keep or not p.is_file():
            continue
        if p.name.startswith(("vectors-", "meta-")) or is_temp_name(p.name):
            p.unlink(missing_ok=True)
            log.debug("removed stale index file %s", p)


def _remove_work_folders(root: Path) -> None:
    """Remove the work folders of first saves of `root` that were killed before their rename.

    Only folders named as `write_generation` names them and holding nothing but index files: the
    parent folder is the user's.
    """
    for p in root.parent.iterdir():
        if p == root or temp_target(p.name) != root.name or not p.is_dir():
            continue
        names = [q.name for q in p.iterdir()]
        if all(n == HEADER_NAME or n.startswith(("vectors-", "meta-")) or is_temp_name(n) for n in names):
            shutil.rmtree(p, ignore_errors=True)
            log.debug("removed the work folder %s of an interrupted save", p)


def _check_field_types(header_path: Path, header: dict[str, Any]) -> None:
    """A header edited by hand (or by another tool) gets one clear error, not a traceback later."""
    files, sizes, digests = header["files"], header["sizes"], header.get("sha256", {})
    problems = [
        name
        for name, ok in (
            ("dim", isinstance(header["dim"], int) and not isinstance(header["dim"], bool) and header["dim"] > 0),
            ("count", isinstance(header["count"], int) and not isinstance(header["count"], bool) and header["count"] >= 0),
            ("params", isinstance(header["params"], dict)),
            ("files", isinstance(files, dict) and all(isinstance(v, str) and v and "/" not in v for v in files.values())),
            ("sizes", isinstance(sizes, dict) and all(isinstance(v, int) or v is None for v in sizes.values())),
            ("sha256", isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())),
        )
        if not ok
    ]
    if problems:
        raise IndexFileError(f"{header_path}: malformed {', '.join(problems)} field(s); rebuild the index")


def read_header(root: Path) -> dict[str, Any]:
    """Read and validate header.json; check the data files it names exist with the recorded sizes.

    Raises:
        IndexFileError: no such index, not an index, unreadable header, or missing/truncated files.
    """
    root = Path(root)
    if not root.exists():
        raise IndexFileError(f"no index at {root}; create one with `clipengine index build`")
    header_path = root / HEADER_NAME
    if not root.is_dir() or not header_path.is_file():
        raise IndexFileError(
            f"{root} is not a clipengine index (no {HEADER_NAME}); an interrupted first save leaves nothing "
            "under the final name, so this is another kind of file or folder"
        )
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise IndexFileError(f"{header_path} is unreadable ({e}); rebuild the index") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise IndexFileError(f"{header_path} is not a {FORMAT} header")
    version = header.get("version", 0)
    if not isinstance(version, int):
        raise IndexFileError(f"{header_path}: version {version!r} is not a number; rebuild the index")
    if version > FORMAT_VERSION:
        raise IndexFileError(
            f"{root} uses index format version {header['version']}, newer than this clipengine "
            f"understands ({FORMAT_VERSION}); upgrade clipengine"
        )
    for key in ("model", "dim", "count", "params", "files", "sizes"):
        if key not in header:
            raise IndexFileError(f"{header_path} lacks the {key!r} field; rebuild the index")
    _check_field_types(header_path, header)
    for role, name in header["files"].items():
        path = root / name
        if not path.is_file():
            raise IndexFileError(f"{root}: {role} file {name} is missing; rebuild the index")
        expected = header["sizes"].get(role)
        if expected is not None and path.stat().st_size != expected:
            raise IndexFileError(
                f"{root}: {role} file {name} has {path.stat().st_size} bytes, header says {expected} "
                "(truncated or modified); rebuild the index"
            )
    return header


def check_digest(root: Path, header: dict[str, Any], role: str) -> None:
    """Check the `role` file ("vectors" or "meta") against the sha256 its header records (headers
    written before there were digests record none: nothing to check).

    A byte changed in place keeps the size `read_header` checks: a changed vector was searched
    without a word, and a changed size field in the faiss file made faiss allocate 16 GB and run
    40 s before failing; so the vectors file is checked before faiss reads it.

    Raises:
        IndexFileError: the file's content is not the one saved.
    """
    expected = header.get("sha256", {}).get(role)
    name = header["files"][role]
    if expected is not None and _sha256(Path(root) / name) != expected:
        raise IndexFileError(
            f"{root}: {role} file {name} does not match the sha256 its header records (changed or "
            "corrupted since it was saved); rebuild the index"
        )


def read_meta(root: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    """The metadata rows named by `header`, one per vector.

    Raises:
        IndexFileError: a file that is not UTF-8, a malformed row, a row without "id", or a row count
            different from the header's.
    """
    path = Path(root) / header["files"]["meta"]
    rows: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise IndexFileError(
                        f"{path}:{lineno}: malformed metadata row ({e}); rebuild the index"
                    ) from e
                if not isinstance(row, dict) or "id" not in row:
                    raise IndexFileError(f"{path}:{lineno}: metadata row without an 'id'; rebuild the index")
                rows.append(row)
    except UnicodeDecodeError as e:  # bytes changed in place: the size check in read_header passes
        raise IndexFileError(f"{path} is not UTF-8 ({e}); the index is corrupted, rebuild it") from e
    if len(rows) != header["count"]:
        raise IndexFileError(
            f"{path} has {len(rows)} rows, header says {header['count']}; the index is inconsistent, rebuild it"
        )
    check_digest(root, header, "meta")  # after the row checks: those name the line at fault
    return rows
