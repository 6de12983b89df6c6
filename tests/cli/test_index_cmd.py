"""`clipengine index build|add|info` and `clipengine search` end to end with a fake model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import distributed_fakes
import numpy as np
import pytest
from typer.testing import CliRunner

from clipengine.cli import index_cmd, index_sources, model_options
from clipengine.cli.app import app, main
from clipengine.index import Index
from clipengine.pipeline.sinks import read_embeddings


class _FakeClip:
    """ClipModel stand-in: images through the fake backend; a text names an image file of `root`."""

    def __init__(self, root: Path, name: str = "fake") -> None:
        from clipengine.image.preprocess import PreprocessConfig, preprocess

        self.backend = distributed_fakes.FakeBackend(embed_dim=8)
        self.preprocess_cfg = PreprocessConfig(image_size=32)
        self._pre, self.root, self.name, self.embed_dim = preprocess, root, name, 8

    def encode_images(self, images: list[Path], batch_size: int = 32) -> np.ndarray:
        return self.backend.encode_images(np.stack([self._pre(p, self.preprocess_cfg) for p in images]))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encode_images([self.root / t for t in texts])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    distributed_fakes.write_images(root, 10)
    (root / "broken.jpg").write_bytes(b"")
    return root


@pytest.fixture
def fake_load(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[model_options.ModelOptions]:
    asked: list[model_options.ModelOptions] = []

    def load(opts: model_options.ModelOptions) -> SimpleNamespace:
        asked.append(opts)
        return _FakeClip(folder, name=opts.model)  # type: ignore[return-value]

    monkeypatch.setattr(model_options, "load_clip", load)
    return asked


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_build_from_embed_output_then_search_by_text_and_image(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    emb, idx = tmp_path / "emb", tmp_path / "photos.index"
    assert (
        _run(capsys, "embed", folder, "-o", emb, "--model", "fake", "--workers", "0", "--no-progress")[0] == 0
    )
    code, out, _ = _run(capsys, "index", "build", emb, "-o", idx)
    assert code == 0 and "10 images, flat (exact)" in out and "model fake" in out

    code, out, _ = _run(capsys, "search", idx, "img-004.jpg", "-k", "3")
    assert code == 0
    first = out.splitlines()[0].split()
    assert float(first[0]) == pytest.approx(1.0, abs=1e-3) and first[1] == str(folder / "img-004.jpg")
    assert len(out.splitlines()) == 3

    code, out, _ = _run(capsys, "search", idx, "--image", folder / "img-007.jpg", "--json", "-k", "2")
    data = json.loads(out)
    assert code == 0 and data["model"] == "fake" and [r["rank"] for r in data["results"]] == [1, 2]
    assert data["results"][0]["id"] == "img-007.jpg" and data["results"][0]["path"] == str(
        folder / "img-007.jpg"
    )
    assert fake_load[-1].model == "fake"  # the query model came from the index header

    code, out, _ = _run(capsys, "index", "info", idx, "--json")
    info = json.loads(out)
    assert code == 0 and info["count"] == 10 and info["image_roots"] == [str(folder)] and info["exact"]


def _spy_add_dir_removal(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The ids in each `index add` folder, read just before it is deleted."""
    seen: list[list[str]] = []
    real = index_sources.remove_add_dir

    def spy(folder: Path) -> None:
        seen.append(read_embeddings(folder)[0])
        real(folder)

    monkeypatch.setattr(index_sources, "remove_add_dir", spy)
    return seen


