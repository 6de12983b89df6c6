"""GPU image path: JPEG decode with nvjpeg (torchvision.io) and resize / crop / normalise in torch.

The geometry is the exact path's (`image.preprocess`): the same resized size (torchvision's
rounding), the same center-crop offsets, the same "squash" mode, and the same skip of the resize
when an image already has the resized size. Bicubic and bilinear resizes are Pillow's own integer
arithmetic (its fixed-point weights, its two passes stored as uint8, in its order, its `box=` for
extreme aspect ratios) run as int8 GEMMs (`image.gpu_resample`): bit-identical to the exact path.
Nearest uses Pillow's indices (bit-identical too, except nearest's crop-window resize of extreme
aspect ratios); `F.interpolate` in float32 is the fallback where the int8 GEMM fails (within one
grey level). tests/image/test_gpu_preprocess.py and test_gpu_resample.py check all of it.

Decoding is robust by construction: an input that is not a complete RGB / grey JPEG goes straight
to the exact CPU decoder (`image.decode`), a batched nvjpeg call that raises is retried one image
at a time, an image nvjpeg refuses falls back to the CPU decoder too, and only an image the CPU
decoder also rejects becomes a `Failure` (with the CPU decoder's reason). EXIF orientation is
applied here (torchvision ignores `apply_exif_orientation` for CUDA decoding, 0.26 - 0.28).
nvjpeg's pixels are not libjpeg-turbo's (chroma upsampling): see the GPU tests for the bounds.

torch and torchvision are imported inside functions: importing this module needs neither.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image

from clipengine.errors import DecodeError
from clipengine.image import decode as _decode
from clipengine.image.gpu_resample import device_weights, resample_last_axis
from clipengine.image.jpeg_header import scan_jpeg_header
from clipengine.image.pillow_resample import RESAMPLE_FILTERS, AxisWeights, axis_weights
from clipengine.image.preprocess import (
    _MAX_RESIZED_PIXELS,
    PreprocessConfig,
    _center_box,
    _normalise_table,
    resize_and_crop,
    resized_size,
)
from clipengine.types import Failure, ImageItem

if TYPE_CHECKING:
    import torch

__all__ = [
    "GPU_DECODE_LIBRARIES",
    "DecodeBatch",
    "Decoded",
    "DecodedChunk",
    "EncodedImage",
    "GpuBatch",
    "GpuDecodeStats",
    "GpuJpegDecoder",
    "assemble_batches",
    "default_decode_group",
    "inspect_encoded",
    "iter_decoded_chunks",
    "iter_gpu_batches",
    "orient",
    "preprocess_tensors",
]

logger = logging.getLogger(__name__)

# A decoder for a list of encoded JPEGs (1-D uint8 CPU tensors) -> (3, H, W) uint8 tensors on the
# device, aligned with the input; None (or raising, for the whole batch) where it cannot decode one.
DecodeBatch = Callable[[list["torch.Tensor"], "torch.device"], Sequence["torch.Tensor | None"]]

_JPEG_SOI = b"\xff\xd8\xff"  # start-of-image marker and the first byte of the next marker
_JPEG_EOI = b"\xff\xd9"
# A complete JPEG ends with EOI; allow trailing padding / metadata after it. No EOI near the end
# means truncated data, which nvjpeg may decode into grey rows where the exact path fails: such
# files go to the CPU decoder so both paths accept and reject the same inputs.
_EOI_TAIL = 4096
# Header parsing reads this prefix (markers before the scan: EXIF, ICC, ...; APPn segments are at
# most 64 KiB each), not a copy of the whole file; the whole file only when the prefix is not enough.
_HEADER_BYTES = 128 * 1024
_NVJPEG_MODES = ("RGB", "L")  # CMYK / YCCK JPEGs go to the CPU decoder (its colour conversion)
_DECODE_GROUP = 256  # default smallest number of files per decode call (see `iter_gpu_batches`)
# At most this many decoded pixels per decode call (1.5 GB as RGB uint8 on the device): 256
# 1280x960 photos fit in one call, 12 MP ones go 42 at a time, so small GPUs are not flooded.
_DECODE_PIXELS = 512_000_000
_READ_SLICE = 32  # most files per reader-thread task (see `_read_ahead`)
# Same-size images are resized together up to this many source pixel values per call (128 Mi: with the
# int8 GEMM's operand and int32 sums, ~470 MB for 36 1280x960 photos).
_GROUP_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class EncodedImage:
    """Encoded bytes, checked ahead of decoding (cheap, header only; done on the reader threads)."""

    id: str
    data: bytes | bytearray | np.ndarray  # file reads are uint8 arrays (see `_read`)
    orientation: int = 1  # EXIF orientation tag, applied after decoding (1 = as stored)
    nvjpeg: bool = True  # False: decode with the exact CPU path (not a JPEG nvjpeg should take)
    pixels: int = 0  # width * height from the header (0 when not read)


def inspect_encoded(item_id: str, data: bytes | bytearray | np.ndarray) -> EncodedImage:
    """Decide where `data` gets decoded and read its EXIF orientation, without decoding pixels.

    nvjpeg gets complete RGB / grey JPEGs within `MAX_IMAGE_PIXELS`; everything else (other
    formats, CMYK, truncated or unreadable headers, bombs) goes to the CPU decoder, which also
    produces the exact path's error message for inputs that cannot be decoded at all.
    """
    view = data.data if isinstance(data, np.ndarray) else memoryview(data)  # no copy either way
    if bytes(view[: len(_JPEG_SOI)]) != _JPEG_SOI or _JPEG_EOI not in bytes(view[-_EOI_TAIL:]):
        return EncodedImage(item_id, data, nvjpeg=False)
    fast = scan_jpeg_header(view)
    orientation: object
    if fast is not None:  # a plain header, read as Pillow would (jpeg_header.py); else Pillow reads it
        width, height, usable, orientation = fast.width, fast.height, True, fast.orientation
    else:
        try:
            width, height, usable, orientation = _read_header(view[:_HEADER_BYTES])
        except Exception:
            try:  # markers past the prefix (big APP segments): read the whole file's
                width, height, usable, orientation = _read_header(view)
            except Exception:  # any header problem: the CPU decoder decides, and names the reason
                return EncodedImage(item_id, data, nvjpeg=False)
    if not usable or width * height > _decode.MAX_IMAGE_PIXELS:
        return EncodedImage(item_id, data, nvjpeg=False)
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1  # unreadable tag: as stored, like image.decode
    return EncodedImage(item_id, data, orientation=orientation, pixels=width * height)


def _read_header(data: memoryview) -> tuple[int, int, bool, object]:
    """(width, height, nvjpeg can take it, EXIF orientation) from the markers before the scan."""
    with _decode._quiet_pil(), Image.open(io.BytesIO(data)) as header:  # parses markers, not pixels
        usable = header.format in ("JPEG", "MPO") and header.mode in _NVJPEG_MODES
        return header.width, header.height, usable, header.getexif().get(_decode._EXIF_ORIENTATION, 1)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Undo an EXIF orientation on a (..., H, W) tensor, as Pillow's `ImageOps.exif_transpose`."""
    if orientation == 2:  # mirrored
        return image.flip(-1)
    if orientation == 3:  # upside down
        return image.flip(-2, -1)
    if orientation == 4:  # mirrored vertically
        return image.flip(-2)
    if orientation == 5:  # transposed
        return image.transpose(-2, -1)
    if orientation == 6:  # shown rotated 90 degrees clockwise
        return image.rot90(-1, (-2, -1))
    if orientation == 7:  # transversed
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # shown rotated 90 degrees counter-clockwise
        return image.rot90(1, (-2, -1))
    return image


