"""decode_image: every input kind, awkward formats handled, bad inputs -> DecodeError with a clear reason."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipengine.errors import DecodeError
from clipengine.image import decode
from clipengine.image.decode import decode_image, open_image

BAD = Path(__file__).parents[1] / "data" / "bad"


@pytest.mark.parametrize(
    ("filename", "reason"),
    [
        ("empty.jpg", "empty file (0 bytes)"),
        ("text.jpg", "not a recognised image format"),
        ("truncated.jpg", "truncated or corrupt image data: image file is truncated"),
        ("truncated.png", "truncated or corrupt image data"),
        ("bomb.png", "decompression bomb: Image size (400000000 pixels) exceeds limit"),
        ("does_not_exist.jpg", "file not found"),
    ],
)
def test_bad_file_raises_decode_error_naming_file_and_reason(filename: str, reason: str) -> None:
    path = BAD / filename
    with pytest.raises(DecodeError) as info:
        decode_image(path)
    assert info.value.source == str(path)
    assert info.value.reason.startswith(reason)
    assert str(info.value).startswith(f"{path}: {reason}")


@pytest.mark.parametrize("filename", ["empty.jpg", "text.jpg", "truncated.jpg", "bomb.png"])
def test_bad_bytes_raise_the_same_errors_with_given_name(filename: str) -> None:
    """Same reason as for the file: `embed` reads files as bytes, `predict` decodes the path, and
    their failure lists must agree (an empty file was "empty input" in one, "empty file" in the other)."""
    with pytest.raises(DecodeError) as from_file:
        decode_image(BAD / filename)
    with pytest.raises(DecodeError) as info:
        decode_image((BAD / filename).read_bytes(), name="upload-7")
    assert info.value.source == "upload-7"
    assert info.value.reason == from_file.value.reason


def _png_with_bad_header_crc() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (10, 20, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[29] ^= 0xFF  # the IHDR chunk's CRC (8 signature + 8 length/type + 13 IHDR bytes)
    return bytes(data)


def _gif_header_only() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (30, 20)).save(buf, "GIF")
    return buf.getvalue()[:16]  # the signature and screen descriptor, no image


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_png_with_bad_header_crc(), "corrupt image header: broken PNG file (bad header checksum in b'IHDR') (a PNG"),
        (_gif_header_only(), "corrupt image header: no more images in GIF file (a GIF"),
    ],
    ids=["png-bad-ihdr-crc", "gif-header-only"],
)
def test_damaged_header_of_a_known_format_says_so(tmp_path: Path, data: bytes, reason: str) -> None:
    """A PNG whose header fails its checksum is a damaged PNG, not "not a recognised image format":
    Pillow drops the PNG reader's reason and reports every format as unidentified (docs: damaged
    header -> corrupt image header). The file and its bytes get the same reason."""
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    with pytest.raises(DecodeError) as from_file:
        decode_image(path)
    with pytest.raises(DecodeError) as from_bytes:
        decode_image(data, name="upload")
    assert from_file.value.reason.startswith(reason)
    assert from_bytes.value.reason == from_file.value.reason


def test_own_pixel_limit_applies_without_leaking_pillows_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    # 12000x12000 is past Pillow's warning threshold but under its error threshold; with warnings
    # as errors (our pytest config) a leaked DecompressionBombWarning would fail this test.
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 100_000_000)
    with pytest.raises(DecodeError, match=r"decompression bomb: 12000x12000 = 144000000 pixels is more than"):
        decode_image(BAD / "bomb_warning_range.png")


def test_raising_the_pixel_limit_past_pillows_own_lets_larger_images_through(monkeypatch: pytest.MonkeyPatch) -> None:
    # The documented way to allow larger images is to raise decode.MAX_IMAGE_PIXELS; Pillow's own
    # hard limit (2 x PIL.Image.MAX_IMAGE_PIXELS, scaled down here to keep the image small) must not
    # refuse them first, and is back as it was afterwards.
    buf = io.BytesIO()
    Image.new("RGB", (60, 50), (10, 20, 30)).save(buf, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2000 pixels
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 4000)
    assert decode_image(buf.getvalue()).size == (60, 50)
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 2999)  # our limit still applies above Pillow's
    with pytest.raises(DecodeError, match=r"60x50 = 3000 pixels is more than MAX_IMAGE_PIXELS = 2999"):
        decode_image(buf.getvalue())


@pytest.mark.parametrize("filename", ["truncated.jpg", "truncated.png"])
def test_lazily_opened_pil_image_with_truncated_data_is_a_decode_error(filename: str) -> None:
    # Image.open reads only the header; the damage showed up as Pillow's raw OSError mid-resize.
    with Image.open(BAD / filename) as im:
        with pytest.raises(DecodeError) as info:
            decode_image(im)
    assert info.value.reason.startswith("truncated or corrupt image data: image file is truncated")
    assert info.value.source == f"<PIL image {im.mode} {im.width}x{im.height}>"


@pytest.mark.parametrize("loaded", [False, True])
def test_pil_image_closed_before_use_is_a_decode_error(loaded: bool) -> None:
    # Closed unread (its `with` block left), Pillow failed with a bare AssertionError or
    # struct.error; read, then close()d, with "ValueError: Operation on closed image".
    with Image.open(BAD.parent / "CLIP.png") as im:
        if loaded:
            im.load()
            im.close()
    with pytest.raises(DecodeError, match=r"the PIL image was closed before use; pass it inside its `with Image.open"):
        decode_image(im)


def test_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="is a directory"):
        decode_image(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.timeout(60)
def test_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO named like an image (a messy folder, a file list): opening it for reading waited
    for a writer forever, so `predict` and `embed` hung. Only regular files are read."""
    from concurrent.futures import ThreadPoolExecutor

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(decode_image, fifo)
        try:
            error = future.exception(timeout=10)
        finally:
            if not future.done():  # unblock the reader so the test ends (a writer end opens it)
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(error, DecodeError)
    assert error.source == str(fifo)
    assert error.reason == "not a regular file but a named pipe (FIFO); only files are read"


