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


# An export's renames: each new engine given another name in the work folder (only where the
# published export has a file of that name with other bytes: here the "other" case's two), the
# note of the files it replaces, each engine moved in from the work folder (text, then image), the
# manifest (the commit; the replaced files go after it). Each export costs seconds, so one point per
# state a kill can leave, not all of them: "2" leaves what "1+" does (nothing happens between
# them), "3" what "2+" does, "3+" what "4" does but its temp file; a fresh export's states are a
# re-export's without the old files, so it keeps the two with temp files (a rerun sweeps them).
_EXPORT_RENAMES = {"fresh": 4, "re": 4, "other": 2 + 4}
_EXPORT_CRASHES = {
    "fresh": ["1", "4"],  # the note's temp file; both engines in, the manifest's temp file
    "re": ["1+", "2+", "4", "4+"],  # the note; one engine in; both in; published, not cleaned up
    # the note (the old manifest used to be removed here: the new text engine had its name); one
    # new engine in beside the old ones; published, the old engines not yet removed
    "other": ["3+", "4+", "6+"],
}


@pytest.mark.integration
@pytest.mark.slow
def test_export_killed_anywhere_keeps_the_old_export_or_publishes_the_new_one(
    tmp_path: Path, tiny_model: CLIP
) -> None:
    import torch

    def argv(root: Path) -> list[str]:
        return ["export", "tiny-synth", "-o", str(root / "export"), "--dynamic", "--no-verify"]

    # The exports a re-export replaces, each with the user's file (which every run leaves): "re",
    # the same model with fp16 engines too (names the new one lacks, removed once it is
    # published); "other", other weights (another model): engines of the same names, other bytes.
    checkpoint = tmp_path / "other.pt"
    torch.save(tiny_model.state_dict(), checkpoint)
    olds = {"re": ["tiny-synth", "--precision", "fp16,fp32"], "other": [str(checkpoint)]}
    made = kill_at_rename.run_jobs(
        [{"root": str(tmp_path / f"old-{name}"), "points": ["0"],
          "argv": ["export", *model, "-o", str(tmp_path / f"old-{name}" / "export"), "--dynamic", "--no-verify"]}
         for name, model in olds.items()], timeout=600
    )  # fmt: skip
    assert all(r[0]["exit"] == 0 and not r[0]["killed"] for r in made), made
    old_manifests = {}
    for name in olds:
        old = tmp_path / f"old-{name}"
        (old / "export" / "notes.txt").write_text("mine")
        old_manifests[name] = _manifest(old / "export")
        shutil.copytree(old, tmp_path / f"ref-{name}")
    jobs, where = [], []
    for name in _EXPORT_CRASHES:  # the uninterrupted runs first
        jobs.append({"root": str(tmp_path / f"ref-{name}"), "points": ["0"], "argv": argv(tmp_path / f"ref-{name}")})  # fmt: skip
    for name, points in _EXPORT_CRASHES.items():
        for point in points:
            root = tmp_path / f"{name}-{point}"
            if name in olds:
                shutil.copytree(tmp_path / f"old-{name}", root)
            jobs.append({"root": str(root), "points": [point], "argv": argv(root)})
            where.append((name, point, root))
    results = kill_at_rename.run_jobs(jobs, timeout=600)
    refs = results[: len(_EXPORT_CRASHES)]
    assert all(r == [{"killed": False, "exit": 0, "renames": r[0]["renames"]}] for r in refs), refs

    for (name, point, root), result in zip(where, results[len(_EXPORT_CRASHES) :], strict=True):
        moment = f"{name} killed at {point}"
        out, ref = root / "export", tmp_path / f"ref-{name}" / "export"
        assert result[0]["killed"], (moment, result)
        if (out / "manifest.json").exists():  # the old export (every file it lists unchanged) or the new one
            assert _verifies(out), moment
            assert _manifest(out) in (old_manifests.get(name), _manifest(ref)), moment
        else:
            assert name == "fresh", f"{moment}: the old export is gone and the new one not published"
    # The reruns, each in the folder its kill left (checked above), as many at once as run_jobs can.
    reruns = kill_at_rename.run_jobs(
        [{"root": str(root), "points": ["0"], "argv": argv(root)} for _, _, root in where], timeout=600
    )
    for (name, point, root), rerun in zip(where, reruns, strict=True):
        moment = f"{name} killed at {point}"
        out, ref = root / "export", tmp_path / f"ref-{name}" / "export"
        assert rerun[0]["exit"] == 0 and not rerun[0]["killed"], (moment, rerun)
        assert _verifies(out) and _manifest(out) == _manifest(ref), moment
        # no temp file, work folder or replaced engine left; the user's file kept
        assert _tree(root) == _tree(tmp_path / f"ref-{name}"), moment
    # The points above are at the moments named there (checked last: a failure above says more).
    assert [r[0]["renames"] for r in refs] == [_EXPORT_RENAMES[name] for name in _EXPORT_CRASHES]
    # the new engines have other names than the old ones they replace (which are gone)
    files = {e["file"] for e in _manifest(tmp_path / "ref-other" / "export")["engines"]}
    assert not files & {e["file"] for e in old_manifests["other"]["engines"]}
    assert files == {p.name for p in (tmp_path / "ref-other" / "export").glob("*.onnx")}


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


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("external_data", [False, True], ids=["graph", "graph+data"])
def test_a_re_export_of_other_weights_changes_no_published_file_before_its_manifest(
    tmp_path: Path, tiny_model: CLIP, monkeypatch: pytest.MonkeyPatch, external_data: bool
) -> None:
    """Engines of the same names with other bytes (an engine with its weights in .onnx.data too)
    move in under content-tagged names: killed before the new manifest, the old export is published
    with every file it lists byte for byte (its manifest used to be removed first, so no export
    was left); the rerun publishes the new one and removes the old files; same bytes keep a name."""
    import copy

    import torch

    from clipengine.export import onnx as onnx_export
    from clipengine.export import quantize
    from clipengine.export.manifest import read_manifest
    from clipengine.export.verify import verify_folder

    if external_data:
        monkeypatch.setattr(quantize, "EXTERNAL_DATA_THRESHOLD", 0)  # every model counts as "large"
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)

    def export(module: CLIP) -> None:  # int8 too: ORT's quantizer names its weights file itself
        onnx_export.export_model(module, out, precisions=("fp32", "int8"), image_batches=None,
                                 text_batches=None, verify=False, split_text_projection=True)  # fmt: skip

    out = tmp_path / "export"
    export(tiny_model)
    (out / "notes.txt").write_text("mine")
    old = _snapshot(out)
    old_names = set(old) - {"manifest.json", "notes.txt"}

    def killed(*args: Any, **kwargs: Any) -> None:  # after every new file moved in, before the commit
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(onnx_export, "write_manifest", killed)
        with pytest.raises(KeyboardInterrupt):
            export(other)
    assert {k: v for k, v in _snapshot(out).items() if k in old} == old  # the old export, untouched
    assert verify_folder(out) == (len(old_names), [])
    # beside them: the new engines (and their data), projection, and the note of what to remove
    assert len(_snapshot(out)) == len(old) + 4 + 4 * external_data + 1 + 1

    export(other)
    new = read_manifest(out)
    listed = {e.file for e in new.engines} | {e.external_data for e in new.engines if e.external_data}
    listed.add(new.text_projection["file"] if new.text_projection else "")
    assert listed.isdisjoint(old_names) and len(listed) == 5 + 4 * external_data
    assert set(_snapshot(out)) == listed | {"manifest.json", "notes.txt"}  # the old files removed
    assert verify_folder(out) == (len(listed), [])
    if external_data:  # each graph points at its own renamed weights
        from clipengine.api import load_export

        assert load_export(out, verify_files=True).encode_texts(["a cat"]).shape == (1, 32)
        return
    export(other)  # the same bytes: the same names
    assert set(_snapshot(out)) == listed | {"manifest.json", "notes.txt"}
    export(tiny_model)  # the first export's bytes, under its names again
    assert _snapshot(out) == old | {"manifest.json": _snapshot(out)["manifest.json"]}


