"""An eval that is interrupted part way (killed, Ctrl-C, a reboot) resumes from its finished chunks."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipengine.api import ClipModel
from clipengine.backends.base import l2_normalize
from clipengine.eval import features, folders, labelled, synthetic
from clipengine.eval.zeroshot import build_classifier, encode_dataset, evaluate_zeroshot
from clipengine.image.preprocess import PreprocessConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_SYNTH_DIR = REPO_ROOT / "src" / "clipengine" / "weights" / "tiny-synth"
CHUNK = 8  # rows per checkpoint in these tests
TEMPLATES = ["a photo of a {}."]


class Interrupted(Exception):
    """What a Ctrl-C or a crash part way through the image tower is, for these tests."""


class CountingBackend:
    """A fixed random projection that counts the dataset rows it encodes (raw features: the eval
    path; the model fingerprint asks for unit rows) and is interrupted after `stop_after` of them."""

    name, device, precision, embed_dim, image_size, context_length = "fake", "cpu", "fp32", 8, 32, 77

    def __init__(self, stop_after: int | None = None) -> None:
        rng = np.random.default_rng(1)
        self.w_img = rng.standard_normal((3 * 32 * 32, 8)).astype(np.float32)
        self.w_txt = rng.standard_normal((77, 8)).astype(np.float32)
        self.rows = 0
        self.stop_after = stop_after

    def encode_images(self, pixels: np.ndarray, *, normalize: bool = True) -> np.ndarray:
        out = pixels.reshape(len(pixels), -1) @ self.w_img
        if normalize:
            return l2_normalize(out)
        if self.stop_after is not None and self.rows + len(pixels) > self.stop_after:
            raise Interrupted(f"interrupted after {self.rows} rows")
        self.rows += len(pixels)
        return out

    def encode_texts(self, tokens: np.ndarray) -> np.ndarray:
        return l2_normalize(tokens.astype(np.float32) @ self.w_txt)


def _model(stop_after: int | None = None) -> ClipModel:
    return ClipModel(CountingBackend(stop_after), PreprocessConfig(image_size=32), "fake", 100.0)  # type: ignore[arg-type]


def _rows(model: ClipModel) -> int:
    return model.backend.rows  # type: ignore[attr-defined,no-any-return]


def _arrays(n: int, seed: int = 3) -> labelled.LabelledImages:
    ds = synthetic.generate(n, seed=seed, task="shape")
    return labelled.LabelledImages("arrays", list(ds.classnames), ds.labels, ds.images)


def _folder(root: Path, n: int = 30, broken: tuple[int, ...] = ()) -> labelled.LabelledImages:
    """An ImageFolder of `n` images, those at sorted positions `broken` cut short (undecodable)."""
    synthetic.write_imagefolder(root, synthetic.generate(n, seed=4, task="shape", image_size=32))
    data = folders.load_imagefolder(root)
    assert data.paths is not None
    for i in broken:
        data.paths[i].write_bytes(data.paths[i].read_bytes()[:30])
    return folders.load_imagefolder(root)  # again: the digest covers the files as they are now


def _interrupt(data: labelled.LabelledImages, stop_after: int) -> Path:
    """Run until the backend is interrupted; the partial folder it leaves behind."""
    with pytest.raises(Interrupted):
        features.checkpointed_features(_model(stop_after), data, batch_size=4, chunk_rows=CHUNK)
    return features.partial_folder(features.feature_cache_path(_model(), data))


def _uninterrupted(data: labelled.LabelledImages, home: Path, monkeypatch: pytest.MonkeyPatch) -> features.FeatureRun:
    """A run from scratch in its own cache home, for reference."""
    with monkeypatch.context() as m:
        m.setenv("CLIPENGINE_HOME", str(home))
        return features.checkpointed_features(_model(), data, batch_size=4, chunk_rows=CHUNK)


def test_a_resumed_run_encodes_only_the_rest_and_equals_an_uninterrupted_one(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    data = _arrays(50)
    partial = _interrupt(data, stop_after=20)  # chunks 0-7 and 8-15 done, killed inside 16-23
    assert sorted(p.name for p in partial.iterdir()) == ["rows-000000000-000000008.npz", "rows-000000008-000000016.npz"]
    told: list[tuple[int, int, Path]] = []
    model = _model()
    run = features.checkpointed_features(
        model, data, batch_size=4, chunk_rows=CHUNK, on_resume=lambda *a: told.append(a)
    )
    assert _rows(model) == 50 - 16 and run.resumed == 16 and not run.hit
    assert told == [(16, 50, partial)]
    reference = _uninterrupted(data, tmp_path / "fresh", monkeypatch)
    assert np.array_equal(run.split.features, reference.split.features)
    assert not partial.exists()  # all in the complete cache file now
    path = features.feature_cache_path(model, data)
    assert np.array_equal(np.load(path), reference.split.features)
    again = features.checkpointed_features(_model(), data, chunk_rows=CHUNK)
    assert again.hit and np.array_equal(again.split.features, reference.split.features)


def test_failures_keep_their_reasons_through_a_resume_and_the_cache(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    data = _folder(tmp_path / "images", broken=(2, 20))
    reference = _uninterrupted(data, tmp_path / "fresh", monkeypatch)
    expected = reference.split.unreadable()
    assert [u["path"] for u in expected] == [str(data.paths[2]), str(data.paths[20])]  # type: ignore[index]
    assert all(u["reason"] and "cache" not in u["reason"] for u in expected)
    _interrupt(data, stop_after=CHUNK + 3)  # the first chunk (with image 2's failure) is kept
    model = _model()
    resumed = features.checkpointed_features(model, data, batch_size=4, chunk_rows=CHUNK)
    assert resumed.resumed == CHUNK and _rows(model) == len(data) - CHUNK - 1  # image 20 is not encoded
    assert resumed.split.unreadable() == expected
    assert np.array_equal(resumed.split.features, reference.split.features, equal_nan=True)
    cached = features.checkpointed_features(_model(), data, chunk_rows=CHUNK)
    assert cached.hit and cached.split.unreadable() == expected


def _damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _damage_shape(path: Path) -> None:
    with path.open("wb") as f:
        np.savez(f, features=np.ones((3, 8), np.float32), failed_rows=np.zeros(0, np.int64), reasons=np.array([], str))


def _damage_nan_without_reason(path: Path) -> None:
    with np.load(path) as z:
        feats = z["features"].copy()
    feats[1] = np.nan
    with path.open("wb") as f:
        np.savez(f, features=feats, failed_rows=np.zeros(0, np.int64), reasons=np.array([], str))


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_shape, _damage_nan_without_reason])
def test_a_damaged_chunk_is_encoded_again_with_a_warning(damage, tmp_path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    data = _arrays(40)
    partial = _interrupt(data, stop_after=2 * CHUNK + 1)
    damaged = partial / "rows-000000008-000000016.npz"
    damage(damaged)
    model = _model()
    with caplog.at_level(logging.WARNING, logger="clipengine.eval.features"):
        run = features.checkpointed_features(model, data, batch_size=4, chunk_rows=CHUNK)
    assert run.resumed == CHUNK and _rows(model) == 40 - CHUNK
    assert any("damaged checkpoint" in r.getMessage() and damaged.name in r.getMessage() for r in caplog.records)
    reference = _uninterrupted(data, tmp_path / "fresh", monkeypatch)
    assert np.array_equal(run.split.features, reference.split.features)


def test_a_changed_dataset_does_not_reuse_the_chunks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = _folder(tmp_path / "images")
    old_partial = _interrupt(data, stop_after=2 * CHUNK + 1)
    assert old_partial.is_dir()
    replaced = data.paths[3]  # type: ignore[index]
    other = synthetic.generate(1, seed=99, task="shape", image_size=40)
    from PIL import Image

    Image.fromarray(other.images[0]).save(replaced)  # same name, another image
    changed = folders.load_imagefolder(tmp_path / "images")
    told: list[object] = []
    model = _model()
    run = features.checkpointed_features(model, changed, batch_size=4, chunk_rows=CHUNK, on_resume=told.append)
    assert run.resumed == 0 and told == [] and _rows(model) == len(changed)
    assert features.partial_folder(features.feature_cache_path(model, changed)) != old_partial


def test_zeroshot_resumes_and_scores_as_an_uninterrupted_run(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    data = _arrays(40)
    monkeypatch.setattr(features, "CHUNK_ROWS", CHUNK)
    with pytest.raises(Interrupted):
        evaluate_zeroshot(_model(stop_after=CHUNK * 3), data, TEMPLATES, batch_size=4)
    model = _model()
    resumed = evaluate_zeroshot(model, data, TEMPLATES, batch_size=4)
    assert resumed.resumed == 3 * CHUNK and _rows(model) == 40 - 3 * CHUNK
    with monkeypatch.context() as m:
        m.setenv("CLIPENGINE_HOME", str(tmp_path / "fresh"))
        fresh = evaluate_zeroshot(_model(), data, TEMPLATES, batch_size=4)
    assert (resumed.top1, resumed.top5, resumed.per_class) == (fresh.top1, fresh.top5, fresh.per_class)
    assert np.array_equal(resumed.predictions, fresh.predictions)


def test_no_cache_neither_resumes_nor_writes(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    data = _arrays(40)
    partial = _interrupt(data, stop_after=CHUNK + 1)
    before = sorted(p.name for p in partial.iterdir())
    model = _model()
    run = features.checkpointed_features(model, data, batch_size=4, chunk_rows=CHUNK, cache=False)
    assert run.resumed == 0 and _rows(model) == 40
    assert sorted(p.name for p in partial.iterdir()) == before  # left for a later run with the cache
    assert not features.feature_cache_path(model, data).exists()


@pytest.mark.skipif(not (TINY_SYNTH_DIR / "model.safetensors").is_file(), reason="tiny-synth weights missing")
def test_zeroshot_on_cached_raw_features_equals_unit_embeddings(tiny_synth, imagefolder_root) -> None:  # type: ignore[no-untyped-def]
    """Normalising the cached raw features at use scores as encoding unit rows did (the code before)."""
    data = folders.load_imagefolder(imagefolder_root)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    result = evaluate_zeroshot(tiny_synth, data, templates)
    weights = build_classifier(tiny_synth.encode_texts, data.classnames, templates)
    unit = encode_dataset(tiny_synth, data, 64).features
    expected = (unit @ weights).argmax(axis=1)
    assert np.array_equal(result.predictions, expected)
    assert result.top1 == float((expected == data.labels).mean())
    cached = evaluate_zeroshot(tiny_synth, data, templates)  # from the cache file now
    assert np.array_equal(cached.predictions, expected)


_KILLED_RUN = """
import os, signal, sys
from clipengine.eval import features
features.CHUNK_ROWS = 16
real = features._write_chunk
written = []
def write_then_die(*args, **kwargs):
    real(*args, **kwargs)
    written.append(1)
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # a kill -9 / power cut right after the second checkpoint
features._write_chunk = write_then_die
from clipengine.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not (TINY_SYNTH_DIR / "model.safetensors").is_file(), reason="tiny-synth weights missing")
def test_cli_run_killed_with_sigkill_resumes_and_says_so(imagefolder_root, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from clipengine.cli.app import app

    args = ["eval", "zeroshot", "-d", "folder", "--root", str(imagefolder_root), "-m", str(TINY_SYNTH_DIR),
            "--out", str(tmp_path / "reports")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, *args], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    monkeypatch.setattr(features, "CHUNK_ROWS", 16)
    resumed = CliRunner().invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming: 32 of 200 images from a previous run" in resumed.output
    assert ".partial" in resumed.output
    fresh = CliRunner().invoke(app, [*args, "--no-cache"])
    assert fresh.exit_code == 0 and "resuming" not in fresh.output

    def scores(output: str) -> str:  # "torch fp32: top-1 ... recall ...%", without the seconds
        return next(line for line in output.splitlines() if "top-1" in line).split("(")[0]

    assert scores(resumed.output) == scores(fresh.output)


def test_a_checkpoint_that_cannot_be_written_does_not_stop_the_eval(tmp_path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """A full disk or a read-only cache home costs the resume, not the result; warned once."""
    data = _arrays(40)

    def disk_full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    model = _model()
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="clipengine.eval.features"):
        m.setattr(np, "savez", disk_full)
        run = features.checkpointed_features(model, data, batch_size=4, chunk_rows=CHUNK)
    assert _rows(model) == 40 and not run.hit
    warned = [r.getMessage() for r in caplog.records if "without saving" in r.getMessage()]
    assert len(warned) == 1 and "No space left" in warned[0]
    reference = _uninterrupted(data, tmp_path / "fresh", monkeypatch)
    assert np.array_equal(run.split.features, reference.split.features)
    assert features.checkpointed_features(_model(), data, chunk_rows=CHUNK).hit  # the complete file was saved
