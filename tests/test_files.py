"""clipengine.files: atomic writes with plain-open permissions, and the umask read without a race."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clipengine import files
from clipengine.files import atomic_path


def test_atomic_path_keeps_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o044  # readable by others like any normal file, not mkstemp's 0600


def test_atomic_path_gives_plain_open_permissions_without_touching_the_umask(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The umask is read, not set to 0 and back: that is process-wide, so a file another thread
    creates in between would get 0o666 / 0o777 permissions."""
    def modes(name: str) -> tuple[int, int]:
        with open(tmp_path / f"{name}.plain", "w") as f:
            f.write("x")
        with atomic_path(tmp_path / f"{name}.atomic") as tmp:
            tmp.write_text("x")
        return ((tmp_path / f"{name}.plain").stat().st_mode & 0o777, (tmp_path / f"{name}.atomic").stat().st_mode & 0o777)

    plain, atomic = modes("default")
    assert atomic == plain
    old = os.umask(0o027)
    try:
        plain, atomic = modes("strict")
    finally:
        os.umask(old)
    assert atomic == plain == 0o640

    if not os.access("/proc/self/status", os.R_OK):
        pytest.skip("no /proc/self/status here: the set-and-restore fallback is used (once)")

    def no_umask(mask: int) -> int:
        raise AssertionError("os.umask called: it changes the umask of every thread")

    real = os.umask(0o022)
    os.umask(real)
    monkeypatch.setattr(os, "umask", no_umask)
    plain, atomic = modes("read")
    assert atomic == plain
    assert files.umask() == real


def test_umask_fallback_sets_and_restores_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Without /proc/self/status the umask is read by setting it and back, at most once per process."""
    real = os.umask(0o022)
    os.umask(real)
    calls = []
    original = os.umask

    def counted(mask: int) -> int:
        calls.append(mask)
        return original(mask)

    monkeypatch.setattr(files, "_UMASK_STATUS", "/nonexistent/status")
    monkeypatch.setattr(os, "umask", counted)
    files._umask_by_setting.cache_clear()
    try:
        assert files.umask() == real
        assert files.umask() == real
    finally:
        files._umask_by_setting.cache_clear()
    assert calls == [0, real]  # one set-and-restore, then cached


def test_embed_outputs_get_plain_open_permissions(tmp_path: Path) -> None:
    """Shards, run.json and failure lists are read by other processes (an index build, a server
    under another account): not mkstemp's 0600."""
    from clipengine.pipeline.sinks import atomic_write_bytes, atomic_write_json

    with open(tmp_path / "plain", "w") as f:
        f.write("x")
    atomic_write_bytes(tmp_path / "a.npy", b"x")
    atomic_write_json(tmp_path / "run.json", {})
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.npy", "run.json")] == [plain, plain]
