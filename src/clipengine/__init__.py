"""clipengine: CLIP from checkpoint to fast, verified inference.

Public API (imports are lazy so `import clipengine` stays cheap and needs no torch):
    load(name_or_path, backend=..., device=..., precision=...) -> ClipModel
    tokenize(texts, context_length=77, truncate=True) -> (N, L) int64
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what mypy sees; at run time `__getattr__` imports these on first use
    from .api import ClipModel, load
    from .index import Index
    from .text.tokenizer import tokenize

__version__ = "0.1.0"

__all__ = ["ClipModel", "Index", "__version__", "load", "tokenize"]

_LAZY = {
    "load": ("clipengine.api", "load"),
    "ClipModel": ("clipengine.api", "ClipModel"),
    "tokenize": ("clipengine.text.tokenizer", "tokenize"),
    "Index": ("clipengine.index", "Index"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'clipengine' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names too: dir() and IPython's tab completion list only what is imported otherwise.
    return sorted({*globals(), *_LAZY})
