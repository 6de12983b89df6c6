"""embed_folder / partitions / list_items / read_* name an argument of the wrong type or range before anything is written:
they were bare errors from deep inside ("'<' not supported between instances of 'str' and 'int'",
"'NoneType' object has no attribute 'to_dict'", "'NoneType' object is not iterable")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipengine.errors import DatasetError
from clipengine.pipeline import embed_folder, list_items, partitions, read_embeddings, read_failures


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": "8"}, TypeError, r"^batch_size must be an integer >= 1, got '8'$"),
        ({"batch_size": 0}, ValueError, r"^batch_size must be an integer >= 1, got 0$"),
        ({"shard_size": 2.5}, TypeError, r"^shard_size must be an integer >= 1, got 2.5$"),
        ({"workers": "2"}, TypeError, r"^workers must be an integer >= 0, got '2'$"),
        ({"workers": -1}, ValueError, r"^workers must be an integer >= 0, got -1$"),  # was taken as 0
        ({"preprocess_cfg": None}, TypeError, r"^preprocess_cfg must be the model's PreprocessConfig"),
        (
            {"source": None},
            TypeError,
            r"^source must be a folder, a file list or a list of ImageItems, got NoneType$",
        ),
        ({"out_dir": None}, TypeError, r"^out_dir must be a folder path \(str or Path\), got NoneType$"),
    ],
)
def test_bad_arguments_are_named_before_anything_is_written(
    image_folder: Path, tmp_path: Path, fake_factory: Any, preprocess_cfg: Any, kwargs: dict[str, Any],
    error: type[Exception], match: str,
) -> None:  # fmt: skip
    args: dict[str, Any] = {
        "workers": 0,
        "source": image_folder,
        "out_dir": tmp_path / "out",
        "preprocess_cfg": preprocess_cfg,
    }
    args.update(kwargs)
    positional = [args.pop(k) for k in ("source", "out_dir")]
    with pytest.raises(error, match=match):
        embed_folder(positional[0], positional[1], fake_factory, args.pop("preprocess_cfg"), **args)
    assert not (tmp_path / "out").exists()


def test_numpy_integer_sizes_are_accepted(
    image_folder: Path, tmp_path: Path, fake_factory: Any, preprocess_cfg: Any
) -> None:
    stats = embed_folder(
        image_folder, tmp_path / "out", fake_factory, preprocess_cfg, workers=0,
        batch_size=np.int64(2), shard_size=np.int64(3),
    )  # fmt: skip
    assert stats.embedded == stats.images > 0


def test_partition_size_that_is_not_an_integer_is_named() -> None:
    with pytest.raises(TypeError, match=r"^partition size must be an integer >= 1, got '2'$"):
        partitions([], "2")  # type: ignore[arg-type]


def test_read_failures_of_a_folder_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    # A mistyped folder read as "no failures" ([]), while read_embeddings of it raised.
    with pytest.raises(DatasetError, match=r"out-typo: no such embed output folder"):
        read_failures(tmp_path / "out-typo")
    assert read_failures(tmp_path) == []  # a folder without failures.jsonl: a run with none


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: list_items(None), r"^source must be a folder or file list \(str or Path\), got NoneType$"),
        (lambda: read_embeddings(None), r"^out_dir must be a folder path \(str or Path\), got NoneType$"),
        (lambda: read_failures(5), r"^out_dir must be a folder path \(str or Path\), got int$"),
    ],
)
def test_path_arguments_of_the_wrong_type_are_named(call: Any, match: str) -> None:
    # Were pathlib's "expected str, bytes or os.PathLike object, not NoneType".
    with pytest.raises(TypeError, match=match):
        call()
