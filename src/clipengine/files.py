"""Files written atomically, with the permissions a plain open() gives: one helper for every writer.

A reader (a resumed run, a server, another process) never sees a half-written file: data goes to a
hidden temp file beside the target, is flushed to disk, then renamed over it (`os.replace`), and the
folder is flushed too (`fsync_dir`): a rename is a change to the folder, and until the folder reaches
the disk a power loss can undo it (fsync(2): syncing a file does not sync its directory entry).

Every temp file is named ``.<final name>.<random>.tmp`` (`is_temp_name`), so the writers that sweep
up after a killed process (embed resume, index saves) recognise them with one rule.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "check_writable_folder",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "is_temp_name",
    "normal_file_mode",
    "replace_durably",
    "temp_target",
    "umask",
]

_UMASK_STATUS = "/proc/self/status"  # Linux >= 4.7 shows the umask there ("Umask:\t0022")
# The suffix keeps the real extension out of the end of the name: a writer that picks a format by
# suffix (matplotlib) is told it; the leading dot hides the file from globs such as part-*.npy.
_TEMP_SUFFIX = ".tmp"
# What fsync of a folder fails with where the filesystem or OS does not do it (some network and
# FUSE filesystems): nothing to flush there, so nothing to report.
_NO_DIR_SYNC = (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES, errno.EPERM)
# The whole name, as mkstemp makes it: "." + final name + "." + 8 random [a-z0-9_] + ".tmp".
_TEMP_NAME = re.compile(r"\.(?P<final>.+)\.[a-z0-9_]{8}" + re.escape(_TEMP_SUFFIX))
# The names the embed shards (".tmp-<name>.<mkstemp random>") and the index files ("<name>.tmp-<8
# hex>") had before they moved onto atomic_path: a folder left by a killed run of an older clipengine.
_LEGACY_TEMP_NAMES = (
    re.compile(r"\.tmp-(?P<final>.+)\.[a-z0-9_]+"),
    re.compile(r"(?P<final>.+)\.tmp-[0-9a-f]{8}"),
)


def check_writable_folder(folder: str | Path) -> None:
    """Refuse an output folder that cannot be made or written, before the long work that fills it.

    The first write would find these only after a model load or a whole evaluation. The nearest
    existing folder on the path is checked: a file in the way, or no write permission (os.access:
    root passes it; the write itself still reports what the check cannot see).

    Raises:
        NotADirectoryError: a file where the folder (or one above it) would go.
        PermissionError: the nearest existing folder is not writable.
    """
    existing = Path(folder)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, "a file, not a folder: the output folder cannot go there", str(existing)
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, "not writable: the output folder cannot be made or filled", str(existing)
        )


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc).

    Setting it to 0 and back is process-wide: a file another thread creates in between would get
    0o666 / 0o777 permissions. So that trick is only the fallback, done at most once per process.
    """
    try:
        with open(_UMASK_STATUS, "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_by_setting()


@functools.lru_cache(maxsize=1)
def _umask_by_setting() -> int:
    """The umask by setting it and restoring it (racy with other threads; cached, so done once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_file_mode() -> int:
    """The mode `open(path, "w")` would give a new file (mkstemp's temp files are 0600)."""
    return 0o666 & ~umask()


@contextmanager
def atomic_path(final: str | Path, *, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success, flush it to disk and rename it over `final`.

    If the block raises, the temp file is removed and `final` is left as it was. `sync=False`
    skips the two fsyncs (about 10 ms a file on a VM disk) for many small files that can be made
    again: a killed process still leaves no torn file, but a power loss may lose the write.
    """
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_TEMP_SUFFIX, dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, normal_file_mode())
        if sync:
            fsync_file(tmp)  # the rename must not reach the disk before the data does
            replace_durably(tmp, final)
        else:
            os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to disk (before a rename publishes it)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries to disk, so renames and new files in it survive a power loss.

    Skipped quietly where folders cannot be opened (Windows, whose renames need no such step) or
    the filesystem refuses fsync on them.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_SYNC:
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file and folder under `folder` (and it), deepest first: before a folder assembled
    beside its final name is renamed into place, so the rename cannot outlive its content."""
    for parent, _dirs, names in os.walk(folder, topdown=False):
        for name in names:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(parent)


def replace_durably(src: str | Path, dst: str | Path) -> None:
    """`os.replace(src, dst)`, then flush the folder(s) holding the two names: only then is the
    rename itself on disk. Flush `src`'s data first (`fsync_file` / `fsync_tree`)."""
    os.replace(src, dst)
    dst_dir = os.path.dirname(os.path.abspath(dst))
    fsync_dir(dst_dir)
    src_dir = os.path.dirname(os.path.abspath(src))
    if src_dir != dst_dir:  # a move between folders changes both
        fsync_dir(src_dir)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`): the old file stays if anything fails."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def temp_target(name: str) -> str | None:
    """The name of the file that a temp file named `name` was to become, or None when `name` is not
    a name `atomic_path` gives its temp files (or an older clipengine gave).

    A sweep in a folder that may hold other files (an embed output can be ``.`` or the images' own
    folder) checks the target too, so it removes only the temp files of what it writes there.
    """
    for pattern in (_TEMP_NAME, *_LEGACY_TEMP_NAMES):
        match = pattern.fullmatch(name)
        if match:
            return match["final"]
    return None


def is_temp_name(name: str) -> bool:
    """Whether a file name is one `atomic_path` gives its temp files (or an older clipengine gave).

    For sweeping up what a killed writer left behind, in folders clipengine owns (an index folder);
    another writer's temp file matches too, so a folder that may hold other files needs
    `temp_target`.
    """
    return temp_target(name) is not None