def _published(out: Path, files: dict[str, bytes]) -> None:
    """`out` holds `files` and a manifest listing them as image fp32 / text fp32 engines."""
    from clipengine.export.manifest import EngineInfo, Manifest, file_sha256, write_manifest

    out.mkdir(exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    engines = [EngineInfo(tower=name.split("_")[0], precision="fp32", batch=None, file=name,
                          sha256=file_sha256(out / name), inputs=[], outputs=[]) for name in files]  # fmt: skip
    write_manifest(Manifest(model="m", pretrained=None, architecture={}, preprocess={}, context_length=77,
                            logit_scale=100.0, embed_dim=32, image_size=32, engines=engines), out)  # fmt: skip


def test_a_new_file_with_other_bytes_than_a_published_one_of_its_name_gets_a_tagged_name(
    tmp_path: Path,
) -> None:
    """Placement: a new engine never lands on a published file with other bytes; same bytes keep
    the published name (tagged or not), so a rerun names its files as the run it repeats did."""
    import hashlib

    from clipengine.export import rewrite

    out, work = tmp_path / "export", tmp_path / "export" / ".export-abcd1234"
    tag = hashlib.sha256(b"new").hexdigest()[:8]
    _published(out, {"image_fp32_dyn.onnx": b"old", f"text_fp32_dyn.{tag}.onnx": b"new"})
    work.mkdir()
    placement = rewrite.Placement(out)

    def place(tower: str, precision: str) -> str:
        name = f"{tower}_{precision}_dyn.onnx"
        file, data = placement.place(work, name, None, (tower, precision, None))
        assert data is None
        return file

    for name in ("image_fp32_dyn.onnx", "text_fp32_dyn.onnx", "image_fp16_dyn.onnx"):
        (work / name).write_bytes(b"new")
    assert place("image", "fp32") == f"image_fp32_dyn.{tag}.onnx"  # its name has other bytes there
    assert place("text", "fp32") == f"text_fp32_dyn.{tag}.onnx"  # the published name, same bytes
    assert place("image", "fp16") == "image_fp16_dyn.onnx"  # no file of its name
    assert sorted(p.name for p in work.iterdir()) == sorted(
        [f"image_fp32_dyn.{tag}.onnx", f"text_fp32_dyn.{tag}.onnx", "image_fp16_dyn.onnx"]
    )
    assert (out / "image_fp32_dyn.onnx").read_bytes() == b"old"
    (work / "image_fp32_dyn.onnx").write_bytes(b"old")  # same bytes as the published one
    placement = rewrite.Placement(out)
    assert place("image", "fp32") == "image_fp32_dyn.onnx"


def test_a_renamed_engine_with_external_data_points_at_its_renamed_weights(tmp_path: Path) -> None:
    """An ONNX graph whose weights are in `<name>.data` is renamed with them, the graph re-saved to
    load the renamed file (ONNX Runtime runs it; the old name is not read)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from clipengine.export import quantize, rewrite

    out, work = tmp_path / "export", tmp_path / "export" / ".export-abcd1234"
    _published(out, {"image_fp32_dyn.onnx": b"old graph", "image_fp32_dyn.onnx.data": b"old weights"})
    work.mkdir()
    w = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)  # over save_onnx's 1 KB: external
    weight = numpy_helper.from_array(w, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [weight],
    )  # fmt: skip
    data = quantize.save_onnx(helper.make_model(graph), work / "image_fp32_dyn.onnx", threshold=0)
    assert data == "image_fp32_dyn.onnx.data"
    name, data = rewrite.Placement(out).place(work, "image_fp32_dyn.onnx", data, ("image", "fp32", None))
    assert name != "image_fp32_dyn.onnx" and data == f"{name}.data"
    assert sorted(p.name for p in work.iterdir()) == sorted([name, data])
    locations = {e.value for t in onnx.load(str(work / name), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}  # fmt: skip
    assert locations == {data}
    session = ort.InferenceSession(str(work / name), providers=["CPUExecutionProvider"])
    x = np.ones((1, 32), np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x @ w)
    assert (out / "image_fp32_dyn.onnx.data").read_bytes() == b"old weights"
