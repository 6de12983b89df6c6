"""Pillow's resize weights (image.pillow_resample) and their exact int8-GEMM evaluation (image.gpu_resample).

The weights are checked against Pillow itself through a plain integer reference (numpy int64,
Pillow's formula), so a mistake in the weights and a mistake in the GEMM arithmetic show apart.
Whole-image equality with the exact path is in test_gpu_preprocess.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipengine.image.pillow_resample import PRECISION_BITS, AxisWeights, axis_weights

torch = pytest.importorskip("torch")

from clipengine.image.gpu_resample import device_weights, resample_last_axis  # noqa: E402

FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def reference(row: np.ndarray, axis: AxisWeights) -> np.ndarray:
    """Pillow's 8-bit pass on the last axis in plain integers: clip8((2^21 + sum(p * w)) >> 22)."""
    span = row[..., axis.first : axis.first + axis.span].astype(np.int64)
    sums = span @ axis.dense().T + (1 << (PRECISION_BITS - 1))
    return np.clip(sums >> PRECISION_BITS, 0, 255).astype(np.uint8)


def pillow_rows(pixels: np.ndarray, out_width: int, interpolation: str, box: tuple[float, float] | None = None) -> np.ndarray:
    """Pillow resizing an (h, w) greyscale image horizontally only (so one pass runs)."""
    img = Image.fromarray(pixels)
    pil_box = None if box is None else (box[0], 0, box[1], pixels.shape[0])
    return np.asarray(img.resize((out_width, pixels.shape[0]), FILTERS[interpolation], box=pil_box))


def test_pillows_horizontal_pass_is_not_a_noop() -> None:
    """The reference tests below resize rows only; Pillow must then run exactly one pass."""
    rows = np.arange(40, dtype=np.uint8).reshape(2, 20)
    assert pillow_rows(rows, 7, "bicubic").shape == (2, 7)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(("in_size", "out_size"), [(1280, 298), (960, 224), (224, 224), (100, 224), (7, 224),
                                                   (1, 224), (4000, 299), (333, 224), (225, 224), (3, 5)])  # fmt: skip
def test_weights_reproduce_pillows_pass(in_size: int, out_size: int, interpolation: str) -> None:
    rng = np.random.default_rng(in_size * 7 + out_size)
    # noise plus the extremes, where bicubic's overshoot is clipped
    pixels = np.concatenate([rng.integers(0, 256, (6, in_size)), np.zeros((1, in_size)), np.full((1, in_size), 255),
                             (np.arange(in_size) % 2 * 255)[None]]).astype(np.uint8)  # fmt: skip
    axis = axis_weights(in_size, out_size, interpolation)
    np.testing.assert_array_equal(reference(pixels, axis), pillow_rows(pixels, out_size, interpolation))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_box_and_kept_outputs_reproduce_pillow(interpolation: str) -> None:
    """`box` as Image.resize(box=) takes it (fractional, read as C floats); `keep`: a crop of the output."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 5000), dtype=np.uint8)
    for box in [(0.0, 5000.0), (1234.5678, 1240.1), (0.3, 17.0), (4990.25, 5000.0), (2500.0, 2500.5)]:
        axis = axis_weights(5000, 224, interpolation, box=box)
        np.testing.assert_array_equal(reference(pixels, axis), pillow_rows(pixels, 224, interpolation, box))
    full = pillow_rows(pixels, 1170, interpolation)
    kept = axis_weights(5000, 1170, interpolation, keep=(473, 697))
    assert kept.first > 0 and kept.first + kept.span < 5000  # only the source span the crop reads
    np.testing.assert_array_equal(reference(pixels, kept), full[:, 473:697])


def test_weights_are_stored_as_a_band() -> None:
    """Caching many sizes stays small: taps per output, not a dense row per output."""
    axis = axis_weights(4000, 299, "bicubic")
    ksize = 2 * int(np.ceil(2.0 * 4000 / 299)) + 1  # Pillow's most taps per output: 55
    assert axis.taps.shape[0] == 299 and axis.taps.shape[1] <= ksize and axis.span == 4000
    dense = axis.dense()
    assert dense.shape == (299, 4000) and (dense != 0).sum(axis=1).max() <= ksize
    assert np.abs(dense.sum(axis=1) - (1 << PRECISION_BITS)).max() <= 60  # rows sum to ~1.0 in fixed point


def test_weights_validate_arguments() -> None:
    with pytest.raises(ValueError, match="no Pillow weights"):
        axis_weights(10, 5, "lanczos")
    with pytest.raises(ValueError, match="not a range"):
        axis_weights(10, 5, "bicubic", keep=(3, 9))
    with pytest.raises(ValueError, match=">= 1"):
        axis_weights(0, 5, "bicubic")


@pytest.mark.parametrize(("in_size", "out_size", "rows"), [(1280, 298, 37), (960, 224, 3), (5, 224, 1), (4000, 224, 16)])
def test_int8_gemm_equals_the_integer_sum(in_size: int, out_size: int, rows: int) -> None:
    """The digit split and the int32 recombination give exactly Pillow's integer result, including
    fewer rows than cuBLAS' minimum and sizes that are not multiples of 8."""
    rng = np.random.default_rng(rows)
    pixels = rng.integers(0, 256, (rows, in_size), dtype=np.uint8)
    pixels[0] = 255
    pixels[-1, ::2] = 0
    for interpolation in ("bicubic", "bilinear"):
        axis = axis_weights(in_size, out_size, interpolation)
        ours = resample_last_axis(torch.from_numpy(pixels), device_weights(axis, torch.device("cpu")))
        np.testing.assert_array_equal(ours.numpy(), reference(pixels, axis))


