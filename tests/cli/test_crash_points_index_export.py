"""`clipengine index build` and `clipengine export` SIGKILLed at every rename they make, then rerun.

After each kill, whatever is at the output opens whole (an index with `Index.load`, an export with
`clipengine export --verify`) or is absent, and an existing output (a rebuild, a re-export) stays
the old one until the new one is complete; a rerun of the same command ends exactly as the
uninterrupted run did and leaves no temp file or stray folder. The runs kill themselves at a
chosen rename (`kill_at_rename`): exact crash points, every one of them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import kill_at_rename
import numpy as np
import pipeline_fakes as fakes
import pytest

from clipengine.cli.app import main
from clipengine.errors import ClipEngineError
from clipengine.index import Index
from clipengine.models.clip import CLIP

# Header fields that record when, not what: a rerun gives other values. A rerun after a kill past
# the commit rebuilds a complete index, so its generation (and the file names carrying it) moves on.
_TIMINGS = ("created", "updated", "export_seconds")
_GENERATION = ("generation", "files")


def _tree(folder: Path) -> list[str]:
    """Every path under `folder`, generation numbers masked (a list, so two generations show)."""
    return sorted(re.sub(r"-\d{6}\.", "-N.", str(p.relative_to(folder))) for p in folder.rglob("*"))


def _points(renames: int) -> list[str]:
    """Every crash point of a run making `renames` renames: before and after each."""
    return [p for n in range(1, renames + 1) for p in (str(n), f"{n}+")]


def _header(index: Path) -> dict[str, Any]:
    header = json.loads((index / "header.json").read_text())
    return {k: v for k, v in header.items() if k not in (*_TIMINGS, *_GENERATION)}


def _vectors(index: Index) -> np.ndarray:
    return np.asarray(index._faiss.reconstruct_n(0, len(index)))


def _loaded_ids(path: Path) -> list[str] | None:
    """The ids of the index at `path`, None if nothing is there; a torn index fails the test."""
    if not path.exists():
        return None
    return Index.load(path).ids


@pytest.mark.integration
def test_index_build_killed_anywhere_leaves_old_or_nothing_and_reruns_to_the_uninterrupted_result(
    tmp_path: Path, tiny_model: CLIP
) -> None:
    import torch

    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), checkpoint)
    images = tmp_path / "images"
    fakes.write_images(images, 12)
    old_images = tmp_path / "old-images"
    fakes.write_images(old_images, 5, prefix="old", seed=3)

    def from_images(root: Path) -> list[str]:
        return ["index", "build", str(images), "-o", str(root / "photos.index"), "--checkpoint",
                str(checkpoint), "--workers", "0"]  # fmt: skip

    embedded = tmp_path / "embedded"  # an embed folder, built once, outside every job's root

    def from_folder(root: Path) -> list[str]:
        return ["index", "build", str(embedded), "-o", str(root / "photos.index")]

    # The references (and the embed folder and the old index the other cases start from).
    assert main(["embed", str(images), "-o", str(embedded), "--checkpoint", str(checkpoint),
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    old = tmp_path / "old" / "photos.index"
    assert main(["index", "build", str(old_images), "-o", str(old), "--checkpoint", str(checkpoint),
                 "--workers", "0"]) == 0  # fmt: skip
    old_ids = Index.load(old).ids
    cases = {"images": from_images, "folder": from_folder, "rebuild": from_folder}
    # embed's 7 renames, then the first save: vectors, meta, header, the folder into place;
    # a rebuild saves a new generation in the folder: vectors, meta, header (the commit)
    renames = {"images": 7 + 4, "folder": 4, "rebuild": 3}
    jobs, where = [], []  # the uninterrupted runs first, then one job per crash point
    for name, argv in cases.items():
        for k, point in [("ref", "0"), *enumerate(_points(renames[name]))]:
            root = tmp_path / f"{k}-{name}"
            if name == "rebuild":
                shutil.copytree(old.parent, root)
            jobs.append({"root": str(root), "points": [point], "argv": argv(root)})
            where.append((name, point, root))
    results = kill_at_rename.run_jobs(jobs)
    refs = [r for (_, point, _), r in zip(where, results, strict=True) if point == "0"]
    assert refs == [[{"killed": False, "exit": 0, "renames": renames[name]}] for name in cases]

    for (name, point, root), result in zip(where, results, strict=True):
        if point == "0":
            continue
        moment = f"{name} killed at {point}"
        ref_root = tmp_path / f"ref-{name}"
        ref = Index.load(ref_root / "photos.index")
        assert result[0]["killed"], (moment, result)
        before = _loaded_ids(root / "photos.index")  # opens whole, or is not there
        assert before in ((old_ids, ref.ids) if name == "rebuild" else (None, ref.ids)), moment
        assert main(cases[name](root)) == 0, moment
        index = Index.load(root / "photos.index")
        assert index.ids == ref.ids, moment
        np.testing.assert_allclose(_vectors(index), _vectors(ref), rtol=0, atol=1e-6, err_msg=moment)
        assert _header(root / "photos.index") == _header(ref_root / "photos.index"), moment
        assert _tree(root) == _tree(ref_root), moment  # no temp file, work folder or old generation


def _verifies(out: Path) -> bool:
    try:
        return main(["export", "--verify", str(out)]) == 0
    except ClipEngineError:
        return False


def _manifest(out: Path) -> dict[str, Any]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {k: v for k, v in manifest.items() if k not in (*_TIMINGS, "tool_versions")}


# An export's renames: the note of the files it replaces, each engine moved in from the work
# folder (text, then image), the manifest (the commit; the replaced files go after it). Each
# export costs seconds, so one point per state a kill can leave, not all 8: "2" leaves what "1+"
# does (nothing happens between them), "3" what "2+" does, "3+" what "4" does but its temp file;
# a fresh export's states are a re-export's without the old files, so it keeps the two with temp
# files (a rerun sweeps them).
_EXPORT_RENAMES = 4
_EXPORT_CRASHES = {
    "fresh": ["1", "4"],  # the note's temp file; both engines in, the manifest's temp file
    "re": ["1+", "2+", "4", "4+"],  # the note; one engine in; both in; published, not cleaned up
}


@pytest.mark.integration
@pytest.mark.slow
def test_export_killed_anywhere_keeps_the_old_export_or_publishes_the_new_one(tmp_path: Path) -> None:
    def argv(root: Path) -> list[str]:
        return ["export", "tiny-synth", "-o", str(root / "export"), "--dynamic", "--no-verify"]

    # The export a re-export replaces: the same model with fp16 engines too (names the new one
    # lacks, removed once it is published) and the user's file (which every run leaves).
    old = tmp_path / "old"
    assert main(["export", "tiny-synth", "-o", str(old / "export"), "--dynamic", "--no-verify",
                 "--precision", "fp16,fp32"]) == 0  # fmt: skip
    (old / "export" / "notes.txt").write_text("mine")
    old_manifest = _manifest(old / "export")
    shutil.copytree(old, tmp_path / "ref-re")
    jobs, where = [], []
    for name, points in {"ref-fresh": ["0"], "ref-re": ["0"]}.items():
        jobs.append({"root": str(tmp_path / name), "points": points, "argv": argv(tmp_path / name)})
    for name, points in _EXPORT_CRASHES.items():
        for point in points:
            root = tmp_path / f"{name}-{point}"
            if name == "re":
                shutil.copytree(old, root)
            jobs.append({"root": str(root), "points": [point], "argv": argv(root)})
            where.append((name, point, root))
    results = kill_at_rename.run_jobs(jobs, timeout=600)
    assert results[:2] == [[{"killed": False, "exit": 0, "renames": _EXPORT_RENAMES}]] * 2

    for (name, point, root), result in zip(where, results[2:], strict=True):
        moment = f"{name} killed at {point}"
        out, ref = root / "export", tmp_path / f"ref-{name}" / "export"
        assert result[0]["killed"], (moment, result)
        if (out / "manifest.json").exists():  # the old export or the new one, whole
            assert _verifies(out), moment
            assert _manifest(out) in (old_manifest, _manifest(ref)), moment
        else:
            assert name == "fresh", f"{moment}: the old export is gone and the new one not published"
        assert main(argv(root)) == 0, moment
        assert _verifies(out) and _manifest(out) == _manifest(ref), moment
        # no temp file, work folder or replaced engine left; the user's file kept
        assert _tree(root) == _tree(tmp_path / f"ref-{name}"), moment


def test_a_rerun_export_sweeps_only_its_own_temp_files(tmp_path: Path) -> None:
    """The temp files of the note and manifests an export killed before their rename left go at
    the next export; another writer's temp file in the folder stays."""
    from clipengine.export import rewrite

    ours = [
        ".manifest.json.k01c83bc.tmp",
        "..previous-engines.json.whh20svt.tmp",
        ".parity_report.json.abcd1234.tmp",
    ]
    theirs = [".notes.txt.abcd1234.tmp", "notes.txt"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    rewrite.remove_stale_work(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def test_a_re_export_unpublishes_the_old_manifest_only_when_it_changes_a_listed_file(
    tmp_path: Path, tiny_model: CLIP
) -> None:
    """Moving in files the old manifest does not list, or lists with the same bytes, keeps it
    published (a kill before the new manifest leaves it valid); a listed file with other bytes
    takes it down first. The incoming files are noted for the next export to remove either way."""
    from clipengine.export import rewrite
    from clipengine.export.onnx import export_model
    from clipengine.export.verify import verify_folder

    out = tmp_path / "export"
    export_model(tiny_model, out, image_batches=None, text_batches=None, verify=False)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(out / "image_fp32_dyn.onnx", work)  # the same bytes under a listed name
    (work / "image_fp16_dyn.onnx").write_bytes(b"new")  # a name it does not list
    previous = rewrite.begin_rewrite(out, work, ["image_fp32_dyn.onnx", "image_fp16_dyn.onnx", None])
    assert verify_folder(out) == (2, [])
    assert previous == {"image_fp32_dyn.onnx", "text_fp32_dyn.onnx", "image_fp16_dyn.onnx"}
    assert set(json.loads((out / ".previous-engines.json").read_text())) == previous
    (work / "text_fp32_dyn.onnx").write_bytes(b"other weights")
    rewrite.begin_rewrite(out, work, ["text_fp32_dyn.onnx"])
    assert not (out / "manifest.json").exists()
