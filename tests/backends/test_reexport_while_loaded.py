"""A backend opens its engines on first use, maybe hours after it read the manifest (a server). A
re-export in between could give its engines the old names back, and then one model's engines ran
under another's backend without a word (found by helper 77: cosine 1.0 to the new weights' image
embeddings, 0.13 to the loaded ones')."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from reweighted import reweighted

from clipengine.backends import create_backend
from clipengine.errors import BackendError
from clipengine.export.manifest import MANIFEST_FILE


def _export(model, out: Path) -> None:  # type: ignore[no-untyped-def]
    from clipengine.export.onnx import export_model

    export_model(model, out, image_batches=(1,), text_batches=(1,), verify=False)



def test_engines_opened_after_a_reexport_are_refused_not_mixed(tmp_path: Path, tiny_model, vit_b1_export: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "export"
    shutil.copytree(vit_b1_export, out)  # what _export(tiny_model, out) writes
    backend = create_backend("onnx", out)  # reads the manifest; opens no engine yet
    # Two re-exports: the first tags its names (the old files are still published), the second
    # takes the plain names back, with other weights behind them.
    _export(reweighted(tiny_model, 1), out)
    _export(reweighted(tiny_model, 2), out)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with pytest.raises(BackendError, match=r"exported again since this backend read its manifest.*load the folder again"):
        backend.encode_images(pixels)
    fresh = create_backend("onnx", out)  # loading again is the fix the message names
    assert fresh.encode_images(pixels).shape == (1, fresh.embed_dim)


def test_a_manifest_replaced_by_rename_is_seen_and_engines_opened_before_keep_running(
    tmp_path: Path, vit_b1_export: Path
) -> None:
    out = tmp_path / "export"
    shutil.copytree(vit_b1_export, out)  # what _export(tiny_model, out) writes
    backend = create_backend("onnx", out)
    pixels = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    before = backend.encode_images(pixels)  # the image engine is open now
    manifest = out / MANIFEST_FILE
    replacement = out / "manifest.json.new"
    replacement.write_bytes(manifest.read_bytes())  # same content, a new file: what an export does
    os.replace(replacement, manifest)
    np.testing.assert_array_equal(backend.encode_images(pixels), before)  # an engine it holds
    with pytest.raises(BackendError, match="exported again"):
        backend.encode_texts(np.zeros((1, 77), dtype=np.int64))  # would open a text engine now


def test_open_engines_opens_every_engine_so_a_reexport_after_it_changes_nothing(
    tmp_path: Path, tiny_model
) -> None:  # type: ignore[no-untyped-def]
    """What the server calls at start: the engines it will ever run are the ones it loaded."""
    from clipengine.export.onnx import export_model

    out = tmp_path / "export"
    export_model(tiny_model, out, image_batches=(1, 4), text_batches=(2,), verify=False)
    backend = create_backend("onnx", out)
    backend.open_engines()  # type: ignore[attr-defined]
    pixels = np.random.default_rng(2).standard_normal((5, 3, 32, 32)).astype(np.float32)  # b4 + b1
    tokens = np.zeros((3, 77), dtype=np.int64)  # b2 twice
    before = backend.encode_images(pixels), backend.encode_texts(tokens)
    _export(reweighted(tiny_model, 3), out)
    _export(reweighted(tiny_model, 4), out)
    after = backend.encode_images(pixels), backend.encode_texts(tokens)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
