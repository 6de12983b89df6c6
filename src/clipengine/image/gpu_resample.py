"""Pillow's 8-bit resize as integer matrix products: bit-identical results, run on tensor cores.

Each pass of Pillow's two-pass resize is `clip8((2^21 + sum(pixel * weight)) >> 22)` with 22-bit
integer weights (`image.pillow_resample`). Here the sum is a matrix product, source pixels x the
(span x outputs) weight band, done exactly in int8 x int8 -> int32 GEMMs (`torch._int_mm`: cuBLASLt
IMMA kernels on a GPU, oneDNN on a CPU):

- pixels p in 0..255 become p - 128 (an XOR of the top bit), which fits int8; the lost
  128 * sum(weights) goes back in as a per-output constant;
- each weight w becomes three signed base-256 digits, w = d0 + 256 d1 + 65536 d2 (each in
  -128..127), so one GEMM against [d0 | d1 | d2] gives the three partial sums A0, A1, A2;
- S = A0 + 256 A1 + 65536 A2 + C overflows int32, but floor(S / 2^22), which is all Pillow keeps,
  equals floor((A1 + 256 A2 + floor((A0 + C) / 256)) / 2^14), which does not.

So the output equals Pillow's value for value, where `F.interpolate(antialias=True)` (float32
weights, round half to even) was off by one grey level on up to ~2 % of values; and the passes
read uint8 and use tensor cores instead of converting whole photos to float32 first.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from clipengine.image.gpu_fused import fused_or_torch
from clipengine.image.pillow_resample import PRECISION_BITS, AxisWeights

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceWeights", "device_weights", "resample_last_axis"]

_MIN_ROWS = 17  # cuBLAS' int8 GEMM wants more than 16 rows
_INT32_MAX = (1 << 31) - 1


def _ceil8(n: int) -> int:
    return -(-n // 8) * 8  # cuBLAS' int8 GEMM wants inner and output sizes in multiples of 8


@dataclass(frozen=True)
class DeviceWeights:
    """One axis' weights on a device, ready for `resample_last_axis`."""

    first: int  # first source pixel read
    span: int  # source pixels read
    n_out: int  # output pixels
    digits: torch.Tensor  # (ceil8(span), 3 * ceil8(n_out)) int8: [d0 | d1 | d2], column-major
    offset: torch.Tensor  # (ceil8(n_out),) int32: 128 * sum(weights) + 2^21


