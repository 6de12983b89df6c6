"""Any image input (path, bytes, PIL image, array) -> an RGB PIL image, or DecodeError naming the source."""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from clipengine.errors import DecodeError
from clipengine.image.files import file_kind
from clipengine.types import ImageInput

__all__ = [
    "EMPTY_FILE",
    "EXTERNAL_DECODERS",
    "MAX_FILE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_JPEG_SCANS",
    "check_whole_read",
    "decode_image",
    "jpeg_scan_count",
    "open_image",
    "open_image_file",
    "open_image_file_to_read_whole",
    "read_error_reason",
    "source_name",
    "to_8bit",
    "to_rgb",
]

logger = logging.getLogger(__name__)

# Refuse images above this many pixels before decoding them (a 1 kB PNG can claim 10^10 pixels).
# 2 x Pillow's default warning threshold: the size at which Pillow itself raises
# DecompressionBombError. Read at call time, so it can be changed (e.g. in tests).
MAX_IMAGE_PIXELS = 2 * 89_478_485

# `embed` reads each file whole before decoding it (`open_image_file_to_read_whole`); a larger file
# is refused before any read. 2 GiB is above any single image within MAX_IMAGE_PIXELS stored
# uncompressed (16-bit RGBA or CMYK TIFF: 8 bytes a pixel, 1.43 GB), and still bounds what 4
# decode workers can hold at once. Read at call time; raise it to allow larger files.
MAX_FILE_BYTES = 2 * 1024**3
# A file to be read whole and larger than this is first checked by its first bytes: a multi-GB
# video, disk image or random data named like a JPEG was read whole, by every worker that met one,
# before the decoder refused it. Smaller files are read at once, as before (no extra read per
# photo); holding one that is not an image costs at most this much.
_CHECK_ABOVE_BYTES = 16 * 1024 * 1024
_SIGNATURE_BYTES = 16  # what Image.open hands each format's signature check

# Formats Pillow decodes by running another program on the bytes: untrusted files must not reach
# it (Ghostscript has a long record of code execution from crafted PostScript). Refused after the
# header is read, before any pixel is decoded: `embed` on a downloaded folder, the server's uploads.
EXTERNAL_DECODERS = {"EPS": "Pillow renders them with Ghostscript"}
# Encoders write 1 scan (baseline) to about 10 (progressive); libjpeg-turbo's own tools cap it at 500.
# libjpeg makes a pass over every block of the image for each scan, even one holding no data (14
# bytes): 10,000 of them in a 6000x6000 JPEG of 350 KB took 60 s to decode (a "scan bomb").
MAX_JPEG_SCANS = 500
_JPEG_SCAN_START = b"\xff\xda"  # SOS; entropy-coded data escapes 0xFF, so these bytes are a marker

_EXIF_ORIENTATION = 0x0112
# One reason for a zero-byte file and empty bytes: `embed` decodes the bytes it read, `predict` the
# path, and their failure lists (and the server's errors) must say the same thing.
EMPTY_FILE = "empty file (0 bytes)"
_UNRECOGNISED = "not a recognised image format"
# open_image_file: binary on Windows; non-blocking where pipes exist, so opening one returns at once.
_O_BINARY = getattr(os, "O_BINARY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOSED = (
    "the PIL image was closed before use; pass it inside its `with Image.open(...)` block, or pass "
    "a .copy() made before closing it"
)
_FILE_CLOSED = (
    "the file the PIL image was opened from was closed before its pixels were read; pass the image "
    "while the file is open, or call .load() on it before closing the file"
)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# warnings.catch_warnings swaps process-global state; the lock keeps concurrent decodes from
# restoring each other's filters. It is held only for header and EXIF parsing (microseconds).
_QUIET_LOCK = threading.Lock()


@contextmanager
def _quiet_pil() -> Iterator[None]:
    """Silence Pillow's warnings that we handle ourselves.

    DecompressionBombWarning: Pillow warns between its limit and twice it from inside Image.open;
    we apply MAX_IMAGE_PIXELS instead. UserWarning from PIL: "Corrupt EXIF data" and the like;
    unreadable metadata must not fail (under -W error) or spam a batch run.
    """
    with _QUIET_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")
        yield