def test_strided_views_and_origin() -> None:
    """A transposed crop of a larger tensor, with `origin` saying where its axis starts."""
    rng = np.random.default_rng(3)
    big = torch.from_numpy(rng.integers(0, 256, (2, 3, 300, 50), dtype=np.uint8))
    axis = axis_weights(300, 64, "bicubic", keep=(10, 50))
    window = big[:, :, axis.first : axis.first + axis.span, 5:45].transpose(2, 3)  # (2, 3, 40, span)
    ours = resample_last_axis(window, device_weights(axis, torch.device("cpu")), origin=axis.first)
    expected = reference(big[:, :, :, 5:45].transpose(2, 3).numpy(), axis)
    np.testing.assert_array_equal(ours.numpy(), expected)
    with pytest.raises(ValueError, match="the axis holds"):
        resample_last_axis(window, device_weights(axis, torch.device("cpu")), origin=axis.first + 1)


def test_sums_that_could_overflow_int32_are_refused() -> None:
    """Weights whose int32 partial sums could overflow raise instead of wrapping silently."""
    wide = AxisWeights(first=0, span=2_000_000, starts=np.zeros(1, np.int64), taps=np.full((1, 2_000_000), 1 << 20, np.int32))
    with pytest.raises(OverflowError):
        device_weights(wide, torch.device("cpu"))


def test_resample_handles_an_empty_batch() -> None:
    axis = axis_weights(20, 8, "bilinear")
    out: Any = resample_last_axis(torch.zeros((0, 3, 5, 20), dtype=torch.uint8), device_weights(axis, torch.device("cpu")))
    assert out.shape == (0, 3, 5, 8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 640),
    height=st.integers(1, 640),
    image_size=st.integers(8, 300),
    interpolation=st.sampled_from(["bicubic", "bilinear"]),
    resize_mode=st.sampled_from(["shortest", "squash"]),
    seed=st.integers(0, 2**16),
)
def test_any_size_equals_pillow(width: int, height: int, image_size: int, interpolation: str, resize_mode: str,
                                seed: int) -> None:  # fmt: skip
    """Whole preprocess on random sizes, model sizes and modes: the GPU path's tensors equal the exact
    path's, value for value (up- and downscales, one axis only, no resize, tiny images)."""
    from clipengine.image.gpu_preprocess import preprocess_tensors
    from clipengine.image.preprocess import PreprocessConfig, preprocess_image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    cfg = PreprocessConfig(image_size=image_size, interpolation=interpolation, resize_mode=resize_mode)
    ours = preprocess_tensors([torch.from_numpy(pixels).permute(2, 0, 1)], cfg)[0].numpy()
    np.testing.assert_array_equal(ours, preprocess_image(Image.fromarray(pixels), cfg))