def _split_digits(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int64 weights -> signed base-256 digits d0, d1, d2 with weights = d0 + 256 d1 + 65536 d2."""
    d0 = (weights + 128) % 256 - 128
    rest = (weights - d0) // 256
    d1 = (rest + 128) % 256 - 128
    d2 = (rest - d1) // 256
    if np.abs(d2).max(initial=0) > 127:
        raise OverflowError("resampling weights beyond 23 bits")  # cannot happen: |w| <= 2^22 * ~1.2
    return d0, d1, d2


def _check_int32(d0: np.ndarray, d1: np.ndarray, d2: np.ndarray, offset: np.ndarray) -> None:
    """Refuse weights whose partial sums could overflow int32 (a source span of millions of pixels
    per output), so no result is ever silently wrong."""
    reach = [128 * np.abs(d).sum(axis=1) for d in (d0, d1, d2)]  # |p - 128| <= 128
    first = reach[0] + np.abs(offset)
    combined = (first >> 8) + 1 + reach[1] + 256 * reach[2]
    if first.max(initial=0) > _INT32_MAX or combined.max(initial=0) > _INT32_MAX:
        raise OverflowError("resize window too wide for exact int32 sums")


def device_weights(axis: AxisWeights, device: torch.device) -> DeviceWeights:
    """`axis` as int8 digit matrices on `device` (cached per axis and device)."""
    return _device_weights(axis, device)


@lru_cache(maxsize=32)  # a few MB each at most (4000-px axes): bounded device memory for folders of many sizes
def _device_weights(axis: AxisWeights, device: torch.device) -> DeviceWeights:
    import torch

    span, n_out = axis.span, axis.n_out
    k_pad, n_pad = _ceil8(span), _ceil8(n_out)
    weights = axis.dense()
    d0, d1, d2 = _split_digits(weights)
    offset = 128 * weights.sum(axis=1) + (1 << (PRECISION_BITS - 1))
    _check_int32(d0, d1, d2, offset)
    digits = np.zeros((3 * n_pad, k_pad), dtype=np.int8)  # rows = outputs: transposed below
    for j, d in enumerate((d0, d1, d2)):
        digits[j * n_pad : j * n_pad + n_out, :span] = d
    offsets = np.zeros(n_pad, dtype=np.int32)
    offsets[:n_out] = offset
    # (k_pad, 3 n_pad) as the transpose of a row-major matrix: the column-major operand layout
    # cuBLASLt's int8 kernels take without a copy.
    return DeviceWeights(
        first=axis.first,
        span=span,
        n_out=n_out,
        digits=torch.from_numpy(digits).to(device).t(),
        offset=torch.from_numpy(offsets).to(device),
    )


def resample_last_axis(pixels: torch.Tensor, weights: DeviceWeights, origin: int = 0) -> torch.Tensor:
    """(..., L) uint8 -> (..., n_out) uint8: one Pillow pass along the last axis, exactly.

    `pixels` may be any strided view (a crop of a larger image, a transpose); `origin` is the
    source index of its first pixel along the axis. Only the weights' source span is read.
    """
    import torch

    lead = tuple(pixels.shape[:-1])
    rows = int(np.prod(lead, dtype=np.int64))
    span, n_out = weights.span, weights.n_out
    k_pad = int(weights.digits.shape[0])
    start = weights.first - origin
    source = pixels[..., start : start + span]
    if start < 0 or source.shape[-1] != span:
        raise ValueError(
            f"the weights read source pixels {weights.first}..{weights.first + span}, "
            f"the axis holds {origin}..{origin + pixels.shape[-1]}"
        )
    # p - 128 as int8 is p XOR 0x80 reinterpreted; written straight into the padded GEMM operand.
    # Pad columns meet zero weights and pad rows are dropped, so neither needs clearing.
    operand = torch.empty((max(rows, _MIN_ROWS), k_pad), dtype=torch.uint8, device=pixels.device)
    fused_or_torch(
        pixels.device,
        lambda kernels: kernels.write_operand(source, operand),
        lambda: torch.bitwise_xor(source, 0x80, out=operand[:rows, :span].view(*lead, span)),
        name="operand",
    )
    sums = torch._int_mm(operand.view(torch.int8), weights.digits)[:rows]  # (rows, 3 n_pad) int32
    combined: torch.Tensor = fused_or_torch(
        sums.device,
        lambda kernels: kernels.combine_digit_sums(sums, weights.offset, n_out, PRECISION_BITS - 8),
        lambda: _combine_digit_sums(sums, weights.offset, n_out),
        name="combine",
    )
    return combined.view(*lead, n_out)


def _combine_digit_sums(sums: torch.Tensor, offset: torch.Tensor, n_out: int) -> torch.Tensor:
    """(rows, 3 n_pad) int32 digit sums -> (rows, n_out) uint8 in torch ops (`image.gpu_triton`
    fuses the same arithmetic into one kernel on CUDA)."""
    import torch

    n_pad = int(offset.shape[0])
    out = sums[:, :n_pad] + offset  # A0 + C
    out >>= 8
    out += sums[:, n_pad : 2 * n_pad]  # + A1
    out.add_(sums[:, 2 * n_pad :], alpha=256)  # + 256 A2
    out >>= PRECISION_BITS - 8
    out.clamp_(0, 255)  # Pillow's clip8
    return out[:, :n_out].to(torch.uint8)
