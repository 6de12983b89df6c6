"""`clipengine embed` SIGKILLed at each kind of moment, then resumed: the uninterrupted result, exactly.

The runs kill themselves at a chosen rename (`kill_at_rename`), so the crash points are exact, not
timing-dependent: before anything is published, between the files of one shard, after k whole
shards, before the failures merge, before the final run.json, and a resume killed in its turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import kill_at_rename
import numpy as np
import pytest

from clipengine.cli.app import main
from clipengine.errors import DatasetError
from clipengine.models.clip import CLIP
from clipengine.pipeline.sinks import read_embeddings

N_GOOD, SHARD, BATCH = 60, 10, 4  # + 2 corrupt files = 62 inputs, 7 shards
# Renames of a whole run: run.json, run.json again (the model's embed_dim, once loaded), 3 per shard
# (failures, vectors, rows last), failures.jsonl, run.json "complete".
RENAMES = 2 + 3 * 7 + 2
CRASHES = {
    "before run.json": ["1"],
    "before any shard": ["3"],
    "between the files of shard 0": ["5"],  # its failures and vectors in place, its rows not
    "after 1 shard": ["5+"],
    "after 3 shards": ["11+"],
    "before the failures merge": ["24"],
    "before the final run.json": ["25"],
    "a resume killed too": ["8+", "3"],  # the resume's 3rd rename: shard 2's rows
}


def _argv(source: Path, checkpoint: Path, out: Path) -> list[str]:
    return ["embed", str(source), "-o", str(out), "--checkpoint", str(checkpoint), "--workers", "0",
            "--no-progress", "--shard-size", str(SHARD), "--batch", str(BATCH), "--dtype", "float32"]  # fmt: skip


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.integration
def test_embed_killed_anywhere_resumes_to_the_uninterrupted_result(
    tmp_path: Path, tiny_model: CLIP, fakes: ModuleType
) -> None:
    import torch

    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), checkpoint)
    source = tmp_path / "images"
    good = fakes.write_images(source, N_GOOD)
    (source / "img-0012b.jpg").write_bytes(good[0].read_bytes()[:60])  # truncated, in shard 1
    (source / "img-0047b.jpg").write_text("not an image")  # in shard 4

    jobs = [
        {"root": str(tmp_path / "ref"), "points": ["0"], "argv": _argv(source, checkpoint, tmp_path / "ref")}
    ]
    for k, points in enumerate(CRASHES.values()):
        out = tmp_path / f"crash{k}"
        jobs.append({"root": str(out), "points": points, "argv": _argv(source, checkpoint, out)})
    results = kill_at_rename.run_jobs(jobs)
    assert results[0] == [{"killed": False, "exit": 0, "renames": RENAMES}]

    ref_ids, ref_vectors, _ = read_embeddings(tmp_path / "ref")
    ref_failures = (tmp_path / "ref" / "failures.jsonl").read_text()
    assert len(ref_ids) == N_GOOD and [json.loads(x)["path"] for x in ref_failures.splitlines()] == [
        "img-0012b.jpg",
        "img-0047b.jpg",
    ]
    for k, (moment, result) in enumerate(zip(CRASHES, results[1:], strict=True)):
        out = tmp_path / f"crash{k}"
        assert all(r["killed"] for r in result), (moment, result)
        with pytest.raises(DatasetError):  # an interrupted run is never read as a finished one
            read_embeddings(out)
        assert main(_argv(source, checkpoint, out)) == 0, moment
        ids, vectors, meta = read_embeddings(out)
        assert ids == ref_ids, moment  # none missing, none twice, in order
        np.testing.assert_allclose(vectors, ref_vectors, rtol=0, atol=1e-5, err_msg=moment)
        assert (out / "failures.jsonl").read_text() == ref_failures, moment
        assert meta["status"] == "complete", moment
        assert _files(out) == _files(tmp_path / "ref"), moment  # no temp file left anywhere
