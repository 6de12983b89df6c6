"""Dynamic export folders give text engines a symbolic length: the folder backends run each batch only
up to its last end-of-text token, with the same embeddings as the full 77-token call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipengine.backends.base import truncated_text_length
from clipengine.backends.folder import FolderEngine
from clipengine.backends.onnx_backend import OnnxBackend
from clipengine.export.manifest import read_manifest


@pytest.fixture(scope="module")
def dynamic_dir(vit_dynamic_int8_export: Path) -> Path:
    """The tiny model's dynamic export (fp32, read here, and int8): the session's, not one more."""
    return vit_dynamic_int8_export


def _tokens(ends: list[int], length: int = 77) -> np.ndarray:
    rng = np.random.default_rng(3)
    x = rng.integers(1, 49000, (len(ends), length)).astype(np.int64)
    x[:, 0] = 49406
    x[np.arange(len(ends)), ends] = 49407
    return x


@pytest.mark.parametrize(("ends", "expected"), [([3], 8), ([7], 8), ([8], 16), ([2, 20], 24), ([76], 77), ([75], 77)])
def test_truncated_length_covers_the_last_eot_in_buckets(ends: list[int], expected: int) -> None:
    assert truncated_text_length(_tokens(ends)) == expected
    assert truncated_text_length(np.zeros((0, 77), np.int64)) == 77


def test_dynamic_text_engine_has_symbolic_length_and_runs_truncated(
    dynamic_dir: Path, tiny_model, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    import torch

    (text,) = read_manifest(dynamic_dir).select("text", "fp32")
    assert isinstance(text.inputs[0].shape[0], str) and isinstance(text.inputs[0].shape[1], str)
    widths: list[int] = []
    real_run = FolderEngine.run

    def spy(self: FolderEngine, x: np.ndarray) -> np.ndarray:
        inner = self.infer

        def record(y: np.ndarray) -> np.ndarray:
            widths.append(y.shape[1])
            return inner(y)

        monkeypatch.setattr(self, "infer", record)
        return real_run(self, x)

    monkeypatch.setattr(FolderEngine, "run", spy)
    backend = OnnxBackend(dynamic_dir)
    # Junk after each EOT: truncation must not change anything, and the junk must not leak in.
    tokens = _tokens([4, 11, 30, 6])
    got = backend.encode_texts(tokens)
    with torch.no_grad():
        ref = tiny_model.encode_text(torch.from_numpy(tokens)).numpy()
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    assert widths == [32]
    assert np.abs(got - ref).max() <= 1e-5
    full = backend.encode_texts(_tokens([76, 5]))  # one text fills the context: no truncation
    assert widths[-1] == 77 and full.shape == (2, tiny_model.config.embed_dim)


def test_fixed_text_engines_keep_their_static_length(dynamic_dir: Path, tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    from clipengine.export.onnx import export_model

    out = tmp_path / "fixed"
    export_model(tiny_model, out, precisions=("fp32",), image_batches=(1,), text_batches=(2,))
    (text,) = read_manifest(out).select("text", "fp32")
    assert text.inputs[0].shape == [2, 77]
    engine = OnnxBackend(out)._text.first()
    assert not engine.truncates_text


def test_openvino_runs_the_truncated_text_engine_too(dynamic_dir: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("openvino")
    from clipengine.backends.openvino_backend import OpenVinoBackend

    tokens = _tokens([4, 11, 30, 6, 76])
    ort_out = OnnxBackend(dynamic_dir).encode_texts(tokens)
    ov_out = OpenVinoBackend(dynamic_dir).encode_texts(tokens)
    assert np.abs(ort_out - ov_out).max() <= 1e-5
