"""Index folder on disk: atomic saves, and clear errors for missing or corrupted files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from clipengine.errors import IndexFileError
from clipengine.files import is_temp_name
from clipengine.index import Index, store


@pytest.fixture
def saved(tmp_path: Path, ids: list[str], vectors: np.ndarray) -> Path:
    return Index.build(ids[:100], vectors[:100], model="fake").save(tmp_path / "photos.index")


def _header(path: Path) -> dict:
    return json.loads((path / store.HEADER_NAME).read_text())


def test_layout_is_header_plus_one_generation_of_files(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == [
        "header.json",
        "meta-000001.jsonl",
        "vectors-000001.faiss",
    ]
    index = Index.load(saved)
    index.add(["new"], np.ones((1, 32)))
    index.save(saved)
    assert sorted(p.name for p in saved.iterdir()) == [
        "header.json",
        "meta-000002.jsonl",
        "vectors-000002.faiss",
    ]
    assert _header(saved)["count"] == 101


def test_saves_are_durable_data_before_header_and_renames_synced(
    tmp_path: Path, ids: list[str], vectors: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power loss keeps the old generation or the new one: the data files are on disk (content
    and names) before the header that names them, and each rename's folder is fsynced after it."""
    import sync_log

    log = sync_log.record(monkeypatch)
    root = Index.build(ids[:10], vectors[:10], model="fake").save(tmp_path / "p.index")
    log.assert_rename_durable(root)  # a first save: the folder rename is the commit
    first = log.renames_to(root)[-1]
    for p in (root / "header.json", root / "vectors-000001.faiss", root / "meta-000001.jsonl", root):
        assert log.synced_before(first, p), p

    index = Index.load(root)
    index.add(["new"], np.ones((1, 32)))
    index.save(root)
    log.assert_rename_durable(root / "header.json")
    commit = log.renames_to(root / "header.json")[-1]
    for name in ("vectors-000002.faiss", "meta-000002.jsonl"):
        log.assert_rename_durable(root / name)
        assert log.renames_to(root / name)[-1] < commit and log.synced_before(commit, root / name)


def _crash_on_header(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == store.HEADER_NAME:
            raise OSError("simulated crash before the header commit")
        real(src, dst)

    monkeypatch.setattr(store.os, "replace", replace)


def test_crash_during_update_leaves_previous_index_intact(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = Index.load(saved)
    index.add(["new"], np.ones((1, 32)))
    _crash_on_header(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        index.save(saved)
    monkeypatch.undo()
    again = Index.load(saved)
    assert len(again) == 100 and "new" not in again
    index.save(saved)  # the next save succeeds and sweeps the orphaned generation-2 files
    assert len(Index.load(saved)) == 101
    assert not [p for p in saved.iterdir() if is_temp_name(p.name) or p.name.endswith("000001.faiss")]


def test_crash_during_first_save_leaves_nothing_under_the_name(
    tmp_path: Path, ids: list[str], vectors: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    _crash_on_header(monkeypatch)
    with pytest.raises(OSError):
        Index.build(ids, vectors, model="fake").save(tmp_path / "new.index")
    assert list(tmp_path.iterdir()) == []


_KILLED_FIRST_SAVE = """
import os, signal, sys
import numpy as np
from clipengine.index import Index, store

real = store._write_atomic

def killed(path, write):  # SIGKILL just before the header, the commit point, is written
    if path.name == store.HEADER_NAME:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, write)

store._write_atomic = killed
Index.build(["a", "b"], np.eye(2, 32), model="fake").save(sys.argv[1])
"""


def test_first_save_killed_leaves_a_work_folder_the_next_save_removes(
    tmp_path: Path, ids: list[str], vectors: np.ndarray
) -> None:
    import signal
    import subprocess
    import sys

    (tmp_path / ".notes.txt.abcd1234.tmp").write_text("another program's temp file")
    killed = subprocess.run([sys.executable, "-c", _KILLED_FIRST_SAVE, str(tmp_path / "new.index")], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] != []  # the killed save's work folder
    Index.build(ids, vectors, model="fake").save(tmp_path / "new.index")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.abcd1234.tmp", "new.index"]
    assert len(Index.load(tmp_path / "new.index")) == len(ids)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "meta-000001.jsonl").unlink(), "meta file meta-000001.jsonl is missing"),
        (lambda p: (p / "vectors-000001.faiss").unlink(), "vectors file vectors-000001.faiss is missing"),
        (lambda p: (p / "header.json").unlink(), "not a clipengine index"),
        (lambda p: (p / "header.json").write_text("{not json"), "header.json is unreadable"),
        (
            lambda p: (p / "vectors-000001.faiss").write_bytes(
                (p / "vectors-000001.faiss").read_bytes()[:-100]
            ),
            "truncated or modified",
        ),
        (
            lambda p: (p / "meta-000001.jsonl").write_text(
                (p / "meta-000001.jsonl").read_text().replace('{"id"', '{"ix"', 1)
            ),
            "metadata row without an 'id'",
        ),
        (
            lambda p: (p / "meta-000001.jsonl").write_bytes(
                b"\xff" + (p / "meta-000001.jsonl").read_bytes()[1:]
            ),
            "meta-000001.jsonl is not UTF-8",
        ),
    ],
    ids=[
        "meta-missing",
        "vectors-missing",
        "header-missing",
        "header-corrupt",
        "vectors-truncated",
        "meta-bad",
        "meta-not-utf8",
    ],
)
def test_damaged_index_gives_a_clear_error(saved: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    damage(saved)
    with pytest.raises(IndexFileError, match=message):
        Index.load(saved)


def test_garbage_vectors_file_of_right_size_is_reported(saved: Path) -> None:
    f = saved / "vectors-000001.faiss"
    f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.raises(IndexFileError, match=r"vectors-000001\.faiss does not match the sha256"):
        Index.load(saved)
    header = _header(saved)
    del header["sha256"]  # an index saved before checksums: faiss itself refuses the file
    (saved / store.HEADER_NAME).write_text(json.dumps(header))
    with pytest.raises(IndexFileError, match="not a readable faiss index"):
        Index.load(saved)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_byte_changed_in_place_is_caught_before_faiss_reads_the_file(
    tmp_path: Path, vectors: np.ndarray, kind: str
) -> None:
    # One flipped byte, same size: a changed vector was searched (wrong results, no error); in an
    # HNSW size field (byte 37 of a 3000-vector index, not flipped here) it made faiss allocate
    # 16 GB and run 40 s before its read error.
    root = Index.build([str(i) for i in range(len(vectors))], vectors, model="fake", kind=kind).save(
        tmp_path / "p.index"
    )
    f = next(root.glob("vectors-*.faiss"))
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match=f"{f.name} does not match the sha256 its header records"):
        Index.load(root)