def test_build_from_images_then_add_new_ones(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    idx = tmp_path / "p.index"
    code, out, _ = _run(
        capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--kind", "hnsw", "--json"
    )
    assert code == 0 and json.loads(out)["kind"] == "hnsw" and json.loads(out)["count"] == 10
    assert (tmp_path / "p.index.embeddings" / "run.json").is_file()

    build_shards = {p.name: p.read_bytes() for p in (tmp_path / "p.index.embeddings" / "shards").iterdir()}
    distributed_fakes.write_images(folder / "new", 3, seed=5)
    embedded = _spy_add_dir_removal(monkeypatch)
    code, out, err = _run(capsys, "index", "add", idx, folder, "--json")
    data = json.loads(out)
    assert "does not match" not in err  # the build's shards are neither checked nor recomputed
    after = {p.name: p.read_bytes() for p in (tmp_path / "p.index.embeddings" / "shards").iterdir()}
    assert after == build_shards
    assert embedded == [["new/img-000.jpg", "new/img-001.jpg", "new/img-002.jpg"]]
    assert not list(tmp_path.glob("p.index.embeddings-add-*"))  # saved into the index: deleted
    assert code == 0 and (data["added"], data["skipped"], data["count"]) == (
        3,
        10,
        13,
    )  # only new files embedded; the 10 indexed ones are reported as skipped
    code, out, _ = _run(capsys, "index", "add", idx, folder, "--json")
    data = json.loads(out)
    assert code == 0 and (data["added"], data["skipped"], data["count"]) == (0, 13, 13)
    code, out, _ = _run(capsys, "search", idx, "new/img-001.jpg", "-k", "1")
    assert code == 0 and out.split()[1] == str(folder / "new" / "img-001.jpg")


def test_an_index_built_again_from_kept_embeddings_loads_no_model(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """Trying another --kind over the same images reuses the kept embeddings: no model load for that."""
    idx = tmp_path / "p.index"
    code, out, _ = _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--kind", "flat", "--json")
    assert code == 0 and json.loads(out)["count"] == 10 and len(fake_load) == 1
    code, out, _ = _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--kind", "hnsw", "--json")
    assert code == 0 and (json.loads(out)["kind"], json.loads(out)["count"]) == ("hnsw", 10)
    assert len(fake_load) == 1
    (tmp_path / "p.index.embeddings" / "shards" / "part-00000.npy").unlink()  # left to compute: loaded
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")[0] == 0 and len(fake_load) == 2
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--retry-failed")[0] == 0
    assert len(fake_load) == 3  # broken.jpg's shard is recomputed


def test_add_names_images_as_the_index_does_and_refuses_names_taken_by_other_images(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """Ids are paths relative to the folder given: adding ROOT/new or another folder with the same
    file names skipped its images as indexed already ("added 0, skipped 3"), and adding ROOT's
    parent added ROOT's images a second time."""
    idx = tmp_path / "p.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")[0] == 0
    distributed_fakes.write_images(folder / "new", 2, seed=5)  # img-000.jpg, img-001.jpg, as in ROOT
    code, out, _ = _run(capsys, "index", "add", idx, folder / "new", "--json")
    assert code == 0 and (json.loads(out)["added"], json.loads(out)["count"]) == (2, 12)
    assert {"new/img-000.jpg", "new/img-001.jpg"} <= set(Index.load(idx).ids)
    assert Index.load(idx).image_roots == [str(folder.resolve())]  # named under ROOT: no new root

    other = tmp_path / "other"
    distributed_fakes.write_images(other, 2, seed=7)  # the same names, other pictures
    header = (idx / "header.json").read_bytes()
    code, _, err = _run(capsys, "index", "add", idx, other)
    assert code == 1 and "2 of its images have paths that are ids of other images" in err
    assert "'img-000.jpg'" in err and (idx / "header.json").read_bytes() == header

    (other / "img-000.jpg").rename(other / "own.jpg")
    (other / "img-001.jpg").unlink()
    code, out, _ = _run(capsys, "index", "add", idx, tmp_path, "--json")  # holds ROOT and other/
    assert code == 0 and (json.loads(out)["added"], json.loads(out)["skipped"]) == (1, 12)
    index = Index.load(idx)
    assert index.ids[-1] == "other/own.jpg" and index.resolve("other/own.jpg") == other / "own.jpg"
    assert index.resolve("img-000.jpg") == folder / "img-000.jpg"


def test_unreadable_images_are_reported_by_build_and_add(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """Images that could not be read are named with their reason, also by `add`, whose own embed
    folder (and so its failures.jsonl) is deleted after the save."""
    idx = tmp_path / "p.index"
    code, out, err = _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--json")
    assert code == 0 and json.loads(out)["failed"] == 1 and json.loads(out)["count"] == 10
    assert "broken.jpg: empty file (0 bytes)" in err
    assert f"listed in {tmp_path / 'p.index.embeddings' / 'failures.jsonl'}" in err

    distributed_fakes.write_images(folder / "new", 2, seed=5)
    (folder / "new" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    code, out, err = _run(capsys, "index", "add", idx, folder, "--json")
    data = json.loads(out)
    assert code == 0 and (data["added"], data["count"], data["failed"]) == (2, 12, 2)
    assert sorted(f["id"] for f in data["failures"]) == ["broken.jpg", "new/cut.jpg"]
    assert all(f["reason"] for f in data["failures"])
    assert "new/cut.jpg: " in err and "rerun `clipengine index add` to retry them" in err
    assert not list(tmp_path.glob("p.index.embeddings-add-*"))

    code, out, err = _run(capsys, "index", "add", idx, folder / "new")  # text summary: a count
    assert code == 0 and "failed 1" in out and "cut.jpg: " in err

    header = (idx / "header.json").read_bytes()  # a retry whose files still fail adds nothing...
    code, out, err = _run(capsys, "index", "add", idx, folder, "--json")
    assert code == 0 and json.loads(out)["added"] == 0 and "new/cut.jpg: " in err
    assert (idx / "header.json").read_bytes() == header  # ...and writes no new generation


def test_failures_the_index_holds_by_now_are_not_reported(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """An embed folder's failures.jsonl can name images the index got since (fixed, then added from
    the folder): adding that embed folder must not say they "are not in the index"."""
    idx = tmp_path / "p.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")[0] == 0
    (folder / "broken.jpg").write_bytes((folder / "img-000.jpg").read_bytes())  # fixed
    code, out, _ = _run(capsys, "index", "add", idx, folder, "--json")
    assert code == 0 and json.loads(out)["added"] == 1 and "failed" not in json.loads(out)

    code, out, err = _run(capsys, "index", "add", idx, tmp_path / "p.index.embeddings", "--json")
    data = json.loads(out)
    assert code == 0 and (data["added"], data["count"]) == (0, 11)
    assert "failed" not in data and "could not be read" not in err


def test_failed_add_keeps_its_embeddings_for_the_rerun_which_then_deletes_them(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from clipengine.errors import IndexFileError
    from clipengine.index import Index
    from clipengine.pipeline.sinks import ShardSink

    idx = tmp_path / "p.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")[0] == 0
    distributed_fakes.write_images(folder / "new", 3, seed=5)

    def full_disk(self: Index, path: Path) -> Path:
        raise IndexFileError("simulated: no space left while saving the index")

    with monkeypatch.context() as m:
        m.setattr(Index, "save", full_disk)
        code, _, err = _run(capsys, "index", "add", idx, folder)
    assert code == 1 and "simulated" in err
    (kept,) = tmp_path.glob("p.index.embeddings-add-*")
    assert read_embeddings(kept)[0] == ["new/img-000.jpg", "new/img-001.jpg", "new/img-002.jpg"]
    assert len(Index.load(idx)) == 10  # the index is as it was

    writes: list[int] = []
    real_write = ShardSink.write
    monkeypatch.setattr(
        ShardSink, "write", lambda self, pid, *a, **k: writes.append(pid) or real_write(self, pid, *a, **k)
    )
    code, out, _ = _run(capsys, "index", "add", idx, folder, "--json")
    assert code == 0 and (json.loads(out)["added"], json.loads(out)["count"]) == (3, 13)
    assert writes == []  # the rerun resumed the kept folder: nothing embedded again
    assert not kept.exists()

    # A folder the user named (--embeddings) or gave as the source is theirs: kept.
    distributed_fakes.write_images(folder / "newer", 2, seed=7)
    mine = tmp_path / "mine.emb"
    assert _run(capsys, "index", "add", idx, folder, "--embeddings", mine)[0] == 0
    assert read_embeddings(mine)[0] == ["newer/img-000.jpg", "newer/img-001.jpg"]
    assert len(Index.load(idx)) == 15 and not list(tmp_path.glob("p.index.embeddings-add-*"))
    assert _run(capsys, "index", "add", idx, mine)[0] == 0 and read_embeddings(mine)[0]


def test_model_mismatch_and_bad_usage_are_refused(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    idx = tmp_path / "p.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")[0] == 0
    code, _, err = _run(capsys, "search", idx, "img-001.jpg", "--model", "ViT-B-32")
    assert code == 1 and "error:" in err and "built with model 'fake', not 'ViT-B-32'" in err
    code, _, err = _run(
        capsys, "index", "build", tmp_path / "p.index.embeddings", "-o", tmp_path / "q", "--model", "RN50"
    )
    assert code == 1 and "embedded with 'fake', not 'RN50'" in err
    # Usage errors (exit 2) go through click's standalone handling, as a console script does.
    runner = CliRunner()
    result = runner.invoke(app, ["search", str(idx)])
    assert result.exit_code == 2 and "exactly one" in result.output
    result = runner.invoke(app, ["search", str(idx), " "])
    assert result.exit_code == 2 and "the text query is empty" in result.output
    emb = str(tmp_path / "p.index.embeddings")
    result = runner.invoke(
        app, ["index", "build", emb, "-o", str(tmp_path / "r"), "--kind", "ivf", "--nlist", "50"]
    )
    assert result.exit_code == 2 and "kind='flat'" in result.output


def test_search_checks_the_model_against_the_index_before_loading_it(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A wrong --model is refused before any weights are read: offline, or with weights that are not
    cached, the user sees the mismatch, not a missing-weights error. An export folder is judged by
    its manifest; one naming the index's model is loaded and searched."""
    from clipengine.export.manifest import Manifest, write_manifest

    idx = tmp_path / "p.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")[0] == 0
    loads = len(fake_load)
    other, same = tmp_path / "export-other", tmp_path / "export-fake"
    for export, name in ((other, "other"), (same, "fake")):
        export.mkdir()
        write_manifest(Manifest(name, None, {}, {}, 77, 100.0, 8, 32, []), export)
    for model in ("ViT-B-32", "tiny-synth@synthetic", "nosuch", str(other)):
        code, _, err = _run(capsys, "search", idx, "img-001.jpg", "--model", model)
        assert code == 1 and err.count("\n") == 1, err
        assert f"built with model 'fake', not '{Path(model).resolve() if model == str(other) else model}'" in err
    assert len(fake_load) == loads  # nothing was loaded
    monkeypatch.setattr(model_options, "load_clip", lambda opts: _FakeClip(folder, name="fake"))  # as the manifest says
    code, out, _ = _run(capsys, "search", idx, "img-001.jpg", "--model", same, "-k", "1")
    assert code == 0 and out.split()[1] == str(folder / "img-001.jpg")


def test_search_refuses_other_weights_of_the_same_architecture(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """The loaded model's name carries no tag ("ViT-B-32"), so matching it let any weights of the
    architecture query an index built with other weights (same dimension: no error, wrong results).
    A name without a tag means the default tag (openai), as it does when loading."""
    idx = tmp_path / "p.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "ViT-B-32@laion2b_s34b_b79k")[0] == 0
    loads = len(fake_load)
    for model in ("ViT-B-32@openai", "ViT-B-32"):
        code, _, err = _run(capsys, "search", idx, "img-001.jpg", "--model", model)
        assert code == 1 and f"built with model 'ViT-B-32@laion2b_s34b_b79k', not '{model}'" in err
    assert len(fake_load) == loads
    code, _, _ = _run(capsys, "search", idx, "img-001.jpg", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k")
    assert code == 0 and len(fake_load) == loads + 1


def test_search_refuses_a_forced_activation_the_weights_were_not_trained_with(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """"-quickgelu" on GELU weights loads the same shapes with another activation (wrong results,
    no error); on OpenAI's weights, trained with QuickGELU, it changes nothing and is accepted."""
    laion, openai = tmp_path / "laion.index", tmp_path / "openai.index"
    assert _run(capsys, "index", "build", folder, "-o", laion, "--model", "ViT-B-32@laion2b_s34b_b79k")[0] == 0
    assert _run(capsys, "index", "build", folder, "-o", openai, "--model", "ViT-B-32@openai")[0] == 0
    loads = len(fake_load)
    code, _, err = _run(capsys, "search", laion, "img-001.jpg", "--model", "ViT-B-32-quickgelu@laion2b_s34b_b79k")
    assert code == 1 and "built with model 'ViT-B-32@laion2b_s34b_b79k'" in err and len(fake_load) == loads
    assert _run(capsys, "search", openai, "img-001.jpg", "--model", "ViT-B-32-quickgelu@openai")[0] == 0


def test_an_index_built_with_a_tagless_name_records_the_default_tag(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """`--model ViT-B-32` loads ViT-B-32@openai: the index says so, so a search with other weights
    of the architecture is refused (a tagless index matched any tag: wrong results, no error)."""
    idx = tmp_path / "p.index"
    code, out, _ = _run(capsys, "index", "build", folder, "-o", idx, "--model", "ViT-B-32", "--json")
    assert code == 0 and json.loads(out)["model"] == "ViT-B-32@openai"
    loads = len(fake_load)
    code, _, err = _run(capsys, "search", idx, "img-001.jpg", "--model", "ViT-B-32@laion2b_s34b_b79k")
    assert code == 1 and "built with model 'ViT-B-32@openai'" in err and len(fake_load) == loads
    assert _run(capsys, "search", idx, "img-001.jpg", "--model", "ViT-B-32")[0] == 0
    distributed_fakes.write_images(folder / "new", 2, seed=5)  # the embeddings' tagless name still adds
    code, out, _ = _run(capsys, "index", "add", idx, folder, "--json")
    assert code == 0 and json.loads(out)["added"] == 2


def test_damaged_or_missing_index_is_a_one_line_error(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    code, _, err = _run(capsys, "search", tmp_path / "none.index", "x")
    assert code == 1 and err.startswith("error: no index at")
    idx = tmp_path / "p.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")[0] == 0
    next(idx.glob("meta-*.jsonl")).unlink()
    code, _, err = _run(capsys, "search", idx, "img-001.jpg")
    assert code == 1 and "meta file" in err and "is missing" in err and len(err.strip().splitlines()) == 1


def test_build_keeps_sizes_of_names_with_unicode_line_separators(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    odd = "odd\u2028name\x85 \u00e9.jpg"  # splitlines() breaks at U+2028 and NEL; JSON keeps them raw
    (folder / "img-003.jpg").rename(folder / odd)
    emb, idx = tmp_path / "emb", tmp_path / "p.index"
    code, _, err = _run(
        capsys, "embed", folder, "-o", emb, "--model", "fake", "--workers", "0", "--no-progress"
    )
    assert code == 0, err
    code, _, err = _run(capsys, "index", "build", emb, "-o", idx)
    assert code == 0, err
    from PIL import Image

    from clipengine.index import Index

    with Image.open(folder / odd) as im:
        size = im.size
    index = Index.load(idx)
    assert odd in index and index.size_of(odd) == size


def test_add_pretrained_same_tag_as_the_index_is_kept_another_is_refused(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """`index add --pretrained TAG` on an index recorded as NAME@TAG loads NAME@TAG (not NAME@TAG@TAG, which
    the add folder would record and every later `index add` would then refuse); another tag is refused
    before any image is embedded."""
    idx = tmp_path / "p.index"
    code, out, _ = _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--pretrained", "t1", "--json")
    assert code == 0 and json.loads(out)["model"] == "fake@t1"
    distributed_fakes.write_images(folder / "new", 2, seed=5)

    code, _, err = _run(capsys, "index", "add", idx, folder, "--pretrained", "t2")
    assert code == 2 and "names other weights" in err
    assert not list(tmp_path.glob("p.index.embeddings-add-*"))

    code, out, _ = _run(capsys, "index", "add", idx, folder, "--pretrained", "t1", "--json")
    assert code == 0 and json.loads(out)["added"] == 2
    assert (fake_load[-1].model, fake_load[-1].pretrained) == ("fake@t1", None)


def test_pretrained_without_a_model_is_never_silently_ignored(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """`search --pretrained` alone names the tag of the index's model (the same one again is fine,
    another is refused before loading); `index build EMB --pretrained` alone is a usage error, since
    the model is the one the embeddings record."""
    emb, idx = tmp_path / "emb", tmp_path / "p.index"
    code, _, err = _run(capsys, "embed", folder, "-o", emb, "--model", "fake", "--pretrained", "t1", "--workers", "0",
                        "--no-progress")  # fmt: skip
    assert code == 0, err
    code, _, err = _run(capsys, "index", "build", emb, "-o", idx, "--pretrained", "t2")
    assert code == 2 and "--pretrained t2 needs --model" in err
    code, _, err = _run(capsys, "index", "build", emb, "-o", idx)
    assert code == 0, err
    loads = len(fake_load)
    code, _, err = _run(capsys, "search", idx, "img-004.jpg", "--pretrained", "t2")
    assert code == 2 and "names other weights" in err and len(fake_load) == loads
    code, _, err = _run(capsys, "search", idx, "img-004.jpg", "--pretrained", "t1")
    assert code == 0, err
    assert (fake_load[-1].model, fake_load[-1].pretrained) == ("fake@t1", None)


def test_search_text_output_keeps_paths_in_one_column(capsys: pytest.CaptureFixture[str]) -> None:
    index = SimpleNamespace(resolve=lambda i: f"/photos/{i}", model="fake")
    index_cmd._print_hits([("a.jpg", 0.5), ("b.jpg", -0.0093), ("c.jpg", -1.0)], index, False, "q")  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    # A minus sign used to push the path of negative scores one column right.
    assert [line.index("/photos/") for line in lines] == [9, 9, 9]
    assert [float(line.split()[0]) for line in lines] == [0.5, -0.0093, -1.0]


def test_add_of_a_folder_or_list_without_images_is_refused(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """It was exit 0, "added 0", where `index build` refuses the same folder: a mistyped folder is
    not a successful add. An add whose every image is indexed already stays one ("skipped N")."""
    idx = tmp_path / "p.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")[0] == 0
    header = (idx / "header.json").read_bytes()
    empty, listed = tmp_path / "empty", tmp_path / "none.txt"
    empty.mkdir()
    listed.write_text("")
    for source in (empty, listed):
        code, out, err = _run(capsys, "index", "add", idx, source)
        assert (code, out, err) == (1, "", f"error: {source}: no images to index\n")
    assert (idx / "header.json").read_bytes() == header
    code, out, _ = _run(capsys, "index", "add", idx, folder, "--json")
    assert code == 0 and (json.loads(out)["added"], json.loads(out)["skipped"]) == (0, 10)


@pytest.fixture
def unreadable(tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    return bad


def test_build_of_only_unreadable_images_fails_and_writes_no_index(
    folder: Path, unreadable: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """It was exit 0 and a 0-image index, as `embed` was: the summary (each failure with its
    reason), then an error naming failures.jsonl, exit 1, and no index written; an index already
    at the output stays as it was."""
    idx = tmp_path / "p.index"
    failures = tmp_path / "p.index.embeddings" / "failures.jsonl"
    code, out, err = _run(capsys, "index", "build", unreadable, "-o", idx, "--model", "fake")
    assert code == 1 and out == "" and not idx.exists()
    lines = err.splitlines()
    assert lines[0].startswith("2 image(s) could not be read") and "empty.jpg: empty file (0 bytes)" in err
    assert lines[-1] == (
        f"error: {unreadable}: none of the 2 images could be read, nothing was indexed; the reasons are in {failures}"
    )
    assert failures.is_file()

    emb = tmp_path / "emb"  # an all-failed embed folder (embed exits 1 but writes it) is refused alike
    embed = ["embed", unreadable, "-o", emb, "--model", "fake", "--workers", "0", "--no-progress"]
    assert _run(capsys, *embed)[0] == 1
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")[0] == 0
    header = (idx / "header.json").read_bytes()
    code, out, err = _run(capsys, "index", "build", emb, "-o", idx, "--json")
    assert code == 1 and json.loads(out)["failed"] == 2 and len(json.loads(out)["failures"]) == 2
    assert err.splitlines()[-1].endswith(f"nothing was indexed; the reasons are in {emb / 'failures.jsonl'}")
    assert (idx / "header.json").read_bytes() == header and len(Index.load(idx)) == 10


def test_add_of_only_unreadable_images_fails_and_changes_nothing(
    folder: Path, unreadable: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """It was exit 0, "added 0", and saved a new generation recording the folder as an image root.
    As `embed`: a source none of whose images can be read is an error (exit 1, after the summary).
    A source that also holds indexed images is not (a retry whose files still fail: see
    test_unreadable_images_are_reported_by_build_and_add). The add's own folder goes, so that a
    rerun after fixing the files embeds them again (a kept complete shard would keep its failures)."""
    idx = tmp_path / "p.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")[0] == 0
    header = (idx / "header.json").read_bytes()
    code, out, err = _run(capsys, "index", "add", idx, unreadable, "--json")
    data = json.loads(out)
    assert code == 1 and (data["added"], data["skipped"], data["failed"], data["count"]) == (0, 0, 2, 10)
    assert "text.png: " in err and err.splitlines()[-1] == (
        f"error: {unreadable}: none of the 2 images could be read, nothing was added; "
        "the reasons are listed above; rerun `clipengine index add` to retry them"
    )
    assert (idx / "header.json").read_bytes() == header
    assert not list(tmp_path.glob("p.index.embeddings-add-*"))
    (unreadable / "text.png").write_bytes((folder / "img-000.jpg").read_bytes())  # fixed
    code, out, err = _run(capsys, "index", "add", idx, unreadable, "--json")
    assert code == 0 and (json.loads(out)["added"], json.loads(out)["failed"]) == (1, 1)
    assert "empty.jpg: " in err

    mine = tmp_path / "mine.emb"  # a folder of the user's is kept, and named
    (other := tmp_path / "other").mkdir()
    (other / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    code, _, err = _run(capsys, "index", "add", idx, other, "--embeddings", mine)
    assert code == 1 and err.splitlines()[-1].endswith(f"the reasons are in {mine / 'failures.jsonl'}")


def test_search_and_failure_lists_escape_control_characters_in_names(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """A newline in a file name split a hit (or a failure) over two lines, and an ESC reached the
    terminal raw; --json keeps the names exact."""
    (folder / "img-001.jpg").rename(folder / "new\nline.jpg")
    (folder / "img-002.jpg").rename(folder / "esc\x1b[31m.jpg")
    (folder / "broken.jpg").rename(folder / "bro\nken.jpg")
    idx = tmp_path / "p.index"
    code, _, err = _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake")
    assert code == 0 and "  bro\\nken.jpg: empty file" in err and "bro\nken" not in err
    code, out, _ = _run(capsys, "search", idx, "img-000.jpg", "-k", "10")
    assert code == 0 and len(out.splitlines()) == 10 and "\x1b" not in out
    assert f"{folder}/new\\nline.jpg" in out and f"{folder}/esc\\x1b[31m.jpg" in out
    code, out, _ = _run(capsys, "search", idx, "img-000.jpg", "-k", "10", "--json")
    paths = {r["path"] for r in json.loads(out)["results"]}
    assert {str(folder / "new\nline.jpg"), str(folder / "esc\x1b[31m.jpg")} <= paths


@pytest.mark.parametrize(
    ("kind", "option", "applies"),
    [("flat", "--nlist", "ivf / ivfpq"), ("flat", "--ef-search", "hnsw"), ("hnsw", "--nprobe", "ivf / ivfpq"),
     ("ivf", "--ef-search", "hnsw"), ("ivfpq", "--ef-search", "hnsw")],
)  # fmt: skip
def test_an_option_the_given_kind_does_not_use_is_refused_before_embedding(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str], kind: str, option: str,
    applies: str,
) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    """`--kind flat --nlist 64` built a flat index and dropped --nlist without a word."""
    idx = tmp_path / "p.index"
    args = ["index", "build", folder, "-o", idx, "--model", "fake", "--kind", kind, option, "4"]
    code, _, err = _run(capsys, *args)
    assert code == 2 and f"{option} applies to --kind {applies}, not {kind}" in err
    assert fake_load == [] and not list(tmp_path.glob("p.index*"))  # refused before the model or any file


def test_an_unknown_kind_is_refused_before_embedding(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """`--kind hnws` loaded the model and embedded every image (hours for a large folder) before
    `Index.build` named the valid kinds."""
    idx = tmp_path / "p.index"
    code, _, err = _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--kind", "hnws")
    assert code == 2 and "unknown index kind 'hnws'; choose 'auto' or one of flat, ivf, ivfpq, hnsw" in err
    assert fake_load == [] and not list(tmp_path.glob("p.index*"))


def test_auto_warns_of_options_its_kind_does_not_use_and_applies_those_it_does(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    from clipengine.index import ann

    idx = tmp_path / "p.index"
    code, out, _ = _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--nlist", "4", "--nprobe",
                        "2", "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["params"] == {"kind": "flat"}  # not recorded as if used
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "--kind auto chose flat for 10 images" in warning.getMessage()
    assert "--nlist, --nprobe ignored (they apply to --kind ivf / ivfpq)" in warning.getMessage()

    caplog.clear()
    monkeypatch.setattr(ann, "AUTO_EXACT_MAX", 5)  # auto picks IVF: --nlist is used
    code, out, _ = _run(capsys, "index", "build", tmp_path / "p.index.embeddings", "-o", tmp_path / "q.index",
                        "--nlist", "2", "--nprobe", "2", "--ef-search", "8", "--json")  # fmt: skip
    params = json.loads(out)["params"]
    assert code == 0 and (params["kind"], params["nlist"], params["nprobe"]) == ("ivf", 2, 2)
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "--ef-search ignored (it applies to --kind hnsw)" in warning.getMessage()

    caplog.clear()  # search: the index's kind decides; --nprobe on an exact index is said to be unused
    assert _run(capsys, "search", idx, "img-001.jpg", "--nprobe", "3")[0] == 0
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "--nprobe ignored: " in warning.getMessage() and "a flat index" in warning.getMessage()
    caplog.clear()
    assert _run(capsys, "search", idx, "img-001.jpg", "--ef-search", "3")[0] == 0
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "--ef-search ignored: " in warning.getMessage() and "(it applies to hnsw)" in warning.getMessage()


def test_search_ef_search_reaches_an_hnsw_index(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The library takes ef_search per query; `search` had no option for it."""
    from clipengine.index import Index

    idx = tmp_path / "h.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", "fake", "--kind", "hnsw")[0] == 0
    seen: list[dict[str, object]] = []
    search = Index.search_vectors

    def spy(self: Index, queries: object, k: int = 10, **tuning: object) -> object:
        seen.append(tuning)
        return search(self, queries, k, **tuning)  # type: ignore[arg-type]

    monkeypatch.setattr(Index, "search_vectors", spy)
    code, out, _ = _run(capsys, "search", idx, "img-001.jpg", "--ef-search", "5", "-k", "1")
    assert code == 0 and seen == [{"nprobe": None, "ef_search": 5}]
    assert out.split()[1] == str(folder / "img-001.jpg")


def test_build_retry_failed_reads_a_fixed_image_again(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """A rebuild resumes INDEX.embeddings, whose complete shards keep their failures."""
    idx = tmp_path / "p.index"
    args = ["index", "build", folder, "-o", idx, "--model", "fake", "--json"]
    assert json.loads(_run(capsys, *args)[1])["count"] == 10  # broken.jpg is empty
    (folder / "broken.jpg").write_bytes((folder / "img-000.jpg").read_bytes())  # fixed
    assert json.loads(_run(capsys, *args)[1])["count"] == 10  # a plain rerun keeps the failure
    code, out, _ = _run(capsys, *args, "--retry-failed")
    assert code == 0 and json.loads(out)["count"] == 11 and "broken.jpg" in Index.load(idx).ids


def test_search_and_add_refuse_a_model_path_whose_files_changed_since_the_build(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    # The index names its model by path: weights saved over it (a fine-tune) kept the name, and
    # searches went on ranking the old embeddings by the new model's queries, with no error.
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights v1")
    idx = tmp_path / "p.index"
    assert _run(capsys, "index", "build", folder, "-o", idx, "--model", model)[0] == 0
    assert _run(capsys, "search", idx, "img-001.jpg", "-k", "1")[0] == 0
    (model / "model.safetensors").write_bytes(b"weights v2")
    more = tmp_path / "more"
    distributed_fakes.write_images(more, 2)
    for args in (("search", idx, "img-001.jpg"), ("index", "add", idx, more)):
        code, _, err = _run(capsys, *args)
        assert code == 1 and "model.safetensors differs" in err and "rebuild the index" in err, err
    assert len(Index.load(idx)) == 10
    (model / "model.safetensors").write_bytes(b"weights v1")  # the weights it was built with again
    assert _run(capsys, "search", idx, "img-001.jpg", "-k", "1")[0] == 0


def test_build_reads_sizes_from_the_runs_own_shards_not_an_older_runs(
    folder: Path, tmp_path: Path, fake_load, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """A rerun over fewer files leaves the older run's last shards behind (read_embeddings skips
    them); the sizes were read from every shard file, so a stale row's old size won."""
    from PIL import Image

    names = sorted(p.name for p in folder.glob("*.jpg"))
    emb, idx = tmp_path / "emb", tmp_path / "p.index"
    embed = ("embed", folder, "-o", emb, "--model", "fake", "--workers", "0", "--no-progress", "--shard-size", "1")
    assert _run(capsys, *embed)[0] == 0
    (folder / names[0]).unlink()  # one partition fewer: the last shard file is now stale
    last = folder / names[-1]
    with Image.open(last) as im:
        resized = im.resize((im.width + 7, im.height + 3))
    resized.save(last)  # its row in the stale shard holds the old size
    assert _run(capsys, *embed)[0] == 0
    assert (emb / "shards" / f"part-{len(names) - 1:05d}.jsonl").is_file()  # the stale shard is there
    assert _run(capsys, "index", "build", emb, "-o", idx)[0] == 0
    assert Index.load(idx).size_of(names[-1]) == resized.size
