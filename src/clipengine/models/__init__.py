"""Architectures, checkpoint conversion, weights registry and loading (names resolved lazily: no torch at import)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LoadedModel", "ModelSpec", "WeightSource", "load_model", "parse_spec", "save_model"]

_LAZY = {
    "LoadedModel": "load",
    "load_model": "load",
    "save_model": "saving",
    "ModelSpec": "spec",
    "parse_spec": "spec",
    "WeightSource": "registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
