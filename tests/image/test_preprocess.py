"""Preprocessing: bit-exact parity with OpenAI's torchvision transform, config round trips, fast path, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clipengine.errors import DecodeError
from clipengine.image import preprocess as preprocess_module
from clipengine.image.decode import decode_image
from clipengine.image.preprocess import (
    OPENAI_MEAN,
    OPENAI_STD,
    PreprocessConfig,
    crop_uint8,
    normalise_uint8,
    preprocess,
    preprocess_batch,
    preprocess_image,
    resized_size,
)

MakeReference = Callable[..., Callable[[Image.Image], np.ndarray]]  # tests/image/conftest.py
Factories = dict[str, Callable[..., Any]]
BAD = Path(__file__).parents[1] / "data" / "bad"
SIZES = [(1, 1), (2, 3), (7, 5), (100, 50), (50, 100), (223, 224), (224, 224), (225, 225), (224, 500), (640, 480),
         (481, 641), (1000, 37), (37, 1000), (333, 777)]  # fmt: skip


def grey_levels(pixels: np.ndarray) -> np.ndarray:
    """Normalised (3, H, W) -> the 0..255 values they encode, to state deviations in grey levels."""
    std = np.asarray(OPENAI_STD, np.float64)[:, None, None]
    mean = np.asarray(OPENAI_MEAN, np.float64)[:, None, None]
    return (pixels.astype(np.float64) * std + mean) * 255


@pytest.mark.parametrize("image_size", [224, 336, 225, 32])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_equals_openai_transform_bit_for_bit(
    openai_transform: MakeReference, images: Factories, width: int, height: int, image_size: int
) -> None:
    img = images["noise"](width, height, seed=width * 1000 + height)
    cfg = PreprocessConfig(image_size=image_size)
    ours = preprocess_image(img, cfg)
    assert ours.shape == (3, image_size, image_size) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, openai_transform(image_size)(img))


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "PA", "CMYK", "1"])
def test_every_8_bit_mode_equals_openai_transform(
    openai_transform: MakeReference, images: Factories, mode: str
) -> None:
    """Resize happens in the image's own mode, then RGB conversion, in OpenAI's order."""
    img = images["noise"](457, 301, mode=mode)
    np.testing.assert_array_equal(preprocess_image(img), openai_transform(224)(img))


def test_clip_png_equals_openai_transform(openai_transform: MakeReference, clip_png: Path) -> None:
    with Image.open(clip_png) as img:
        img.load()
    assert img.mode == "RGBA"  # 65% fully transparent: the order of resize and convert matters
    reference = openai_transform(224)(img)
    np.testing.assert_array_equal(preprocess(clip_png), reference)
    np.testing.assert_array_equal(preprocess(clip_png.read_bytes()), reference)
    deviation = np.abs(grey_levels(preprocess(clip_png)) - grey_levels(reference))
    assert deviation.mean() <= 1.0  # the bound; in fact 0


@pytest.mark.parametrize(("width", "height"), [(640, 480), (37, 1000), (5, 3)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_squash_and_bilinear_equal_torchvision(
    openai_transform: MakeReference, images: Factories, width: int, height: int, interpolation: str
) -> None:
    img = images["noise"](width, height)
    for squash in (False, True):
        cfg = PreprocessConfig(interpolation=interpolation, resize_mode="squash" if squash else "shortest")
        np.testing.assert_array_equal(
            preprocess_image(img, cfg), openai_transform(224, squash, interpolation)(img)
        )


def test_equals_open_clip_image_transform(images: Factories) -> None:
    transform = pytest.importorskip("open_clip.transform")
    img = images["noise"](333, 500)
    for mode in ("shortest", "squash"):
        reference = transform.image_transform(224, is_train=False, resize_mode=mode)(img).numpy()
        np.testing.assert_array_equal(preprocess_image(img, PreprocessConfig(resize_mode=mode)), reference)


def test_resized_size_uses_torchvisions_truncation() -> None:
    cfg = PreprocessConfig()
    assert resized_size(640, 480, cfg) == (298, 224)  # int(224 * 640 / 480) = int(298.67)
    assert resized_size(37, 1000, cfg) == (224, 6054)
    assert resized_size(5, 3, PreprocessConfig(resize_mode="squash")) == (224, 224)


def test_extreme_aspect_ratio_stays_bounded_and_close(
    openai_transform: MakeReference, images: Factories, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past _MAX_RESIZED_PIXELS the resize goes straight into the crop window (no 224 x 10^7 buffer)."""
    img = images["noise"](2000, 60)
    reference = grey_levels(openai_transform(224)(img))
    monkeypatch.setattr(preprocess_module, "_MAX_RESIZED_PIXELS", 1000)
    deviation = np.abs(grey_levels(preprocess_image(img)) - reference)
    assert deviation.mean() <= 1.0
    assert preprocess_image(Image.new("RGB", (1, 100_000), (9, 9, 9))).shape == (3, 224, 224)


def test_16_bit_image_is_scaled_before_resizing() -> None:
    with Image.open(BAD / "gray16.png") as im:
        ramp16 = np.asarray(im)
    as_8_bit = Image.fromarray(np.rint(ramp16 / 65535.0 * 255).astype(np.uint8))
    np.testing.assert_array_equal(preprocess(BAD / "gray16.png"), preprocess_image(as_8_bit))
    # Pillow's own I;16 -> RGB conversion (OpenAI's path) clips: almost everything would be white.
    assert grey_levels(preprocess(BAD / "gray16.png")).mean() < 200


