"""GPU image path: torch preprocessing vs the exact path, decoder fallbacks (fake nvjpeg on CPU), real nvjpeg on CUDA.

The CPU tests run `preprocess_tensors` on CPU tensors (torch only, no torchvision ops) and drive
`GpuJpegDecoder` with an injected batch decoder, so every fallback rule is checked without a GPU.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clipengine.errors import DecodeError
from clipengine.image import gpu_decode, gpu_preprocess, nvimgcodec_decode
from clipengine.image.decode import decode_image
from clipengine.image.gpu_decode import (
    LARGE_JPEG_PIXELS,
    GpuDecodeStats,
    GpuJpegDecoder,
    inspect_encoded,
    orient,
)
from clipengine.image.gpu_preprocess import preprocess_tensors
from clipengine.image.preprocess import (
    OPENAI_MEAN,
    OPENAI_STD,
    PreprocessConfig,
    preprocess,
    preprocess_image,
)
from clipengine.pipeline import gpu_batching
from clipengine.pipeline.gpu_batching import iter_gpu_batches
from clipengine.types import Failure, ImageItem

torch = pytest.importorskip("torch")

Factories = dict[str, Callable[..., Any]]
BAD = Path(__file__).parents[1] / "data" / "bad"
# One grey level in normalised units for the channel with the smallest std (G): 1 / 255 / 0.2613.
ONE_LEVEL = 1 / 255 / min(OPENAI_STD)
SIZES = [(640, 480), (480, 640), (1280, 960), (100, 50), (50, 100), (225, 225), (223, 224), (1000, 37),
         (37, 1000), (333, 777), (7, 5)]  # fmt: skip


def grey_levels(pixels: np.ndarray) -> np.ndarray:
    """Normalised (..., 3, H, W) -> the 0..255 values they encode, to state deviations in grey levels."""
    std = np.asarray(OPENAI_STD, np.float64)[:, None, None]
    mean = np.asarray(OPENAI_MEAN, np.float64)[:, None, None]
    return (pixels.astype(np.float64) * std + mean) * 255


def as_tensor(img: Image.Image) -> Any:
    """RGB PIL image -> (3, H, W) uint8 tensor, what either decoder hands to preprocess_tensors."""
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def photo(images: Factories, width: int, height: int, seed: int = 0) -> Image.Image:
    return decode_image(images["jpeg"](width, height, seed=seed))


def gpu_pixels(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    out: np.ndarray = preprocess_tensors([as_tensor(img)], cfg)[0].numpy()
    return out


# ---------------------------------------------------------------------------------------------
# preprocess_tensors vs the exact path (CPU tensors)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("kind", ["photo", "noise"])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_resized_pixels_are_bit_identical_to_exact_path(
    images: Factories, width: int, height: int, kind: str, resize_mode: str, interpolation: str
) -> None:
    """Pillow's integer resize reproduced (image.gpu_resample): every value equal, upscales, downscales,
    one axis only, odd sizes. (The float32 `interpolate` path it replaced was off by one grey level
    on up to 1.6 % of values.)"""
    img = photo(images, width, height) if kind == "photo" else images["noise"](width, height, seed=width + height)
    cfg = PreprocessConfig(interpolation=interpolation, resize_mode=resize_mode)
    ours, exact = gpu_pixels(img, cfg), preprocess_image(img, cfg)
    assert ours.shape == exact.shape == (3, 224, 224) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, exact)


def test_clip_png_bit_identical(clip_png: Path) -> None:
    """CLIP.png decoded to RGB (as both decoders hand it over): sharp edges, where a one-pass float
    resize missed by up to 10 levels and float32 two-pass by 1."""
    rgb = decode_image(clip_png)
    for mode in ("shortest", "squash"):
        cfg = PreprocessConfig(resize_mode=mode)
        np.testing.assert_array_equal(gpu_pixels(rgb, cfg), preprocess_image(rgb, cfg))


def test_float_resize_stays_within_one_grey_level(images: Factories, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback (a device whose int8 GEMM fails): `F.interpolate` in float32, measured here
    within one grey level, on at most 3 % of values."""
    monkeypatch.setattr(gpu_preprocess, "_int_resize_failed", True)
    for width, height in [(640, 480), (1280, 960), (37, 1000)]:
        for kind in ("photo", "noise"):
            img = photo(images, width, height) if kind == "photo" else images["noise"](width, height, seed=1)
            ours, exact = gpu_pixels(img, PreprocessConfig()), preprocess_image(img, PreprocessConfig())
            diff = np.abs(ours - exact)
            assert diff.max() <= ONE_LEVEL * 1.001
            assert (diff > 0).mean() <= 0.03


