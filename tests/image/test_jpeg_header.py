"""The fast JPEG header scan answers exactly as Pillow does, or not at all (None: Pillow decides).

Checked on generated files of every kind the GPU loader meets and on thousands of mutated and
truncated headers: wherever `scan_jpeg_header` answers, Pillow opens the file and reports the same
size, a usable mode and the same EXIF orientation.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipengine.image import gpu_decode
from clipengine.image.decode import MAX_IMAGE_PIXELS
from clipengine.image.jpeg_header import JpegHeader, scan_jpeg_header

BAD = Path(__file__).parents[1] / "data" / "bad"


def pillow_view(data: bytes) -> tuple[int, int, bool, object, bool] | None:
    """What the loader's Pillow path reads: (width, height, usable by nvjpeg, orientation,
    progressive), or None if Pillow fails."""
    try:
        return gpu_decode._read_header(memoryview(data))
    except Exception:
        return None


def agrees(data: bytes) -> JpegHeader | None:
    fast = scan_jpeg_header(memoryview(data))
    if fast is not None and fast.width * fast.height <= MAX_IMAGE_PIXELS:  # bombs: CPU path either way
        assert pillow_view(data) == (fast.width, fast.height, True, fast.orientation, fast.progressive), data[:64]
    return fast


def photo(width: int = 48, height: int = 32, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image.convert(mode)


def jpeg(image: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def exif_bytes(orientation: int | None, big_endian: bool = False) -> bytes:
    """An APP1 EXIF payload (without "Exif\\0\\0") holding one orientation SHORT, in either byte order."""
    order = ">" if big_endian else "<"
    head = b"MM\x00*" if big_endian else b"II*\x00"
    entries = [] if orientation is None else [struct.pack(order + "HHIH2x", 0x0112, 3, 1, orientation)]
    return head + struct.pack(order + "I", 8) + struct.pack(order + "H", len(entries)) + b"".join(entries) + b"\0\0\0\0"


def with_app1(data: bytes, payload: bytes) -> bytes:
    """Insert an APP1 segment right after SOI."""
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def corpus() -> dict[str, bytes]:
    base = photo()
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "rgb": jpeg(base),
        "rgb_444": jpeg(base, subsampling=0),
        "grey": jpeg(base.convert("L")),
        "progressive": jpeg(base, progressive=True),
        "optimized": jpeg(base, optimize=True),
        "quality100": jpeg(base, quality=100),
        "exif6": jpeg(base, exif=exif.tobytes()),
        "icc": jpeg(base, icc_profile=b"x" * 100),
        "icc_chunked": jpeg(base, icc_profile=bytes(200_000)),
        "comment": jpeg(base, comment=b"hello"),
        "restart": jpeg(base, restart_marker_blocks=1),
        "cmyk": jpeg(base.convert("CMYK")),
        "big_endian_exif3": with_app1(jpeg(base), b"Exif\x00\x00" + exif_bytes(3, big_endian=True)),
        "exif_without_orientation": with_app1(jpeg(base), b"Exif\x00\x00" + exif_bytes(None)),
        "xmp": with_app1(jpeg(base), b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta tiff:Orientation=\"8\"/>"),
    }
    for n in range(1, 9):
        files[f"orientation{n}"] = with_app1(jpeg(base), b"Exif\x00\x00" + exif_bytes(n))
    mpo = io.BytesIO()
    base.save(mpo, "MPO", save_all=True, append_images=[photo(seed=1)])
    files["mpo"] = mpo.getvalue()
    for path in sorted(BAD.glob("*.jpg")):
        files[f"bad/{path.name}"] = path.read_bytes()
    return files


CORPUS = corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_scan_agrees_with_pillow(name: str) -> None:
    agrees(CORPUS[name])


@pytest.mark.parametrize(
    "name",
    ["rgb", "rgb_444", "grey", "progressive", "optimized", "quality100", "exif6", "icc", "icc_chunked", "comment",
     "restart", "big_endian_exif3", "exif_without_orientation", *[f"orientation{n}" for n in range(1, 9)]],
)  # fmt: skip
def test_scan_answers_for_plain_files(name: str) -> None:
    """Not a scanner that always defers: the files cameras and encoders write are read here."""
    fast = agrees(CORPUS[name])
    assert fast is not None
    assert (fast.width, fast.height) == (48, 32)


@pytest.mark.parametrize("name", ["cmyk", "xmp", "mpo", "bad/cmyk.jpg", "bad/text.jpg", "bad/empty.jpg"])
def test_scan_defers_what_it_does_not_model(name: str) -> None:
    assert scan_jpeg_header(memoryview(CORPUS[name])) is None


def test_twelve_bit_and_lossless_frames_defer() -> None:
    data = bytearray(CORPUS["rgb"])
    sof = data.index(b"\xff\xc0")
    twelve = bytearray(data)
    twelve[sof + 4] = 12  # sample precision
    assert scan_jpeg_header(memoryview(bytes(twelve))) is None
    lossless = bytearray(data)
    lossless[sof + 1] = 0xC3
    assert scan_jpeg_header(memoryview(bytes(lossless))) is None


@pytest.mark.parametrize("name", ["rgb", "exif6", "orientation8", "icc", "progressive", "grey", "big_endian_exif3"])
def test_mutated_headers_agree_or_defer(name: str) -> None:
    """Random byte changes and truncations in the header: every answer the scan gives is Pillow's."""
    data = CORPUS[name]
    header_end = data.index(b"\xff\xda") + 2
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    answered = 0
    for trial in range(1000):
        mutated = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            mutated[int(rng.integers(2, header_end))] = int(rng.integers(0, 256))
        if trial % 5 == 0:
            mutated = mutated[: int(rng.integers(2, header_end + 16))]
        answered += agrees(bytes(mutated)) is not None
    assert answered > 100  # most single-byte changes land in tables or pixels the header check ignores


