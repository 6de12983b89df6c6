"""Runtimes that turn pixels and tokens into embeddings; `create_backend` imports each one lazily."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..types import Backend

__all__ = ["BACKEND_KINDS", "FOLDER_BACKENDS", "Backend", "construct_backend", "create_backend"]

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
            openvino also "bf16", computed on the fp32 engines). The torch backend casts and moves
            the module it is given in place (no copy of a large model): pass `copy.deepcopy(model)`
            to keep the caller's module at fp32 on its device.
        **opts: backend-specific options, passed through.

    Raises:
        InputError (a BackendError): unknown kind, wrong model type, a device that is not a str,
            or options the backend does not take (or rejects).
        BackendError: the backend cannot be created (see each backend).
    """
    if not isinstance(device, str):  # else AttributeError 'int' object has no attribute 'startswith'
        raise InputError(f"device must be a device name (str), e.g. 'cpu' or 'cuda', got {device!r}")
    if kind == "torch":
        from ..models.clip import CLIP
        from .torch_backend import TorchBackend

        if not isinstance(model_or_path, CLIP):
            raise InputError(
                f"backend 'torch' needs a clipengine CLIP module, got {type(model_or_path).__name__}"
            )
        return construct_backend(kind, TorchBackend, model_or_path, device=device, precision=precision, **opts)
    if kind in FOLDER_BACKENDS:
        if not isinstance(model_or_path, (str, Path)):
            raise InputError(
                f"backend {kind!r} needs an export folder path, got {type(model_or_path).__name__}"
            )
        if kind == "onnx":
            from .onnx_backend import OnnxBackend  # optional dependency: onnxruntime

            return construct_backend(kind, OnnxBackend, model_or_path, device=device, precision=precision, **opts)
        from .openvino_backend import OpenVinoBackend  # optional dependency: openvino

        return construct_backend(kind, OpenVinoBackend, model_or_path, device=device, precision=precision, **opts)
    raise InputError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")


def construct_backend(kind: str, cls: Callable[..., Backend], *args: Any, **kwargs: Any) -> Backend:
    """`cls(*args, **kwargs)`, options it does not take an InputError. Only the call's signature is
    checked: a TypeError from inside the constructor was reported as "bad options []" (the options
    were fine; e.g. a manifest batch of "4"), so it now propagates as what it is."""
    try:
        inspect.signature(cls).bind(*args, **kwargs)
    except TypeError as e:
        options = sorted(k for k in kwargs if k not in ("device", "precision"))
        raise InputError(f"backend {kind!r}: bad options {options} ({e})") from e
    return cls(*args, **kwargs)
