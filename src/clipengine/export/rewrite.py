"""How an export rewrites its folder in place: stage files in a work folder under names that change
no file the folder holds (`Placement`: a re-export whose engine has other bytes gives it another
name), and only once every engine passed its parity check move the new files in, publish the new
manifest (the commit: the old export stays published and whole until then), and drop the replaced
export's files (a failed export leaves the old one as it was).

Separate from `export.onnx` (which builds and verifies the engines) because this is the part that
keeps a folder safe to read while it changes and clean after a killed or failed export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from ..files import atomic_write_bytes, fsync_dir, fsync_file, temp_target
from .manifest import MANIFEST_FILE, PREVIOUS_FILE, WORK_PREFIX, file_sha256

__all__ = [
    "PARITY_REPORT_FILE",
    "WORK_PREFIX",
    "Placement",
    "Role",
    "begin_rewrite",
    "finish_rewrite",
    "move_files",
    "remove_stale_work",
]

log = logging.getLogger(__name__)

# WORK_PREFIX: the work folder inside the export folder (same filesystem: renames)
_WORK_DIR = re.compile(re.escape(WORK_PREFIX) + r"[a-z0-9_]{8}")  # as tempfile names it
PARITY_REPORT_FILE = "parity_report.json"  # a failed export's manifest, under another name
# PREVIOUS_FILE: the files of the export being replaced, until it is
_OWN_FILES = (MANIFEST_FILE, PARITY_REPORT_FILE, PREVIOUS_FILE)  # written here through atomic temp files


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


# What a new file stands for, to find the name the published export gives the same thing: an
# engine's (tower, precision, batch), or "text_projection".
Role: TypeAlias = "tuple[str, str, int | None] | str"


class Placement:
    """Names for an export's finished files under which moving them into `out` changes no file there.

    Each file (an engine with its external data, or the split projection) takes the first of these
    names that is free in `out` (no file there, or one with the same bytes): the name the published
    manifest gives the same engine, its own name (`image_fp32_dyn.onnx`), then that name tagged with
    its content (`image_fp32_dyn.3f2a9c1b.onnx`). So a re-export whose engine has other bytes never
    overwrites one the published manifest lists: the old export stays whole until the new manifest
    replaces it, and its files go after that (`finish_rewrite`). Same bytes keep the same name, so a
    rerun after a kill ends as the run that was not killed.
    """

    def __init__(self, out: Path) -> None:
        self._out = out
        self._listed = _listed_roles(out)
        self._taken: set[str] = set()  # names given to this export's other files

    def place(self, work: Path, name: str, data: str | None, role: Role) -> tuple[str, str | None]:
        """Rename `work/name` (and its external data file `data`, the graph then pointing at the new
        name) to the name it will have in `out`; return (file, external data file or None)."""
        shas = [file_sha256(work / n) for n in (name, data) if n]
        tag = hashlib.sha256("".join(shas).encode()).hexdigest() if data else shas[0]
        stem, dot, suffix = name.partition(".")
        listed = self._listed.get(role, "")
        ours = re.fullmatch(re.escape(stem) + r"(\.[0-9a-f]{8,64})?" + re.escape(dot + suffix), listed)
        candidates = [listed] if ours else []  # a name another engine could have is not taken from a manifest
        candidates += [name, f"{stem}.{tag[:8]}{dot}{suffix}", f"{stem}.{tag}{dot}{suffix}"]
        file, extra = name, data
        for candidate in dict.fromkeys(candidates):
            new_extra = f"{candidate}.data" if data else None
            if candidate != file:
                if any(n in self._taken or (work / n).exists() for n in (candidate, new_extra) if n):
                    continue  # another file's name in this export
                _rename_engine(work, file, extra, candidate, new_extra)
                file, extra = candidate, new_extra
            if all(self._free(work, n) for n in (file, extra) if n):
                break
        # None free (a damaged folder; a tag collision): the last one, and begin_rewrite then
        # unpublishes the old manifest before the move.
        self._taken.update(n for n in (file, extra) if n)
        return file, extra

    def _free(self, work: Path, name: str) -> bool:
        """Whether moving `work/name` into the folder leaves every file there as it was."""
        there = self._out / name
        if not there.exists():
            return True
        return (
            there.is_file()
            and there.stat().st_size == (work / name).stat().st_size
            and file_sha256(there) == file_sha256(work / name)
        )


def _listed_roles(folder: Path) -> dict[Role, str]:
    """What each file the published manifest in `folder` lists stands for (none if unreadable)."""
    from ..errors import BackendError
    from .manifest import read_manifest

    if not (folder / MANIFEST_FILE).is_file():
        return {}
    try:
        m = read_manifest(folder)
    except BackendError:
        return {}
    roles: dict[Role, str] = {(e.tower, e.precision, e.batch): e.file for e in m.engines}
    if isinstance(m.text_projection, dict):
        roles["text_projection"] = m.text_projection.get("file")  # type: ignore[assignment]
    return {role: n for role, n in roles.items() if n in _plain_names([n])}


def _rename_engine(work: Path, name: str, data: str | None, new: str, new_data: str | None) -> None:
    """Rename a file in `work`; an ONNX graph with external data is re-saved pointing at its
    renamed data file (only the location strings change: the weights stay in that file)."""
    if data is None or new_data is None:
        os.replace(work / name, work / new)
        return
    import onnx

    os.replace(work / data, work / new_data)
    graph = onnx.load(str(work / name), load_external_data=False)
    for tensor in _tensors(graph.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == data:
                entry.value = new_data
    (work / new).write_bytes(graph.SerializeToString())
    (work / name).unlink()


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX graph: initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else []:
                yield from _tensors(sub)
            for sub in attr.graphs:
                yield from _tensors(sub)


def begin_rewrite(out: Path, work: Path, names: Sequence[str | None]) -> set[str]:
    """Before the finished files `names` move from `work` into `out` (every new engine has passed):
    note what a later export must remove, and unpublish `out`'s manifest if the move would change a
    file it lists. Return the files this export replaces.

    The old export stays published (and verifies) until the new manifest replaces it: `Placement`
    named the new files so that none has the name of a listed one with other bytes. Should one
    still (the folder changed during the export; a damaged manifest), its manifest is removed
    first, so that a half-rewritten folder never looks complete. The old manifest's files and the
    incoming ones are noted in `PREVIOUS_FILE` first, so an export killed midway still leaves the
    next one the list of files to remove once it succeeds.
    """
    noted = out / PREVIOUS_FILE
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
    from .manifest import read_manifest

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
    (out / PREVIOUS_FILE).unlink(missing_ok=True)
    (out / PARITY_REPORT_FILE).unlink(missing_ok=True)  # an earlier failed export's: not about this one