def test_inspect_uses_the_scan_and_keeps_its_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """inspect_encoded gives the same routing and orientation with the scan as with Pillow alone."""
    with_scan = {name: gpu_decode.inspect_encoded(name, data) for name, data in CORPUS.items()}
    monkeypatch.setattr(gpu_decode, "scan_jpeg_header", lambda view: None)
    for name, data in CORPUS.items():
        pillow_only = gpu_decode.inspect_encoded(name, data)
        got = with_scan[name]
        assert (got.nvjpeg, got.orientation, got.pixels) == (
            pillow_only.nvjpeg, pillow_only.orientation, pillow_only.pixels), name  # fmt: skip


def test_a_progressive_scan_bomb_goes_to_the_cpu_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvjpeg took progressive JPEGs of any scan count; one of thousands of empty scans (each a pass
    over the image) now goes to the CPU decoder, which refuses it by name (image.decode)."""
    from clipengine.image.decode import MAX_JPEG_SCANS

    data = CORPUS["progressive"]
    last = data.rindex(b"\xff\xda")
    empty_scan = data[last : last + 2 + struct.unpack(">H", data[last + 2 : last + 4])[0]]  # header only
    end = data.rindex(b"\xff\xd9")
    bomb = data[:end] + empty_scan * MAX_JPEG_SCANS + data[end:]
    assert scan_jpeg_header(memoryview(data)).progressive  # type: ignore[union-attr]
    assert not scan_jpeg_header(memoryview(CORPUS["rgb"])).progressive  # type: ignore[union-attr]
    for reader in ("scan", "pillow"):
        if reader == "pillow":
            monkeypatch.setattr(gpu_decode, "scan_jpeg_header", lambda view: None)
        assert gpu_decode.inspect_encoded("ok.jpg", data).nvjpeg, reader
        assert not gpu_decode.inspect_encoded("bomb.jpg", bomb).nvjpeg, reader
        assert not gpu_decode.inspect_encoded("bomb.jpg", np.frombuffer(bomb, np.uint8)).nvjpeg, reader