def test_character_device_is_refused(tmp_path: Path) -> None:
    """A link to /dev/zero named like an image was read until memory ran out; /dev/null read as empty."""
    link = tmp_path / "zero.jpg"
    link.symlink_to(os.devnull)
    with pytest.raises(DecodeError, match=r"zero\.jpg: not a regular file but a character device"):
        decode_image(link)


def test_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="cannot decode an image from int"):
        decode_image(42)  # type: ignore[arg-type]


def _rgb(path_or_image: object) -> np.ndarray:
    im = decode_image(path_or_image)  # type: ignore[arg-type]
    assert im.mode == "RGB"
    return np.asarray(im)


def test_cmyk_jpeg_becomes_rgb() -> None:
    assert open_image(BAD / "cmyk.jpg").mode == "CMYK"
    np.testing.assert_array_equal(_rgb(BAD / "cmyk.jpg")[0, 0], [0, 255, 255])  # pure cyan


def test_16_bit_png_is_scaled_not_clipped() -> None:
    assert open_image(BAD / "gray16.png").mode == "I;16"
    row = _rgb(BAD / "gray16.png")[0, :, 0]
    expected = np.rint(np.linspace(0, 65535, 64).astype(np.uint16) / 65535.0 * 255)
    np.testing.assert_array_equal(row, expected)  # a full 0..255 ramp, not mostly 255


def test_animated_gif_gives_first_frame() -> None:
    np.testing.assert_array_equal(_rgb(BAD / "animated.gif")[8, 8], [255, 0, 0])


def test_exif_orientation_is_applied() -> None:
    pixels = _rgb(BAD / "exif_rotated.jpg")  # stored 40x20 red|blue, orientation 6
    assert pixels.shape == (40, 20, 3)
    assert pixels[2, 10, 0] > 200 and pixels[2, 10, 2] < 50  # top: red
    assert pixels[-3, 10, 2] > 200 and pixels[-3, 10, 0] < 50  # bottom: blue


def test_corrupt_exif_is_ignored_without_warning() -> None:
    # pytest turns warnings into errors here, so a leaked "Corrupt EXIF data" would fail this.
    np.testing.assert_array_equal(_rgb(BAD / "corrupt_exif.jpg").shape, (8, 8, 3))


def test_exif_orientation_of_a_callers_image_does_not_modify_it() -> None:
    with Image.open(BAD / "exif_rotated.jpg") as original:
        assert decode_image(original).size == (20, 40)
        assert original.size == (40, 20)


def test_palette_with_per_entry_alpha_converts_without_warning() -> None:
    np.testing.assert_array_equal(_rgb(BAD / "palette_transparency.png")[0, 0], [200, 100, 50])


def test_alpha_is_dropped_not_composited() -> None:
    np.testing.assert_array_equal(_rgb(BAD / "gray_alpha.png")[0, 0], [90, 90, 90])  # alpha 10 ignored
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    np.testing.assert_array_equal(_rgb(rgba)[0, 0], [10, 20, 30])


def test_encoded_bytes_equal_file(clip_png: Path) -> None:
    np.testing.assert_array_equal(_rgb(clip_png.read_bytes()), _rgb(clip_png))
    np.testing.assert_array_equal(_rgb(bytearray(clip_png.read_bytes())), _rgb(str(clip_png)))


