"""Pillow's 8-bit resampling weights, reproduced exactly, so that another device can resize as Pillow does.

Pillow (libImaging/Resample.c) resizes an 8-bit image in two separable passes. Along one axis,
each output pixel gets filter weights computed in double precision (`precompute_coeffs`),
normalised to sum to one and rounded to 22-bit fixed point (`normalize_coeffs_8bpc`); the output
value is `clip8((2^21 + sum(pixel * weight)) >> 22)`, all in integers. The second pass reads the
first pass's output stored as uint8.

`axis_weights` computes those integer weights for the output pixels one asks for, as a dense band
(output pixel x source pixel in a span): with them, `sum(pixel * weight)` is an integer matrix
product, which `image.gpu_resample` runs on tensor cores. The arithmetic below follows Pillow's
C, operation for operation, in IEEE doubles (Python floats), so the weights are Pillow's bit for
bit; tests/image/test_gpu_resample.py compares whole resizes against Pillow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["PRECISION_BITS", "RESAMPLE_FILTERS", "AxisWeights", "axis_weights"]

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 - 8 bits of value - 2 of headroom


def _bicubic(x: float) -> float:
    a = -0.5  # Pillow's (and OpenAI's torchvision-on-PIL) bicubic
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bilinear(x: float) -> float:
    if x < 0.0:
        x = -x
    if x < 1.0:
        return 1.0 - x
    return 0.0


# name -> (filter, support in source pixels at scale 1), as Pillow's BICUBIC and BILINEAR structs
RESAMPLE_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@dataclass(frozen=True, eq=False)  # hashed by identity: `axis_weights` caches instances
class AxisWeights:
    """One axis of a Pillow resize: output pixel i = sum over t of source[first + starts[i] + t] * taps[i, t].

    `taps` are Pillow's fixed-point integers (scaled by 2^PRECISION_BITS), zero past each output
    pixel's own window. Stored as a band (a few dozen taps per output) so that caching many sizes
    stays small; `dense()` gives the (n_out, span) matrix a GEMM wants.
    """

    first: int  # first source pixel any kept output reads
    span: int  # source pixels from `first` that the kept outputs read
    starts: np.ndarray  # (n_out,) int64: each output's first source pixel, relative to `first`
    taps: np.ndarray  # (n_out, max taps) int32

    @property
    def n_out(self) -> int:
        return int(self.taps.shape[0])

    def dense(self) -> np.ndarray:
        """(n_out, span) int64: row i holds output i's weights at its source pixels' columns."""
        matrix = np.zeros((self.n_out, self.span), dtype=np.int64)
        width = self.taps.shape[1]
        for i, start in enumerate(self.starts.tolist()):
            stop = min(start + width, self.span)
            matrix[i, start:stop] = self.taps[i, : stop - start]
        return matrix


@lru_cache(maxsize=512)
def axis_weights(
    in_size: int,
    out_size: int,
    interpolation: str,
    box: tuple[float, float] | None = None,
    keep: tuple[int, int] | None = None,
) -> AxisWeights:
    """Pillow's weights for resizing an axis of `in_size` pixels (or its `box` span) to `out_size`.

    Args:
        in_size: source pixels along the axis.
        out_size: the resized length (Pillow's `size` along this axis).
        interpolation: "bicubic" or "bilinear".
        box: Pillow's `box` along this axis (start, end) in source pixels, as `Image.resize(box=)`
            takes it; None is the whole axis. Pillow reads it as C floats: so does this.
        keep: the output pixels wanted, [start, stop) of `out_size` (a crop folded into the
            resize: Pillow computes every output pixel independently, so the kept ones are the same).

    Returns:
        AxisWeights over the source span the kept outputs read (an output whose window is empty,
        which Pillow leaves at 2^21 >> 22 = 0, has no taps).
    """
    if interpolation not in RESAMPLE_FILTERS:
        raise ValueError(f"no Pillow weights for {interpolation!r}; choose from {', '.join(RESAMPLE_FILTERS)}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got {in_size} -> {out_size}")
    filt, filter_support = RESAMPLE_FILTERS[interpolation]
    lo, hi = keep if keep is not None else (0, out_size)
    if not 0 <= lo < hi <= out_size:
        raise ValueError(f"keep {keep} is not a range inside 0..{out_size}")
    start, end = box if box is not None else (0.0, float(in_size))
    in0, in1 = np.float32(start), np.float32(end)  # C `float box[4]`
    # precompute_coeffs: `(double)(in1 - in0) / outSize`, the subtraction in float.
    scale = float(np.float32(in1 - in0)) / out_size
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    ss = 1.0 / filterscale
    bounds: list[tuple[int, list[float]]] = []
    for xx in range(lo, hi):
        center = float(in0) + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C casts truncate toward zero, as int() does
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [filt((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for w in k:  # summed in order, as the C loop does (not pairwise)
            ww += w
        if ww != 0.0:
            k = [w / ww for w in k]
        bounds.append((xmin, k))
    first = min((xmin for xmin, k in bounds if k), default=0)
    last = max((xmin + len(k) for xmin, k in bounds if k), default=first + 1)
    width = max((len(k) for _, k in bounds), default=1) or 1
    starts = np.array([max(xmin - first, 0) for xmin, _ in bounds], dtype=np.int64)
    taps = np.zeros((hi - lo, width), dtype=np.int32)
    one = 1 << PRECISION_BITS
    for i, (_, k) in enumerate(bounds):
        # normalize_coeffs_8bpc: round half away from zero through a truncating cast.
        taps[i, : len(k)] = [int(w * one + (0.5 if w >= 0 else -0.5)) for w in k]
    for array in (starts, taps):
        array.setflags(write=False)
    return AxisWeights(first=first, span=max(1, last - first), starts=starts, taps=taps)