@contextmanager
def _pillow_limit_at_least(limit: int) -> Iterator[None]:
    """Raise Pillow's own hard limit (2 x `PIL.Image.MAX_IMAGE_PIXELS`) to `limit` for one header parse.

    Pillow refuses images over its limit inside `Image.open`, so a `MAX_IMAGE_PIXELS` set above
    it (the documented way to allow larger images) would never be reached. Pillow's limit is only
    ever raised, only when ours is above it, and put back at once; call it under `_QUIET_LOCK`.
    """
    saved = Image.MAX_IMAGE_PIXELS
    raise_it = saved is not None and 2 * saved < limit
    if raise_it:
        Image.MAX_IMAGE_PIXELS = (limit + 1) // 2
    try:
        yield
    finally:
        if raise_it:
            Image.MAX_IMAGE_PIXELS = saved


def source_name(source: object) -> str:
    """How errors and logs name an input: the path, or a short description of in-memory data."""
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    if isinstance(source, np.ndarray):
        return f"<array {'x'.join(map(str, source.shape))} {source.dtype}>"
    return f"<{type(source).__name__}>"


def decode_image(
    source: ImageInput, name: str | None = None, *, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode an image into an RGB PIL image, oriented as its EXIF tag says.

    Args:
        source: a file path, encoded bytes, a PIL image, or an array in RGB order shaped (H, W),
            (H, W, 1), (H, W, 3) or (H, W, 4); uint8, uint16 (scaled by 255/65535), bool, or
            float in [0, 1].
        name: how errors name the input (default: the path, or a description of the data).
        draft_size: opt-in speed-up for JPEG files/bytes: let libjpeg decode at 1/2, 1/4 or 1/8
            scale as long as both sides stay >= (width, height). Approximate (see docs).

    Returns:
        An RGB image (see `to_rgb`: alpha dropped, 16-bit grey scaled); animations give their
        first frame.

    Raises:
        DecodeError: missing/empty/unreadable file, unknown format, truncated data, more than
            MAX_IMAGE_PIXELS pixels, or an array of unsupported shape, dtype or range.
        TypeError: `source` is none of the supported types.
    """
    label = name if name is not None else source_name(source)
    return to_rgb(open_image(source, label, draft_size=draft_size), label)


def open_image(
    source: ImageInput, name: str | None = None, *, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Like `decode_image` but keeps the decoded mode (RGBA, P, L, I;16, ...).

    Preprocessing resizes in the original mode before converting to RGB, as OpenAI's transform
    does; for images with alpha that order changes the result (see docs).
    """
    label = name if name is not None else source_name(source)
    if isinstance(source, Image.Image):
        return _oriented(_loaded(source, label), copy=True)
    if isinstance(source, np.ndarray):
        return _from_array(source, label)
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise DecodeError(label, EMPTY_FILE)
        return _decode_stream(io.BytesIO(source), label, draft_size)
    if isinstance(source, str | os.PathLike):
        return _decode_file(Path(source), label, draft_size)
    raise TypeError(
        f"cannot decode an image from {type(source).__name__}; expected a path, bytes, PIL image or array"
    )


def _decode_file(path: Path, label: str, draft_size: tuple[int, int] | None) -> Image.Image:
    try:
        with open_image_file(path, label) as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise DecodeError(label, EMPTY_FILE)
            return _decode_stream(f, label, draft_size)
    except OSError as e:
        raise DecodeError(label, read_error_reason(e)) from e


def open_image_file(path: str | os.PathLike[str], name: str | None = None) -> BinaryIO:
    """Open a file for reading its image bytes: regular files only, refused before any read.

    A named pipe (or a link to one, or to a device) named like an image is listed with the
    photos; opening a pipe for reading waits for a writer forever, and /dev/zero never ends.
    The file is opened non-blocking (a pipe then opens at once), checked, and made blocking.

    Raises:
        DecodeError: not a regular file (a named pipe, device or socket), naming `name` or the path.
        OSError: the file cannot be opened (`read_error_reason` words it); a folder is
            IsADirectoryError, as `open` raises it.
    """
    return _open_regular(path, name)[0]


def _open_regular(path: str | os.PathLike[str], name: str | None) -> tuple[BinaryIO, int]:
    """`open_image_file`, and the file's size from the same fstat."""
    fd = os.open(path, os.O_RDONLY | _O_BINARY | _O_NONBLOCK)
    try:
        info = os.fstat(fd)
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise DecodeError(
                name if name is not None else os.fspath(path),
                f"not a regular file but {file_kind(mode)}; only files are read",
            )
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
        return open(fd, "rb"), info.st_size  # the caller closes it
    except BaseException:
        os.close(fd)
        raise


def open_image_file_to_read_whole(path: str | os.PathLike[str], name: str | None = None) -> BinaryIO:
    """`open_image_file` for a reader that reads the file whole (`embed`'s decode workers and GPU
    reader threads): a file no image could be is refused first, at position 0 on return.

    A file over 16 MiB whose first bytes no format Pillow decodes claims (see `_unrecognised_reason`)
    is refused by those bytes, with the reason the decoder gives for the same file; then one over
    `MAX_FILE_BYTES` by its size. Smaller files are left to the decoder: no extra read.

    Raises:
        DecodeError: not a regular file, too large, or not an image by its first bytes.
        OSError: as `open_image_file`.
    """
    label = name if name is not None else os.fspath(path)
    f, size = _open_regular(path, label)
    try:
        check_whole_read(label, size, f)
        return f
    except BaseException:
        f.close()
        raise


def check_whole_read(label: str, size: int, fp: IO[bytes]) -> None:
    """Refuse `size` bytes a reader is about to read whole, when no image could be in them.

    `fp` holds the data from its start (a file, or the first bytes of a tar member); it is read only
    for data over 16 MiB, whose first bytes no format Pillow decodes may claim (see
    `_unrecognised_reason`): refused with the reason the decoder gives for the same file. Then data
    over `MAX_FILE_BYTES` is refused by its size.

    Raises:
        DecodeError: naming `label` and the reason.
    """
    if size > _CHECK_ABOVE_BYTES:  # first: a video named .jpg is named as no image, as predict names it
        reason = _unrecognised_reason(fp)
        if reason is not None:
            raise DecodeError(label, reason)
    if size > MAX_FILE_BYTES:
        raise DecodeError(
            label,
            f"file of {size:,} bytes is larger than MAX_FILE_BYTES = {MAX_FILE_BYTES:,} (files are read "
            "whole to be decoded; raise clipengine.image.decode.MAX_FILE_BYTES to allow larger ones)",
        )


def _unrecognised_reason(fp: IO[bytes]) -> str | None:
    """The reason the decoder gives for a file no image format starts like; None when one may.

    Derived from Pillow's registered formats as `Image.open` tries them: a format whose signature
    check claims the first 16 bytes, or one with no signature (TGA, ...) whose header reader takes
    the file. Reads only headers; `fp` is left at position 0.
    """
    head = _head(fp)
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")):  # JPEG, PNG: most files, decided at once
        return None
    Image.init()  # every format plugin, as Image.open loads them when the common five fail
    unsigned = []
    for format_id in Image.ID:
        factory, accept = Image.OPEN[format_id]
        if accept is None:
            unsigned.append(factory)
            continue
        try:
            claimed = accept(head)
        except Exception:  # a signature check can fail on a short prefix (struct.error)
            continue
        if claimed and not isinstance(claimed, str):  # a str is Pillow's "maybe": it does not open those
            return None
    try:
        for factory in unsigned:
            fp.seek(0)
            try:
                with _quiet_pil():
                    factory(fp, "")
            except Exception:  # Image.open's test for these formats: their header reader refuses the bytes
                continue
            return None
    finally:
        fp.seek(0)
    return _unrecognised(head)


def _unrecognised(head: bytes) -> str:
    """The reason for bytes no format claims, with their start: "starts with b'\\x00\\x00\\x00 ftypisom'"
    names a video, b'<!DOCTYPE html>' a saved web page. Worded once: the check before a whole
    read and the decoder's failure must say the same of one file."""
    return f"{_UNRECOGNISED}: starts with {head!r}"


def _head(fp: IO[bytes]) -> bytes:
    """The first `_SIGNATURE_BYTES` of a file; its position and read buffer untouched where the OS allows."""
    if hasattr(os, "pread") and hasattr(fp, "fileno"):  # one pread: no buffered data left before the whole read
        try:
            return os.pread(fp.fileno(), _SIGNATURE_BYTES, 0)
        except (OSError, io.UnsupportedOperation):
            pass  # an in-memory or special stream: read it instead
    position = fp.tell()
    fp.seek(0)
    head = fp.read(_SIGNATURE_BYTES)
    fp.seek(position)
    return head


def read_error_reason(error: OSError) -> str:
    """The failure reason for a file that could not be read. One wording for every reader (predict
    decodes the path; embed's loaders read the bytes first), as for `EMPTY_FILE`."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"cannot read file: {error.strerror or error}"  # other failures (I/O error, bad link, ...)


def _decode_stream(fp: IO[bytes], label: str, draft_size: tuple[int, int] | None) -> Image.Image:
    """Open (header only), check the size, then decode the first frame fully while `fp` is open."""
    try:
        with _quiet_pil(), _pillow_limit_at_least(MAX_IMAGE_PIXELS):
            im = Image.open(fp)
    except UnidentifiedImageError as e:
        raise DecodeError(label, _unidentified_reason(fp)) from e
    except Image.DecompressionBombError as e:  # Pillow's own limit (2x its warning limit) came first
        raise DecodeError(label, f"decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # Pillow plugins signal bad headers all three ways
        raise DecodeError(label, f"corrupt image header: {e}") from e
    if im.format in EXTERNAL_DECODERS:
        raise DecodeError(label, f"{im.format} images are not decoded ({EXTERNAL_DECODERS[im.format]})")
    width, height = im.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DecodeError(
            label,
            f"decompression bomb: {width}x{height} = {width * height} pixels is more than "
            f"MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS}",
        )
    # Only a progressive JPEG holds more scans than components (a baseline one decodes in one pass).
    if im.format in ("JPEG", "MPO") and im.info.get("progressive"):
        scans = _stream_scan_count(fp)
        if scans > MAX_JPEG_SCANS:
            raise DecodeError(label, f"a progressive JPEG of {scans} scans, at most {MAX_JPEG_SCANS} decoded "
                                     "(each scan is a pass over every block: such files take minutes)")  # fmt: skip
    if draft_size is not None and im.format == "JPEG":
        im.draft("RGB", draft_size)  # picks the largest DCT reduction keeping both sides >= draft_size
    try:
        im.load()  # first frame only: we never seek
    except (
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:  # GIF frames larger than the canvas
        raise DecodeError(label, f"decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(label, f"truncated or corrupt image data: {e}") from e
    return _oriented(im, copy=False)


def jpeg_scan_count(data: bytes | bytearray) -> int:
    """An upper bound of a JPEG's scans: its SOS markers (metadata such as an EXIF thumbnail may add some)."""
    return data.count(_JPEG_SCAN_START)


def _stream_scan_count(fp: IO[bytes]) -> int:
    """`jpeg_scan_count` of a whole stream, read in blocks; its position is kept for the decoder."""
    position = fp.tell()
    fp.seek(0)
    count, last = 0, b""
    while block := fp.read(1 << 20):
        count += (last + block).count(_JPEG_SCAN_START)  # `last`: a marker split between two blocks
        last = block[-1:]
    fp.seek(position)
    return count


def _unidentified_reason(fp: IO[bytes]) -> str:
    """Why Pillow identified no format: a damaged header when a format claims the first bytes.

    Pillow tries every format reader and, when each refuses, drops their reasons: a PNG failing
    its header checksum read "not a recognised image format", like a text file. The reader whose
    signature check accepts the bytes is run again here (the failure path only) for its reason.
    """
    try:
        fp.seek(0)
        prefix = fp.read(16)  # what Image.open hands the signature checks
    except (OSError, ValueError):
        return _UNRECOGNISED
    for format_id in Image.ID:
        factory, accept = Image.OPEN[format_id]
        try:
            claimed = accept is not None and accept(prefix)
        except Exception:  # a signature check can fail on a short prefix (struct.error)
            continue
        if not claimed or isinstance(claimed, str):  # a str is Pillow's "maybe": only a warning
            continue
        try:
            fp.seek(0)
            with _quiet_pil():
                factory(fp, "")
        except Exception as e:  # the reason Pillow dropped; any type: this only words the error
            return f"corrupt image header: {e} (a {format_id} file by its first bytes)"
        return _UNRECOGNISED  # read this time: not a header Pillow refused
    return _unrecognised(prefix)


def _loaded(im: Image.Image, label: str) -> Image.Image:
    """A caller's PIL image with its pixels read (a no-op when they already are).

    `Image.open` reads only the header, so damage in the data, or a file closed before its pixels
    were read, would otherwise surface mid-resize as Pillow's OSError, AssertionError or
    ValueError instead of a DecodeError naming the input.
    """
    try:
        im.load()
    except AssertionError as e:  # Pillow asserts it still has the file: closed unread
        raise DecodeError(label, _CLOSED) from e
    except ValueError as e:
        if "closed image" in str(e):  # "Operation on closed image": close()d
            raise DecodeError(label, _CLOSED) from e
        if getattr(getattr(im, "fp", None), "closed", False):  # Image.open(f), then f closed, unread
            raise DecodeError(label, _FILE_CLOSED) from e
        raise DecodeError(label, f"truncated or corrupt image data: {e}") from e
    except (OSError, SyntaxError, EOFError) as e:
        raise DecodeError(label, f"truncated or corrupt image data: {e}") from e
    if im.width == 0 or im.height == 0:  # an empty crop box gives one; the resize divided by zero
        raise DecodeError(label, f"image size {im.width}x{im.height} has no pixels")
    return im


def _oriented(im: Image.Image, *, copy: bool) -> Image.Image:
    """Apply the EXIF orientation tag, as browsers do; OpenAI's transform does not (see docs).

    A caller's image is transposed into a new image (`copy=True`) so it is never modified.
    """
    try:
        with _quiet_pil():
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError) as e:  # unreadable EXIF never makes the pixels unusable
        logger.debug("ignoring unreadable EXIF: %s", e)
        return im
    if orientation in (None, 1):
        return im
    if copy:
        return ImageOps.exif_transpose(im)
    ImageOps.exif_transpose(im, in_place=True)
    return im