def test_an_id_changed_in_place_is_caught(saved: Path) -> None:
    f = saved / "meta-000001.jsonl"
    f.write_text(f.read_text().replace("img/0000.jpg", "img/9999.jpg", 1))
    with pytest.raises(IndexFileError, match=r"meta-000001\.jsonl does not match the sha256"):
        Index.load(saved)


def test_missing_index_and_foreign_folder(tmp_path: Path, vectors: np.ndarray) -> None:
    with pytest.raises(IndexFileError, match=r"no index at .*clipengine index build"):
        Index.load(tmp_path / "nope.index")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("x")
    with pytest.raises(IndexFileError, match="refusing to write"):
        Index.build(["a"], vectors[:1], model="fake").save(tmp_path / "docs")
    (tmp_path / "file.index").write_text("x")
    with pytest.raises(IndexFileError, match="not an index folder"):
        Index.build(["a"], vectors[:1], model="fake").save(tmp_path / "file.index")


def test_load_racing_a_save_reads_the_new_generation(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = store.read_meta
    calls: list[int] = []

    def read_meta_while_another_process_saves(root: Path, header: dict) -> list[dict]:
        if not calls:  # first attempt: a writer commits generation 2 and sweeps generation 1 meanwhile
            calls.append(1)
            grown = Index.build([f"n{i}" for i in range(3)], np.eye(3, 32), model="fake")
            grown.save(saved)
        return real(root, header)

    monkeypatch.setattr(store, "read_meta", read_meta_while_another_process_saves)
    index = Index.load(saved)
    assert len(index) == 3 and calls == [1]


def test_a_save_over_a_generation_saved_since_the_load_is_refused(saved: Path) -> None:
    # Two `index add` at once: both loaded generation 1 and both wrote generation 2 under the same
    # names; the index came out unreadable ("holds 101000 vectors, header says 100999"), or with one
    # add's vectors under the other's ids. Now the later save is refused and loses nothing.
    first, second = Index.load(saved), Index.load(saved)
    first.add(["a"], np.ones((1, 32)))
    first.save(saved)
    second.add(["b"], -np.ones((1, 32)))
    with pytest.raises(IndexFileError, match="saved by another process since it was loaded"):
        second.save(saved)
    again = Index.load(saved)
    assert len(again) == 101 and "a" in again and "b" not in again
    first.add(["c"], np.eye(1, 32))  # the index that saved last saves again
    first.save(saved)
    Index.build(["d"], np.eye(1, 32), model="fake").save(saved)  # a new index replaces it, as before
    assert Index.load(saved).ids == ["d"]


def test_a_save_waits_while_another_writer_holds_the_folder(saved: Path) -> None:
    import threading

    fcntl = pytest.importorskip("fcntl")  # folders are locked where the OS has flock
    index = Index.load(saved)
    index.add(["new"], np.ones((1, 32)))
    fd = os.open(saved, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer in the middle of its save
    try:
        saving = threading.Thread(target=index.save, args=(saved,))
        saving.start()
        saving.join(0.5)
        assert saving.is_alive() and store.peek_generation(saved) == 1
    finally:
        os.close(fd)
    saving.join(30)
    assert not saving.is_alive() and len(Index.load(saved)) == 101


def test_ids_and_roots_that_are_not_utf8_round_trip(tmp_path: Path, vectors: np.ndarray) -> None:
    ids = ["bad\udcff.jpg", "caf\u00e9 \u2028\n.jpg"]  # os.fsdecode of a Latin-1 name; odd but valid UTF-8
    roots = [str(tmp_path / "ph\udce9otos")]
    path = Index.build(ids, vectors[:2], model="fake", image_roots=roots).save(tmp_path / "p.index")
    loaded = Index.load(path)
    assert loaded.ids == ids and loaded.image_roots == roots


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"version": "x"}, "version 'x' is not a number"),
        ({"dim": "512"}, r"malformed dim field"),
        ({"count": -1}, r"malformed count field"),
        ({"files": ["vectors"]}, r"malformed files field"),
        ({"files": {"vectors": "../../elsewhere.faiss", "meta": "m"}}, r"malformed files field"),
        ({"sizes": {"vectors": "big"}}, r"malformed sizes field"),
    ],
)
def test_a_hand_edited_header_is_one_clear_error(saved: Path, edit: dict, message: str) -> None:
    header = _header(saved)
    (saved / store.HEADER_NAME).write_text(json.dumps({**header, **edit}))
    with pytest.raises(IndexFileError, match=message):
        Index.load(saved)
