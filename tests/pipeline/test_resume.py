"""A run killed mid-way (SIGKILL, in a subprocess) resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipengine.pipeline.sinks import read_embeddings

ENTRY = Path(__file__).with_name("embed_entry.py")
N_IMAGES, SHARD, BATCH = 120, 10, 5  # 12 shards


def _embed(source: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        str(ENTRY),
        str(source),
        str(out),
        "--shard-size",
        str(SHARD),
        "--batch",
        str(BATCH),
    ]
    # A new session so the kill reaches the decode worker processes too (they share the group id).
    return subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen[str]) -> dict[str, object]:
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    stats: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return stats


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.005)  # polling interval, not a timing assumption


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 1])
def test_killed_run_resumes_without_duplicates_or_losses(tmp_path: Path, fakes, workers: int) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "images"
    fakes.write_images(source, N_IMAGES)
    (source / "broken.jpg").write_bytes(b"not a jpeg")
    reference = _finish(_embed(source, tmp_path / "ref"))
    assert reference["shards_written"] == 13

    out = tmp_path / "out"
    proc = _embed(source, out, "--delay", "0.05", "--workers", str(workers))
    _wait_for(out / "shards" / "part-00001.jsonl", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)  # reap it and close its stdout pipe
    shards = out / "shards"
    done = {p.name.split(".")[0] for p in shards.glob("part-*.jsonl") if ".failures" not in p.name}
    started = {p.name.split(".")[0] for p in shards.iterdir() if not p.name.startswith(".")}
    assert 2 <= len(done) < 13, "kill should land mid-run"
    assert len(started - done) <= 1  # at most one partition was caught half-written
    for name in done:  # every visible shard is whole: rows match
        assert len(np.load(shards / f"{name}.npy")) == len(
            (shards / f"{name}.jsonl").read_text().splitlines()
        )

    resumed = _finish(_embed(source, out, "--workers", str(workers)))
    assert resumed["shards_skipped"] == len(done)
    assert resumed["shards_written"] == 13 - len(done)
    ids, vectors, meta = read_embeddings(out)
    ref_ids, ref_vectors, _ = read_embeddings(tmp_path / "ref")
    assert ids == ref_ids and len(set(ids)) == len(ids) == N_IMAGES
    np.testing.assert_array_equal(vectors, ref_vectors)
    failures = (out / "failures.jsonl").read_text().splitlines()
    assert [json.loads(line)["path"] for line in failures] == ["broken.jpg"]
    assert meta["status"] == "complete"
    assert not [p for p in shards.iterdir() if p.name.startswith(".")]  # no temp files left
