"""Seeded fuzzing of decode + preprocessing against OpenAI's torchvision transform (and HF's processor).

Each test checks the tolerance docs/tokenizer_preprocess.md claims for its path: bit-for-bit for every
8-bit mode and size below the extreme-aspect limit, <= 1 grey level mean (<= 19 max) past it, and the
documented scaling for 16-bit and float images. Sizes, modes and configs come from a fixed seed.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image, ImageOps

from clipengine.errors import DecodeError
from clipengine.image import preprocess as preprocess_module
from clipengine.image.preprocess import (
    OPENAI_MEAN,
    OPENAI_STD,
    PreprocessConfig,
    crop_uint8,
    normalise_uint8,
    preprocess,
    preprocess_image,
    resized_size,
)

MakeReference = Callable[..., Callable[[Image.Image], np.ndarray]]  # tests/image/conftest.py
EIGHT_BIT_MODES = ["RGB", "L", "LA", "P", "P+transparency", "PA", "RGBA", "CMYK", "1"]


def grey_levels(pixels: np.ndarray) -> np.ndarray:
    """Normalised (3, H, W) -> the 0..255 values they encode, to state deviations in grey levels."""
    std = np.asarray(OPENAI_STD, np.float64)[:, None, None]
    mean = np.asarray(OPENAI_MEAN, np.float64)[:, None, None]
    return (pixels.astype(np.float64) * std + mean) * 255


def random_size(rng: np.random.Generator) -> tuple[int, int]:
    """Tiny, one-pixel lines, odd, exactly 224 +- 2, and ordinary sizes, in equal shares."""
    kind = int(rng.integers(6))
    if kind == 0:
        return int(rng.integers(1, 4)), int(rng.integers(1, 4))
    if kind == 1:
        return 1, int(rng.integers(1, 300))
    if kind == 2:
        return int(rng.integers(1, 300)), 1
    if kind == 3:
        return int(rng.integers(1, 120)) * 2 + 1, int(rng.integers(1, 120)) * 2 + 1
    if kind == 4:
        return 224 + int(rng.integers(-2, 3)), 224 + int(rng.integers(-2, 3))
    return int(rng.integers(1, 700)), int(rng.integers(1, 700))


def random_image(rng: np.random.Generator, mode: str, width: int, height: int) -> Image.Image:
    """Noise (the hardest case for resampling parity) in `mode`, with random alpha where it has one."""
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    if mode in ("RGBA", "LA"):
        img = rgb.convert(mode[:-1])
        img.putalpha(alpha)
        return img
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=int(rng.integers(2, 257)))
    if mode == "P+transparency":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        img.info["transparency"] = int(rng.integers(16))
        return img
    if mode == "PA":
        return rgb.convert("P").convert("PA")
    return rgb.convert(mode)


def encoded(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def opened(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img


def fuzz_cases(n: int, seed: int) -> Iterator[tuple[Image.Image, PreprocessConfig]]:
    rng = np.random.default_rng(seed)
    count = 0
    while count < n:
        width, height = random_size(rng)
        cfg = PreprocessConfig(
            image_size=int(rng.choice([224, 224, 32, 225, 336])),
            interpolation=str(rng.choice(["bicubic", "bicubic", "bilinear", "nearest"])),
            resize_mode=str(rng.choice(["shortest", "shortest", "squash"])),
        )
        new_w, new_h = resized_size(width, height, cfg)
        if new_w * new_h > preprocess_module._MAX_RESIZED_PIXELS:
            continue  # the bounded-memory path, tested against its own tolerance below
        yield random_image(rng, EIGHT_BIT_MODES[count % len(EIGHT_BIT_MODES)], width, height), cfg
        count += 1


def test_fuzz_8_bit_modes_sizes_and_configs_equal_openai_bit_for_bit(openai_transform: MakeReference) -> None:
    for img, cfg in fuzz_cases(90, seed=20261127):
        reference = openai_transform(cfg.image_size, cfg.resize_mode == "squash", cfg.interpolation)(img)
        ours = preprocess_image(img, cfg)
        case = f"{img.mode} {img.size} {cfg}"
        np.testing.assert_array_equal(ours, reference, err_msg=case)
        # The decode workers' split (uint8 crop, normalised in the parent) gives the same bits.
        np.testing.assert_array_equal(normalise_uint8(crop_uint8(img, cfg), cfg), reference, err_msg=case)


@pytest.mark.parametrize(
    ("fmt", "modes"),
    [
        ("PNG", ["RGB", "L", "LA", "P", "P+transparency", "RGBA", "1"]),
        ("TIFF", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1"]),
        ("WEBP", ["RGB", "L", "RGBA"]),
        ("GIF", ["RGB", "L", "P", "P+transparency"]),
        ("JPEG", ["RGB", "L", "CMYK"]),
    ],
)
def test_fuzz_encoded_images_equal_openai_on_the_decoded_image(
    openai_transform: MakeReference, fmt: str, modes: list[str]
) -> None:
    """Through decode: `preprocess(bytes)` equals the reference on `Image.open` of the same bytes."""
    rng = np.random.default_rng(7)
    for mode in modes:
        width, height = random_size(rng)
        img = random_image(rng, mode, width, height)
        lossless = {"lossless": True} if fmt == "WEBP" else {}
        data = encoded(img, fmt, **lossless)
        reference = openai_transform(32)(opened(data))
        np.testing.assert_array_equal(
            preprocess(data, PreprocessConfig(image_size=32)), reference, err_msg=mode
        )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_fuzz_every_exif_orientation_is_applied_before_openais_transform(
    openai_transform: MakeReference, fmt: str
) -> None:
    """`preprocess` equals OpenAI's transform of the EXIF-transposed image for tags 1-8 (and ignores
    invalid 0 and 9); `preprocess_image` of the image as stored keeps OpenAI's own behaviour."""
    rng = np.random.default_rng(8)
    cfg = PreprocessConfig(image_size=32)
    for orientation in range(10):
        mode = str(rng.choice(["RGB", "L"] if fmt == "JPEG" else ["RGB", "L", "RGBA", "P"]))
        img = random_image(rng, mode, 37, 23)  # not square: 5-8 swap width and height
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encoded(img, fmt, exif=exif.tobytes() if fmt != "TIFF" else exif)
        stored = opened(data)
        expected = openai_transform(32)(ImageOps.exif_transpose(stored))
        np.testing.assert_array_equal(preprocess(data, cfg), expected, err_msg=f"{mode} {orientation}")
        np.testing.assert_array_equal(preprocess_image(stored, cfg), openai_transform(32)(stored))


