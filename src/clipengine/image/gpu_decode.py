"""GPU JPEG decode: nvjpeg (torchvision.io, or NVIDIA nvImageCodec) with the exact CPU decoder behind it.

Decoding is robust by construction: an input that is not a complete RGB / grey JPEG goes straight
to the exact CPU decoder (`image.decode`), a batched nvjpeg call that raises is retried one image
at a time, an image nvjpeg refuses falls back to the CPU decoder too, and only an image the CPU
decoder also rejects becomes a `Failure` (with the CPU decoder's reason). EXIF orientation is
applied here (torchvision ignores `apply_exif_orientation` for CUDA decoding, 0.26 - 0.28).
nvjpeg's pixels are not libjpeg-turbo's (chroma upsampling): see the GPU tests for the bounds.

The decoded images go to `image.gpu_preprocess` (resize / crop / normalise on the device);
`pipeline.gpu_batching` reads the files and cuts batches. torch and torchvision are imported
inside functions: importing this module needs neither.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image

from clipengine.errors import DecodeError
from clipengine.image import decode as _decode
from clipengine.image.jpeg_header import scan_jpeg_header
from clipengine.image.preprocess import PreprocessConfig, resize_and_crop
from clipengine.types import Failure

if TYPE_CHECKING:
    import torch

__all__ = [
    "GPU_DECODE_LIBRARIES",
    "LARGE_JPEG_PIXELS",
    "DecodeBatch",
    "Decoded",
    "EncodedImage",
    "GpuDecodeStats",
    "GpuJpegDecoder",
    "inspect_encoded",
    "orient",
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
# JPEGs above this many pixels (phone photos: 12 MP) are decoded in a call apart from the smaller
# ones of their batch: see `GpuJpegDecoder`'s `large_pixels`.
LARGE_JPEG_PIXELS = 4_000_000


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
        progressive = fast.progressive
    else:
        try:
            width, height, usable, orientation, progressive = _read_header(view[:_HEADER_BYTES])
        except Exception:
            try:  # markers past the prefix (big APP segments): read the whole file's
                width, height, usable, orientation, progressive = _read_header(view)
            except Exception:  # any header problem: the CPU decoder decides, and names the reason
                return EncodedImage(item_id, data, nvjpeg=False)
    if not usable or width * height > _decode.MAX_IMAGE_PIXELS:
        return EncodedImage(item_id, data, nvjpeg=False)
    # A scan bomb (thousands of empty scans, each a pass over the image) goes to the CPU decoder,
    # which refuses it by name; counted for progressive files only (baseline ones are the bulk).
    if progressive and _decode.jpeg_scan_count(bytes(view)) > _decode.MAX_JPEG_SCANS:
        return EncodedImage(item_id, data, nvjpeg=False)
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1  # unreadable tag: as stored, like image.decode
    return EncodedImage(item_id, data, orientation=orientation, pixels=width * height)


def _read_header(data: memoryview) -> tuple[int, int, bool, object, bool]:
    """(width, height, nvjpeg can take it, EXIF orientation, progressive) from the markers before the scan."""
    with _decode._quiet_pil(), Image.open(io.BytesIO(data)) as header:  # parses markers, not pixels
        usable = header.format in ("JPEG", "MPO") and header.mode in _NVJPEG_MODES
        orientation = header.getexif().get(_decode._EXIF_ORIENTATION, 1)
        return header.width, header.height, usable, orientation, bool(header.info.get("progressive"))


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
    cpu_assist: int = 0  # decoded by CPU assist workers (`pipeline.cpu_assist`), not nvjpeg
    assist_s: float = 0.0  # those workers' read + decode + preprocess seconds, summed
    assist_wait_s: float = 0.0  # wall seconds the loader waited for them (their share is too large)


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
        large_pixels: JPEGs above this many pixels get a decode call of their own per batch
            (`LARGE_JPEG_PIXELS` by default; None: one call per batch). A batched nvjpeg call
            holding a few 12 MP photos among 1 MP ones is much slower than the two groups decoded
            apart: on an H200 (session 8, benchmarks/gpu_gap.py, 5 rounds in turn), 4096 files with
            every 8th 4000x3000 decoded at 1,624 img/s in one call per batch and 2,454 split
            (`embed_folder`: 1,599 vs 2,425). A folder of one size is one group either way.
            Measured with torchvision's decoder; `library="nvimgcodec"` splits the same way,
            unmeasured (one call per batch it ran the mix at 2,422 img/s with the model).
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
        large_pixels: int | None = LARGE_JPEG_PIXELS,
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
        error: Exception | None = None
        for item, tensor in zip(encoded, data, strict=True):
            try:
                singles.append(self.decode_batch([tensor], self.device)[0])
            except Exception as err:
                logger.debug("nvjpeg cannot decode %s (%s); using the CPU decoder", item.id, err)
                singles.append(None)
                error = err
        if len(singles) > 1 and all(image is None for image in singles) and not self._warned_all_failed:
            # A decoder that raises on every JPEG (torchvision without nvjpeg, a broken CUDA set-up)
            # would otherwise leave only debug lines while the loader thread decodes all on the CPU.
            self._warned_all_failed = True
            logger.warning("the %s GPU decoder failed on each of %d JPEGs (%s); the CPU decoder takes them",
                           self.library, len(singles), error)  # fmt: skip
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


def _as_tensor(data: bytes | bytearray | np.ndarray) -> torch.Tensor:
    """1-D uint8 CPU tensor over the encoded bytes; no copy for arrays and bytearrays."""
    import torch

    if isinstance(data, np.ndarray):
        return torch.from_numpy(data)
    # frombuffer shares a bytearray's memory; bytes are read-only, so those are copied first.
    return torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)
