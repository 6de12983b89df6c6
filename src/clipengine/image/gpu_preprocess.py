"""GPU preprocessing: resize / crop / normalise decoded images in torch, as the exact path does.

The geometry is the exact path's (`image.preprocess`): the same resized size (torchvision's
rounding), the same center-crop offsets, the same "squash" mode, and the same skip of the resize
when an image already has the resized size. Bicubic and bilinear resizes are Pillow's own integer
arithmetic (its fixed-point weights, its two passes stored as uint8, in its order, its `box=` for
extreme aspect ratios) run as int8 GEMMs (`image.gpu_resample`): bit-identical to the exact path.
Nearest uses Pillow's indices (bit-identical too, except nearest's crop-window resize of extreme
aspect ratios); `F.interpolate` in float32 is the fallback where the int8 GEMM fails (within one
grey level). tests/image/test_gpu_preprocess.py and test_gpu_resample.py check all of it.

The images come from `image.gpu_decode`. torch is imported inside functions: importing this
module does not need it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from clipengine.image.gpu_fused import fused_or_torch
from clipengine.image.gpu_resample import device_weights, resample_last_axis
from clipengine.image.pillow_resample import RESAMPLE_FILTERS, AxisWeights, axis_weights
from clipengine.image.preprocess import (
    _MAX_RESIZED_PIXELS,
    PreprocessConfig,
    _center_box,
    _normalise_table,
    resized_size,
)

if TYPE_CHECKING:
    import torch

__all__ = ["preprocess_tensors"]

logger = logging.getLogger(__name__)

# Same-size images are resized together up to this many source pixel values per call (128 Mi: with the
# int8 GEMM's operand and int32 sums, ~470 MB for 36 1280x960 photos).
_GROUP_ELEMENTS = 1 << 27


def preprocess_tensors(
    images: Sequence[torch.Tensor], cfg: PreprocessConfig, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(3, H, W) uint8 RGB images on one device -> (N, 3, S, S) normalised pixels on that device.

    Resize (bicubic / bilinear with antialias, as Pillow's filters; nearest as Pillow's nearest),
    round and clamp to 0..255 as Pillow's uint8 output, center-crop, then (v / 255 - mean) / std
    in float32, value for value the exact path's lookup table.

    Extreme aspect ratios (where the exact path resizes "into the crop window" to bound memory)
    resize only the source rows / columns that feed the crop, plus the filter's reach: memory stays
    O(S^2) per image, at up to about half an output pixel of offset from the exact path.

    Args:
        images: uint8 tensors shaped (3, H, W), all on the same device.
        cfg: the model's preprocessing settings.
        out_dtype: dtype of the result (float32 when None).

    Raises:
        ValueError: an image that is not a (3, H, W) uint8 tensor, or images on several devices.
    """
    import torch

    size = cfg.image_size
    if not images:
        return torch.empty((0, 3, size, size), dtype=out_dtype or torch.float32)
    device = images[0].device
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"image {i}: expected a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}"
            )
        if image.device != device:
            raise ValueError(f"image {i} is on {image.device}, image 0 on {device}: use one device")
        groups.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(i)
    rows: list[torch.Tensor | None] = [None] * len(images)
    for (height, width), indices in groups.items():
        step = max(1, _GROUP_ELEMENTS // (3 * height * width))
        for start in range(0, len(indices), step):
            part = indices[start : start + step]
            batch = torch.stack([images[i] for i in part]) if len(part) > 1 else images[part[0]][None]
            cropped = _resize_crop(batch, width, height, cfg)
            for j, i in enumerate(part):
                rows[i] = cropped[j]
    crops = torch.stack([r for r in rows if r is not None])
    return _normalise(crops, cfg, out_dtype or torch.float32)


def _resize_crop(batch: torch.Tensor, width: int, height: int, cfg: PreprocessConfig) -> torch.Tensor:
    """(n, 3, height, width) uint8 -> (n, 3, S, S) uint8, the exact path's `resize_and_crop`.

    Bicubic / bilinear: Pillow's own integer arithmetic (`image.gpu_resample`), bit-identical.
    Nearest, and devices whose int8 GEMM fails: `F.interpolate` in float32 (`_float_resize_crop`).
    """
    if cfg.interpolation in RESAMPLE_FILTERS and not _int_resize_failed:
        try:
            return _exact_resize_crop(batch, width, height, cfg)
        except (RuntimeError, OverflowError) as err:
            if isinstance(err, _torch_oom()):
                raise
            _note_int_resize_failure(err)
    return _float_resize_crop(batch, width, height, cfg)


_int_resize_failed = False  # set once the int8 GEMM failed on this process' device: not retried


def _note_int_resize_failure(err: Exception) -> None:
    global _int_resize_failed
    if isinstance(err, OverflowError):  # this image only (a window of millions of pixels)
        logger.debug("exact integer resize refused (%s); float32 resize instead", err)
        return
    _int_resize_failed = True
    logger.warning("exact integer resize failed on this device (%s); resizing in float32 instead "
                   "(within one grey level of Pillow)", err)  # fmt: skip


def _torch_oom() -> type[BaseException]:
    import torch

    return torch.OutOfMemoryError


def _exact_resize_crop(batch: torch.Tensor, width: int, height: int, cfg: PreprocessConfig) -> torch.Tensor:
    """Pillow's resize (and the crop, folded in: only the kept output pixels are computed)."""
    size = cfg.image_size
    new_w, new_h = resized_size(width, height, cfg)
    left, top, right, bottom = _center_box(new_w, new_h, size)
    interpolation = cfg.interpolation
    horizontal: AxisWeights | None
    vertical: AxisWeights | None
    if new_w * new_h > _MAX_RESIZED_PIXELS:
        # As the exact path: the crop window's box in source pixels, resized straight to S x S.
        sx, sy = width / new_w, height / new_h
        x_box, y_box = (left * sx, right * sx), (top * sy, bottom * sy)
        horizontal = _box_axis(width, size, interpolation, x_box)
        vertical = _box_axis(height, size, interpolation, y_box)
        vertical_first = _pillow_vertical_first(width, height, size, size)
        cols, rows = slice(0, width), slice(0, height)
    else:
        horizontal = None if new_w == width else axis_weights(width, new_w, interpolation, keep=(left, right))
        vertical = None if new_h == height else axis_weights(height, new_h, interpolation, keep=(top, bottom))
        vertical_first = _pillow_vertical_first(width, height, new_w, new_h)
        cols, rows = slice(left, right), slice(top, bottom)
    device = batch.device
    # A pass Pillow skips is a plain crop; before the first pass, the other axis is cut to what
    # the second pass reads (Pillow does the same for the rows of its horizontal pass).
    if horizontal is None:
        batch = batch[:, :, :, cols]
    if vertical is None:
        batch = batch[:, :, rows, :]
    if vertical_first:
        x_origin = 0
        if horizontal is not None and vertical is not None:
            batch = batch[:, :, :, horizontal.first : horizontal.first + horizontal.span]
            x_origin = horizontal.first
        if vertical is not None:
            batch = _vertical_pass(batch, vertical)
        if horizontal is not None:
            batch = resample_last_axis(batch, device_weights(horizontal, device), origin=x_origin)
    else:
        y_origin = 0
        if horizontal is not None and vertical is not None:
            batch = batch[:, :, vertical.first : vertical.first + vertical.span, :]
            y_origin = vertical.first
        if horizontal is not None:
            batch = resample_last_axis(batch, device_weights(horizontal, device))
        if vertical is not None:
            batch = _vertical_pass(batch, vertical, origin=y_origin)
    return batch.contiguous()


def _vertical_pass(batch: torch.Tensor, vertical: AxisWeights, origin: int = 0) -> torch.Tensor:
    transposed = resample_last_axis(batch.transpose(2, 3), device_weights(vertical, batch.device), origin=origin)
    return transposed.transpose(2, 3)


def _box_axis(in_size: int, out_size: int, interpolation: str, box: tuple[float, float]) -> AxisWeights | None:
    """Weights for one axis of a box resize, or None where Pillow skips the pass (its
    `need_horizontal` / `need_vertical`: same size and the box is the whole axis, as C floats)."""
    if out_size == in_size and np.float32(box[0]) == 0 and np.float32(box[1]) == in_size:
        return None
    return axis_weights(in_size, out_size, interpolation, box=box)


def _float_resize_crop(batch: torch.Tensor, width: int, height: int, cfg: PreprocessConfig) -> torch.Tensor:
    """`_resize_crop` with `F.interpolate` in float32: Pillow's nearest exactly, its filters within
    one grey level (float weights, round half to even)."""
    size = cfg.image_size
    new_w, new_h = resized_size(width, height, cfg)
    left, top, right, bottom = _center_box(new_w, new_h, size)
    if new_w * new_h > _MAX_RESIZED_PIXELS:
        logger.debug("extreme aspect ratio %dx%d: resizing only the crop window", width, height)
        y0, y1, out_h, off_y = _window(height, new_h, top, size)
        x0, x1, out_w, off_x = _window(width, new_w, left, size)
        # Pass order as Pillow picks it for the exact path's box resize: whole image -> S x S.
        vertical_first = _pillow_vertical_first(width, height, size, size)
        resized = _resize(batch[:, :, y0:y1, x0:x1], out_h, out_w, cfg.interpolation, vertical_first)
        return resized[:, :, off_y : off_y + size, off_x : off_x + size]
    if (new_w, new_h) != (width, height):  # torchvision leaves an image of the right size untouched
        vertical_first = _pillow_vertical_first(width, height, new_w, new_h)
        batch = _resize(batch, new_h, new_w, cfg.interpolation, vertical_first)
    return batch[:, :, top:bottom, left:right]


def _window(n_src: int, n_new: int, start: int, size: int) -> tuple[int, int, int, int]:
    """One axis of a window resize: source span [lo, hi), its resized length, the crop's offset in it.

    The span covers the crop window mapped back to the source plus the filter's reach (bicubic's
    support of 2 source pixels, widened by the shrink factor), so edge clamping at the span's ends
    never reaches the crop.
    """
    scale = n_new / n_src  # output pixels per source pixel
    reach = math.ceil(2 * max(1.0, 1 / scale)) + 1
    lo = max(0, math.floor(start / scale) - reach)
    hi = min(n_src, math.ceil((start + size) / scale) + reach)
    length = max(size, round((hi - lo) * scale))
    offset = min(length - size, max(0, round(start - lo * scale)))
    return lo, hi, length, offset


def _resize(
    batch: torch.Tensor, height: int, width: int, interpolation: str, vertical_first: bool
) -> torch.Tensor:
    """(n, 3, h, w) uint8 -> (n, 3, height, width) uint8 the way Pillow resizes 8-bit images.

    Pillow resamples one axis, stores that pass as rounded, saturated uint8, then resamples the
    other; the passes here do the same, in Pillow's order, because with bicubic's overshoot (sharp
    edges, noise, upscaling) one float pass, or the other order, differs from Pillow by up to ~20
    grey levels where matching passes stay within one.
    """
    import torch
    import torch.nn.functional as F

    src_h, src_w = int(batch.shape[2]), int(batch.shape[3])
    if interpolation == "nearest":
        rows = _nearest_indices(src_h, height, batch.device)
        cols = _nearest_indices(src_w, width, batch.device)
        return batch.index_select(2, rows).index_select(3, cols)
    passes = [(src_h, width), (height, width)]  # horizontal, then vertical
    if vertical_first:
        passes = [(height, src_w), (height, width)]
    for size in passes:
        if tuple(batch.shape[2:]) == size:  # Pillow skips a pass that keeps its axis
            continue
        x = batch.float()  # float on every device: CUDA has no uint8 antialiased kernels
        if size[1] == 1 and size[0] > 1:
            # torch's antialiased kernel (CPU, torch 2.13) returns wrong rows when the output is
            # one pixel wide, e.g. the vertical pass of a 1-px-wide image; transposed it is right.
            x = F.interpolate(x.transpose(2, 3), size=size[::-1], mode=interpolation, antialias=True)
            x = x.transpose(2, 3)
        else:
            x = F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)
        batch = x.round_().clamp_(0, 255).to(torch.uint8)
    return batch


