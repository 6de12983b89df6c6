"""Image search: a faiss inner-product index over unit embeddings, tied to the model that made them."""

from __future__ import annotations

from .ann import AUTO_EXACT_MAX, KINDS, IndexParams, choose_params
from .index import Hit, Index, QueryModel, same_model
from .rows import sizes_from_rows

__all__ = [
    "AUTO_EXACT_MAX",
    "KINDS",
    "Hit",
    "Index",
    "IndexParams",
    "QueryModel",
    "choose_params",
    "same_model",
    "sizes_from_rows",
]
