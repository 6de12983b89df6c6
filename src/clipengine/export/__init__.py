"""ONNX export with built-in parity verification, and loading export folders (loading needs no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# What mypy sees; at run time `__getattr__` imports these on first use. Not load_export: an import
# of clipengine.api here, even for type checking only, breaks the layers contract (export is below api).
if TYPE_CHECKING:
    from .manifest import EngineInfo, Manifest, read_manifest
    from .onnx import export_model

__all__ = ["EngineInfo", "Manifest", "export_model", "load_export", "read_manifest"]

_LAZY = {
    "export_model": ("clipengine.export.onnx", "export_model"),  # imports torch
    "load_export": ("clipengine.api", "load_export"),  # kept here for discoverability
    "EngineInfo": ("clipengine.export.manifest", "EngineInfo"),
    "Manifest": ("clipengine.export.manifest", "Manifest"),
    "read_manifest": ("clipengine.export.manifest", "read_manifest"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'clipengine.export' has no attribute {name!r}")
