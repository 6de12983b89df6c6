"""FP16 conversion and INT8 quantization of an exported fp32 ONNX graph, plus >2 GB-safe saving.

Choices (measured on ViT-B/32 random weights, CPU, see docs/export.md):
- FP16: onnxconverter-common on the fp32 graph with float32 inputs/outputs kept (`keep_io_types`).
  As faithful as exporting a `.half()` module (both cos 1.000000, max-abs 9e-5) but a 1 s
  rewrite instead of a second 30 s torch export. LayerNormalization keeps its fp32 statistics
  (`stash_type=1`), softmax subtracts its max, and the causal mask is a finite -1e4.
- INT8 dynamic (default): ORT `quantize_dynamic`, MatMul/Gemm weights int8 per output channel,
  activations quantized per call. Static (QDQ, with calibration data): MatMul/Gemm/Conv only;
  quantizing every op (Add, LayerNorm, Softmax, GELU) dropped cosine to 0.985.
- Static activations are int8 with zero point 0 (symmetric), weights int8 per channel: OpenVINO
  maps that onto its int8 brgemm kernels without zero-point subtraction. ViT-B/32 image, batch 32,
  2 Zen 4 cores: OpenVINO 91 img/s symmetric vs 78 asymmetric (uint8 activations); ONNX Runtime
  45 vs 49, where dynamic (45) stays the default. Cosine vs fp32 0.99966 vs 0.99974 (random
  weights, random-pixel calibration).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "INT8_OP_TYPES",
    "INT8_STATIC_OP_TYPES",
    "convert_fp16",
    "quantize_int8",
    "quantize_weights_int8",
    "save_onnx",
]

log = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes; protobuf cannot serialise a model over 2 GiB
INT8_OP_TYPES = ("MatMul", "Gemm")  # dynamic: weights of these ops only
INT8_STATIC_OP_TYPES = ("MatMul", "Gemm", "Conv")  # static QDQ: also the ResNet / patch convs


def _tensor_bytes(model: Any) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def needs_external_data(model: Any, threshold: int = EXTERNAL_DATA_THRESHOLD) -> bool:
    return _tensor_bytes(model) > threshold


def save_onnx(model: Any, path: Path, threshold: int | None = None) -> str | None:
    """Save a ModelProto; weights go to `<name>.data` beside it when they exceed `threshold`.

    Returns:
        The external data file name, or None when everything fits in the .onnx file.
    """
    import onnx

    limit = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    if not needs_external_data(model, limit):
        onnx.save_model(model, str(path))
        return None
    data = f"{path.name}.data"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
        size_threshold=1024,
    )
    return data


def convert_fp16(src: Path, dst: Path, threshold: int | None = None) -> str | None:
    """fp32 graph -> fp16 weights and compute, float32 inputs/outputs. Returns the external data name."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    with warnings.catch_warnings(record=True) as caught:
        # One UserWarning per constant outside fp16's exact range (the -1e4 mask, tiny weights):
        # expected, and what it costs is measured by the parity check that follows.
        warnings.simplefilter("always")
        half = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    if caught:
        log.debug("%s: fp16 conversion rounded %d constants, e.g. %s", src.name, len(caught), caught[0].message)
    return save_onnx(half, dst, threshold)


class _QuietPreprocessHint(logging.Filter):
    """ORT's quantizer logs "Please consider to run pre-processing" on the root logger every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


class _Reader:
    """onnxruntime CalibrationDataReader over an in-memory array, `batch` rows per call."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int | None) -> None:
        step = batch or min(8, len(data))
        chunks = [data[i : i + step] for i in range(0, len(data), step)]
        if batch:  # fixed-batch graphs only accept exactly `batch` rows
            chunks = [c for c in chunks if len(c) == batch] or [np.resize(data, (batch, *data.shape[1:]))]
        self._iter: Iterator[dict[str, np.ndarray]] = iter([{input_name: c} for c in chunks])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:  # part of the CalibrationDataReader protocol; we calibrate once
        pass


