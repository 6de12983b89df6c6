"""open_image_file_to_read_whole: a large file that is no image, or one too large, is refused before it is read."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipengine.errors import DecodeError
from clipengine.image import decode
from clipengine.image.decode import decode_image, open_image_file_to_read_whole

GIB = 1024**3


def _sparse(path: Path, size: int, head: bytes = b"") -> Path:
    """A file of `size` bytes starting with `head`, the rest a hole: no disk used, no time spent."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def _encoded(fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buf, fmt, **save)
    return buf.getvalue()


def test_a_multi_gigabyte_file_of_no_image_format_is_refused_by_its_first_bytes(tmp_path: Path) -> None:
    """A disk image named .jpg: refused by its first 16 bytes, with the reason `predict` gives for it."""
    huge = _sparse(tmp_path / "huge.jpg", 3 * GIB, b"\x00\x00\x00\x18ftypisom")  # an MP4's first bytes
    with pytest.raises(DecodeError) as info:
        open_image_file_to_read_whole(huge, "huge.jpg")
    assert info.value.source == "huge.jpg"
    assert info.value.reason == "not a recognised image format: starts with b'\\x00\\x00\\x00\\x18ftypisom\\x00\\x00\\x00\\x00'"
    with pytest.raises(DecodeError) as streamed:  # predict's path: Pillow reads only the header
        decode_image(huge, "huge.jpg")
    assert streamed.value.reason == info.value.reason


def test_a_file_named_jpg_holding_text_says_what_it_starts_with(tmp_path: Path) -> None:
    """The same reason from a path, from bytes, and from the check before a whole read."""
    text = tmp_path / "notes.jpg"
    text.write_text("<!DOCTYPE html><html>" * 10)
    reasons = set()
    for source in (text, text.read_bytes()):
        with pytest.raises(DecodeError) as info:
            decode_image(source, "notes.jpg")
        reasons.add(info.value.reason)
    assert reasons == {"not a recognised image format: starts with b'<!DOCTYPE html><'"}


def test_a_file_that_looks_like_an_image_but_is_over_max_file_bytes_is_refused_unread(tmp_path: Path) -> None:
    big = _sparse(tmp_path / "big.jpg", 2 * GIB + 1, _encoded("JPEG")[:64])
    with pytest.raises(DecodeError, match=r"file of 2,147,483,649 bytes is larger than MAX_FILE_BYTES = 2,147,483,648"):
        open_image_file_to_read_whole(big)


def test_max_file_bytes_is_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photo = tmp_path / "a.png"
    photo.write_bytes(_encoded("PNG"))
    with open_image_file_to_read_whole(photo) as f:
        assert Image.open(io.BytesIO(f.read())).size == (32, 24)
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", photo.stat().st_size - 1)
    with pytest.raises(DecodeError, match=r"larger than MAX_FILE_BYTES"):
        open_image_file_to_read_whole(photo)


@pytest.mark.parametrize(
    ("fmt", "save"),
    [
        ("JPEG", {}),
        ("PNG", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("WEBP", {}),
        ("PPM", {}),
        ("TGA", {}),  # no signature: Pillow tries its header reader on any file, and so does the check
        ("ICO", {}),
        ("PCX", {}),
        ("SGI", {}),
    ],
)
def test_every_format_the_decoder_reads_passes_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, save: dict[str, object]
) -> None:
    """The check is Pillow's own format detection: nothing the decoder reads is refused by it."""
    monkeypatch.setattr(decode, "_CHECK_ABOVE_BYTES", 0)  # check every file, however small
    path = tmp_path / "image.jpg"  # named like a JPEG: the bytes decide
    path.write_bytes(_encoded(fmt, **save))
    with open_image_file_to_read_whole(path) as f:
        assert f.tell() == 0
        data = f.read()
    assert data == path.read_bytes()
    assert decode_image(data).size[0] > 0


def test_a_large_image_passes_the_check_with_its_bytes_intact_for_both_readers(tmp_path: Path) -> None:
    """Over the 16 MiB at which the check runs: read back whole, as bytes and as an array."""
    data = _encoded("PNG") + os.urandom(17 * 1024 * 1024)  # trailing bytes after IEND: a large PNG
    path = tmp_path / "large.png"
    path.write_bytes(data)
    with open_image_file_to_read_whole(path) as f:
        assert f.read() == data
    with open_image_file_to_read_whole(path) as f:
        assert np.fromfile(f, dtype=np.uint8).tobytes() == data  # the GPU readers' way
