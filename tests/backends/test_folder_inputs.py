"""Both export-folder runtimes (ONNX Runtime, OpenVINO) on awkward inputs: every batch size against the
PyTorch reference, non-finite pixels, damaged manifests, engines that are not what the manifest says."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipengine.backends import create_backend
from clipengine.errors import BackendError, InputError

NEEDS_OPENVINO = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
KINDS = ["onnx", pytest.param("openvino", marks=NEEDS_OPENVINO)]


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:  # type: ignore[no-untyped-def]
    """Tiny ViT, fp32 and dynamic int8, image engines b1/b4, text b2 (fixed batches: split and pad)."""
    from clipengine.export.onnx import export_model

    out = tmp_path_factory.mktemp("folder_inputs") / "fixed"
    export_model(tiny_model, out, precisions=("fp32", "int8"), image_batches=(1, 4), text_batches=(2,))
    return out


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:  # type: ignore[no-untyped-def]
    """Tiny ViT, fp32 and dynamic int8, dynamic batch axis, text projection split off."""
    from clipengine.export.onnx import export_model

    out = tmp_path_factory.mktemp("folder_inputs") / "dynamic"
    export_model(tiny_model, out, precisions=("fp32", "int8"), image_batches=None, text_batches=None,
                 split_text_projection=True)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((70, 3, 32, 32)).astype(np.float32)


def _folder(request: pytest.FixtureRequest, name: str) -> Path:
    folder: Path = request.getfixturevalue(name)
    return folder


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["fixed", "dynamic"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_an_input_error_naming_the_rows(
    request: pytest.FixtureRequest, pixels: np.ndarray, kind: str, layout: str, precision: str, value: float
) -> None:
    """A NaN image came back as an all-zero row (l2_normalize keeps zero rows) with no error, and under
    dynamic INT8 it changed the other images of its batch (one activation scale per batch)."""
    backend = create_backend(kind, _folder(request, layout), precision=precision)
    bad = pixels[:9].copy()
    bad[3, 1, 5, 7] = value
    bad[6, 0, 0, 0] = value
    with pytest.raises(InputError, match=r"NaN or infinite values \(rows 3, 6 of 9\)"):
        backend.encode_images(bad)
    with pytest.raises(InputError, match="NaN or infinite"):
        backend.encode_images(bad, normalize=False)
    assert np.isfinite(backend.encode_images(pixels[:9])).all()  # the backend still works


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [0, -4, "4", 2.5, True])
def test_engine_batch_that_is_not_a_positive_integer_is_a_backend_error(
    fixed: Path, tmp_path: Path, pixels: np.ndarray, kind: str, batch: object
) -> None:
    """Batch 0 or below made plan_batches loop forever (no b1 engine) or run nonsense pieces; "4" and
    2.5 failed as TypeErrors ("bad options []" from create_backend, a slice error at the first call)."""
    folder = tmp_path / "copy"
    shutil.copytree(fixed, folder)
    data = json.loads((folder / "manifest.json").read_text())
    for engine in data["engines"]:
        if engine["file"] == "image_fp32_b4.onnx":
            engine["batch"] = batch
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BackendError, match=r"manifest\.json: engine 'image_fp32_b4\.onnx': \"batch\" must be"):
        create_backend(kind, folder).encode_images(pixels[:9])
    assert create_backend(kind, folder, precision="int8").encode_images(pixels[:9]).shape == (9, 32)


@pytest.mark.parametrize(
    ("kind", "option"), [("onnx", "intra_op_threads"), pytest.param("openvino", "threads", marks=NEEDS_OPENVINO)]
)
@pytest.mark.parametrize("value", [True, "too many", 2**40])
def test_thread_counts_that_are_booleans_or_far_above_the_cpus_are_refused(
    dynamic: Path, kind: str, option: str, value: object
) -> None:
    """ONNX Runtime starts every thread when it opens an engine: 1,000 on 2 cores took 51 s, 10**6 never
    finished, 2**40 was a pybind TypeError reported as "bad options"; True ran as 1 thread."""
    too_many = 4 * (os.cpu_count() or 1) + 1
    count = too_many if value == "too many" else value
    with pytest.raises(InputError, match=rf"^{option}"):
        create_backend(kind, dynamic, **{option: count})
    backend = create_backend(kind, dynamic, **{option: os.cpu_count()})
    assert backend.encode_images(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 32)
