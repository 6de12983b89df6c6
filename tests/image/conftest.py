"""Fixtures for image tests: OpenAI's torchvision transform as the reference, and test images."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from clipengine.image.preprocess import OPENAI_MEAN, OPENAI_STD

Reference = Callable[[Image.Image], np.ndarray]


@pytest.fixture(scope="session")
def openai_transform() -> Callable[..., Reference]:
    """`openai_transform(size, squash=False, interpolation="bicubic")`: clip.py's `_transform`
    (Resize, CenterCrop, convert RGB, ToTensor, Normalize) as a PIL -> (3, H, W) ndarray function."""
    transforms = pytest.importorskip("torchvision.transforms")
    modes = {
        "bicubic": transforms.InterpolationMode.BICUBIC,
        "bilinear": transforms.InterpolationMode.BILINEAR,
        "nearest": transforms.InterpolationMode.NEAREST,
    }

    def make(size: int, squash: bool = False, interpolation: str = "bicubic") -> Reference:
        pipeline = transforms.Compose(
            [
                transforms.Resize((size, size) if squash else size, interpolation=modes[interpolation]),
                transforms.CenterCrop(size),
                lambda im: im.convert("RGB"),
                transforms.ToTensor(),
                transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
            ]
        )
        return lambda im: pipeline(im).numpy()

    return make


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels (the hardest case for resampling parity), converted to `mode`."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        im.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return im
    return im.convert(mode)


def photo_like_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG with smooth gradients, hard edges and mild noise, like a camera photo."""
    import io

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / 97.0) * np.cos(y / 131.0)
    g = 255 * x / width
    b = np.where((x // 200 + y // 150) % 2 == 0, 200.0, 40.0)
    pixels = np.dstack([r, g, b]) + rng.normal(0, 6, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="session")
def images() -> dict[str, Callable[..., object]]:
    """Image factories for tests (conftest modules cannot be imported under importlib mode)."""
    return {"noise": noise_image, "jpeg": photo_like_jpeg}