def to_8bit(im: Image.Image, name: str = "<PIL image>") -> Image.Image:
    """Scale high-bit-depth grey to 8-bit "L"; other modes are returned unchanged.

    16-bit grey ("I;16*", and "I" as Pillow opens some 16-bit files) maps v -> round(v * 255 / 65535),
    where Pillow's own conversion (and so OpenAI's transform) clips at 255 and turns most 16-bit
    images white. "F" (32-bit float) is read as [0, 1], like float arrays.
    """
    if im.mode in _SIXTEEN_BIT_MODES:
        return _from_array(np.clip(np.asarray(im), 0, 65535).astype(np.uint16), name)
    if im.mode == "F":
        return _from_array(np.asarray(im), name)
    return im


def to_rgb(im: Image.Image, name: str = "<PIL image>") -> Image.Image:
    """Convert any Pillow mode to RGB as OpenAI's transform does (`convert("RGB")`), except high bit depths.

    Alpha is dropped rather than composited; high bit depths go through `to_8bit` first.
    """
    im = to_8bit(im, name)
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        # Pillow warns on P -> RGB when the palette has per-entry alpha; via RGBA it does not,
        # and the colours are the same palette entries.
        return im.convert("RGBA").convert("RGB")
    if im.mode == "La":  # premultiplied grey + alpha: Pillow converts it only to "LA" (else a raw ValueError)
        im = im.convert("LA")
    return im.convert("RGB")