def test_exif_orientation_applied_by_preprocess_not_by_preprocess_image() -> None:
    path = BAD / "exif_rotated.jpg"
    oriented = preprocess_image(decode_image(path))
    np.testing.assert_array_equal(preprocess(path), oriented)
    with Image.open(path) as as_stored:
        assert not np.array_equal(preprocess_image(as_stored), oriented)  # OpenAI ignores EXIF


def test_batch_equals_single_images(clip_png: Path, images: Factories) -> None:
    sources = [
        clip_png,
        images["noise"](50, 80),
        np.zeros((10, 10, 3), np.uint8),
        (BAD / "cmyk.jpg").read_bytes(),
    ]
    cfg = PreprocessConfig(image_size=64)
    batch = preprocess_batch(sources, cfg)
    assert batch.shape == (4, 3, 64, 64) and batch.dtype == np.float32
    for row, source in zip(batch, sources, strict=True):
        np.testing.assert_array_equal(row, preprocess(source, cfg))
    assert preprocess_batch([], cfg).shape == (0, 3, 64, 64)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16"])
def test_uint8_crops_normalise_to_preprocess_image_bit_for_bit(images: Factories, mode: str) -> None:
    """Decode workers ship `crop_uint8` and the parent applies `normalise_uint8`: the same values
    as `preprocess_image`, for every mode and for a batch at once."""
    cfg = PreprocessConfig(image_size=48, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    img = images["noise"](131, 77, mode=mode) if mode != "I;16" else Image.fromarray(
        np.random.default_rng(1).integers(0, 65535, (77, 131), dtype=np.uint16))  # fmt: skip
    crop = crop_uint8(img, cfg)
    assert crop.shape == (3, 48, 48) and crop.dtype == np.uint8 and crop.flags.c_contiguous
    np.testing.assert_array_equal(normalise_uint8(crop, cfg), preprocess_image(img, cfg))
    batch = np.stack([crop, crop[:, ::-1].copy()])
    np.testing.assert_array_equal(normalise_uint8(batch, cfg)[1], normalise_uint8(batch[1], cfg))


def test_normalise_uint8_refuses_other_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        normalise_uint8(np.zeros((3, 4, 4), np.float32), PreprocessConfig())
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        normalise_uint8(np.zeros((4, 4, 3), np.uint8), PreprocessConfig())


def test_batch_raises_for_bad_item(clip_png: Path) -> None:
    with pytest.raises(DecodeError, match=r"text\.jpg: not a recognised image format"):
        preprocess_batch([clip_png, BAD / "text.jpg"])


def test_errors_after_decoding_name_the_input(tmp_path: Path) -> None:
    """An "F" TIFF holding 0..255 decodes but is refused when scaled to 8 bits: `preprocess` named
    it "<PIL image>" where `decode_image` names the file (docs: the path, or the name= passed)."""
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 5), 200.0, np.float32), "F").save(path)
    with pytest.raises(DecodeError) as info:
        preprocess(path)
    assert info.value.source == str(path)
    assert info.value.reason.startswith("float pixel values must be finite and in [0, 1]")
    with pytest.raises(DecodeError) as named:
        preprocess(path.read_bytes(), name="upload-3")
    assert named.value.source == "upload-3"
    with pytest.raises(DecodeError) as in_batch:
        preprocess_batch([path])
    assert in_batch.value.source == str(path)


def test_fast_path_is_close_to_exact_for_large_jpeg(images: Factories) -> None:
    jpeg = images["jpeg"](1920, 1280)
    exact, fast = preprocess(jpeg), preprocess(jpeg, fast=True)
    deviation = np.abs(grey_levels(fast) - grey_levels(exact))
    assert deviation.mean() <= 1.0  # measured 0.29 grey levels, see docs/tokenizer_preprocess.md
    assert not np.array_equal(fast, exact)  # the reduced decode really happened


def test_fast_path_changes_nothing_for_small_or_non_jpeg(clip_png: Path, images: Factories) -> None:
    small = images["jpeg"](400, 300)  # less than 2 x 224 on the short side: no reduction possible
    np.testing.assert_array_equal(preprocess(small, fast=True), preprocess(small))
    np.testing.assert_array_equal(preprocess(clip_png, fast=True), preprocess(clip_png))


def test_config_round_trips_through_json() -> None:
    cfg = PreprocessConfig(image_size=336, interpolation="bilinear", resize_mode="squash")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d == {"image_size": 336, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                 "interpolation": "bilinear", "resize_mode": "squash", "crop": "center"}  # fmt: skip
    assert PreprocessConfig.from_dict(d) == cfg
    assert hash(PreprocessConfig.from_dict(d)) == hash(cfg)


def test_config_reads_open_clip_preprocess_cfg() -> None:
    oc = {"size": [224, 224], "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
          "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}  # fmt: skip
    assert PreprocessConfig.from_dict(oc) == PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, "image_size must be a positive int"),
        ({"std": (1.0, 0.0, 1.0)}, "std > 0"),
        ({"mean": (0.5, 0.5)}, "3 values each"),
        ({"interpolation": "lanczos"}, "interpolation must be one of bicubic, bilinear, nearest"),
        ({"resize_mode": "longest"}, "resize_mode must be one of shortest, squash"),
        ({"crop": "random"}, "crop must be one of center"),
    ],
)
def test_invalid_config_raises_value_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("d", "message"), [({"sizee": 224}, "unknown preprocess keys"), ({"size": [224, 256]}, "only square")]
)
def test_from_dict_rejects_unknown_keys_and_non_square(d: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreprocessConfig.from_dict(d)


def test_import_does_not_import_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "import clipengine.text.tokenizer, clipengine.image.preprocess as p\n"
        "p.preprocess(np.zeros((5, 5, 3), np.uint8))\n"
        "leaked = sorted(m for m in ('torch', 'torchvision') if m in sys.modules)\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
