"""Runtimes that turn pixels and tokens into embeddings; `create_backend` imports each one lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from ..types import Backend

__all__ = ["BACKEND_KINDS", "FOLDER_BACKENDS", "Backend", "create_backend"]

BACKEND_KINDS = ("torch", "onnx", "openvino")
FOLDER_BACKENDS = ("onnx", "openvino")  # the kinds that run `clipengine export` folders


def create_backend(
    kind: str, model_or_path: Any, *, device: str = "cpu", precision: str = "fp32", **opts: Any
) -> Backend:
    """Build a backend of `kind`.

    Args:
        kind: "torch" (model_or_path is a `clipengine.models.clip.CLIP`), or "onnx" / "openvino"
            (an export folder, run by ONNX Runtime / OpenVINO).
        device: "cpu", "cuda" or "cuda:N" (openvino: "cpu" or an OpenVINO device name, no CUDA).
        precision: "fp32", "bf16", "fp16", "fp8" (torch), or what the export folder holds (onnx;
            openvino also "bf16", computed on the fp32 engines).
        **opts: backend-specific options, passed through.

    Raises:
        InputError (a BackendError): unknown kind, wrong model type, or options the backend rejects.
        BackendError: the backend cannot be created (see each backend).
    """
    if kind == "torch":
        from ..models.clip import CLIP
        from .torch_backend import TorchBackend

        if not isinstance(model_or_path, CLIP):
            raise InputError(
                f"backend 'torch' needs a clipengine CLIP module, got {type(model_or_path).__name__}"
            )
        try:
            return TorchBackend(model_or_path, device=device, precision=precision, **opts)
        except TypeError as e:
            raise InputError(f"backend 'torch': bad options {sorted(opts)} ({e})") from e
    if kind in FOLDER_BACKENDS:
        if not isinstance(model_or_path, (str, Path)):
            raise InputError(
                f"backend {kind!r} needs an export folder path, got {type(model_or_path).__name__}"
            )
        if kind == "onnx":
            from .onnx_backend import OnnxBackend  # optional dependency: onnxruntime

            try:
                return OnnxBackend(model_or_path, device=device, precision=precision, **opts)
            except TypeError as e:
                raise InputError(f"backend 'onnx': bad options {sorted(opts)} ({e})") from e
        from .openvino_backend import OpenVinoBackend  # optional dependency: openvino

        try:
            return OpenVinoBackend(model_or_path, device=device, precision=precision, **opts)
        except TypeError as e:
            raise InputError(f"backend 'openvino': bad options {sorted(opts)} ({e})") from e
    raise InputError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")
