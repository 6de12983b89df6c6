"""A resume never mixes precisions: run.json records the backend's precision and another one is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pipeline_fakes
import pytest

from clipengine.errors import IndexMismatchError
from clipengine.pipeline.run import embed_folder


def _factory(precision: str) -> pipeline_fakes.FakeBackendFactory:
    class Factory(pipeline_fakes.FakeBackendFactory):
        def __call__(self) -> pipeline_fakes.FakeBackend:
            backend = super().__call__()
            backend.precision = precision
            return backend

    return Factory()


def test_resume_at_another_precision_is_refused(image_folder: Path, preprocess_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    embed_folder(image_folder, out, _factory("fp32"), preprocess_cfg, model="export", workers=0, shard_size=2)
    assert json.loads((out / "run.json").read_text())["precision"] == "fp32"
    last = sorted((out / "shards").glob("part-*.npy"))[-1]
    last.unlink()  # an unfinished shard: the resume computes it
    with pytest.raises(IndexMismatchError, match=r"precision='fp32', but this run uses precision='int8'.*--precision fp32"):
        embed_folder(image_folder, out, _factory("int8"), preprocess_cfg, model="export", workers=0, shard_size=2)
    assert not last.exists()  # nothing written at int8
    stats = embed_folder(image_folder, out, _factory("fp32"), preprocess_cfg, model="export", workers=0, shard_size=2)
    assert stats.shards_written == 1 and last.exists()


def test_a_run_json_without_precision_takes_the_backends(image_folder: Path, preprocess_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    embed_folder(image_folder, out, _factory("bf16"), preprocess_cfg, model="export", workers=0, shard_size=2)
    info = json.loads((out / "run.json").read_text())
    del info["precision"]  # written by an older clipengine
    (out / "run.json").write_text(json.dumps(info))
    sorted((out / "shards").glob("part-*.npy"))[-1].unlink()
    embed_folder(image_folder, out, _factory("bf16"), preprocess_cfg, model="export", workers=0, shard_size=2)
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16"
