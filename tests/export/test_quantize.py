"""Weights outside the .onnx file (the >2 GB path for ViT-g/bigG), exercised with a zero threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipengine.api import load_export
from clipengine.export import quantize
from clipengine.export.manifest import file_sha256


def test_external_data_export_loads_and_records_checksums(tmp_path: Path, tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from clipengine.export.onnx import export_model

    monkeypatch.setattr(quantize, "EXTERNAL_DATA_THRESHOLD", 0)  # every model counts as "large"
    out = tmp_path / "big"
    manifest = export_model(tiny_model, out, precisions=("fp32", "fp16", "int8"), image_batches=None,
                            text_batches=None)
    for engine in manifest.engines:
        assert engine.external_data is not None, engine.file
        assert engine.external_data.startswith(engine.file)
        assert file_sha256(out / engine.external_data) == engine.external_data_sha256
        assert engine.parity is not None and engine.parity.passed
    for precision in ("fp32", "fp16", "int8"):
        vectors = load_export(out, precision=precision).encode_texts(["a cat", "a dog"])
        assert vectors.shape == (2, 32) and np.isfinite(vectors).all()


@pytest.mark.parametrize(("size", "external"), [(10, True), (10**9, False)])
def test_save_onnx_threshold(tmp_path: Path, size: int, external: bool) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight],
    )
    model = helper.make_model(graph)
    data = quantize.save_onnx(model, tmp_path / "m.onnx", threshold=size)
    assert (data == "m.onnx.data") is external
    assert (tmp_path / "m.onnx.data").exists() is external
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
