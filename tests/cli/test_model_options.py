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


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_download_with_an_export_backend_fetches_no_torch_weights(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`embed --backend onnx --model ViT-L-14 --download` downloaded the 890 MB torch checkpoint,
    then failed: onnx and openvino run export folders only, which are never downloaded."""
    from clipengine.cli import downloads
    from clipengine.cli.model_options import load_clip
    from clipengine.errors import InputError

    fetched: list[str] = []
    monkeypatch.setattr(downloads, "fetch_with_progress", lambda name, pretrained=None: fetched.append(name))
    opts = parse_model_options("ViT-L-14", None, None, backend, "fp32", "cpu", True)
    with pytest.raises(InputError, match=f"backend '{backend}' runs export folders"):
        load_clip(opts)
    assert fetched == []
