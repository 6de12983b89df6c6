"""Triton kernels for the GPU preprocessing's memory-bound steps (imported only on CUDA, lazily).

Measured on an H200 (session 5), `preprocess_tensors` ran 1280x960 photos at 24.7k img/s, about
40 us per image, against 8.1-11k img/s for the JPEG decode it follows: a third of a loader's time
at the 8k img/s target. Most of it is not the int8 GEMM but what torch does around it, one kernel
per operator:

- combining the GEMM's three digit sums into Pillow's uint8 (`gpu_resample`): seven elementwise
  kernels that each read and write the whole int32 sums (~36 MB per 1280x960 photo in the
  horizontal pass); `combine_digit_sums` reads them once and writes uint8;
- the normalisation by table lookup (`gpu_preprocess._normalise`): int64 indices, an add, a gather
  and a cast (~6 MB per image); `normalise_by_table` is one gather from uint8 to the output dtype;
- the copy that builds each GEMM's operand (p XOR 0x80 from a strided crop): 10 us per photo in
  torch's generic strided kernel (session 15's profile), a quarter of the time the kernels above
  left; `write_operand` reads the crop in tiles (added after that session's run: unmeasured on a
  GPU; `CLIPENGINE_GPU_KERNEL_SKIP=operand` compares).

Both give the same integers / table values as the torch code they replace (tests/image's `gpu`
tests compare them, and the whole preprocessing with the exact CPU path). Measured on the H200 in
session 15 (benchmarks/gpu_preprocess_bench.py, 256 photos per call): 38.6k img/s against 25.6k
for the torch ops, 25.9 against 39.0 us per photo; the GPU time left is the int8 GEMM (~10 us)
and the copy that builds its operand (~10 us). When they are used: `image.gpu_fused`. Importing
this module imports triton.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

__all__ = ["combine_digit_sums", "normalise_by_table", "write_operand"]

_COMBINE_ROWS = 64
_COMBINE_COLS = 64
_NORMALISE_BLOCK = 2048
_OPERAND_ROWS = 16
_OPERAND_COLS = 256


# Row and element counts change from call to call: not specialised on, so one compile serves them all.
@triton.jit(do_not_specialize=["rows"])  # type: ignore[untyped-decorator]
def _combine_kernel(sums_ptr, offset_ptr, out_ptr, rows, n_out, n_pad, sums_stride,  # type: ignore[no-untyped-def]
                    SHIFT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    inside = (r < rows) & (c < n_out)
    at = sums_ptr + r.to(tl.int64) * sums_stride + c
    a0 = tl.load(at, mask=inside, other=0)
    a1 = tl.load(at + n_pad, mask=inside, other=0)
    a2 = tl.load(at + 2 * n_pad, mask=inside, other=0)
    offset = tl.load(offset_ptr + c, mask=c < n_out, other=0)
    # int32 throughout, as gpu_resample's torch code: >> on signed ints is arithmetic (a floor).
    value = (((a0 + offset) >> 8) + a1 + a2 * 256) >> SHIFT
    value = tl.minimum(tl.maximum(value, 0), 255)
    tl.store(out_ptr + r.to(tl.int64) * n_out + c, value.to(tl.uint8), mask=inside)


@triton.jit(do_not_specialize=["total"])  # type: ignore[untyped-decorator]
def _normalise_kernel(crops_ptr, table_ptr, out_ptr, total, plane, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < total
    pixel = tl.load(crops_ptr + i, mask=inside, other=0).to(tl.int32)
    channel = ((i // plane) % 3).to(tl.int32)
    value = tl.load(table_ptr + channel * 256 + pixel, mask=inside, other=0.0)
    tl.store(out_ptr + i, value.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["rows"])  # type: ignore[untyped-decorator]
def _operand_kernel(src_ptr, out_ptr, rows, span, d1, d2, s0, s1, s2, s3, out_stride,  # type: ignore[no-untyped-def]
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    inside = (r < rows) & (c < span)
    # row r of the (rows, span) operand is source[i0, i1, i2, :], r = (i0 * d1 + i1) * d2 + i2
    at = src_ptr + (r // (d1 * d2)) * s0 + (r // d2 % d1) * s1 + (r % d2) * s2 + c.to(tl.int64) * s3
    pixel = tl.load(at, mask=inside, other=0)
    tl.store(out_ptr + r * out_stride + c, (pixel ^ 0x80).to(tl.uint8), mask=inside)


def write_operand(source: torch.Tensor, operand: torch.Tensor) -> None:
    """operand[r, :span] = source's row r XOR 0x80, for a (..., span) uint8 view of up to 4
    dimensions, any strides (`gpu_resample.resample_last_axis`'s int8 GEMM operand: p - 128)."""
    span = int(source.shape[-1])
    lead = [int(n) for n in source.shape[:-1]]
    strides = [int(st) for st in source.stride()]
    if len(lead) > 3:
        raise ValueError(f"expected at most 4 dimensions, got {tuple(source.shape)}")
    while len(lead) < 3:  # (span,) or (r, span): leading axes of size 1
        lead.insert(0, 1)
        strides.insert(0, 0)
    rows = lead[0] * lead[1] * lead[2]
    if operand.stride(1) != 1 or operand.shape[0] < rows or operand.shape[1] < span:
        raise ValueError(f"operand {tuple(operand.shape)} {operand.stride()} cannot take {rows} rows of {span}")
    if rows == 0 or span == 0:
        return
    grid = (triton.cdiv(rows, _OPERAND_ROWS), triton.cdiv(span, _OPERAND_COLS))
    _operand_kernel[grid](source, operand, rows, span, lead[1], lead[2], *strides, operand.stride(0),
                          BLOCK_R=_OPERAND_ROWS, BLOCK_C=_OPERAND_COLS)  # fmt: skip


def combine_digit_sums(sums: torch.Tensor, offset: torch.Tensor, n_out: int, shift: int) -> torch.Tensor:
    """(rows, 3 n_pad) int32 digit sums -> (rows, n_out) uint8:
    clip8((((A0 + offset) >> 8) + A1 + 256 A2) >> shift), as `gpu_resample.resample_last_axis`."""
    import torch

    rows = int(sums.shape[0])
    n_pad = int(offset.shape[0])
    if sums.stride(1) != 1 or sums.shape[1] != 3 * n_pad:
        raise ValueError(f"expected row-major (rows, {3 * n_pad}) sums, got {tuple(sums.shape)} {sums.stride()}")
    out = torch.empty((rows, n_out), dtype=torch.uint8, device=sums.device)
    if rows == 0 or n_out == 0:
        return out
    grid = (triton.cdiv(rows, _COMBINE_ROWS), triton.cdiv(n_out, _COMBINE_COLS))
    _combine_kernel[grid](sums, offset, out, rows, n_out, n_pad, sums.stride(0),
                          SHIFT=shift, BLOCK_R=_COMBINE_ROWS, BLOCK_C=_COMBINE_COLS)  # fmt: skip
    return out


def normalise_by_table(crops: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, 3, S, S) uint8 crops -> `dtype` values table[channel * 256 + pixel], as
    `gpu_preprocess._normalise` (table: (3 * 256,) float32)."""
    import torch

    crops = crops.contiguous()
    out = torch.empty(crops.shape, dtype=dtype, device=crops.device)
    total = crops.numel()
    if total:
        plane = int(crops.shape[2]) * int(crops.shape[3])
        _normalise_kernel[(triton.cdiv(total, _NORMALISE_BLOCK),)](crops, table, out, total, plane,
                                                                  BLOCK=_NORMALISE_BLOCK)  # fmt: skip
    return out
