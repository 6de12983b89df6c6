"""export.rewrite: files move from the work folder into the export folder durably."""

from __future__ import annotations

from pathlib import Path

import pytest
import sync_log

from clipengine.export import rewrite


def test_moved_files_are_synced_before_their_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest written next names the moved files (with checksums): after a power loss they
    must be in the folder, whole, not renamed entries over unwritten data."""
    out = tmp_path / "export"
    work = out / f"{rewrite.WORK_PREFIX}abcd1234"
    work.mkdir(parents=True)
    (work / "image_fp32.onnx").write_bytes(b"graph")
    (work / "image_fp32.onnx.data").write_bytes(b"weights")
    log = sync_log.record(monkeypatch)
    rewrite.move_files(work, out, ["image_fp32.onnx", "image_fp32.onnx.data", None])
    assert sorted(p.name for p in out.iterdir()) == [work.name, "image_fp32.onnx", "image_fp32.onnx.data"]
    for name in ("image_fp32.onnx", "image_fp32.onnx.data"):
        log.assert_rename_durable(out / name)
        assert log.synced_before(log.renames_to(out / name)[-1], out / name)
    # weights data first: a graph is never in the folder without the data it loads
    assert log.renames_to(out / "image_fp32.onnx.data")[-1] < log.renames_to(out / "image_fp32.onnx")[-1]
