"""The server accepts an index built with the same weights even when only one side names the tag."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from clipengine.errors import IndexMismatchError
from clipengine.serve.engine import check_index


def _model(name: str, dim: int = 32) -> SimpleNamespace:
    return SimpleNamespace(name=name, embed_dim=dim)


def _index(model: str, dim: int = 32) -> SimpleNamespace:
    return SimpleNamespace(model=model, dim=dim)


def test_index_with_tag_matches_model_without_tag() -> None:
    check_index(_model("ViT-B-32"), _index("ViT-B-32@openai"))  # type: ignore[arg-type]


def test_index_with_other_tag_is_refused() -> None:
    with pytest.raises(IndexMismatchError, match="laion2b"):
        check_index(_model("ViT-B-32@openai"), _index("ViT-B-32@laion2b_s34b_b79k"))  # type: ignore[arg-type]


def test_index_with_other_dim_is_refused() -> None:
    with pytest.raises(IndexMismatchError, match="dimensions"):
        check_index(_model("ViT-B-32", 512), _index("ViT-B-32", 768))  # type: ignore[arg-type]