def _from_array(array: npt.NDArray[Any], label: str) -> Image.Image:
    """(H, W[, C]) array -> an "L", "RGB" or "RGBA" image (C = 1, 3 or 4)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    elif array.ndim != 2 and not (array.ndim == 3 and array.shape[2] in (3, 4)):
        # (3, H, W) is how torch holds an image, (N, H, W) how datasets hold grey ones: name the fix
        fix = ""
        if array.ndim == 3 and array.shape[0] in (1, 3):  # (4, H, W) could be H=4 as well
            fix = "; for channels first, pass array.transpose(1, 2, 0)"
        elif array.ndim == 3:
            fix = f"; for a stack of {array.shape[0]} grey images, pass list(array)"
        raise DecodeError(
            label, f"array shape {array.shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4){fix}"
        )
    if array.size == 0:
        raise DecodeError(label, f"array shape {array.shape} has no pixels")
    pixels = np.ascontiguousarray(_to_uint8(array, label))
    return Image.fromarray(pixels)  # uint8 (H, W) / (H, W, 3) / (H, W, 4) -> "L" / "RGB" / "RGBA"


def _to_uint8(array: npt.NDArray[Any], label: str) -> npt.NDArray[np.uint8]:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype == np.uint16:
        wide = array.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535), exact ints
    if array.dtype.kind == "f":
        lo, hi = float(np.min(array)), float(np.max(array))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            # 0-255 floats are common (a uint8 image after astype(float)): say what makes them [0, 1]
            on_255_scale = lo >= 0.0 and 1.0 < hi <= 255.0
            fix = "; for 0-255 values, divide an array by 255 or .convert('L') a PIL image" if on_255_scale else ""
            raise DecodeError(
                label, f"float pixel values must be finite and in [0, 1], got range [{lo:g}, {hi:g}]{fix}"
            )
        return np.rint(array * 255.0).astype(np.uint8)
    raise DecodeError(
        label, f"unsupported array dtype {array.dtype} (use uint8, uint16, bool or float in [0, 1])"
    )