def _nvjpeg_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched nvjpeg decode (hardware JPEG engines on A100 / H100 / H200).

    torchvision allocates the outputs on the caller's current stream but writes them from its own
    stream without waiting for the caller's: memory freed by queued work (the previous batch's
    resize, the model) can be handed out and overwritten before that work runs. Seen on an H200 as
    embeddings with cosine 0.56 once the host side got fast enough to run ahead. So the decode
    allocates from a stream of its own, the caller's stream waits for it, and each output is
    marked as used there (`record_stream`), so its memory is not reused before that use is done.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    consumer = torch.cuda.current_stream(device)
    stream = _decode_stream(device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        # One call for the whole list. No apply_exif_orientation: torchvision ignores it for CUDA
        # output (0.26 - 0.28); `orient` does it instead.
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    images = list(decoded) if isinstance(decoded, list) else [decoded]
    consumer.wait_stream(stream)
    for image in images:
        image.record_stream(consumer)
    return images


GPU_DECODE_LIBRARIES = ("torchvision", "nvimgcodec")


def _library_decoder(library: str, fancy_upsampling: bool) -> DecodeBatch:
    if library == "torchvision":
        if fancy_upsampling:
            raise ValueError("fancy_upsampling needs library='nvimgcodec' (torchvision's decoder has no such option)")
        return _nvjpeg_decode
    if library == "nvimgcodec":
        from clipengine.image import nvimgcodec_decode

        if not nvimgcodec_decode.available():
            raise ImportError(
                "GPU decode with nvimgcodec needs NVIDIA nvImageCodec: pip install 'nvidia-nvimgcodec-cu13[nvjpeg]' "
                "(cu12 for CUDA 12)"
            )
        return nvimgcodec_decode.make_decode_batch(fancy_upsampling)  # type: ignore[no-any-return]
    raise ValueError(f"unknown GPU decode library {library!r}; choose from {', '.join(GPU_DECODE_LIBRARIES)}")


@lru_cache(maxsize=16)
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    import torch

    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


@dataclass
class GpuDecodeStats:
    """Where images were decoded; `cpu_fallback` > 0 is normal for PNGs, CMYK or odd JPEGs."""

    nvjpeg: int = 0  # decoded on the GPU
    cpu_fallback: int = 0  # decoded by the exact CPU path instead
    failures: int = 0  # undecodable by either
    batch_retries: int = 0  # batched nvjpeg calls that raised and were retried one image at a time
    read_s: float = 0.0  # seconds reading + inspecting files, summed over reader threads
    decode_s: float = 0.0  # wall seconds in `GpuJpegDecoder.decode` (the nvjpeg call waits for its decode)
    preprocess_s: float = 0.0  # wall seconds queuing resize / crop / normalise


class Decoded(NamedTuple):
    """Decoded images in input order (failed ones left out), and a Failure per undecodable input."""

    ids: list[str]
    images: list[torch.Tensor]  # (3, H, W) uint8 on the decoder's device, EXIF-oriented
    failures: list[Failure]
    sizes: list[tuple[int, int]]  # original (width, height) of each image, EXIF-oriented


class GpuJpegDecoder:
    """Decodes JPEGs with nvjpeg in one batched call; anything else through the exact CPU decoder.

    Args:
        device: "cuda", "cuda:1", ... (any torch device when `decode_batch` is given).
        decode_batch: the batched decoder; default torchvision's nvjpeg `decode_jpeg`. Tests
            inject a fake to exercise the fallbacks without a GPU.
        stats: counters to add to (a new `GpuDecodeStats` by default).
        large_pixels: experimental; JPEGs above this many pixels get an nvjpeg call of their own
            per batch. On an H200, 1280x960 JPEGs alone decoded at ~8,950 img/s and 4000x3000 alone
            at ~916, but a 7:1 mix at ~1,950 instead of the ~4,300 those rates imply. Splitting
            gained 6 % on that mix in benchmarks/gpu_e2e.py (H200, 1,514 vs 1,430 img/s), so it
            stays off by default. None: one call per batch.
        library: which GPU JPEG decoder runs when `decode_batch` is not given: "torchvision"
            (`torchvision.io.decode_jpeg`) or "nvimgcodec" (NVIDIA nvImageCodec, when installed:
            `image.nvimgcodec_decode`).
        fancy_upsampling: nvimgcodec only: libjpeg's interpolated chroma upsampling (closer to
            the exact path) instead of nvjpeg's replication.
    """

    def __init__(
        self,
        device: str | torch.device = "cuda",
        *,
        decode_batch: DecodeBatch | None = None,
        stats: GpuDecodeStats | None = None,
        large_pixels: int | None = None,
        library: str = "torchvision",
        fancy_upsampling: bool = False,
    ) -> None:
        import torch

        self.large_pixels = large_pixels
        self.device = torch.device(device)
        self.library = library if decode_batch is None else "custom"
        self.decode_batch = decode_batch if decode_batch is not None else _library_decoder(library, fancy_upsampling)
        self.stats = stats if stats is not None else GpuDecodeStats()
        self._warned_all_failed = False

    def decode(
        self, items: Sequence[EncodedImage | tuple[str, bytes]], cfg: PreprocessConfig | None = None
    ) -> Decoded:
        """Decode `(id, bytes)` pairs (or already inspected `EncodedImage`s), keeping their order.

        With `cfg`, images the CPU decoder takes are also resized and cropped there, exactly as the
        exact path does (in their own mode: RGBA premultiplied, palettes nearest, 16-bit scaled)
        and handed over as S x S RGB, which `preprocess_tensors` leaves as it is: those images
        then match the exact path bit for bit. Without it they come back at full size in RGB.
        """
        t0 = time.perf_counter()
        encoded = [it if isinstance(it, EncodedImage) else inspect_encoded(*it) for it in items]
        results: list[tuple[torch.Tensor, tuple[int, int]] | Failure | None] = [None] * len(encoded)
        for on_gpu in self._nvjpeg_groups(encoded):
            for i, image in zip(on_gpu, self._nvjpeg([encoded[i] for i in on_gpu]), strict=True):
                if image is not None:
                    image = orient(image, encoded[i].orientation)
                    results[i] = image, (int(image.shape[2]), int(image.shape[1]))
                    self.stats.nvjpeg += 1
        for i, e in enumerate(encoded):
            if results[i] is None:
                results[i] = self._cpu(e, cfg)
        decoded = Decoded([], [], [], [])
        for e, result in zip(encoded, results, strict=True):
            if isinstance(result, Failure):
                decoded.failures.append(result)
            elif result is not None:
                decoded.ids.append(e.id)
                decoded.images.append(result[0])
                decoded.sizes.append(result[1])
        self.stats.decode_s += time.perf_counter() - t0
        return decoded

    def _nvjpeg_groups(self, encoded: list[EncodedImage]) -> list[list[int]]:
        """Indices of the images nvjpeg takes, one list per nvjpeg call (see `large_pixels`)."""
        on_gpu = [i for i, e in enumerate(encoded) if e.nvjpeg]
        if self.large_pixels is None:
            return [on_gpu]
        large = [i for i in on_gpu if encoded[i].pixels > self.large_pixels]
        small = [i for i in on_gpu if encoded[i].pixels <= self.large_pixels]
        return [group for group in (small, large) if group]

    def _nvjpeg(self, encoded: list[EncodedImage]) -> list[torch.Tensor | None]:
        """Decoded images aligned with `encoded`; None where nvjpeg could not decode one."""
        if not encoded:
            return []
        data = [_as_tensor(e.data) for e in encoded]
        try:
            images = list(self.decode_batch(data, self.device))
        except Exception as err:  # torchvision raises RuntimeError; any error only means "not this way"
            # The batched call returns nothing when one image fails: find it one image at a time.
            logger.debug("batched nvjpeg decode of %d images failed (%s); retrying one by one", len(data), err)
            self.stats.batch_retries += 1
        else:
            if len(images) != len(encoded):
                raise RuntimeError(f"{self.library} decoder returned {len(images)} images for {len(encoded)}")
            if len(images) > 1 and all(image is None for image in images) and not self._warned_all_failed:
                self._warned_all_failed = True  # e.g. nvImageCodec without its nvjpeg library
                logger.warning("the %s GPU decoder decoded none of %d JPEGs; the CPU decoder takes them "
                               "(is its nvjpeg library installed?)", self.library, len(images))  # fmt: skip
            return images
        singles: list[torch.Tensor | None] = []
        for item, tensor in zip(encoded, data, strict=True):
            try:
                singles.append(self.decode_batch([tensor], self.device)[0])
            except Exception as err:
                logger.debug("nvjpeg cannot decode %s (%s); using the CPU decoder", item.id, err)
                singles.append(None)
        return singles

    def _cpu(
        self, encoded: EncodedImage, cfg: PreprocessConfig | None
    ) -> tuple[torch.Tensor, tuple[int, int]] | Failure:
        """The exact path's decoder (EXIF-oriented RGB; with `cfg` also its resize and crop), moved
        to the device, with the decoded (width, height); or the Failure it gives."""
        import torch

        try:
            image = _decode.open_image(bytes(encoded.data), encoded.id)  # a copy, next to a CPU decode
            size = (int(image.width), int(image.height))
            if cfg is not None:
                image = resize_and_crop(_decode.to_8bit(image, encoded.id), cfg)
            rgb = _decode.to_rgb(image, encoded.id)
        except DecodeError as e:
            self.stats.failures += 1
            return Failure(encoded.id, e.reason)
        except Exception as e:  # any other per-image error is this image's failure, never the batch's
            logger.debug("failed to decode %s", encoded.id, exc_info=True)
            self.stats.failures += 1
            return Failure(encoded.id, f"{type(e).__name__}: {e}")
        self.stats.cpu_fallback += 1
        pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8))  # (H, W, 3), a writable copy
        return pixels.permute(2, 0, 1).to(self.device), size


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
    offsets = torch.arange(0, 3 * 256, 256, device=crops.device).view(1, 3, 1, 1)
    return table[crops.long() + offsets].to(dtype)