def _pillow_vertical_first(src_w: int, src_h: int, width: int, height: int) -> bool:
    """Whether the installed Pillow resamples vertically first for this resize (it matters: the
    pass in between is stored as uint8). Read from Pillow's sources:

    - Pillow >= 13 (Resample.c, python-pillow/Pillow#9549): when the height loses more than twice
      as many pixels as the width.
    - Pillow 12.2 - 12.x (Image.resize, python-pillow/Pillow#9524): images over 100 times taller
      than wide whose height shrinks.
    - Older: always horizontally first.
    """
    version = _pillow_version()
    if version >= (13, 0):
        shrink_h = src_h - height
        return shrink_h > 0 and shrink_h > 2 * (src_w - width)
    if version >= (12, 2):
        return src_h > 100 * src_w and height < src_h
    return False


@lru_cache(maxsize=1)
def _pillow_version() -> tuple[int, int]:
    from PIL import __version__

    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in __version__.split(".")[:2])
    return major, minor


def _nearest_indices(n_src: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Pillow's nearest-neighbour source indices: int(x) over x = scale / 2 + k * scale, accumulated
    in double one step at a time as Pillow's affine scaler does (a closed form floor((k + 0.5) *
    scale), torch's "nearest-exact", differs at ties where the running sum rounds)."""
    import torch

    scale = n_src / n_out
    steps = np.full(n_out, scale)
    steps[0] = scale / 2
    positions = np.add.accumulate(steps)  # sequential, like Pillow's `xo += a[0]`
    indices = np.minimum(positions.astype(np.int64), n_src - 1)
    return torch.from_numpy(indices).to(device)


def _normalise(crops: torch.Tensor, cfg: PreprocessConfig, dtype: torch.dtype) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> normalised `dtype` by lookup in the exact path's float32 table."""
    import torch

    table = _device_table(cfg.mean, cfg.std, crops.device)  # (3 * 256,)

    def torch_ops() -> torch.Tensor:
        offsets = torch.arange(0, 3 * 256, 256, device=crops.device).view(1, 3, 1, 1)
        return table[crops.long() + offsets].to(dtype)

    normalised: torch.Tensor = fused_or_torch(
        crops.device, lambda kernels: kernels.normalise_by_table(crops, table, dtype), torch_ops, name="normalise"
    )
    return normalised


@lru_cache(maxsize=16)
def _device_table(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.array(_normalise_table(mean, std)).reshape(-1)).to(device)
