"""Shared model-selection options: --compile reaches the torch backend and only it."""

from __future__ import annotations

import pytest
import typer

from clipengine.cli.model_options import parse_model_options


def test_compile_is_passed_to_the_torch_backend() -> None:
    opts = parse_model_options("tiny-synth", None, None, "torch", "bf16", "cpu", False, True)
    assert opts.extra == {"compile": True}
    assert parse_model_options("tiny-synth", None, None, "torch", "bf16", "cpu", False).extra == {}


def test_compile_with_onnx_is_a_usage_error() -> None:
    with pytest.raises(typer.BadParameter, match="--compile applies to --backend torch"):
        parse_model_options("models/x", None, None, "onnx", "fp32", "cpu", False, True)


def test_unknown_backend_is_a_usage_error() -> None:
    with pytest.raises(typer.BadParameter, match=r"one of torch, onnx, openvino, got .tensorflow."):
        parse_model_options("tiny-synth", None, None, "tensorflow", "fp32", "cpu", False)
