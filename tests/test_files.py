"""clipengine.files: atomic writes with plain-open permissions, and the umask read without a race."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clipengine import files
from clipengine.files import atomic_path, atomic_write_bytes, is_temp_name


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


def _fail_fsync(monkeypatch: pytest.MonkeyPatch, name_part: str) -> None:
    """Make the fsync of a temp file whose name holds `name_part` fail: its data is written by then,
    the rename not yet done (a full disk or an I/O error in the middle of a write)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError("simulated I/O error while writing")
        real(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd to tell which file is being synced")
    monkeypatch.setattr(os, "fsync", fsync)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_write_bytes_keeps_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"old")
    _fail_fsync(monkeypatch, "data.bin")
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_temp_names_are_recognised_by_one_rule(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "part-00000.npy") as tmp:
        assert tmp.parent == tmp_path and is_temp_name(tmp.name) and tmp.name.startswith(".")
        tmp.write_bytes(b"x")
    assert not is_temp_name("part-00000.npy") and not is_temp_name("header.json")
    assert not is_temp_name("meta-000001.jsonl") and not is_temp_name("notes.tmp")  # not hidden
    # what the embed shards and index files were named before they moved onto atomic_path
    assert is_temp_name(".tmp-part-00003.npy.abc") and is_temp_name("header.json.tmp-1a2b3c4d")


def test_failed_shard_write_leaves_the_old_shard_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from clipengine.pipeline.sinks import RUN_FILE, ShardSink, atomic_write_json
    from clipengine.types import Failure

    sink = ShardSink(tmp_path, dtype="float32")
    sink.write(0, ["a", "b"], np.eye(2, 4, dtype=np.float32), [(1, 1), (2, 2)], [Failure("c", "bad")])
    atomic_write_json(tmp_path / RUN_FILE, {"status": "complete"})
    before = _snapshot(tmp_path)

    _fail_fsync(monkeypatch, "part-00000.npy")  # the failure list is rewritten by then, the rows not
    with pytest.raises(OSError, match="simulated"):
        sink.write(0, ["a", "b", "c"], np.ones((3, 4), dtype=np.float32), [(1, 1)] * 3, [])
    monkeypatch.undo()
    _fail_fsync(monkeypatch, RUN_FILE)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_json(tmp_path / RUN_FILE, {"status": "running"})

    after = _snapshot(tmp_path)
    assert after["shards/part-00000.npy"] == before["shards/part-00000.npy"]
    assert after["shards/part-00000.jsonl"] == before["shards/part-00000.jsonl"]
    assert after[RUN_FILE] == before[RUN_FILE]
    assert set(after) == set(before)  # no temp file anywhere
    assert not any(is_temp_name(Path(name).name) for name in after)


def test_failed_index_write_leaves_the_old_index_and_no_temp_file(tmp_path: Path) -> None:
    import numpy as np

    from clipengine.index import Index, store

    vectors = np.eye(3, 8, dtype=np.float32)
    root = Index.build(["a", "b", "c"], vectors, model="fake").save(tmp_path / "p.index")
    before = _snapshot(root)

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half a faiss file")
        raise OSError("simulated I/O error while writing")

    header = {"model": "fake", "dim": 8, "count": 0, "params": {"kind": "flat"}}
    with pytest.raises(OSError, match="simulated"):
        store.write_generation(root, header, half_then_fail, iter([]))
    assert _snapshot(root) == before
    assert Index.load(root).ids == ["a", "b", "c"]

    fresh = tmp_path / "fresh.index"  # a first save assembles the index in a sibling temp folder
    with pytest.raises(OSError, match="simulated"):
        store.write_generation(fresh, header, half_then_fail, iter([]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.index"]


def test_leftover_temp_files_of_a_killed_writer_are_swept(tmp_path: Path) -> None:
    """A SIGKILL between mkstemp and os.replace leaves the temp file: the embed resume and the next
    index save remove it, recognising atomic_path's names."""
    import numpy as np

    from clipengine.index import Index
    from clipengine.pipeline.sinks import ShardSink

    def leftover(final: Path) -> Path:
        with pytest.raises(KeyboardInterrupt), atomic_path(final) as tmp:
            name = tmp.name
            raise KeyboardInterrupt
        (final.parent / name).write_bytes(b"half")  # what a killed process would have left
        return final.parent / name

    (tmp_path / "out" / "shards").mkdir(parents=True)
    left = [leftover(tmp_path / "out" / "shards" / "part-00000.npy"), leftover(tmp_path / "out" / "run.json")]
    assert ShardSink(tmp_path / "out").clean_temp_files() == 2
    assert not any(p.exists() for p in left)

    index = Index.build(["a", "b"], np.eye(2, 8, dtype=np.float32), model="fake")
    root = index.save(tmp_path / "p.index")
    left = [leftover(root / "header.json"), leftover(root / "vectors-000002.faiss")]
    index.save(root)
    assert not any(p.exists() for p in left)
    assert sorted(p.name for p in root.iterdir()) == ["header.json", "meta-000002.jsonl", "vectors-000002.faiss"]


def test_atomic_path_syncs_the_data_then_the_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync of the file orders data before the rename; only an fsync of the folder after the
    rename makes the rename itself survive a power loss."""
    import sync_log

    log = sync_log.record(monkeypatch)
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"new")
    log.assert_rename_durable(target)
    rename = log.renames_to(target)[-1]
    assert log.synced_before(rename, target)  # the data (same inode after the rename)
    assert not log.synced_before(rename, tmp_path)  # a folder fsync before the rename does not count


def test_fsync_dir_is_skipped_where_folders_cannot_be_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    real_fsync, real_open = os.fsync, os.open

    def refused(fd: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refused)  # a filesystem that refuses fsync on a folder
    files.fsync_dir(tmp_path)

    def io_error(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", io_error)  # a real failure is not hidden
    with pytest.raises(OSError, match="Input/output"):
        files.fsync_dir(tmp_path)
    monkeypatch.setattr(os, "fsync", real_fsync)

    def no_dir_open(path: object, flags: int, *args: object) -> int:
        if os.path.isdir(str(path)):
            raise PermissionError(errno.EACCES, "Permission denied")  # Windows opening a folder
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_dir_open)
    files.fsync_dir(tmp_path)
    atomic_write_bytes(tmp_path / "x", b"x")  # the write goes on without the folder sync
    assert (tmp_path / "x").read_bytes() == b"x"


def test_fsync_tree_syncs_every_file_and_folder_before_a_folder_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sync_log

    work = tmp_path / ".work"
    (work / "sub").mkdir(parents=True)
    (work / "a").write_text("a")
    (work / "sub" / "b").write_text("b")
    log = sync_log.record(monkeypatch)
    files.fsync_tree(work)
    files.replace_durably(work, tmp_path / "final")
    final = tmp_path / "final"
    rename = log.renames_to(final)[-1]
    for p in (final / "a", final / "sub" / "b", final / "sub", final):
        assert log.synced_before(rename, p), p
    log.assert_rename_durable(final)


def test_atomic_path_without_sync_is_still_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sync=False (regenerable files): no fsync, but the same temp-then-rename, nothing left over."""
    import sync_log

    log = sync_log.record(monkeypatch)
    target = tmp_path / "img.png"
    with pytest.raises(RuntimeError), atomic_path(target, sync=False) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    with atomic_path(target, sync=False) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and os.listdir(tmp_path) == ["img.png"]
    assert log.renames_to(target) and not [e for e in log.events if e[0] == "fsync"]
