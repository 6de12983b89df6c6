"""Record renames and fsyncs, in order, to check that a rename is followed by an fsync of its folder.

`record(monkeypatch)` wraps os.replace, os.rename and os.fsync (pathlib and shutil.move call them);
each fsync is recorded by the (device, inode) of what its descriptor is open on, so a folder is
recognised by identity, not by a path that /proc would be needed to read back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SyncLog", "record"]


def _identity(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@dataclass
class SyncLog:
    """Events as ("rename", dst path) and ("fsync", (dev, inode)), in the order they happened."""

    events: list[tuple[str, Any]] = field(default_factory=list)

    def renames_to(self, dst: Path) -> list[int]:
        return [k for k, (kind, what) in enumerate(self.events) if kind == "rename" and Path(what) == dst]

    def synced_after(self, k: int, path: Path) -> bool:
        """Whether `path` (a file or a folder) was fsynced after event `k`."""
        ident = _identity(path)
        return any(kind == "fsync" and what == ident for kind, what in self.events[k + 1 :])

    def synced_before(self, k: int, path: Path) -> bool:
        """Whether `path` was fsynced before event `k`: identity as of now (renames keep inodes)."""
        ident = _identity(path)
        return any(kind == "fsync" and what == ident for kind, what in self.events[:k])

    def assert_rename_durable(self, dst: Path) -> None:
        """`dst` was renamed into place, and its folder fsynced after the (last) rename."""
        dst = Path(dst)
        renames = self.renames_to(dst)
        assert renames, f"nothing was renamed to {dst}"
        assert self.synced_after(renames[-1], dst.parent), (
            f"{dst.parent} not fsynced after the rename to {dst.name}"
        )


def record(monkeypatch: Any) -> SyncLog:
    log = SyncLog()
    real_replace, real_rename, real_fsync = os.replace, os.rename, os.fsync

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_replace(src, dst, *args, **kwargs)
        log.events.append(("rename", os.path.abspath(dst)))

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_rename(src, dst, *args, **kwargs)
        log.events.append(("rename", os.path.abspath(dst)))

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        log.events.append(("fsync", (st.st_dev, st.st_ino)))
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "fsync", fsync)
    return log
