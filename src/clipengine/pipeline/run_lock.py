"""One run at a time per output folder: an exclusive flock on ``OUT/.clipengine.lock`` while a run writes.

Two runs into one folder (a command started twice, two shells, a local run beside a Ray one) both
passed the resume check, which reads run.json, before either had written it, or before either had
loaded its model (run.json learns the embedding size and precision then). They then wrote each
other's shards: the folder held 16-d and 32-d shards (or fp32 and int8 ones, silently) under one
run.json, both runs reported success, and a run could also crash renaming a temp file that the
other's start-up sweep had deleted. The second run is now refused at once (`OutputBusyError`).

The OS releases a flock when its process dies, so a killed run never blocks the resume. The lock
file is never deleted: removing it while another process waits to lock it would let two processes
hold locks on two different files. It holds the holder's pid (and host), for the message, while
held; it is hidden (a leading dot) and matches no shard or temp-file name.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputBusyError

__all__ = ["LOCK_FILE", "exclusive_output"]

_log = logging.getLogger(__name__)

LOCK_FILE = ".clipengine.lock"

# Folders this process holds, by real path -> (holding thread, nesting depth). The CLI takes the
# lock before its model load and `embed_folder` takes it again inside: a flock taken twice by one
# process through two descriptors conflicts with itself. Another thread asking is refused, as
# another process is.
_held: dict[str, tuple[int, int]] = {}
_held_guard = threading.Lock()


@contextmanager
def exclusive_output(out_dir: str | Path) -> Iterator[None]:
    """Hold the output folder `out_dir` (created if missing) for one run, or refuse at once.

    Re-entrant within a thread. Where the OS or file system has no flock (Windows, some network
    mounts) runs are not kept apart, as before.

    Raises:
        OutputBusyError: another process (or another thread of this one) holds the folder.
        OSError: the folder or its lock file cannot be made.
    """
    key = os.path.realpath(out_dir)
    me = threading.get_ident()
    with _held_guard:
        owner, depth = _held.get(key, (me, 0))
        if owner != me:
            raise _busy(out_dir, f"pid {os.getpid()}, another thread")
        fd = _lock(Path(out_dir)) if depth == 0 else None
        _held[key] = (me, depth + 1)
    try:
        yield
    finally:
        with _held_guard:
            owner, depth = _held.pop(key)
            if depth > 1:
                _held[key] = (owner, depth - 1)
            elif fd is not None:
                _release(fd)


def _lock(out_dir: Path) -> int | None:
    """An open descriptor of the folder's lock file holding flock(LOCK_EX), with this process's pid
    written in it; None where the OS or file system cannot lock."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise _busy(out_dir, holder) from None
    except OSError as e:  # a file system without flock (some NFS mounts): go on unlocked
        os.close(fd)
        _log.debug("cannot lock %s (%s): concurrent runs into it are not kept apart", out_dir, e)
        return None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as e:  # the lock holds all the same; only the message loses the pid
        _log.debug("could not record the pid in %s: %s", out_dir / LOCK_FILE, e)
    return fd


def _release(fd: int) -> None:
    """Empty the lock file (no stale pid for the next refusal to name), then unlock by closing."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)


def _read_holder(fd: int) -> str | None:
    """"pid N" (and the host when not this one) from a held lock file; None before its holder has
    written it."""
    try:
        pid, _, host = os.pread(fd, 256, 0).decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        return None
    if not pid.isdigit():
        return None
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _busy(out_dir: str | Path, holder: str | None) -> OutputBusyError:
    return OutputBusyError(
        f"{out_dir} is being written by another clipengine run ({holder or 'pid unknown'}); wait for it "
        "to finish (a rerun then resumes it), or use another output folder"
    )