_RAMP = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (_RAMP, np.dstack([_RAMP] * 3)),
        (_RAMP[:, :, None], np.dstack([_RAMP] * 3)),
        (np.dstack([_RAMP, _RAMP + 1, _RAMP + 2]), np.dstack([_RAMP, _RAMP + 1, _RAMP + 2])),
        (np.dstack([_RAMP, _RAMP, _RAMP, np.zeros_like(_RAMP)]), np.dstack([_RAMP] * 3)),
        (_RAMP / 255.0, np.dstack([_RAMP] * 3)),
        ((_RAMP / 255.0).astype(np.float32), np.dstack([_RAMP] * 3)),
        (_RAMP.astype(np.uint16) * 257, np.dstack([_RAMP] * 3)),
        (_RAMP > 100, np.dstack([(_RAMP > 100) * 255] * 3)),
        (np.dstack([_RAMP] * 3)[:, ::-1], np.dstack([_RAMP] * 3)[:, ::-1]),  # non-contiguous view
    ],
    ids=["HxW", "HxWx1", "HxWx3", "HxWx4", "float64", "float32", "uint16", "bool", "strided"],
)
def test_arrays_of_each_supported_layout(array: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(_rgb(array), expected)


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((2, 2, 2), np.uint8), "array shape (2, 2, 2) is not"),
        (np.zeros((2, 2, 3, 1), np.uint8), "array shape (2, 2, 3, 1) is not"),
        (np.zeros((0, 5), np.uint8), "array shape (0, 5) has no pixels"),
        (np.full((2, 2), 1.5), "float pixel values must be finite and in [0, 1], got range [1.5, 1.5]"),
        (np.full((2, 2), np.nan, np.float32), "float pixel values must be finite"),
        (np.zeros((2, 2), np.int64), "unsupported array dtype int64"),
    ],
)
def test_bad_arrays_raise_decode_error(array: np.ndarray, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_image(array)
    assert info.value.reason.startswith(reason)
    assert info.value.source.startswith("<array ")


def test_draft_size_decodes_large_jpeg_at_reduced_scale() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200), (40, 80, 120)).save(buf, "JPEG")
    im = decode_image(buf.getvalue(), draft_size=(300, 300))
    assert im.size == (400, 300) and im.mode == "RGB"  # 1/4 scale keeps both sides >= 300
    assert decode_image(buf.getvalue()).size == (1600, 1200)  # off unless asked


def test_eps_is_refused_before_pillow_runs_ghostscript_on_it(tmp_path: Path) -> None:
    """Pillow decodes EPS by running Ghostscript on the bytes: `embed` on an untrusted folder must not."""
    eps = tmp_path / "doc.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\n")
    with pytest.raises(DecodeError, match=r"doc.eps: EPS images are not decoded \(Pillow renders them with"):
        decode_image(eps)


def _progressive_jpeg(extra_scans: int, size: int = 64) -> bytes:
    """A progressive JPEG with `extra_scans` more scans that hold no data (14 bytes each): libjpeg
    still makes a pass over every block for each one (a "scan bomb")."""
    import io
    import re

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 200)).save(out, format="JPEG", progressive=True)
    data = out.getvalue()
    last = [m.start() for m in re.finditer(b"\xff\xda", data)][-1]
    empty_scan = data[last : last + 2 + int.from_bytes(data[last + 2 : last + 4], "big")]  # header only
    end = data.rfind(b"\xff\xd9")
    return data[:end] + empty_scan * extra_scans + data[end:]


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(tmp_path: Path) -> None:
    """The server refused these uploads; embed / predict decoded them: 10,000 empty scans in a
    6000x6000 JPEG of 350 KB took 60 s in one decode worker."""
    from clipengine.image.decode import MAX_JPEG_SCANS, open_image

    bomb = _progressive_jpeg(MAX_JPEG_SCANS + 100)
    reason = f"a progressive JPEG of {MAX_JPEG_SCANS + 110} scans, at most {MAX_JPEG_SCANS} decoded"
    with pytest.raises(DecodeError, match=f"^bomb.jpg: {reason}"):
        open_image(bomb, name="bomb.jpg")
    (tmp_path / "bomb.jpg").write_bytes(bomb)  # a file is read in blocks, the same count
    with pytest.raises(DecodeError, match=reason):
        decode_image(tmp_path / "bomb.jpg")
    ordinary = _progressive_jpeg(0)  # 10 scans, as encoders write them
    assert open_image(ordinary, name="ok.jpg").size == (64, 64)
    (tmp_path / "ok.jpg").write_bytes(ordinary)
    assert decode_image(tmp_path / "ok.jpg").size == (64, 64)