@lru_cache(maxsize=16)
def _device_table(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.array(_normalise_table(mean, std)).reshape(-1)).to(device)


def _as_tensor(data: bytes | bytearray | np.ndarray) -> torch.Tensor:
    """1-D uint8 CPU tensor over the encoded bytes; no copy for arrays and bytearrays."""
    import torch

    if isinstance(data, np.ndarray):
        return torch.from_numpy(data)
    # frombuffer shares a bytearray's memory; bytes are read-only, so those are copied first.
    return torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)


class GpuBatch(NamedTuple):
    """Preprocessed images on the device; ids align with rows of pixels."""

    ids: list[str]
    pixels: torch.Tensor  # (n, 3, S, S) on the decoder's device
    failures: list[Failure]  # inputs met while filling this batch that could not be used
    sizes: list[tuple[int, int]]  # original (width, height) per row, EXIF-oriented


def _read(item: ImageItem) -> EncodedImage | Failure:
    """Runs on a reader thread: file bytes plus the header check, or the read error as a Failure."""
    if isinstance(item.source, bytes):
        return inspect_encoded(item.id, item.source)
    try:
        # np.fromfile: no zero-filled buffer, and the read runs without the GIL, so reader threads
        # scale (550 kB files, 2 cores: 10k files/s on 2 threads vs 2.1k with bytearray + readinto,
        # which did not scale); torch.from_numpy then wraps it without a copy.
        data = np.fromfile(os.fspath(item.source), dtype=np.uint8)
    except OSError as e:
        return Failure(item.id, f"cannot read file: {e.strerror or e}")
    except Exception as e:  # e.g. a NUL byte in a listed path: this file's failure, as in the CPU loader
        return Failure(item.id, f"{type(e).__name__}: {e}")
    return inspect_encoded(item.id, data)


