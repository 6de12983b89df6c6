"""How an export rewrites its folder in place: stage files in a work folder, and only once every
engine passed its parity check move the new files in (unpublishing the old manifest first only when
that changes a file it lists), publish the new manifest, and drop the replaced export's engines
(a failed export leaves the old one as it was).

Separate from `export.onnx` (which builds and verifies the engines) because this is the part that
keeps a folder safe to read while it changes and clean after a killed or failed export.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..files import atomic_write_bytes, fsync_dir, fsync_file, temp_target
from .manifest import MANIFEST_FILE

__all__ = [
    "PARITY_REPORT_FILE",
    "WORK_PREFIX",
    "begin_rewrite",
    "finish_rewrite",
    "move_files",
    "remove_stale_work",
]

log = logging.getLogger(__name__)

WORK_PREFIX = ".export-"  # the work folder inside the export folder (same filesystem: renames)
_WORK_DIR = re.compile(re.escape(WORK_PREFIX) + r"[a-z0-9_]{8}")  # as tempfile names it
PARITY_REPORT_FILE = "parity_report.json"  # a failed export's manifest, under another name
_PREVIOUS_FILE = ".previous-engines.json"  # files of the export being replaced, until it is
_OWN_FILES = (MANIFEST_FILE, PARITY_REPORT_FILE, _PREVIOUS_FILE)  # written here through atomic temp files


def _listed_files(folder: Path) -> set[str]:
    """Files an existing manifest in `folder` lists (engines, their data, the projection)."""
    from ..errors import BackendError
    from .manifest import read_manifest

    if not (folder / MANIFEST_FILE).is_file():
        return set()
    try:
        m = read_manifest(folder)
    except BackendError:
        return set()
    names = {e.file for e in m.engines} | {e.external_data for e in m.engines if e.external_data}
    if m.text_projection:
        names.add(m.text_projection["file"])
    return _plain_names(names)


def _plain_names(names: Iterable[object]) -> set[str]:
    """Plain file names only, never paths elsewhere."""
    return {n for n in names if isinstance(n, str) and n and Path(n).name == n}


def remove_stale_work(out: Path) -> None:
    """Remove what exports killed before their cleanup ran left (call before making a work folder):
    their work folders, and the temp files of the notes and manifests they were writing (only
    those: the folder may hold the user's files)."""
    for work in out.iterdir():
        if _WORK_DIR.fullmatch(work.name) and work.is_dir():
            shutil.rmtree(work, ignore_errors=True)
        elif temp_target(work.name) in _OWN_FILES and work.is_file():
            work.unlink(missing_ok=True)


def begin_rewrite(out: Path, work: Path, names: Sequence[str | None]) -> set[str]:
    """Before the finished files `names` move from `work` into `out` (every new engine has passed):
    note what a later export must remove, and unpublish `out`'s manifest if the move would change a
    file it lists. Return the files this export replaces.

    The old export stays published (and verifies) until the new manifest replaces it, unless a new
    file has the name of one it lists with other bytes (a re-export of other weights): only then is
    its manifest removed first, so that a half-rewritten folder never looks complete. The old
    manifest's files and the incoming ones are noted in `_PREVIOUS_FILE` first, so an export killed
    midway still leaves the next one the list of files to remove once it succeeds.
    """
    noted = out / _PREVIOUS_FILE
    incoming = _plain_names(names)
    previous = _listed_files(out)
    try:
        previous |= _plain_names(json.loads(noted.read_text(encoding="utf-8")))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError) as e:  # damaged: only some old engines stay behind
        log.warning("ignoring %s (%s)", noted, e)
    atomic_write_bytes(noted, json.dumps(sorted(previous | incoming)).encode())
    if _changes_listed_files(out, work, incoming):
        (out / MANIFEST_FILE).unlink(missing_ok=True)
    return previous | incoming


def _changes_listed_files(out: Path, work: Path, incoming: set[str]) -> bool:
    """Whether moving `incoming` from `work` into `out` changes a file `out`'s manifest lists (by
    the SHA-256 it records); True for a manifest that cannot be read."""
    from ..errors import BackendError
    from .manifest import file_sha256, read_manifest

    if not (out / MANIFEST_FILE).is_file():
        return False
    try:
        m = read_manifest(out)
    except BackendError:
        return True
    recorded: dict[object, object] = {e.file: e.sha256 for e in m.engines}
    recorded |= {e.external_data: e.external_data_sha256 for e in m.engines if e.external_data}
    spec = m.text_projection
    if spec:  # as verify_folder reads it: a bare name records no checksum
        recorded |= {spec.get("file"): spec.get("sha256")} if isinstance(spec, dict) else {spec: None}
    return any(recorded[n] != file_sha256(work / n) for n in sorted(incoming) if n in recorded)


def move_files(work: Path, out: Path, names: Sequence[str | None]) -> None:
    """Rename finished files into the export folder (weights data before the graph that needs it).

    Each file's data is flushed before its rename, and the folder after them: the manifest written
    next names these files with their checksums, so after a power loss they must be there, whole.
    """
    for name in reversed([n for n in names if n]):
        fsync_file(work / name)  # written by onnx / numpy into the work folder, not yet synced
        os.replace(work / name, out / name)  # same filesystem (the work folder is inside `out`)
    fsync_dir(out)


def finish_rewrite(out: Path, previous: set[str]) -> None:
    """Once the new manifest is written: remove the files of the export it replaced (`previous`,
    from `begin_rewrite`) that it does not list, and the notes earlier exports left."""
    current = _listed_files(out)
    for stale in sorted(previous - current):  # engines of an earlier export that this one replaced
        (out / stale).unlink(missing_ok=True)
    (out / _PREVIOUS_FILE).unlink(missing_ok=True)
    (out / PARITY_REPORT_FILE).unlink(missing_ok=True)  # an earlier failed export's: not about this one
