"""`ClipModel` with the inputs users really pass: what is accepted gives the same embedding as the
path, and what is refused is an InputError / DecodeError that names the input and the fix."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipengine.api import ClipModel
from clipengine.errors import DecodeError, InputError
from clipengine.image.preprocess import preprocess_batch, preprocess_image


def _png(tmp_path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(pixels).save(path)
    return path


def _closed_stream(path: Path, kind: str) -> io.IOBase:
    if kind == "file":
        return open(path, "rb")  # the test closes it before the image is used
    return io.BytesIO(path.read_bytes())


@pytest.mark.parametrize("kind", ["file", "bytesio"])
def test_pil_image_whose_file_was_closed_unread_is_named_as_such(
    model: ClipModel, tmp_path: Path, kind: str
) -> None:
    # Image.open(f) reads only the header; with `f` closed before the pixels were read, Pillow 13
    # raises "seek of closed file" / "I/O operation on closed file", which read as a damaged image
    # ("truncated or corrupt image data") though the file is fine.
    stream = _closed_stream(_png(tmp_path), kind)
    with stream:
        im = Image.open(stream)
    with pytest.raises(DecodeError) as info:
        model.encode_images(im)
    assert info.value.source == "<PIL image RGB 50x40>"
    assert "corrupt" not in info.value.reason
    assert "was closed before its pixels were read" in info.value.reason
    assert ".load()" in info.value.reason  # the fix


def test_pil_image_loaded_before_its_file_was_closed_is_encoded(model: ClipModel, tmp_path: Path) -> None:
    path = _png(tmp_path)
    with open(path, "rb") as f:
        im = Image.open(f)
        im.load()
    np.testing.assert_array_equal(model.encode_images(im), model.encode_images(path))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_stack_of_raw_images_is_refused_with_the_list_to_pass(model: ClipModel, dtype: type) -> None:
    # (N, H, W, 3) is how video frames and datasets hold images; a 4-D array is read as already
    # preprocessed pixels, and the refusal named only that form, not how to pass raw pixels.
    frames = np.zeros((2, 40, 50, 3), dtype=dtype)
    with pytest.raises(InputError, match=r"got \(2, 40, 50, 3\).*pass list\(images\)"):
        model.encode_images(frames)
    assert model.encode_images(list(frames)).shape == (2, model.embed_dim)  # the fix it names works


def test_uint8_batch_of_model_size_is_refused_with_the_list_to_pass(model: ClipModel) -> None:
    size = model.image_size
    crops = np.zeros((2, 3, size, size), dtype=np.uint8)  # the shape of preprocessed pixels, not their dtype
    with pytest.raises(InputError, match=r"must be float.*got uint8.*pass list\(images\)"):
        model.encode_images(crops)
    assert model.encode_images(list(crops.transpose(0, 2, 3, 1))).shape == (2, model.embed_dim)


class Series:
    """What matters here of a pandas Series (a DataFrame column): iterable, `tolist()`, no Sequence."""

    def __init__(self, values: list[str]) -> None:
        self._values = values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def tolist(self) -> list[str]:
        return list(self._values)


def test_pandas_column_of_texts_is_refused_with_tolist(model: ClipModel) -> None:
    # A DataFrame column is a Series, not a Sequence: refused (its .to_numpy() is taken), but the
    # refusal said "decode bytes first and wrap one text in a list", which does not apply.
    captions = Series(["a cat", "a dog"])
    with pytest.raises(InputError, match=r"texts must be .*got Series; .*\.tolist\(\)"):
        model.encode_texts(captions)
    with pytest.raises(InputError, match=r"labels must be .*got Series; .*\.tolist\(\)"):
        model.text_classifier(captions)
    assert model.encode_texts(captions.tolist()).shape == (2, model.embed_dim)


def test_generator_of_texts_is_refused_with_list(model: ClipModel) -> None:
    with pytest.raises(InputError, match=r"texts must be .*got generator; pass list\(texts\)"):
        model.encode_texts(t for t in ["a cat", "a dog"])


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 40)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("images", "kind", "fix"),
    [
        (lambda: (b for b in [_png_bytes()]), "generator", "list(images)"),
        (lambda: io.BytesIO(_png_bytes()), "BytesIO", "its bytes (.getvalue(), or .read() of a file)"),
        (lambda: torch.zeros(3, 6, 8), "Tensor", "a NumPy array: t.permute(1, 2, 0).numpy()"),
    ],
)
def test_image_containers_that_are_refused_name_the_fix(
    model: ClipModel, images: Callable[[], object], kind: str, fix: str
) -> None:
    with pytest.raises(InputError, match=rf"images is {kind};.*pass {re.escape(fix)}"):
        model.encode_images(images())  # type: ignore[arg-type]


def test_channels_first_array_is_refused_with_the_transpose(model: ClipModel) -> None:
    # (3, H, W) is how torch and torchvision hold an image; refused (it would read as H=3), but the
    # refusal listed the shapes taken without the transpose that gives one.
    pixels = np.zeros((3, 40, 50), dtype=np.uint8)
    with pytest.raises(DecodeError, match=r"array shape \(3, 40, 50\).*\.transpose\(1, 2, 0\)"):
        model.encode_images(pixels)
    assert model.encode_images(pixels.transpose(1, 2, 0)).shape == (1, model.embed_dim)


def test_float_array_on_the_0_255_scale_is_refused_with_the_division(model: ClipModel) -> None:
    pixels = np.full((4, 5, 3), 200.0, dtype=np.float32)
    with pytest.raises(DecodeError, match=r"got range \[200, 200\].*divide an array by 255"):
        model.encode_images(pixels)
    assert model.encode_images(pixels / 255).shape == (1, model.embed_dim)


def test_stack_of_grey_images_is_refused_with_the_list_to_pass(model: ClipModel) -> None:
    # (N, H, W) is how MNIST-like datasets hold grey images; refused (no such image shape), but the
    # refusal listed the shapes taken without saying that a stack goes in as a list.
    digits = np.zeros((10, 28, 28), dtype=np.uint8)
    with pytest.raises(DecodeError, match=r"array shape \(10, 28, 28\).*pass list\(array\)"):
        model.encode_images(digits)
    assert model.encode_images(list(digits)).shape == (10, model.embed_dim)


@pytest.mark.parametrize("one_image", ["cat.jpg", Path("cat.jpg"), b"\x89PNG", "PIL"])
def test_preprocess_batch_of_one_image_instead_of_a_list_is_refused(one_image: object) -> None:
    # A str is a Sequence: "cat.jpg" was the paths "c", "a", "t", ... ("c: file not found"), and
    # bytes the ints of their bytes (a bare TypeError).
    image = Image.new("RGB", (4, 4)) if one_image == "PIL" else one_image
    with pytest.raises(InputError, match=r"sources must be a list of images, got one .*; pass \[image\]"):
        preprocess_batch(image)  # type: ignore[arg-type]


def test_preprocess_batch_of_a_generator_is_refused_with_list() -> None:
    with pytest.raises(InputError, match=r"sources must be a list of images, got generator; pass list\(sources\)"):
        preprocess_batch(image for image in [Image.new("RGB", (4, 4))])  # type: ignore[arg-type]


def test_preprocess_image_of_a_path_is_refused_naming_preprocess(tmp_path: Path) -> None:
    # Was AttributeError: 'str' object has no attribute 'mode'.
    with pytest.raises(InputError, match=r"preprocess_image takes a PIL image, got str; .*use preprocess"):
        preprocess_image(str(_png(tmp_path)))  # type: ignore[arg-type]


def test_preprocess_of_a_generator_does_not_name_a_list(model: ClipModel) -> None:
    # preprocess takes one image: "pass list(image)" would be refused next as a list.
    with pytest.raises(InputError, match=r"^image is generator; expected a path, bytes, PIL image or array, one image$"):
        model.preprocess(image for image in [b"x"])  # type: ignore[arg-type]