def iter_gpu_batches(
    items: Iterable[ImageItem],
    cfg: PreprocessConfig,
    device: str | torch.device = "cuda",
    batch_size: int = 256,
    *,
    read_threads: int = 2,
    prefetch_batches: int = 2,
    out_dtype: torch.dtype | None = None,
    decoder: GpuJpegDecoder | None = None,
    decode_group: int | None = None,
) -> Iterator[GpuBatch]:
    """Files -> batches of preprocessed pixels on the GPU, exactly `batch_size` rows (the last may be short).

    Reader threads read and inspect up to `prefetch_batches` groups of files ahead; this thread
    decodes and preprocesses (GPU work is queued asynchronously, so it overlaps the consumer's
    model as long as the consumer does not synchronise on every batch). As in
    `pipeline.batching.iter_batches`, failures do not shrink a batch: later images fill it, and each
    Failure rides on the batch being filled when it was met.

    The two stages are `iter_decoded_chunks` and `assemble_batches`; `pipeline.gpu_loading` can
    run them on threads of their own.

    Args:
        items: what to load, in order (ids are kept in this order).
        cfg: the model's preprocessing settings.
        device: where pixels are decoded and returned (ignored when `decoder` is given).
        batch_size: rows per batch.
        read_threads: threads reading files and parsing JPEG headers, in slices of up to 32
            files per task. More is slower from page cache: they hold the GIL for the header
            parse and starve this thread, which issues the GPU work (H200, 16 cores, 4096
            1280x960 JPEGs, twice each, one file per task: 1 thread 3.8-3.9k img/s, 2: 4.7-4.9k,
            4: 3.8-4.0k, 8: 4.0-4.5k, 16: 3.9k). Network storage with high latency may want more.
        prefetch_batches: groups of files read ahead of the decoder.
        out_dtype: pixel dtype (float32 when None); float16 halves the memory traffic for an fp16 model.
        decoder: a decoder to use (its `stats` fill in); default a new `GpuJpegDecoder(device)`.
        decode_group: files per decode call (default `max(batch_size, 256)`): nvjpeg's batched
            decode gets faster with larger calls (H200, 1280x960: 7,549 img/s at 64 per call,
            8,062 at 1024) and each call has a fixed cost (a stream wait), so small model batches
            (the CLI's default 32) are cut from larger decoded groups. A group is decoded in
            chunks of at most `_DECODE_PIXELS` header pixels, which bounds the device memory of
            full-size images held at once.

    Yields:
        GpuBatch(ids, pixels, failures, sizes).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    decoder = decoder if decoder is not None else GpuJpegDecoder(device)
    group_size = decode_group if decode_group is not None else default_decode_group(batch_size)
    chunks = iter_decoded_chunks(items, cfg, decoder, group_size=group_size, read_threads=read_threads,
                                 prefetch_groups=prefetch_batches)  # fmt: skip
    return _closing(assemble_batches(chunks, cfg, decoder, batch_size, out_dtype=out_dtype), chunks)


def _closing(batches: Iterator[GpuBatch], chunks: Iterator[DecodedChunk]) -> Iterator[GpuBatch]:
    """`batches`, with `chunks` (and so the reader threads) closed however they end. An error raised
    in `assemble_batches` keeps its frame, which holds `chunks`, alive for as long as the caller
    holds the error: without this the reader threads would go on reading until it is dropped."""
    try:
        yield from batches
    finally:
        close = getattr(chunks, "close", None)  # a generator (`iter_decoded_chunks`)
        if close is not None:
            close()


def default_decode_group(batch_size: int) -> int:
    """Files per decode call for a model batch of `batch_size` (see `iter_gpu_batches`)."""
    return max(batch_size, _DECODE_GROUP)


class DecodedChunk(NamedTuple):
    """One decode call's result, in input order, and where it sits in its group of files."""

    decoded: Decoded  # full-size images on the device (or S x S ones the CPU decoder resized)
    unread: list[Failure]  # files of the group that could not be read (on the group's first chunk)
    group_order: dict[str, int] | None  # on the group's last chunk only: each id's input position


