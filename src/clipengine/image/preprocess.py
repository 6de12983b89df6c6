"""CLIP image preprocessing (resize, center crop, normalise) with Pillow + NumPy, equal to OpenAI's transform."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from clipengine.errors import InputError
from clipengine.image.decode import open_image, source_name, to_8bit, to_rgb
from clipengine.types import FloatArray, ImageInput

__all__ = [
    "INTERPOLATIONS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "RESIZE_MODES",
    "PreprocessConfig",
    "crop_uint8",
    "draft_size",
    "normalise_uint8",
    "preprocess",
    "preprocess_batch",
    "preprocess_image",
    "resize_and_crop",
    "resized_size",
]

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB, on the [0, 1] scale
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,  # all OpenAI and most open_clip weights
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
RESIZE_MODES = ("shortest", "squash")
CROPS = ("center",)

# Above this many intermediate pixels (an aspect ratio beyond ~1:334 at 224 px) the resize is done
# straight into the crop window (Pillow's `box`) instead of resize-then-crop: bounded memory for
# hostile inputs like a 1x100000 PNG, at a small deviation from the reference (see docs).
_MAX_RESIZED_PIXELS = 1 << 24
# Fast path: JPEG DCT scaling keeps the decoded short side >= this multiple of the target size.
_DRAFT_OVERSAMPLE = 2


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels are prepared for a model; travels with the weights, never inferred from the name."""

    image_size: int = 224  # H == W of the model input
    mean: tuple[float, float, float] = OPENAI_MEAN  # per-channel RGB mean subtracted, [0, 1] scale
    std: tuple[float, float, float] = OPENAI_STD  # per-channel RGB std divided by
    interpolation: str = "bicubic"  # one of INTERPOLATIONS
    resize_mode: str = "shortest"  # "shortest": short side -> image_size, then crop; "squash": both sides
    crop: str = "center"  # only "center" (OpenAI's CenterCrop)

    def __post_init__(self) -> None:
        # Accept lists (from JSON) but store tuples so the config stays hashable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each and std > 0, got {self.mean}, {self.std}")
        for field, value, valid in (
            ("interpolation", self.interpolation, tuple(INTERPOLATIONS)),
            ("resize_mode", self.resize_mode, RESIZE_MODES),
            ("crop", self.crop, CROPS),
        ):
            if value not in valid:
                raise ValueError(f"{field} must be one of {', '.join(valid)}; got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); `from_dict` reads it back."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Read `to_dict` output, or an open_clip preprocess cfg (`size` may be an int or [H, W]).

        Raises:
            ValueError: unknown keys, a non-square size, or invalid values.
        """
        d = dict(d)
        if "size" in d:  # open_clip's spelling
            size = d.pop("size")
            if isinstance(size, Sequence):
                if len(size) != 2 or size[0] != size[1]:
                    raise ValueError(f"only square image sizes are supported, got {size!r}")
                size = size[0]
            d.setdefault("image_size", int(size))
        d.pop("mode", None)  # open_clip's colour mode, always "RGB"
        d.pop("fill_color", None)  # only used by open_clip's "longest" mode, which we do not offer
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown preprocess keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)


def resized_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(width, height) after the resize step, with torchvision's exact rounding.

    "shortest": the short side becomes image_size and the long side int(size * long / short),
    truncated in float arithmetic, as torchvision's `Resize(int)` computes it.
    """
    size = cfg.image_size
    if cfg.resize_mode == "squash":
        return size, size
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _center_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision's CenterCrop offsets: round() of half the margin (Python rounds halves to even)."""
    left = round((width - size) / 2.0)
    top = round((height - size) / 2.0)
    return left, top, left + size, top + size


def resize_and_crop(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize then center-crop to (image_size, image_size) in the image's mode, as torchvision does on PIL."""
    resample = INTERPOLATIONS[cfg.interpolation]
    new_w, new_h = resized_size(img.width, img.height, cfg)
    size = cfg.image_size
    left, top, right, bottom = _center_box(new_w, new_h, size)
    if new_w * new_h > _MAX_RESIZED_PIXELS:
        logger.debug("extreme aspect ratio %dx%d: resizing into the crop window", img.width, img.height)
        sx, sy = img.width / new_w, img.height / new_h
        return img.resize((size, size), resample, box=(left * sx, top * sy, right * sx, bottom * sy))
    if (new_w, new_h) != img.size:  # torchvision returns the image untouched when sizes match
        img = img.resize((new_w, new_h), resample)
    if (left, top, right, bottom) != (0, 0, *img.size):
        img = img.crop((left, top, right, bottom))
    return img


@lru_cache(maxsize=16)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> FloatArray:
    """(3, 256) float32: channel c, byte v -> (v / 255 - mean[c]) / std[c], computed in float32
    in ToTensor + Normalize's order so that every value is bit-identical to torchvision's."""
    v = np.arange(256, dtype=np.float32) / np.float32(255)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    table: FloatArray = ((v[None, :] - m) / s).astype(np.float32)
    table.setflags(write=False)
    return table


def _normalise(img: Image.Image, cfg: PreprocessConfig, out: FloatArray | None = None) -> FloatArray:
    """RGB image (H, W) -> (3, H, W) float32 via a per-channel lookup table."""
    pixels = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    table = _normalise_table(cfg.mean, cfg.std)
    if out is None:
        out = np.empty((3, img.height, img.width), dtype=np.float32)
    for c in range(3):
        np.take(table[c], pixels[:, :, c], out=out[c])
    return out


def crop_uint8(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """`preprocess_image` without the normalisation: (3, S, S) uint8 RGB, a quarter of its bytes.

    Decode workers send this to the parent (`pipeline.batching`), which calls `normalise_uint8`:
    the same float32 values as `preprocess_image`, bit for bit, for 4x less inter-process traffic.
    """
    rgb = np.asarray(to_rgb(resize_and_crop(to_8bit(img), cfg)), dtype=np.uint8)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def normalise_uint8(pixels: np.ndarray, cfg: PreprocessConfig, out: FloatArray | None = None) -> FloatArray:
    """(..., 3, H, W) uint8 RGB -> float32 with the model's mean / std (the same table as `preprocess_image`)."""
    if pixels.dtype != np.uint8 or pixels.ndim < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W) uint8 pixels, got {pixels.dtype} {pixels.shape}")
    table = _normalise_table(cfg.mean, cfg.std)
    if out is None:
        out = np.empty(pixels.shape, dtype=np.float32)
    for c in range(3):
        np.take(table[c], pixels[..., c, :, :], out=out[..., c, :, :])
    return out


def preprocess_image(img: Image.Image, cfg: PreprocessConfig | None = None) -> FloatArray:
    """A PIL image (any mode) -> (3, H, W) float32, equal to OpenAI's torchvision transform.

    Like OpenAI's transform, it resizes and crops in the image's own mode and converts to RGB
    last: that order matters for alpha (Pillow resizes RGBA premultiplied) and palettes (Pillow
    resizes them nearest-neighbour). Only 16-bit/float images are scaled to 8 bits first, where
    the reference would clip them. EXIF orientation is not applied here (`preprocess` does).

    Raises:
        InputError: `img` is not a PIL image (`preprocess` takes paths, bytes and arrays).
    """
    if not isinstance(img, Image.Image):  # else "'str' object has no attribute 'mode'"
        raise InputError(
            f"preprocess_image takes a PIL image, got {type(img).__name__}; for a path, bytes or array use preprocess"
        )
    cfg = cfg or PreprocessConfig()
    return _transform(img, cfg)


def _transform(
    img: Image.Image, cfg: PreprocessConfig, out: FloatArray | None = None, name: str = "<PIL image>"
) -> FloatArray:
    """`name`: how an error names the input (a float image out of range is refused by `to_8bit`)."""
    return _normalise(to_rgb(resize_and_crop(to_8bit(img, name), cfg), name), cfg, out)


def draft_size(cfg: PreprocessConfig, fast: bool) -> tuple[int, int] | None:
    """The `draft_size` of `open_image` for `fast` (None: the exact full-size decode). One rule for
    `preprocess` and the pipeline's decode workers, which must agree (docs/tokenizer_preprocess.md)."""
    if not fast:
        return None
    side = cfg.image_size * _DRAFT_OVERSAMPLE
    return side, side  # both sides >= side keeps the short side >= side in either resize mode


def preprocess(
    source: ImageInput, cfg: PreprocessConfig | None = None, *, name: str | None = None, fast: bool = False
) -> FloatArray:
    """Decode (EXIF-oriented, first frame) and preprocess one image -> (3, H, W) float32.

    Args:
        source: path, bytes, PIL image or array (see `decode_image`).
        cfg: preprocessing settings; OpenAI's 224 px defaults when None.
        name: how errors name the input.
        fast: opt-in approximate path for large JPEGs: decode at a reduced DCT scale (libjpeg
            "draft" mode) while keeping at least 2x the target resolution. Off by default
            because it is not bit-exact; docs/tokenizer_preprocess.md gives the measured deviation.

    Raises:
        DecodeError: the input cannot be decoded.
    """
    cfg = cfg or PreprocessConfig()
    label = name if name is not None else source_name(source)
    return _transform(open_image(source, label, draft_size=draft_size(cfg, fast)), cfg, name=label)


def preprocess_batch(
    sources: Sequence[ImageInput], cfg: PreprocessConfig | None = None, *, fast: bool = False
) -> FloatArray:
    """Preprocess several images into one (N, 3, H, W) float32 array.

    Raises:
        DecodeError: for the first input that cannot be decoded (pipelines that must go on past
            bad images call `preprocess` per item and record failures instead).
        InputError: `sources` is one image (a path, bytes or PIL image) or not a list (a generator).
    """
    _check_sources(sources)
    cfg = cfg or PreprocessConfig()
    size = cfg.image_size
    out = np.empty((len(sources), 3, size, size), dtype=np.float32)
    for i, source in enumerate(sources):
        label = source_name(source)
        _transform(open_image(source, label, draft_size=draft_size(cfg, fast)), cfg, out=out[i], name=label)
    return out


def _check_sources(sources: object) -> None:
    """A str is a Sequence too: one path was read as the paths "c", "a", "t" ("c: file not found"),
    and bytes as their ints; a generator has no len() for the output array."""
    if isinstance(sources, str | os.PathLike | bytes | bytearray | memoryview | Image.Image):
        raise InputError(
            f"sources must be a list of images, got one ({source_name(sources)}); pass [image], or call preprocess"
        )
    if not isinstance(sources, Sequence | np.ndarray):
        raise InputError(f"sources must be a list of images, got {type(sources).__name__}; pass list(sources)")
