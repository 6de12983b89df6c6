"""clipengine.load / load_export options and ClipModel arguments of the wrong type: an InputError
naming the argument, never an AttributeError or TypeError from inside a backend or the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import clipengine
from clipengine.api import ClipModel, load_export
from clipengine.errors import BackendError, InputError


@pytest.fixture(scope="module")
def export_dir(vit_b1_export: Path) -> Path:
    return vit_b1_export


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        # Was AttributeError: 'int' object has no attribute 'lower' (the registry's tag lookup).
        ("pretrained", 5, r"^pretrained must be a weights tag \(str\) or None, got 5$"),
        # Was accepted silently as the default weights, while "tiny-synth@" is refused.
        ("pretrained", "", r"^pretrained is empty; pass a tag"),
        # Was truthy: "no" turned downloads on.
        ("allow_download", "no", r"^allow_download must be True or False, got 'no'$"),
        ("device", None, r"^device must be a device name \(str\), e.g. 'cpu' or 'cuda', got None$"),
        ("precision", 16, r"^precision must be a precision name \(str\), e.g. 'fp32' or 'bf16', got 16$"),
    ],
)
def test_load_refuses_options_of_the_wrong_type(option: str, value: Any, match: str) -> None:
    with pytest.raises(InputError, match=match):
        clipengine.load("tiny-synth", **{option: value})


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
@pytest.mark.parametrize("option", ["device", "precision"])
@pytest.mark.parametrize("value", [None, 5])
def test_export_folder_options_of_the_wrong_type_are_named(
    export_dir: Path, backend: str, option: str, value: Any
) -> None:
    # device=None was AttributeError: 'NoneType' object has no attribute 'startswith' in both runtimes.
    with pytest.raises(InputError, match=rf"^{option} must be a {option} name \(str\)"):
        clipengine.load(export_dir, backend=backend, **{option: value})
    with pytest.raises(InputError, match=rf"^{option} must be a {option} name \(str\)"):
        load_export(export_dir, backend=backend, **{option: value})


def test_onnx_providers_as_one_string_is_refused(export_dir: Path) -> None:
    # Was BackendError "onnxruntime has no C, P, U, E, x, ...": the string read letter by letter.
    with pytest.raises(
        InputError, match=r"providers must be a list of provider names.*\['CPUExecutionProvider'\]"
    ):
        clipengine.load(export_dir, providers="CPUExecutionProvider")
    assert clipengine.load(export_dir, providers=["CPUExecutionProvider"]).backend.name == "onnx"


@pytest.mark.parametrize("image", [None, 5, 2.5, {"a": 1}, ["a.png"]])
def test_preprocess_refuses_what_is_not_one_image(model: ClipModel, image: Any) -> None:
    # Was the decoder's bare TypeError; a list is several images (encode_images takes those).
    with pytest.raises(
        InputError,
        match=rf"^image is {type(image).__name__}; expected a path, bytes, PIL image or array, one image$",
    ):
        model.preprocess(image)


@pytest.mark.parametrize("normalize", ["no", None, 0])
def test_encode_images_normalize_must_be_a_bool(model: ClipModel, normalize: Any) -> None:
    # "no" was truthy: unit rows where raw features were asked for, without a word.
    with pytest.raises(InputError, match=r"^normalize must be True or False"):
        model.encode_images(np.zeros((8, 8, 3), np.uint8), normalize=normalize)


def test_encode_images_normalize_false_keeps_the_raw_norm(model: ClipModel) -> None:
    image = np.full((8, 8, 3), 90, np.uint8)
    raw = model.encode_images(image, normalize=np.bool_(False))
    unit = model.encode_images(image)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-5)
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-3


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "La", "P", "PA", "I", "I;16", "F", "RGBA", "RGBa", "CMYK", "YCbCr", "HSV"]
)
def test_pil_images_of_every_mode_encode_to_unit_rows(model: ClipModel, mode: str) -> None:
    # "La" was Pillow's raw ValueError "conversion from La to L not supported".
    emb = model.encode_images(Image.new(mode, (20, 30)))
    assert emb.shape == (1, model.embed_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"preprocess_cfg": None},
            r"^preprocess_cfg must be a PreprocessConfig, got NoneType$",
        ),  # was AttributeError
        (
            {"logit_scale": "abc"},
            r"^logit_scale must be a finite number, got 'abc'$",
        ),  # was float()'s ValueError
        (
            {"logit_scale": float("inf")},
            r"^logit_scale must be a finite number, got inf$",
        ),  # NaN probabilities
    ],
)
def test_clip_model_refuses_a_bad_preprocess_cfg_or_logit_scale(
    model: ClipModel, kwargs: Any, match: str
) -> None:
    args: dict[str, Any] = {"preprocess_cfg": model.preprocess_cfg, "logit_scale": 100.0, **kwargs}
    with pytest.raises(InputError, match=match):
        ClipModel(model.backend, args["preprocess_cfg"], "x", args["logit_scale"])


def test_export_with_an_infinite_logit_scale_is_a_broken_folder(export_dir: Path, tmp_path: Path) -> None:
    from export_copies import copy_with_manifest

    folder = copy_with_manifest(export_dir, tmp_path / "copy", logit_scale=float("inf"))
    with pytest.raises(
        BackendError, match=r'manifest\.json: "logit_scale" must be a finite number, got inf'
    ) as info:
        clipengine.load(folder)
    assert not isinstance(info.value, InputError)  # the folder is broken, not an argument