def as_8_bit(values: np.ndarray) -> Image.Image:
    """The documented 16-bit scaling, round(v * 255 / 65535), in float64 (no tie is exact)."""
    return Image.fromarray(np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8))


def png_16_bit(values: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG (colour type 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA); Pillow cannot write most."""
    height, width = values.shape[:2]
    rows = values.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_fuzz_16_bit_grey_is_scaled_then_equals_openai(openai_transform: MakeReference) -> None:
    """I;16, I;16B and I images, and 16-bit grey PNG/TIFF files: OpenAI's transform of the scaled image."""
    rng = np.random.default_rng(16)
    cfg = PreprocessConfig(image_size=32)
    for _ in range(6):
        width, height = random_size(rng)
        values = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        values.flat[:4] = [0, 65535, 32767, 32768][: values.size]  # the ends and the rounding midpoint
        reference = openai_transform(32)(as_8_bit(values))
        images = {
            "I;16": Image.fromarray(values),
            "I;16B": Image.frombytes("I;16B", (width, height), values.astype(">u2").tobytes()),
            "I": Image.fromarray(values.astype(np.int32)),
            "PNG": png_16_bit(values, 0),
            "TIFF": encoded(Image.fromarray(values), "TIFF"),
        }
        for label, source in images.items():
            ours = (
                preprocess_image(source, cfg) if isinstance(source, Image.Image) else preprocess(source, cfg)
            )
            np.testing.assert_array_equal(ours, reference, err_msg=f"{label} {width}x{height}")


@pytest.mark.parametrize("colour_type", [2, 4, 6])
def test_16_bit_colour_png_equals_openai(openai_transform: MakeReference, colour_type: int) -> None:
    """Pillow itself reduces 16-bit RGB, grey+alpha and RGBA PNGs to 8 bits; both paths see that."""
    channels = {2: 3, 4: 2, 6: 4}[colour_type]
    values = np.random.default_rng(colour_type).integers(0, 65536, (31, 45, channels), dtype=np.uint16)
    data = png_16_bit(values, colour_type)
    np.testing.assert_array_equal(preprocess(data), openai_transform(224)(opened(data)))


def test_float_images_are_read_as_0_to_1_unlike_pillows_0_to_255(openai_transform: MakeReference) -> None:
    """Documented difference: a mode "F" image is read like a float array, [0, 1] -> 0..255; Pillow
    (and so OpenAI's transform) reads F as 0..255 and clips. Values outside [0, 1] are refused."""
    unit = np.random.default_rng(3).random((20, 30)).astype(np.float32)
    ours = preprocess_image(Image.fromarray(unit, "F"))
    np.testing.assert_array_equal(
        ours, openai_transform(224)(Image.fromarray(np.rint(unit * 255).astype(np.uint8)))
    )
    with pytest.raises(DecodeError, match=r"float pixel values must be finite and in \[0, 1\]"):
        preprocess_image(Image.fromarray(unit * 255, "F"))


@pytest.mark.parametrize(("width", "height"), [(2, 700), (700, 2), (3, 1100), (5, 1700), (1, 400), (400, 1)])
def test_extreme_aspect_ratios_stay_within_the_documented_deviation(
    openai_transform: MakeReference, width: int, height: int
) -> None:
    """Past _MAX_RESIZED_PIXELS (unpatched: beyond ~1:334 at 224 px) the resize goes straight into the
    crop window; docs claim <= 1 grey level mean and up to 19 max on pure noise."""
    cfg = PreprocessConfig()
    new_w, new_h = resized_size(width, height, cfg)
    assert new_w * new_h > preprocess_module._MAX_RESIZED_PIXELS
    img = Image.fromarray(
        np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    )
    deviation = np.abs(grey_levels(preprocess_image(img, cfg)) - grey_levels(openai_transform(224)(img)))
    assert deviation.mean() <= 1.0 and deviation.max() <= 19, (deviation.mean(), deviation.max())


@pytest.fixture(scope="module")
def hf_processor():  # type: ignore[no-untyped-def]
    """transformers' CLIPImageProcessor with its defaults, which are OpenAI's (224, bicubic, mean/std)."""
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPImageProcessor()


def _hf(processor, img: Image.Image) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(processor(images=img, return_tensors="np")["pixel_values"][0])


def test_fuzz_transformers_processor_is_within_2_grey_levels_where_it_crops_like_openai(hf_processor) -> None:  # type: ignore[no-untyped-def]
    """transformers resamples in torch (up to 2 grey levels off Pillow) and floors the crop offset where
    torchvision rounds half to even (1 px apart when the margin is 3 mod 4); see the docs."""
    rng = np.random.default_rng(5)
    checked = 0
    while checked < 12:
        width, height = random_size(rng)
        new_w, new_h = resized_size(width, height, PreprocessConfig())
        margin = max(new_w, new_h) - 224
        if new_w * new_h > preprocess_module._MAX_RESIZED_PIXELS or margin % 4 == 3:
            continue
        img = random_image(rng, str(rng.choice(["RGB", "L"])), width, height)
        deviation = np.abs(grey_levels(_hf(hf_processor, img)) - grey_levels(preprocess_image(img)))
        assert deviation.max() <= 2, (img.mode, img.size, deviation.max())
        checked += 1


def test_transformers_processor_differences_from_openai_are_the_documented_ones(hf_processor) -> None:  # type: ignore[no-untyped-def]
    # An odd margin whose half rounds up: 225x301 -> 224x299, margin 75; torchvision's top row is
    # round(37.5) = 38, transformers' 37. Its output matches ours cropped at row 37.
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (301, 225, 3), dtype=np.uint8))
    resized = img.resize((224, 299), Image.Resampling.BICUBIC)
    cfg = PreprocessConfig()
    floor_crop = np.ascontiguousarray(np.asarray(resized.crop((0, 37, 224, 261))).transpose(2, 0, 1))
    round_crop = np.ascontiguousarray(np.asarray(resized.crop((0, 38, 224, 262))).transpose(2, 0, 1))
    np.testing.assert_array_equal(preprocess_image(img), normalise_uint8(round_crop, cfg))
    hf = grey_levels(_hf(hf_processor, img))
    assert np.abs(hf - grey_levels(normalise_uint8(floor_crop, cfg))).max() <= 2
    assert np.abs(hf - grey_levels(preprocess_image(img))).mean() > 10
    # Alpha: transformers composites onto white; OpenAI drops alpha after a premultiplied resize (black).
    transparent = Image.new("RGBA", (300, 300), (200, 10, 10, 0))
    assert np.allclose(grey_levels(_hf(hf_processor, transparent)), 255, atol=0.01)
    assert np.allclose(grey_levels(preprocess_image(transparent)), 0, atol=0.01)
