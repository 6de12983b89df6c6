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
    # The weights are as much a part of the engine as the graph: verify_files and --verify check
    # them too (verify_files checked only the .onnx, which no longer holds the weights).
    from clipengine.errors import BackendError
    from clipengine.export.verify import verify_folder

    with open(out / "text_fp32_dyn.onnx.data", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BackendError, match=r"text_fp32_dyn\.onnx\.data: SHA-256 differs"):
        load_export(out, verify_files=True).encode_texts(["a cat"])
    assert [p.split(": ", 1)[0] for p in verify_folder(out)[1]] == [str(out / "text_fp32_dyn.onnx.data")]


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


@pytest.mark.parametrize("trans_b", [False, True])
def test_weight_only_int8_rounds_each_output_channel_and_keeps_float_activations(tmp_path: Path, trans_b: bool) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 40)).astype(np.float32) * np.linspace(0.01, 3, 40, dtype=np.float32)  # (K, N)
    weight = w.T.copy() if trans_b else w
    node = (helper.make_node("Gemm", ["x", "w"], ["y"], transB=1) if trans_b
            else helper.make_node("MatMul", ["x", "w"], ["y"]))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 40])],
                              [numpy_helper.from_array(weight, "w")])
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8w.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    assert quantize.quantize_weights_int8(src, dst) == ("weights", None)

    model = onnx.load(str(dst))
    (stored,) = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", node.op_type]
    assert not [t for t in model.graph.initializer if t.name == "w"]  # the float weight is gone
    q = numpy_helper.to_array(stored).astype(np.float32)
    q = q.T if trans_b else q
    scale = np.abs(w).max(axis=0) / 127  # one scale per output channel, channels 300x apart in size
    assert np.abs(q * scale - w).max(axis=0).max() <= (scale / 2 + 1e-7).max()
    x = rng.standard_normal((5, 48)).astype(np.float32)
    y = ort.InferenceSession(str(dst)).run(None, {"x": x})[0]
    assert np.abs(y - x @ w).max() <= np.abs(x).sum(1).max() * scale.max() / 2 + 1e-5
