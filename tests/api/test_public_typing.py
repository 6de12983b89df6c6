"""A user's script that calls the API as the README does type-checks under `mypy --strict` with the
real types: the lazy `__getattr__` re-exports used to make `clipengine.load` and friends Any, so a
typed function returning `model.encode_images(...)` failed with [no-any-return]."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import clipengine

USER_SCRIPT = """
from __future__ import annotations

import os
from typing import assert_type

import numpy as np
import numpy.typing as npt

import clipengine
from clipengine.api import ClipModel
from clipengine.export import Manifest, read_manifest
from clipengine.index import Index


def images(paths: list[str]) -> npt.NDArray[np.float32]:
    model = clipengine.load("tiny-synth", pretrained="synthetic")
    assert_type(model, ClipModel)
    return model.encode_images(paths)


def images_of_every_accepted_kind(entry: os.DirEntry[str], data: bytearray) -> npt.NDArray[np.float32]:
    # What encode_images takes at run time: any os.PathLike, bytes-like buffers as well as bytes.
    model = clipengine.load("tiny-synth")
    model.preprocess(memoryview(data))
    return model.encode_images([entry, data, memoryview(data), b"...", "a.jpg", np.zeros((4, 4, 3), np.uint8)])


def texts_from_an_array(column: npt.NDArray[np.str_]) -> list[list[tuple[str, float]]]:
    # A 1-D array of str (a DataFrame column's .to_numpy()) is taken wherever a list of str is.
    model = clipengine.load("tiny-synth")
    model.encode_texts(column)
    model.text_classifier(column, np.array(["a photo of a {}."]))
    return model.classify("cat.jpg", column, templates=np.array(["a photo of a {}."]))


def texts() -> npt.NDArray[np.float32]:
    return clipengine.load("tiny-synth@synthetic", backend="torch", precision="bf16").encode_texts(["a cat"])


def tokens() -> npt.NDArray[np.int64]:
    return clipengine.tokenize(["a diagram", "a dog"])


def ranked() -> list[list[tuple[str, float]]]:
    return clipengine.load("tiny-synth").classify("cat.jpg", ["cat", "dog"], templates=["a photo of a {}."])


def index() -> Index:
    return clipengine.Index.load("photos.index")


def search() -> list[list[tuple[str, float]]]:
    model = clipengine.load("tiny-synth", pretrained="synthetic")
    index = Index.load("photos.index")
    index.search_images(model, "query.jpg", k=10)
    return index.search_texts(model, "a dog on the beach", k=10)


def manifest() -> Manifest:
    return read_manifest("models/tiny")
"""


def test_package_is_marked_typed() -> None:
    # Without py.typed an installed (non-editable) clipengine is skipped by mypy: "missing library stubs".
    assert (Path(clipengine.__file__).parent / "py.typed").is_file()


@pytest.mark.slow
def test_readme_style_script_type_checks_with_real_types(tmp_path: Path) -> None:
    exe = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("mypy (a [dev] dependency) is not installed")
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    result = subprocess.run(
        [exe, "--strict", "--cache-dir", str(tmp_path / "mypy-cache"), str(script)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
