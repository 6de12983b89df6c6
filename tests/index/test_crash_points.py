"""`clipengine index add` SIGKILLed while embedding and while saving: the index opens as the old one
or the new one (never a broken one), and a rerun ends as the uninterrupted add did, leaving nothing
behind. The runs kill themselves at a chosen rename (`kill_at_rename`): exact crash points.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import kill_at_rename
import numpy as np
import pipeline_fakes as fakes
import pytest

from clipengine.cli.app import main
from clipengine.index import Index
from clipengine.models.clip import CLIP

# Renames of an add of one shard: its embed folder's run.json (twice), the shard's 3 files,
# failures.jsonl, run.json "complete"; then the index's vectors, metadata, and header (the commit).
RENAMES = 7 + 3
CRASHES = {
    "while embedding": ["4"],
    "before the index's vectors": ["8"],
    "between the index's files": ["9+"],
    "before the header commit": ["10"],
    "after the commit, before the embed folder is removed": ["10+"],
    "a rerun killed too": ["5+", "5"],  # the rerun resumes the shard, then dies before the metadata
}


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _generation_files(generation: int) -> list[str]:
    return ["header.json", f"meta-{generation:06d}.jsonl", f"vectors-{generation:06d}.faiss"]


def _vectors(index: Index) -> np.ndarray:
    return np.asarray(index._faiss.reconstruct_n(0, len(index)))


@pytest.mark.integration
def test_index_add_killed_anywhere_opens_whole_and_reruns_to_the_uninterrupted_result(
    tmp_path: Path, tiny_model: CLIP
) -> None:
    import torch

    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), checkpoint)
    old_images, new_images = tmp_path / "old", tmp_path / "new"
    fakes.write_images(old_images, 12)
    good = fakes.write_images(new_images, 10, prefix="new", seed=1)
    (new_images / "new-bad.jpg").write_bytes(good[0].read_bytes()[:60])
    base = tmp_path / "base" / "photos.index"
    assert main(["index", "build", str(old_images), "-o", str(base), "--checkpoint", str(checkpoint),
                 "--workers", "0"]) == 0  # fmt: skip
    old_ids = Index.load(base).ids

    def case(name: str) -> tuple[Path, list[str]]:
        root = tmp_path / name
        shutil.copytree(base, root / "photos.index")
        return root, ["index", "add", str(root / "photos.index"), str(new_images), "--workers", "0"]

    jobs = []
    for name, points in {"ref": ["0"], **{f"crash{k}": p for k, p in enumerate(CRASHES.values())}}.items():
        root, argv = case(name)
        jobs.append({"root": str(root), "points": points, "argv": argv})
    results = kill_at_rename.run_jobs(jobs)
    assert results[0] == [{"killed": False, "exit": 0, "renames": RENAMES}]

    ref = Index.load(tmp_path / "ref" / "photos.index")
    assert ref.ids[: len(old_ids)] == old_ids and len(ref) == len(old_ids) + 10
    assert _files(tmp_path / "ref" / "photos.index") == _generation_files(2)
    assert [p.name for p in (tmp_path / "ref").iterdir()] == ["photos.index"]
    for k, (moment, result) in enumerate(zip(CRASHES, results[1:], strict=True)):
        root = tmp_path / f"crash{k}"
        assert all(r["killed"] for r in result), (moment, result)
        assert Index.load(root / "photos.index").ids in (old_ids, ref.ids), moment  # old or new, whole
        assert main(["index", "add", str(root / "photos.index"), str(new_images), "--workers", "0"]) == 0
        index = Index.load(root / "photos.index")
        assert index.ids == ref.ids, moment
        np.testing.assert_allclose(_vectors(index), _vectors(ref), rtol=0, atol=1e-5, err_msg=moment)
        assert [p.name for p in root.iterdir()] == ["photos.index"], moment  # no embed or temp folder left
        # ref's generation and files, no leftovers: a rerun after a kill past the commit adds
        # nothing (only the unreadable file is retried), so it saves nothing and sweeps instead
        assert _files(root / "photos.index") == _generation_files(2), moment


def test_only_finished_add_folders_whose_ids_are_all_indexed_are_swept(tmp_path: Path) -> None:
    """What an add killed after its save leaves goes; an add folder still being filled (or
    resumable: ids the index lacks), and folders that are not add folders, stay."""
    from clipengine.cli import index_sources
    from clipengine.pipeline.sinks import ShardSink, atomic_write_json

    index = Index.build(["a.jpg", "b.jpg"], np.eye(2, 8, dtype=np.float32), model="fake")
    path = index.save(tmp_path / "p.index")

    def add_folder(name: str, ids: list[str], status: str) -> Path:
        folder = tmp_path / name
        ShardSink(folder, "float32").write(
            0, ids, np.eye(len(ids), 8, dtype=np.float32), [(1, 1)] * len(ids), []
        )
        atomic_write_json(folder / "run.json", {"status": status})
        return folder

    done = add_folder("p.index.embeddings-add-0123456789ab", ["b.jpg"], "complete")
    kept = [
        add_folder("p.index.embeddings-add-111111111111", ["b.jpg", "c.jpg"], "complete"),  # c not indexed
        add_folder("p.index.embeddings-add-222222222222", ["a.jpg"], "running"),  # still being filled
        add_folder("p.index.embeddings-add-mine", ["a.jpg"], "complete"),  # not a name add gives
        add_folder("q.index.embeddings-add-333333333333", ["a.jpg"], "complete"),  # another index's
    ]
    index_sources.remove_done_add_dirs(path, index)
    assert not done.exists() and all(p.is_dir() for p in kept)
