"""A fast read of a plain JPEG's header: size, components and EXIF orientation, or "ask Pillow".

The GPU loader checks every file's header on its reader threads before nvjpeg sees it
(`gpu_decode.inspect_encoded`). With Pillow (`Image.open` + `getexif`) that is ~30-50 us of
Python per file on this CPU and ~100 us on the H200 machine's, all of it holding the GIL that the
decode thread needs: on the H200 the decode call ran at a third of its raw rate next to 8 such
readers. This walks the marker segments with `struct` instead (a few us).

It answers only for files whose header it fully understands, and then it answers exactly what
Pillow would: the markers Pillow parses before the scan (APPn, COM, DQT, SOF0-2) are checked the
way Pillow checks them, and anything it does not model returns None, so the caller asks Pillow
(as before): other SOF types, 12-bit data, Adobe / Photoshop / MPF / XMP segments (XMP can carry
the orientation), odd EXIF layouts, padding or junk between segments, truncated segments.
tests/image/test_jpeg_header.py compares both on generated and mutated headers.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = ["JpegHeader", "scan_jpeg_header"]

_SOF = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive: Pillow's SOF handler, 8-bit
_SKIPPED = (0xC4, 0xDD)  # DHT, DRI: Pillow skips them
_EXIF = b"Exif\x00\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_ICC = b"ICC_PROFILE\x00"
_ORIENTATION = 0x0112
_SHORT = 3  # TIFF field type


class JpegHeader(NamedTuple):
    width: int
    height: int
    components: int  # 1 (grey) or 3 (YCbCr / RGB): the ones Pillow opens as "L" / "RGB"
    orientation: int  # the EXIF tag as stored (1 when absent); the caller sanitises it
    progressive: bool = False  # SOF2: may hold many scans (`image.decode.MAX_JPEG_SCANS`)


def scan_jpeg_header(data: memoryview) -> JpegHeader | None:
    """The header of a plain 8-bit grey / colour JPEG, or None: "not modelled here, ask Pillow"."""
    try:
        return _scan(data)
    except (struct.error, IndexError, ValueError):
        return None


def _scan(data: memoryview) -> JpegHeader | None:
    end = len(data)
    if end < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    exif: bytes | None = None
    frame: tuple[int, int, int] | None = None
    progressive = False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None  # junk between segments (Pillow skips it byte by byte): not modelled
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        body_start, body_end = pos + 4, pos + 2 + length
        if length < 2 or body_end > end:
            return None  # short or truncated segment: Pillow's `_safe_read` decides
        if marker == 0xDA:  # start of scan (Pillow reads its segment too): the header is complete
            if frame is None:
                return None
            width, height, components = frame
            orientation = _orientation(exif) if exif is not None else 1
            return JpegHeader(width, height, components, orientation, progressive)
        body = data[body_start:body_end]
        if 0xE0 <= marker <= 0xEF:
            exif = _app(marker, body, exif)
            if exif is _UNMODELLED:
                return None
        elif marker == 0xDB:
            if not _dqt_ok(body):
                return None
        elif marker in _SOF:
            if frame is not None:
                return None  # a second frame header: not modelled
            frame = _sof(body)
            if frame is None:
                return None
            progressive = marker == 0xC2
        elif marker not in _SKIPPED and marker != 0xFE:  # COM (0xFE) is only stored by Pillow
            return None
        pos = body_end
    return None  # no scan found in the data


_UNMODELLED = b"<unmodelled>"


def _app(marker: int, body: memoryview, exif: bytes | None) -> bytes | None:
    """Pillow's APP handler, as far as it can fail or change the answer; `_UNMODELLED` to bail."""
    head = bytes(body[:32])
    if marker == 0xE0 and head.startswith(b"JFIF"):
        return exif if len(body) >= 7 else _UNMODELLED  # Pillow reads the version unguarded
    if marker == 0xE1 and head.startswith(_EXIF):
        # Pillow concatenates EXIF segments: the first whole, later ones without their prefix.
        return bytes(body) if exif is None else exif + bytes(body[6:])
    if marker == 0xE1 and head.startswith(_XMP[:28]):
        return _UNMODELLED  # XMP may carry the orientation (Pillow reads tiff:Orientation from it)
    if marker == 0xE2 and head.startswith(_ICC):
        return exif if len(body) >= 14 else _UNMODELLED  # Pillow reads byte 13 of the first chunk
    if marker == 0xE2 and head.startswith(b"MPF\x00"):
        return _UNMODELLED  # multi-picture: Pillow opens it as MPO and parses the index
    if marker == 0xED and head.startswith(b"Photoshop 3.0\x00"):
        return _UNMODELLED
    if marker == 0xEE and head.startswith(b"Adobe"):
        return _UNMODELLED  # colour transform flags (CMYK / YCCK files)
    return exif


def _dqt_ok(body: memoryview) -> bool:
    """Pillow's DQT check: every table complete (1 + 64 or 1 + 128 bytes)."""
    pos, end = 0, len(body)
    while pos < end:
        precision = 1 if body[pos] // 16 == 0 else 2
        size = 1 + precision * 64
        if end - pos < size:
            return False
        pos += size
    return True


def _sof(body: memoryview) -> tuple[int, int, int] | None:
    if len(body) < 6 or body[0] != 8:  # Pillow raises on other bit depths
        return None
    if (len(body) - 6) % 3:  # Pillow reads 3 bytes per component entry and fails on a partial one
        return None
    height, width = struct.unpack_from(">HH", body, 1)
    components = body[5]
    if components not in (1, 3) or width == 0 or height == 0:
        return None
    return width, height, components


def _orientation(exif: bytes) -> int:
    """IFD0's orientation tag from an APP1 EXIF payload ("Exif\\0\\0" + TIFF), or raises
    ValueError (-> None from `scan_jpeg_header`) for anything but one plain SHORT entry or none."""
    tiff = exif[6:]
    if tiff[:4] == b"II*\x00":
        order = "<"
    elif tiff[:4] == b"MM\x00*":
        order = ">"
    else:
        raise ValueError("not a TIFF header")
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    if ifd < 8 or ifd + 2 + 12 * count > len(tiff):
        raise ValueError("IFD0 outside the segment")
    found = []
    for k in range(count):
        tag, kind, n = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * k)
        if tag == _ORIENTATION:
            if kind != _SHORT or n != 1:
                raise ValueError("orientation is not one SHORT")
            found.append(struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * k + 8)[0])
    if len(found) > 1:
        raise ValueError("several orientation tags")
    return found[0] if found else 1