def test_int8_gemm_failure_falls_back_once_with_a_warning(
    images: Factories, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A device without int8 GEMMs: one warning, then the float path for the rest of the process."""
    calls = []

    def broken(*args: Any) -> Any:
        calls.append(1)
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(gpu_preprocess, "_int_resize_failed", False)
    monkeypatch.setattr(torch, "_int_mm", broken)
    img = images["noise"](300, 200, seed=2)
    exact = preprocess_image(img, PreprocessConfig())
    with caplog.at_level("WARNING", logger="clipengine.image.gpu_preprocess"):
        for _ in range(3):
            assert np.abs(gpu_pixels(img, PreprocessConfig()) - exact).max() <= ONE_LEVEL * 1.001
    assert len(calls) == 1
    assert [r.message for r in caplog.records if "float32" in r.message and "CUBLAS" in r.message]


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize(("width", "height"), [*SIZES, (224, 224), (1, 1000)])
def test_nearest_is_bit_identical(images: Factories, width: int, height: int, resize_mode: str) -> None:
    """Pillow's nearest indices (a running double sum) are reproduced exactly, not torch's "nearest"."""
    img = images["noise"](width, height, seed=3)
    cfg = PreprocessConfig(interpolation="nearest", resize_mode=resize_mode)
    np.testing.assert_array_equal(gpu_pixels(img, cfg), preprocess_image(img, cfg))


@pytest.mark.parametrize(("width", "height", "mode"), [(224, 224, "shortest"), (224, 224, "squash"),
                                                       (224, 500, "shortest"), (731, 224, "shortest")])  # fmt: skip
def test_no_resize_needed_is_bit_identical(images: Factories, width: int, height: int, mode: str) -> None:
    """Same crop box, same normalisation table: when no resize happens the outputs are equal."""
    img = images["noise"](width, height, seed=7)
    cfg = PreprocessConfig(resize_mode=mode)
    np.testing.assert_array_equal(gpu_pixels(img, cfg), preprocess_image(img, cfg))


@pytest.mark.parametrize("image_size", [32, 225, 336])
def test_other_model_sizes_and_normalisation(images: Factories, image_size: int) -> None:
    cfg = PreprocessConfig(image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = photo(images, 640, 480)
    diff = np.abs(gpu_pixels(img, cfg) - preprocess_image(img, cfg))
    assert diff.max() <= 2 / 255 / 0.5 * 1.001  # one grey level at std 0.5


def test_extreme_aspect_ratio_resizes_only_the_crop_window(images: Factories) -> None:
    """Past the exact path's _MAX_RESIZED_PIXELS both paths resize only the crop window's box
    (Pillow's `box=`), and the weights here are Pillow's for that box: bit-identical."""
    for img in (images["noise"](1, 1000), photo(images, 3, 5000), images["noise"](3, 5000, seed=4),
                images["noise"](5000, 3, seed=5)):  # fmt: skip
        np.testing.assert_array_equal(gpu_pixels(img, PreprocessConfig()), preprocess_image(img, PreprocessConfig()))
    huge = torch.full((3, 100_000, 1), 9, dtype=torch.uint8)  # 224 x 22.4M intermediate if not bounded
    assert preprocess_tensors([huge], PreprocessConfig()).shape == (1, 3, 224, 224)


def test_batch_of_mixed_sizes_keeps_order_and_equals_one_by_one(images: Factories) -> None:
    sizes = [(640, 480), (300, 300), (640, 480), (224, 224), (300, 300), (640, 480)]
    imgs = [as_tensor(images["noise"](w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    cfg = PreprocessConfig()
    batch = preprocess_tensors(imgs, cfg)
    assert batch.shape == (len(sizes), 3, 224, 224)
    for i, img in enumerate(imgs):
        assert torch.equal(batch[i], preprocess_tensors([img], cfg)[0])
    half = preprocess_tensors(imgs, cfg, out_dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, batch.half())
    assert preprocess_tensors([], cfg).shape == (0, 3, 224, 224)


@pytest.mark.parametrize(
    "bad", [torch.zeros((3, 5, 5), dtype=torch.float32), torch.zeros((5, 5, 3), dtype=torch.uint8)]
)
def test_rejects_tensors_that_are_not_3_h_w_uint8(bad: Any) -> None:
    with pytest.raises(ValueError, match="expected a \\(3, H, W\\) uint8 tensor"):
        preprocess_tensors([bad], PreprocessConfig())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_equals_pillows_exif_transpose(orientation: int) -> None:
    from PIL import ImageOps

    img = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif.tobytes())
    with Image.open(buf) as tagged:
        expected = np.asarray(ImageOps.exif_transpose(tagged))
    got = orient(as_tensor(img), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------------------------
# Decoder routing and fallbacks, with a fake batched decoder


class FakeNvjpeg:
    """Stands in for torchvision's batched nvjpeg call: decodes with Pillow as stored (no EXIF,
    like nvjpeg), and raises for the whole batch when any input is in `refuse`."""

    def __init__(self, refuse: tuple[bytes, ...] = ()) -> None:
        self.refuse = refuse
        self.calls: list[list[bytes]] = []

    def __call__(self, data: list[Any], device: Any) -> list[Any]:
        raws = [t.numpy().tobytes() for t in data]
        self.calls.append(raws)
        if any(raw in self.refuse for raw in raws):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        out = []
        for raw in raws:
            with Image.open(io.BytesIO(raw)) as im:
                out.append(as_tensor(im).to(device))
        return out


def jpeg_bytes(images: Factories, width: int, height: int, seed: int) -> bytes:
    data: bytes = images["jpeg"](width, height, seed=seed)
    return data


def png_bytes(images: Factories) -> bytes:
    buf = io.BytesIO()
    images["noise"](40, 30, seed=5).save(buf, "PNG")
    return buf.getvalue()


def test_decoder_falls_back_per_image_and_keeps_order(images: Factories) -> None:
    refused = jpeg_bytes(images, 64, 48, seed=2)
    inputs = [
        ("good1.jpg", jpeg_bytes(images, 80, 60, seed=1)),
        ("photo.png", png_bytes(images)),  # not a JPEG: never offered to nvjpeg
        ("truncated.jpg", (BAD / "truncated.jpg").read_bytes()),  # no EOI: CPU path, which fails
        ("refused.jpg", refused),  # nvjpeg raises: batch retried one by one, then CPU
        ("cmyk.jpg", (BAD / "cmyk.jpg").read_bytes()),  # CMYK: CPU path
        ("text.jpg", (BAD / "text.jpg").read_bytes()),  # not an image at all
        ("exif_rotated.jpg", (BAD / "exif_rotated.jpg").read_bytes()),  # stored 40x20, shown 20x40
        ("good2.jpg", jpeg_bytes(images, 33, 77, seed=3)),
    ]
    fake = FakeNvjpeg(refuse=(refused,))
    decoder = GpuJpegDecoder("cpu", decode_batch=fake)
    decoded = decoder.decode(inputs)

    assert decoded.ids == ["good1.jpg", "photo.png", "refused.jpg", "cmyk.jpg", "exif_rotated.jpg", "good2.jpg"]
    by_name = dict(inputs)
    for name, image in zip(decoded.ids, decoded.images, strict=True):
        expected = np.array(decode_image(by_name[name], name))  # the exact path's RGB, EXIF-oriented
        assert image.dtype == torch.uint8
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)
    assert tuple(decoded.images[4].shape) == (3, 40, 20)

    def reason(name: str) -> str:
        with pytest.raises(DecodeError) as info:
            decode_image(by_name[name], name)
        return info.value.reason

    assert decoded.failures == [Failure("truncated.jpg", reason("truncated.jpg")),
                                Failure("text.jpg", reason("text.jpg"))]  # fmt: skip
    assert decoded.failures[0].reason.startswith("truncated or corrupt image data")
    # One batched call with the four JPEGs nvjpeg should take, then one call per image.
    gpu_names = ["good1.jpg", "refused.jpg", "exif_rotated.jpg", "good2.jpg"]
    assert fake.calls[0] == [by_name[n] for n in gpu_names]
    assert fake.calls[1:] == [[by_name[n]] for n in gpu_names]
    assert decoder.stats == GpuDecodeStats(
        nvjpeg=3, cpu_fallback=3, failures=2, batch_retries=1, decode_s=decoder.stats.decode_s
    )


def test_batch_without_trouble_is_one_call(images: Factories) -> None:
    fake = FakeNvjpeg()
    decoder = GpuJpegDecoder("cpu", decode_batch=fake)
    decoded = decoder.decode([(f"{i}.jpg", jpeg_bytes(images, 50 + i, 40, seed=i)) for i in range(5)])
    assert decoded.ids == [f"{i}.jpg" for i in range(5)] and not decoded.failures
    assert len(fake.calls) == 1 and decoder.stats.nvjpeg == 5 and decoder.stats.cpu_fallback == 0


def test_large_images_get_their_own_call_and_order_is_kept(images: Factories) -> None:
    fake = FakeNvjpeg()
    decoder = GpuJpegDecoder("cpu", decode_batch=fake, large_pixels=60 * 60)
    dims = [(40, 30), (80, 70), (50, 40), (90, 60), (30, 30)]
    datas = [jpeg_bytes(images, w, h, seed=i) for i, (w, h) in enumerate(dims)]
    decoded = decoder.decode([(f"{i}.jpg", d) for i, d in enumerate(datas)])
    assert decoded.ids == [f"{i}.jpg" for i in range(5)]
    assert decoded.sizes == dims
    assert fake.calls == [[datas[0], datas[2], datas[4]], [datas[1], datas[3]]]  # small ones first, then large
    one_call = GpuJpegDecoder("cpu", decode_batch=FakeNvjpeg(), large_pixels=None)
    one_call_decoded = one_call.decode([(f"{i}.jpg", d) for i, d in enumerate(datas)])
    assert all(torch.equal(a, b) for a, b in zip(decoded.images, one_call_decoded.images, strict=True))


def test_default_decoder_splits_at_large_jpeg_pixels(images: Factories) -> None:
    """By default a JPEG over LARGE_JPEG_PIXELS gets a call apart; one at the limit stays with the small ones."""
    fake = FakeNvjpeg()
    at_limit = jpeg_bytes(images, 2000, 2000, seed=1)  # exactly 4 MP
    above = jpeg_bytes(images, 2001, 2000, seed=2)
    small = jpeg_bytes(images, 64, 48, seed=3)
    decoded = GpuJpegDecoder("cpu", decode_batch=fake).decode([("a.jpg", above), ("b.jpg", at_limit), ("c.jpg", small)])
    assert LARGE_JPEG_PIXELS == 2000 * 2000
    assert decoded.ids == ["a.jpg", "b.jpg", "c.jpg"]
    assert fake.calls == [[at_limit, small], [above]]


# ---------------------------------------------------------------------------------------------
# nvImageCodec as the batched decoder (its CPU backend here; the GPU tests below run its GPU ones)

needs_nvimgcodec = pytest.mark.skipif(not nvimgcodec_decode.available(), reason="nvidia-nvimgcodec not installed")


@needs_nvimgcodec
def test_nvimgcodec_decoder_routes_falls_back_and_equals_exact_path(images: Factories) -> None:
    """The adapter's contract on nvImageCodec's CPU backend (libjpeg-turbo, as Pillow): the same
    ids, failures and sizes as the exact path, pixels bit for bit, order kept."""
    inputs = [
        ("good1.jpg", jpeg_bytes(images, 80, 60, seed=1)),
        ("photo.png", png_bytes(images)),
        ("truncated.jpg", (BAD / "truncated.jpg").read_bytes()),
        ("cmyk.jpg", (BAD / "cmyk.jpg").read_bytes()),
        ("exif_rotated.jpg", (BAD / "exif_rotated.jpg").read_bytes()),
        ("grey.jpg", encode_jpeg(photo(images, 50, 30).convert("L"))),
        ("good2.jpg", jpeg_bytes(images, 33, 77, seed=3)),
    ]
    decoder = GpuJpegDecoder("cpu", library="nvimgcodec")
    decoded = decoder.decode(inputs)
    assert decoded.ids == ["good1.jpg", "photo.png", "cmyk.jpg", "exif_rotated.jpg", "grey.jpg", "good2.jpg"]
    assert [f.id for f in decoded.failures] == ["truncated.jpg"]
    assert decoder.stats.nvjpeg == 4 and decoder.stats.cpu_fallback == 2
    by_name = dict(inputs)
    for name, image, size in zip(decoded.ids, decoded.images, decoded.sizes, strict=True):
        expected = np.array(decode_image(by_name[name], name).convert("RGB"))
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected, err_msg=name)
        assert size == (expected.shape[1], expected.shape[0])


@needs_nvimgcodec
def test_nvimgcodec_returns_none_for_what_it_cannot_decode(images: Factories) -> None:
    good = torch.from_numpy(np.frombuffer(jpeg_bytes(images, 40, 30, seed=0), np.uint8).copy())
    junk = torch.from_numpy(np.frombuffer(b"\xff\xd8\xff" + bytes(64) + b"\xff\xd9", np.uint8).copy())
    out = nvimgcodec_decode.decode_batch([good, junk, good], torch.device("cpu"))
    assert out[1] is None and out[0] is not None and out[2] is not None
    assert out[0].shape == (3, 30, 40) and out[0].dtype == torch.uint8 and torch.equal(out[0], out[2])


def test_decoder_warns_once_when_the_gpu_decoder_takes_nothing(
    images: Factories, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU decoder that decodes nothing (nvImageCodec without its nvjpeg library) is not silent:
    the CPU decoder takes every image, and one warning says why it got slow."""
    calls = []

    def decodes_nothing(data: list[Any], device: Any) -> list[None]:
        calls.append(len(data))
        return [None] * len(data)

    decoder = GpuJpegDecoder("cpu", decode_batch=decodes_nothing)
    inputs = [(f"{i}.jpg", jpeg_bytes(images, 30, 20, seed=i)) for i in range(3)]
    with caplog.at_level("WARNING", logger=gpu_decode.__name__):
        first = decoder.decode(inputs)
        decoder.decode(inputs)
    assert first.ids == ["0.jpg", "1.jpg", "2.jpg"] and decoder.stats.cpu_fallback == 6
    assert calls == [3, 3]
    assert [r.getMessage() for r in caplog.records if "decoded none" in r.getMessage()] == [
        "the custom GPU decoder decoded none of 3 JPEGs; the CPU decoder takes them (is its nvjpeg library installed?)"
    ]


def test_decoder_warns_once_when_the_gpu_decoder_raises_on_every_image(
    images: Factories, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU decoder that raises for the batch and again for each image alone (torchvision built
    without nvjpeg) is not silent either: one warning with its error, the CPU decoder takes them."""

    def raises(data: list[Any], device: Any) -> list[Any]:
        raise RuntimeError("not compiled with nvJPEG support")

    decoder = GpuJpegDecoder("cpu", decode_batch=raises)
    inputs = [(f"{i}.jpg", jpeg_bytes(images, 30, 20, seed=i)) for i in range(3)]
    with caplog.at_level("WARNING", logger=gpu_decode.__name__):
        first = decoder.decode(inputs)
        decoder.decode(inputs)
    assert first.ids == ["0.jpg", "1.jpg", "2.jpg"] and decoder.stats.cpu_fallback == 6
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "the custom GPU decoder failed on each of 3 JPEGs (not compiled with nvJPEG support); "
        "the CPU decoder takes them"
    ]


def test_decoder_rejects_unknown_library_and_misplaced_options() -> None:
    with pytest.raises(ValueError, match="unknown GPU decode library 'dali'"):
        GpuJpegDecoder("cpu", library="dali")
    with pytest.raises(ValueError, match="fancy_upsampling needs library='nvimgcodec'"):
        GpuJpegDecoder("cpu", fancy_upsampling=True)


def test_decoder_missing_nvimgcodec_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvimgcodec_decode, "available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'nvidia-nvimgcodec-cu13\[nvjpeg\]'"):
        GpuJpegDecoder("cpu", library="nvimgcodec")


@pytest.mark.parametrize(
    ("filename", "to_nvjpeg", "orientation"),
    [("exif_rotated.jpg", True, 6), ("corrupt_exif.jpg", True, 1), ("cmyk.jpg", False, 1),
     ("truncated.jpg", False, 1), ("empty.jpg", False, 1), ("gray16.png", False, 1)],
)  # fmt: skip
def test_inspect_routes_by_header(filename: str, to_nvjpeg: bool, orientation: int) -> None:
    encoded = inspect_encoded(filename, (BAD / filename).read_bytes())
    assert (encoded.nvjpeg, encoded.orientation) == (to_nvjpeg, orientation)


def test_inspect_reads_headers_longer_than_its_prefix(images: Factories) -> None:
    exif = Image.Exif()
    exif[0x0112] = 3
    buf = io.BytesIO()
    icc = bytes(300_000)  # five APP2 segments: the markers before the scan outgrow the prefix
    photo(images, 64, 48).save(buf, "JPEG", exif=exif.tobytes(), icc_profile=icc)
    assert len(buf.getvalue()) > 2 * gpu_decode._HEADER_BYTES
    encoded = inspect_encoded("big_header.jpg", buf.getvalue())
    assert (encoded.nvjpeg, encoded.orientation) == (True, 3)


def test_inspect_sends_bombs_to_the_cpu_path(monkeypatch: pytest.MonkeyPatch, images: Factories) -> None:
    from clipengine.image import decode

    data = jpeg_bytes(images, 64, 48, seed=0)
    assert inspect_encoded("a.jpg", data).nvjpeg
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 64 * 48 - 1)
    assert not inspect_encoded("a.jpg", data).nvjpeg


def write_folder(root: Path, images: Factories) -> list[ImageItem]:
    names = []
    for i in range(7):
        (root / f"{i:02d}.jpg").write_bytes(jpeg_bytes(images, 60 + 7 * i, 50, seed=i))
        names.append(f"{i:02d}.jpg")
    (root / "03b.png").write_bytes(png_bytes(images))
    (root / "04b.jpg").write_bytes((BAD / "truncated.jpg").read_bytes())
    names += ["03b.png", "04b.jpg"]
    items = [ImageItem(n, str(root / n)) for n in sorted(names)]
    return [*items, ImageItem("missing.jpg", str(root / "missing.jpg"))]


def test_iter_gpu_batches_full_batches_in_order_with_failures(tmp_path: Path, images: Factories) -> None:
    items = write_folder(tmp_path, images)
    cfg = PreprocessConfig(image_size=32)
    decoder = GpuJpegDecoder("cpu", decode_batch=FakeNvjpeg())
    batches = list(iter_gpu_batches(items, cfg, "cpu", batch_size=3, read_threads=3, decoder=decoder))

    assert [len(b.ids) for b in batches] == [3, 3, 2]  # failures do not shrink a batch
    ids = [i for b in batches for i in b.ids]
    assert ids == [it.id for it in items if it.id not in ("04b.jpg", "missing.jpg")]
    failures = [f for b in batches for f in b.failures]
    assert [f.id for f in failures] == ["04b.jpg", "missing.jpg"]
    assert failures[1].reason == "file not found"  # as the CPU loader and predict word it
    pixels = torch.cat([b.pixels for b in batches])
    for row, item_id in zip(pixels, ids, strict=True):
        exact = preprocess(tmp_path / item_id, cfg)
        assert np.abs(row.numpy() - exact).max() <= ONE_LEVEL * 1.001
    assert decoder.stats.nvjpeg == 7 and decoder.stats.cpu_fallback == 1 and decoder.stats.failures == 2


@pytest.mark.parametrize("decode_group", [None, 3, 4])
def test_decode_groups_are_cut_into_batches(tmp_path: Path, images: Factories, decode_group: int | None) -> None:
    """Files are decoded in groups of `decode_group` (default max(batch, 256): one call here) and
    cut into batches of `batch_size`: the same rows, order and failures whatever the grouping."""
    items = write_folder(tmp_path, images)
    fake = FakeNvjpeg()
    decoder = GpuJpegDecoder("cpu", decode_batch=fake)
    batches = list(iter_gpu_batches(items, PreprocessConfig(image_size=32), "cpu", batch_size=3,
                                    decoder=decoder, decode_group=decode_group))  # fmt: skip
    assert [len(b.ids) for b in batches] == [3, 3, 2]
    assert [i for b in batches for i in b.ids] == [it.id for it in items if it.id not in ("04b.jpg", "missing.jpg")]
    assert [f.id for b in batches for f in b.failures] == ["04b.jpg", "missing.jpg"]
    assert len(fake.calls) == {None: 1, 3: 3, 4: 3}[decode_group]  # a group with no JPEG makes no call
    with pytest.raises(ValueError, match="decode_group must be >= 1"):
        next(iter_gpu_batches(items, PreprocessConfig(image_size=32), "cpu", decoder=decoder, decode_group=0))


@pytest.mark.parametrize(("read_slice", "threads"), [(1, 1), (2, 3), (4, 2), (32, 2)])
def test_read_slices_keep_order_and_failures(tmp_path: Path, images: Factories, monkeypatch: pytest.MonkeyPatch,
                                             read_slice: int, threads: int) -> None:  # fmt: skip
    """Reader threads take slices of a group; whatever the slice size and thread count, the groups
    come back in input order, with each unreadable file's Failure in its place."""
    items = write_folder(tmp_path, images)  # 10 items: 7 JPEGs, a PNG, a truncated JPEG, a missing file
    monkeypatch.setattr(gpu_batching, "_READ_SLICE", read_slice)
    stats = gpu_decode.GpuDecodeStats()
    groups = list(gpu_batching._read_ahead(items, 4, threads, 1, stats))
    assert [len(g.read) for g in groups] == [4, 4, 2]
    assert [g.ids for g in groups] == [[it.id for it in items[i : i + 4]] for i in (0, 4, 8)]
    assert not any(g.assisted for g in groups)
    flat = [g for group in groups for g in group.read]
    assert [r.id for r in flat] == [it.id for it in items]
    assert [type(r).__name__ for r in flat].count("Failure") == 1 and isinstance(flat[-1], Failure)
    assert stats.read_s > 0


def test_read_slice_size() -> None:
    size = gpu_batching._read_slice_size
    assert size(256, 2) == 32 and size(256, 1) == 32  # capped at _READ_SLICE
    assert size(256, 16) == 4  # at least 4 tasks per thread
    assert size(10, 2) == 2 and size(1, 8) == 1


def test_read_ahead_stops_reading_when_the_consumer_stops(tmp_path: Path, images: Factories,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A consumer that stops after the first group leaves the queued slices unread."""
    items = write_folder(tmp_path, images) * 20  # 200 items, 50 groups of 4
    reads: list[str] = []
    real_read = gpu_batching._read
    monkeypatch.setattr(gpu_batching, "_read", lambda item: (reads.append(item.id), real_read(item))[1])
    monkeypatch.setattr(gpu_batching, "_READ_SLICE", 1)
    groups = gpu_batching._read_ahead(items, 4, 1, 1, gpu_decode.GpuDecodeStats())
    first = next(groups)
    groups.close()  # type: ignore[attr-defined]
    assert len(first.read) == 4 and len(reads) < len(items) // 2


def test_decode_calls_hold_a_bounded_number_of_pixels(tmp_path: Path, images: Factories,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A decode group is split into calls of at most `_DECODE_PIXELS` (by header size), in order."""
    items = write_folder(tmp_path, images)  # seven JPEGs of 60..102 x 50
    monkeypatch.setattr(gpu_batching, "_DECODE_PIXELS", 2 * 80 * 50)
    fake = FakeNvjpeg()
    decoder = GpuJpegDecoder("cpu", decode_batch=fake)
    batches = list(iter_gpu_batches(items, PreprocessConfig(image_size=32), "cpu", batch_size=4, decoder=decoder))
    assert [i for b in batches for i in b.ids] == [it.id for it in items if it.id not in ("04b.jpg", "missing.jpg")]
    assert [f.id for b in batches for f in b.failures] == ["04b.jpg", "missing.jpg"]
    for call in fake.calls:
        pixels = [Image.open(io.BytesIO(raw)).size for raw in call]
        assert len(call) == 1 or sum(w * h for w, h in pixels) <= 2 * 80 * 50
    assert len(fake.calls) > 2


def test_cpu_fallbacks_in_batches_equal_the_exact_path_bit_for_bit(clip_png: Path) -> None:
    """Alpha, palette and 16-bit images are resized in their own mode on the CPU, as the exact path
    does; decoded to RGB first and resized on the GPU instead, CLIP.png (65% transparent) would be
    off by 2.1 levels on average and up to 254 at transparent edges."""
    paths = [clip_png, BAD / "palette_transparency.png", BAD / "gray16.png", BAD / "gray_alpha.png",
             BAD / "cmyk.jpg", BAD / "animated.gif"]  # fmt: skip
    items = [ImageItem(p.name, str(p)) for p in paths]
    for cfg in (PreprocessConfig(), PreprocessConfig(image_size=32, resize_mode="squash")):
        decoder = GpuJpegDecoder("cpu", decode_batch=FakeNvjpeg())
        (batch,) = iter_gpu_batches(items, cfg, "cpu", batch_size=8, decoder=decoder)
        assert batch.ids == [p.name for p in paths] and decoder.stats.cpu_fallback == len(paths)
        for row, path in zip(batch.pixels, paths, strict=True):
            np.testing.assert_array_equal(row.numpy(), preprocess(path, cfg))


def test_iter_gpu_batches_only_failures_still_reports_them(tmp_path: Path) -> None:
    items = [ImageItem("gone.jpg", str(tmp_path / "gone.jpg")), ImageItem("text", b"not an image")]
    decoder = GpuJpegDecoder("cpu", decode_batch=FakeNvjpeg())
    (batch,) = iter_gpu_batches(items, PreprocessConfig(), "cpu", batch_size=4, decoder=decoder)
    assert batch.ids == [] and tuple(batch.pixels.shape) == (0, 3, 224, 224)
    assert [f.id for f in batch.failures] == ["gone.jpg", "text"]


def test_any_per_file_read_error_is_a_failure_like_the_cpu_path(tmp_path: Path, images: Factories) -> None:
    """A path the OS cannot even be asked for (a NUL byte, possible from a file list) is that file's
    Failure with the CPU loader's reason, not an exception that ends the whole run."""
    from clipengine.pipeline.batching import load_chunk

    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(images, 40, 30, seed=1))
    nul = str(tmp_path / "b\x00.jpg")
    items = [ImageItem("a.jpg", str(tmp_path / "a.jpg")), ImageItem("b", nul)]
    decoder = GpuJpegDecoder("cpu", decode_batch=FakeNvjpeg())
    (batch,) = iter_gpu_batches(items, PreprocessConfig(image_size=32), "cpu", batch_size=4, decoder=decoder)
    assert batch.ids == ["a.jpg"]
    assert batch.failures == load_chunk([("b", nul)], PreprocessConfig(image_size=32).to_dict()).failures


def test_an_error_after_reading_stops_the_reader_threads(images: Factories) -> None:
    """An exception in the preprocessing stage (here a decoder handing back a wrong shape) shuts the
    reader threads down before it reaches the caller, even while the caller holds on to it."""
    data = jpeg_bytes(images, 40, 30, seed=1)
    items = [ImageItem(f"{i}.jpg", data) for i in range(400)]

    def wrong_shape(data: list[Any], device: Any) -> list[Any]:
        return [torch.zeros((1, 30, 40), dtype=torch.uint8) for _ in data]

    decoder = GpuJpegDecoder("cpu", decode_batch=wrong_shape)
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="expected a") as raised:  # held, as a REPL's last error is
        list(iter_gpu_batches(items, PreprocessConfig(image_size=32), "cpu", batch_size=2, decoder=decoder,
                              decode_group=4))  # fmt: skip
    assert not [t.name for t in set(threading.enumerate()) - before if t.name.startswith("clipengine-read")]
    assert raised.value is not None


def test_import_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import clipengine.image.gpu_decode, clipengine.image.gpu_preprocess, clipengine.image.nvimgcodec_decode\n"
        "import clipengine.pipeline.gpu_batching, clipengine.pipeline.gpu_loading, clipengine.pipeline.cpu_assist\n"
        "import clipengine.pipeline.gpu_procs\n"
        "leaked = sorted(m for m in ('torch', 'torchvision') if m in sys.modules)\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Real nvjpeg (CUDA)


def encode_jpeg(img: Image.Image, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


@pytest.mark.gpu
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize(("width", "height"), [(1280, 960), (100, 50), (3, 5000), (1, 1000), (224, 224)])
def test_cuda_preprocess_matches_exact_path(
    images: Factories, width: int, height: int, resize_mode: str, interpolation: str
) -> None:
    """On the GPU (cuBLASLt's int8 GEMMs) the resize is Pillow's, value for value; nearest too."""
    img = images["noise"](width, height, seed=11)
    cfg = PreprocessConfig(interpolation=interpolation, resize_mode=resize_mode)
    ours = preprocess_tensors([as_tensor(img).cuda()], cfg)[0].cpu().numpy()
    assert not gpu_preprocess._int_resize_failed
    exact = preprocess_image(img, cfg)
    if interpolation == "nearest" and resize_mode == "shortest" and (width, height) == (3, 5000):
        # nearest's crop-window resize keeps the float path's bounds (H200: max 14 levels, mean 0.47)
        diff = np.abs(grey_levels(ours) - grey_levels(exact))
        assert diff.max() <= 16.0 and diff.mean() <= 0.6
    else:
        np.testing.assert_array_equal(ours, exact)


@pytest.mark.gpu
def test_cuda_batches_of_photos_equal_cpu_tensors(images: Factories) -> None:
    """Many same-size photos in one GEMM (and groups split by _GROUP_ELEMENTS) give the CPU's values."""
    imgs = [as_tensor(photo(images, 1280, 960, seed=i)) for i in range(40)]
    cfg = PreprocessConfig()
    on_gpu = preprocess_tensors([t.cuda() for t in imgs], cfg).cpu()
    assert torch.equal(on_gpu, preprocess_tensors(imgs, cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("library", ["torchvision", pytest.param("nvimgcodec", marks=needs_nvimgcodec)])
def test_cuda_large_jpegs_apart_decode_as_in_one_call(images: Factories, library: str) -> None:
    """The default split (JPEGs over LARGE_JPEG_PIXELS in a call of their own) changes no pixel and
    no order on the real decoder: a 4.2 MP photo between 1280x960 ones, against one call per batch."""
    sizes = [(1280, 960), (2100, 2000), (1280, 960), (640, 480), (2100, 2000)]
    items = [(f"{i}.jpg", encode_jpeg(photo(images, w, h, seed=i))) for i, (w, h) in enumerate(sizes)]
    split = GpuJpegDecoder("cuda", library=library).decode(items)
    one_call = GpuJpegDecoder("cuda", library=library, large_pixels=None).decode(items)
    assert split.ids == one_call.ids == [name for name, _ in items] and not split.failures
    assert split.sizes == one_call.sizes == sizes
    assert all(torch.equal(a, b) for a, b in zip(split.images, one_call.images, strict=True))
    assert split.images[1].shape == (3, 2000, 2100) and split.images[0].is_cuda


GPU_LIBRARIES = [pytest.param("torchvision", id="torchvision"),
                 pytest.param("nvimgcodec", marks=needs_nvimgcodec, id="nvimgcodec")]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("library", "fancy"), [("torchvision", False),
                         pytest.param("nvimgcodec", False, marks=needs_nvimgcodec),
                         pytest.param("nvimgcodec", True, marks=needs_nvimgcodec)])  # fmt: skip
@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0 (cameras' usual)
@pytest.mark.parametrize(("width", "height"), [(1280, 960), (640, 480), (333, 777), (224, 224)])
def test_nvjpeg_close_to_exact_path(
    images: Factories, width: int, height: int, subsampling: int, library: str, fancy: bool
) -> None:
    """nvjpeg upsamples 4:2:0 chroma differently from libjpeg-turbo's "fancy" (triangle) filter
    that Pillow uses, so at sharp colour edges single pixels differ by tens of levels; the resize
    averages most of it away. Measured on an H200 (torchvision 0.26, session 5, with the exact
    integer resize): 4:4:4 bit-identical for all three decoders; 4:2:0 torchvision max 4
    (1280x960) to 37 (224x224, no resize), mean 0.16 - 0.58 levels; nvImageCodec max 2, mean 0.000."""
    img = photo(images, width, height, seed=width)
    data = encode_jpeg(img, subsampling=subsampling)
    decoder = GpuJpegDecoder("cuda", library=library, fancy_upsampling=fancy)
    decoded = decoder.decode([("a.jpg", data)])
    assert decoder.stats.nvjpeg == 1 and decoder.stats.cpu_fallback == 0
    cfg = PreprocessConfig()
    ours = preprocess_tensors(decoded.images, cfg)[0].cpu().numpy()
    diff = np.abs(grey_levels(ours) - grey_levels(preprocess(data, cfg)))
    print(f"{library} fancy={fancy} {width}x{height} sub={subsampling}: max {diff.max():.2f} "
          f"mean {diff.mean():.3f} levels")  # fmt: skip
    if subsampling == 0:  # no chroma upsampling: the decoders agree with libjpeg, and so does the resize
        np.testing.assert_array_equal(ours, preprocess(data, cfg))
    elif library == "nvimgcodec":
        assert diff.max() <= 3.0 and diff.mean() <= 0.01
    else:
        assert diff.max() <= 48.0 and diff.mean() <= 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("library", GPU_LIBRARIES)
def test_decoded_images_survive_queued_work_on_the_callers_stream(images: Factories, library: str) -> None:
    """Regression: torchvision writes decoded images from its own stream into memory allocated on
    the caller's; without the guard in `_nvjpeg_decode`, a batch decoded while the caller's stream
    still had queued reads of the previous batch overwrote it (cosine 0.56 in benchmarks/gpu_e2e.py)."""
    datas = [jpeg_bytes(images, 640, 480, seed=i) for i in range(12)]
    decoder = GpuJpegDecoder("cuda", library=library)
    expected = [decoder.decode([(str(i), d)]).images[0].cpu() for i, d in enumerate(datas)]
    busy = torch.randn(2048, 2048, device="cuda")
    copies = []
    for r in range(8):
        order = [(r + k) % len(datas) for k in range(6)]
        decoded = decoder.decode([(str(i), datas[i]) for i in order])
        for _ in range(30):  # keep the caller's stream busy so the copies below run late
            busy = torch.tanh(busy @ busy)
        copies.append((order, [image.clone() for image in decoded.images]))
        del decoded  # its memory goes back to the allocator while the clones are still queued
    torch.cuda.synchronize()
    for order, clones in copies:
        for i, clone in zip(order, clones, strict=True):
            assert torch.equal(clone.cpu(), expected[i]), i


@pytest.mark.gpu
@pytest.mark.parametrize("library", GPU_LIBRARIES)
def test_nvjpeg_exif_orientation_and_grey(images: Factories, library: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    img = photo(images, 320, 200)
    grey = img.convert("L")
    inputs = [("rot.jpg", encode_jpeg(img, exif=exif.tobytes())), ("grey.jpg", encode_jpeg(grey))]
    decoder = GpuJpegDecoder("cuda", library=library)
    decoded = decoder.decode(inputs)
    assert decoder.stats.nvjpeg == 2
    for (name, data), image in zip(inputs, decoded.images, strict=True):
        expected = np.array(decode_image(data, name)).astype(np.int16)
        got = image.permute(1, 2, 0).cpu().numpy().astype(np.int16)
        assert got.shape == expected.shape, name  # (320, 200, 3) for the rotated one
        assert np.abs(got - expected).mean() <= 1.5, name


@pytest.mark.gpu
@pytest.mark.parametrize("library", GPU_LIBRARIES)
def test_nvjpeg_cmyk_and_png_fall_back_and_match_exact_path(images: Factories, library: str) -> None:
    inputs = [("cmyk.jpg", (BAD / "cmyk.jpg").read_bytes()), ("p.png", png_bytes(images))]
    decoder = GpuJpegDecoder("cuda", library=library)
    decoded = decoder.decode(inputs)
    assert decoder.stats.cpu_fallback == 2 and decoded.ids == ["cmyk.jpg", "p.png"]
    for (name, data), image in zip(inputs, decoded.images, strict=True):
        assert image.is_cuda
        np.testing.assert_array_equal(image.permute(1, 2, 0).cpu().numpy(), np.array(decode_image(data, name)))


@pytest.mark.gpu
@pytest.mark.parametrize("library", GPU_LIBRARIES)
def test_iter_gpu_batches_end_to_end_on_cuda(tmp_path: Path, images: Factories, library: str) -> None:
    items = write_folder(tmp_path, images)
    decoder = GpuJpegDecoder("cuda", library=library)
    batches = list(iter_gpu_batches(items, PreprocessConfig(), "cuda", batch_size=4, decoder=decoder,
                                    out_dtype=torch.float16))  # fmt: skip
    assert [len(b.ids) for b in batches] == [4, 4]
    assert all(b.pixels.is_cuda and b.pixels.dtype == torch.float16 for b in batches)
    assert [f.id for b in batches for f in b.failures] == ["04b.jpg", "missing.jpg"]
    assert decoder.stats.nvjpeg == 7 and decoder.stats.cpu_fallback == 1
    ids = [i for b in batches for i in b.ids]
    pixels = torch.cat([b.pixels for b in batches]).float().cpu().numpy()
    for row, item_id in zip(pixels, ids, strict=True):
        diff = np.abs(grey_levels(row) - grey_levels(preprocess(tmp_path / item_id)))
        assert diff.mean() <= 1.5, item_id


@pytest.mark.gpu
def test_torchvision_decode_jpeg_takes_device() -> None:
    """torchvision's nvjpeg entry point exists with the signature the decoder calls."""
    import inspect

    from torchvision.io import decode_jpeg

    params = inspect.signature(decode_jpeg).parameters
    assert {"input", "mode", "device"} <= set(params)