def iter_decoded_chunks(
    items: Iterable[ImageItem],
    cfg: PreprocessConfig,
    decoder: GpuJpegDecoder,
    *,
    group_size: int = _DECODE_GROUP,
    read_threads: int = 2,
    prefetch_groups: int = 2,
) -> Iterator[DecodedChunk]:
    """Stage 1 of `iter_gpu_batches`: files -> decode calls.

    Reader threads read `prefetch_groups` groups of `group_size` files ahead; each group is
    decoded in chunks of at most `_DECODE_PIXELS` header pixels, so one chunk's full-size images
    are on the device at a time (plus what the next stage still holds).
    """
    if group_size < 1:
        raise ValueError(f"decode_group must be >= 1, got {group_size}")
    stats = decoder.stats
    for group in _read_ahead(items, group_size, max(1, read_threads), max(1, prefetch_groups), stats):
        unread = [r for r in group if isinstance(r, Failure)]
        stats.failures += len(unread)
        order = {r.id: i for i, r in enumerate(group)}
        chunks = list(_pixel_chunks([r for r in group if isinstance(r, EncodedImage)], _DECODE_PIXELS))
        if not chunks:  # nothing readable: the group still reports its failures
            yield DecodedChunk(Decoded([], [], [], []), unread, order)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            yield DecodedChunk(decoder.decode(chunk, cfg), unread if i == 0 else [], order if last else None)


