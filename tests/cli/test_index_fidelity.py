"""`index build` measures an approximate index's recall and every index command states it; the query
model's lower precision is stated by `search` and by a build that embeds."""

from __future__ import annotations

import json
from pathlib import Path

import distributed_fakes
import numpy as np
import pipeline_fakes
import pytest

from clipengine.cli import model_options
from clipengine.cli.app import main
from clipengine.index import Index


class _Clip:
    def __init__(self, root: Path, precision: str) -> None:
        from clipengine.image.preprocess import PreprocessConfig

        self.backend = distributed_fakes.FakeBackend(embed_dim=8)
        self.backend.precision = precision
        self.preprocess_cfg = PreprocessConfig(image_size=32)
        self.root, self.name, self.embed_dim = root, "fake", 8

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        from clipengine.image.preprocess import preprocess

        return self.backend.encode_images(np.stack([preprocess(self.root / t, self.preprocess_cfg) for t in texts]))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    distributed_fakes.write_images(root, 40)
    return root


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_approximate_build_records_its_measured_recall(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("faiss")
    monkeypatch.setattr(model_options, "load_clip", lambda opts: _Clip(folder, opts.precision))
    idx = tmp_path / "p.index"
    code, out, err = _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--kind", "hnsw", "--json")
    assert code == 0
    recall = Index.load(idx).extra["recall"]  # in the header: `index info` and `search` state it later
    assert recall["k"] == 10 and recall["queries"] == 40 and 0.0 <= recall["recall"] <= 1.0
    assert json.loads(out)["recall"] == recall
    line = f"note: hnsw is an approximate index: recall@10 {recall['recall']:.3f} against exact search"
    assert line in err and "note: fake" not in err  # an fp32 model states nothing
    code, out, err = _run(capsys, "search", idx, "img-001.jpg", "-k", "2", "--precision", "bf16")
    assert code == 0 and line in err and "note: fake bf16 is not fp32: deviation from fp32 unmeasured" in err
    code, _, err = _run(capsys, "index", "info", idx)
    assert code == 0 and line in err


def test_exact_index_states_nothing_and_an_add_drops_the_stale_recall(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("faiss")
    monkeypatch.setattr(model_options, "load_clip", lambda opts: _Clip(folder, opts.precision))
    flat = tmp_path / "f.index"
    code, _, err = _run(capsys, "index", "build", folder, "-o", flat, "--model", "fake", "--kind", "flat")
    assert code == 0 and "note:" not in err and "recall" not in Index.load(flat).extra
    idx, more = tmp_path / "i.index", tmp_path / "more"
    code, _, err = _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--kind", "ivf",
                        "--precision", "int8")  # fmt: skip
    assert code == 0 and "note: fake int8 is not fp32: deviation from fp32 unmeasured for this model" in err
    assert "recall" in Index.load(idx).extra
    monkeypatch.setattr(model_options, "load_clip", lambda opts: pytest.fail("loaded for kept embeddings"))
    code, _, err = _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--kind", "ivf",
                        "--precision", "int8")  # fmt: skip
    assert code == 0 and "int8 is not fp32: deviation from fp32 unmeasured for this model" in err  # stated again
    monkeypatch.setattr(model_options, "load_clip", lambda opts: _Clip(folder, opts.precision))
    pipeline_fakes.write_images(more, 3, prefix="new")
    code, _, err = _run(capsys, "index", "add", idx, more, "--precision", "int8")
    assert code == 0 and "recall" not in Index.load(idx).extra
    assert "note: ivf is an approximate index: recall unmeasured" in err


def test_build_from_a_lower_precision_embed_folder_states_and_keeps_its_deviation(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("faiss")
    monkeypatch.setattr(model_options, "load_clip", lambda opts: _Clip(folder, opts.precision))
    emb, idx = tmp_path / "emb", tmp_path / "f.index"
    assert _run(capsys, "embed", folder, "-o", emb, "--model", "fake", "--precision", "bf16", "--workers", "0",
                "--no-progress")[0] == 0  # fmt: skip
    code, _, err = _run(capsys, "index", "build", emb, "-o", idx, "--kind", "flat")
    assert code == 0 and "note: fake bf16 is not fp32: deviation from fp32 unmeasured for this model" in err
    assert Index.load(idx).extra["fidelity"]["precision"] == "bf16"


def test_add_at_another_precision_than_the_build_is_refused_and_changes_nothing(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export folder is one model label at fp32 and int8: an add at another --precision would mix
    two precisions' vectors in one index without a word."""
    monkeypatch.setattr(model_options, "load_clip", lambda opts: _Clip(folder, opts.precision))
    idx = tmp_path / "p.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")[0] == 0
    assert Index.load(idx).extra["precision"] == "fp32"
    distributed_fakes.write_images(folder / "new", 3, seed=5)
    code, _, err = _run(capsys, "index", "add", idx, folder, "--precision", "bf16")
    assert code == 2 and "built from embeddings at precision fp32, these are at bf16" in err
    assert "--precision fp32" in err
    kept = Index.load(idx)
    assert len(kept) == 40 and not [i for i in kept.ids if i.startswith("new/")]
    assert not list(tmp_path.glob("p.index.embeddings-add-*"))  # its wrong-precision vectors: gone
    code, out, _ = _run(capsys, "index", "add", idx, folder, "--json")  # at the build's precision
    assert code == 0 and json.loads(out)["added"] == 3
