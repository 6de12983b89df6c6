"""Index arguments of the wrong kind are refused up front with a message naming them: before, some
were taken silently and broke later (a str as ids, model=None, bad sizes failing at save) and some
were bare numpy/Python errors naming nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipengine.index import Index
from clipengine.models.clip import CLIP

V = np.eye(3, 8, dtype=np.float32)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ("abc", r"ids must be a list of ids, not one string \('abc'\)"),  # was 3 ids "a", "b", "c"
        ([1, 2, 3], r"ids\[0\] is int \(1\), not a str"),  # came back from load as "1", "2", "3"
        (None, r"ids must be a list of str, got NoneType"),  # was "object of type 'NoneType' has no len()"
    ],
)
def test_ids_must_be_a_list_of_str(ids: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Index.build(ids, V, model="m")
    index = Index.build(["x", "y", "z"], V, model="m")
    with pytest.raises(ValueError, match=match):
        index.add(ids, V)
    assert len(index) == 3


@pytest.mark.parametrize("model", [None, "", 5])
def test_build_refuses_a_model_that_is_not_a_name(model: Any) -> None:
    # None was stored, then every later query failed with AttributeError in same_model.
    with pytest.raises(ValueError, match=r"^model must be the name of the model that made the vectors"):
        Index.build(["a", "b", "c"], V, model=model)


def test_bad_sizes_are_refused_at_build_not_at_save(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sizes\[1\] is 'ab'; expected \(width, height\)"):
        Index.build(["a", "b", "c"], V, model="m", sizes=[(4, 3), "ab", None])
    index = Index.build(["a", "b", "c"], V, model="m", sizes=[(4, 3), [5, 6], None])
    index.save(tmp_path / "idx")
    assert Index.load(tmp_path / "idx").size_of("b") == (5, 6)


@pytest.mark.parametrize(("where", "value"), [("vectors", [["a"] * 8] * 3), ("queries", "a dog")])
def test_non_numeric_vectors_name_the_argument(where: str, value: Any) -> None:
    # Was numpy's "could not convert string to float: 'a'".
    with pytest.raises(ValueError, match=rf"^{where} must be a numeric \(N, D\) matrix, got dtype <U"):
        if where == "vectors":
            Index.build(["a", "b", "c"], value, model="m", dim=8)
        else:
            Index.build(["a", "b", "c"], V, model="m").search_vectors(value, k=1)


def test_one_image_root_as_a_str_is_one_root() -> None:
    assert Index.build(["a", "b", "c"], V, model="m", image_roots="/data/pics").image_roots == ["/data/pics"]


def test_ann_parameter_that_is_not_an_integer_is_named() -> None:
    # Was TypeError: '<' not supported between instances of 'str' and 'int'.
    with pytest.raises(TypeError, match=r"^nlist must be an integer >= 1, got '4'$"):
        Index.build(["a", "b", "c"], V, model="m", kind="ivf", nlist="4")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: CLIP) -> Any:
    import clipengine
    from clipengine.models.saving import save_model

    return clipengine.load(save_model(tiny_model, tmp_path_factory.mktemp("index_inputs") / "tiny"))


@pytest.mark.parametrize("texts", [None, 5])
def test_search_texts_refuses_what_is_not_text(clip_model: Any, texts: Any) -> None:
    index = Index.build(["a"], clip_model.encode_texts(["a dog"]), model=clip_model.name)
    with pytest.raises(
        ValueError, match=rf"^texts must be a str or a list of str, got {type(texts).__name__}"
    ):
        index.search_texts(clip_model, texts)


def test_search_images_takes_a_preprocessed_batch(clip_model: Any) -> None:
    # A (N, 3, S, S) array was wrapped in a list and refused as one image of the wrong shape.
    images = [np.full((8, 8, 3), v, np.uint8) for v in (0, 120, 250)]
    index = Index.build(["a", "b", "c"], clip_model.encode_images(images), model=clip_model.name)
    pixels = np.stack([clip_model.preprocess(im) for im in images])
    assert index.search_images(clip_model, pixels, k=3) == index.search_images(clip_model, images, k=3)
    assert len(index.search_images(clip_model, pixels, k=1)) == 3


def test_save_and_load_name_a_path_of_the_wrong_type() -> None:
    # Were pathlib's "expected str, bytes or os.PathLike object, not NoneType".
    with pytest.raises(TypeError, match=r"^path must be an index folder path \(str or Path\), got NoneType$"):
        Index.build(["a", "b", "c"], V, model="m").save(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^path must be an index folder path \(str or Path\), got int$"):
        Index.load(5)  # type: ignore[arg-type]


def test_k_may_not_be_a_bool() -> None:
    # k=True searched as k=1 without a word.
    with pytest.raises(TypeError, match=r"^k must be an integer, got True$"):
        Index.build(["a", "b", "c"], V, model="m").search_vectors(V[:1], k=True)
