"""Regenerate the awkward-image fixtures in this folder: `python tests/data/bad/make_bad.py`.

The outputs are committed (each under 4 kB); this script documents exactly how each was made.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent


def _two_colour(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: orientation changes are visible in the pixels."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2] = (255, 0, 0)
    a[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (1-bit grey) followed by a tiny IDAT: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _jpeg(im: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _png(im: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def make_all() -> dict[str, bytes]:
    gradient = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (192, 1))
    full_jpeg = _jpeg(Image.fromarray(np.dstack([gradient, gradient[::-1], gradient])))
    full_png = _png(Image.fromarray(gradient[:48, :64]))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored 40x20, shown 20x40
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = bytes([0, 128])  # per-entry alpha: Pillow warns on P -> RGB
    la = Image.fromarray(np.dstack([np.full((8, 8), 90, np.uint8), np.full((8, 8), 10, np.uint8)]))
    return {
        "empty.jpg": b"",
        "text.jpg": b"this is a text file with an image extension\n",
        "truncated.jpg": full_jpeg[: len(full_jpeg) // 2],
        "truncated.png": full_png[: len(full_png) // 2],
        "bomb.png": _png_header_only(20_000, 20_000),  # 4e8 pixels: beyond Pillow's own error limit
        "bomb_warning_range.png": _png_header_only(12_000, 12_000),  # 1.44e8: Pillow would only warn
        "cmyk.jpg": _jpeg(Image.new("CMYK", (32, 24), (255, 0, 0, 0))),  # pure cyan
        "gray16.png": _png(Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1)))),
        "animated.gif": gif.getvalue(),
        "exif_rotated.jpg": _jpeg(_two_colour(40, 20), exif=exif),
        "palette_transparency.png": _png(palette, transparency=bytes([0, 128])),
        "gray_alpha.png": _png(la),
        # An EXIF block whose one IFD entry points past its end: Pillow warns "Corrupt EXIF data".
        "corrupt_exif.jpg": _jpeg(
            Image.new("RGB", (8, 8), (0, 128, 0)),
            exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00\x00\x00",
        ),
    }


if __name__ == "__main__":
    for name, data in make_all().items():
        (HERE / name).write_bytes(data)
