"""`clipengine index info` reads the header alone (it hashed and loaded the whole index, ~7 s and
2.5 GB of memory for 1M x 512 vectors, to print one line); `--verify` checks every file as loads do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipengine.cli.app import main
from clipengine.index import Index, store
from clipengine.index.persistence import describe_header, read_header

pytest.importorskip("faiss")


def _index(tmp_path: Path, kind: str) -> Path:
    vectors = np.random.default_rng(3).standard_normal((600, 32)).astype(np.float32)
    index = Index.build([f"img/{i:03d}.jpg" for i in range(600)], vectors, model="m@tag", kind=kind)
    index.extra["precision"] = "fp16"  # an extra header field, and (approximate kinds) a recall
    if not index.params.exact:
        index.extra["recall"] = {"k": 10, "queries": 40, "recall": 0.91}
    index.image_roots = ["/photos"]
    return index.save(tmp_path / f"{kind}.index")


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_header_describes_the_index_as_loading_it_does(tmp_path: Path, kind: str) -> None:
    path = _index(tmp_path, kind)
    loaded = Index.load(path)
    assert describe_header(read_header(path)) == (loaded.describe(), loaded.extra)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
@pytest.mark.parametrize("as_json", [["--json"], []])
def test_info_prints_the_same_with_and_without_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, as_json: list[str]
) -> None:
    path = _index(tmp_path, kind)
    quick = _run(capsys, "index", "info", path, *as_json)
    verified = _run(capsys, "index", "info", path, "--verify", *as_json)
    assert quick == verified and quick[0] == 0
    if as_json:
        assert json.loads(quick[1])["count"] == 600
    if kind == "hnsw":
        assert "recall@10 0.910" in quick[2]


def test_info_hashes_and_loads_nothing_without_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _index(tmp_path, "flat")

    def no_hashing(file: Path) -> str:
        raise AssertionError(f"index info hashed {file}")

    monkeypatch.setattr(store, "_sha256", no_hashing)
    monkeypatch.setattr(store, "read_meta", no_hashing)
    code, out, err = _run(capsys, "index", "info", path)
    assert code == 0, err
    assert out == f"{path}: 600 images, flat (exact), dim 32, model m@tag\n"


def test_verify_finds_a_changed_byte_the_header_alone_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _index(tmp_path, "flat")
    vectors = path / read_header(path)["files"]["vectors"]
    data = bytearray(vectors.read_bytes())
    data[-5] ^= 0xFF  # a vector changed in place: the size the header records still matches
    vectors.write_bytes(bytes(data))
    assert _run(capsys, "index", "info", path)[0] == 0
    code, _, err = _run(capsys, "index", "info", path, "--verify")
    assert code == 1 and "does not match the sha256 its header records" in err


def test_info_still_refuses_a_truncated_or_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _index(tmp_path, "flat")
    header = read_header(path)
    meta = path / header["files"]["meta"]
    meta.write_bytes(meta.read_bytes()[:-10])
    code, _, err = _run(capsys, "index", "info", path)
    assert code == 1 and "(truncated or modified)" in err
    (path / header["files"]["vectors"]).unlink()
    code, _, err = _run(capsys, "index", "info", path)
    assert code == 1 and "file vectors-" in err and "is missing" in err