def quantize_int8(
    src: Path,
    dst: Path,
    *,
    calibration: np.ndarray | None = None,
    input_name: str = "",
    batch: int | None = None,
    op_types: Sequence[str] | None = None,
    threshold: int | None = None,
) -> tuple[str, str | None]:
    """fp32 graph -> INT8 graph; dynamic without `calibration`, static QDQ with it.

    Args:
        calibration: inputs to calibrate activation ranges on ((N, 3, H, W) pixels or (N, L) tokens).
        input_name: the graph's input name (static only).
        batch: the graph's fixed batch size, None = dynamic (static only).
        op_types: ops to quantize (default INT8_OP_TYPES / INT8_STATIC_OP_TYPES).

    Returns:
        ("dynamic" | "static", external data file name or None).
    """
    hint_filter = _QuietPreprocessHint()
    logging.getLogger().addFilter(hint_filter)
    try:
        return _quantize(src, dst, calibration, input_name, batch, op_types, threshold)
    finally:
        logging.getLogger().removeFilter(hint_filter)


def _quantize(
    src: Path,
    dst: Path,
    calibration: np.ndarray | None,
    input_name: str,
    batch: int | None,
    op_types: Sequence[str] | None,
    threshold: int | None,
) -> tuple[str, str | None]:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    size = sum(p.stat().st_size for p in src.parent.glob(f"{src.name}*"))  # .onnx + .onnx.data
    external = size > (EXTERNAL_DATA_THRESHOLD if threshold is None else threshold)
    if calibration is None:
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=list(op_types or INT8_OP_TYPES), use_external_data_format=external,
        )
        return "dynamic", _external_name(dst)
    quantize_static(
        str(src), str(dst), _Reader(input_name, calibration, batch),
        quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=list(op_types or INT8_STATIC_OP_TYPES), use_external_data_format=external,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return "static", _external_name(dst)


def _external_name(path: Path) -> str | None:
    """The weights file ORT's quantizer wrote beside `path`, if it wrote one."""
    extra = [p.name for p in path.parent.glob(f"{path.name}*") if p != path]
    return extra[0] if extra else None


def quantize_weights_int8(src: Path, dst: Path, threshold: int | None = None) -> tuple[str, str | None]:
    """fp32 graph -> the same graph with MatMul/Gemm weights stored as int8 (weight-only, "int8w").

    Each 2-D weight becomes int8 with one symmetric scale per output channel, followed by a
    DequantizeLinear: no calibration data, activations stay float. Under ONNX Runtime the graph
    computes in fp32 with the rounded weights; OpenVINO reads the pattern as compressed weights and,
    with DYNAMIC_QUANTIZATION_GROUP_SIZE set, quantizes activations per token and channel group
    at run time, so its int8 kernels run with far smaller activation error than static per-tensor
    scales (ViT-B/32 text, 77 tokens: cos 0.9992 vs 0.994; see docs/export.md).

    Returns:
        ("weights", external data file name or None).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        name = node.input[1] if node.op_type in INT8_OP_TYPES and len(node.input) > 1 else ""
        tensor = weights.get(name)
        if tensor is not None and len(tensor.dims) == 2:
            w = numpy_helper.to_array(tensor).astype(np.float32)
            trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
            axis = 0 if trans_b else 1  # the output-channel axis of this weight
            scale = np.maximum(np.abs(w).max(axis=1 - axis) / 127.0, np.finfo(np.float32).tiny).astype(np.float32)
            shape = (-1, 1) if axis == 0 else (1, -1)
            q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            model.graph.initializer.extend([
                numpy_helper.from_array(q, f"{name}_int8"),
                numpy_helper.from_array(scale, f"{name}_scale"),
                numpy_helper.from_array(np.zeros(scale.size, np.int8), f"{name}_zero"),
            ])
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
                                          [f"{name}_dequantized"], axis=axis, name=f"{name}_DequantizeLinear"))  # fmt: skip
            node.input[1] = f"{name}_dequantized"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return "weights", save_onnx(model, dst, threshold)