def assemble_batches(
    chunks: Iterable[DecodedChunk],
    cfg: PreprocessConfig,
    decoder: GpuJpegDecoder,
    batch_size: int,
    *,
    out_dtype: torch.dtype | None = None,
) -> Iterator[GpuBatch]:
    """Stage 2 of `iter_gpu_batches`: decoded chunks -> preprocessed batches of `batch_size` rows.

    `decoder` gives the device and the stats (`preprocess_s`). A group's batches are yielded once
    its last chunk is in, with the group's failures in input order.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = decoder.stats
    ids: list[str] = []
    sizes: list[tuple[int, int]] = []
    pieces: list[torch.Tensor] = []
    failures: list[Failure] = []
    met: list[Failure] = []
    for decoded, unread, group_order in chunks:
        met += unread
        met += decoded.failures
        if decoded.ids:
            t0 = time.perf_counter()
            pieces.append(preprocess_tensors(decoded.images, cfg, out_dtype=out_dtype))
            stats.preprocess_s += time.perf_counter() - t0
            ids.extend(decoded.ids)
            sizes.extend(decoded.sizes)
        del decoded  # the full-size images: freed once preprocessed
        if group_order is None:
            continue
        failures.extend(sorted(met, key=lambda f: group_order.get(f.id, 0)))
        met = []
        while len(ids) >= batch_size:
            pixels = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            yield GpuBatch(ids[:batch_size], pixels[:batch_size], failures, sizes[:batch_size])
            ids, failures, sizes = ids[batch_size:], [], sizes[batch_size:]
            pieces = [pixels[batch_size:]] if ids else []
    if ids or failures or met:
        empty = (0, 3, cfg.image_size, cfg.image_size)
        pixels = torch.cat(pieces) if pieces else torch.empty(empty, dtype=out_dtype, device=decoder.device)
        yield GpuBatch(ids, pixels, failures + met, sizes)


def _pixel_chunks(encoded: list[EncodedImage], budget: int) -> Iterator[list[EncodedImage]]:
    """Consecutive runs of `encoded` whose header pixel counts add up to at most `budget` (one
    image at least): what one decode call may hold on the device at full size."""
    chunk: list[EncodedImage] = []
    total = 0
    for e in encoded:
        if chunk and total + e.pixels > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(e)
        total += e.pixels
    if chunk:
        yield chunk


def _read_ahead(
    items: Iterable[ImageItem], group_size: int, threads: int, prefetch: int, stats: GpuDecodeStats
) -> Iterator[list[EncodedImage | Failure]]:
    """Groups of `group_size` read results in input order, with up to `prefetch` groups in flight.

    Each reader task reads a slice of a group, not one file: a thread-pool task costs tens of
    microseconds of GIL-held bookkeeping and a thread wake-up, which per file capped the loader's
    host side below the decoder's rate (see `_read_slice_size`).
    """
    slice_size = _read_slice_size(group_size, threads)
    pending: deque[list[Future[tuple[list[EncodedImage | Failure], float]]]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="clipengine-read") as pool:
        try:
            for group in _batched(items, group_size):
                pending.append([pool.submit(_read_slice, group[i : i + slice_size])
                                for i in range(0, len(group), slice_size)])  # fmt: skip
                if len(pending) > prefetch:
                    yield _collect(pending.popleft(), stats)
            while pending:
                yield _collect(pending.popleft(), stats)
        finally:
            for futures in pending:  # consumer stopped early: drop reads not yet started
                for fut in futures:
                    fut.cancel()


def _read_slice_size(group_size: int, threads: int) -> int:
    """Files per reader task: at least 4 tasks per thread in a group (so threads share the work and
    the first results come early), at most 32 files (about 7 MB of 1280x960 JPEGs)."""
    return max(1, min(_READ_SLICE, -(-group_size // (4 * threads))))


def _read_slice(items: Sequence[ImageItem]) -> tuple[list[EncodedImage | Failure], float]:
    """Runs on a reader thread: `_read` for each item, and the seconds it took."""
    t0 = time.perf_counter()
    return [_read(item) for item in items], time.perf_counter() - t0


def _batched(items: Iterable[ImageItem], size: int) -> Iterator[list[ImageItem]]:
    group: list[ImageItem] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _collect(
    futures: list[Future[tuple[list[EncodedImage | Failure], float]]], stats: GpuDecodeStats
) -> list[EncodedImage | Failure]:
    results: list[EncodedImage | Failure] = []
    for fut in futures:
        read, seconds = fut.result()
        stats.read_s += seconds
        results.extend(read)
    return results
