"""Pipeline fixtures: the fake Backend, a preprocess config for it, and folders of generated images."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pipeline_fakes
import pytest


@pytest.fixture(scope="session")
def fakes() -> ModuleType:
    return pipeline_fakes


@pytest.fixture
def fake_backend(fakes: ModuleType):  # type: ignore[no-untyped-def]
    return fakes.FakeBackend(embed_dim=8, image_size=32)


@pytest.fixture
def fake_factory(fakes: ModuleType):  # type: ignore[no-untyped-def]
    return fakes.FakeBackendFactory(embed_dim=8, image_size=32)


@pytest.fixture(scope="session")
def preprocess_cfg():  # type: ignore[no-untyped-def]
    """32 px CLIP preprocessing (matches the fake backend's image_size)."""
    from clipengine.image.preprocess import PreprocessConfig

    return PreprocessConfig(image_size=32)


@pytest.fixture
def image_folder(tmp_path: Path, fakes: ModuleType) -> Path:
    """25 good JPEGs: 20 at the top level, 5 in a sub-folder."""
    root = tmp_path / "images"
    fakes.write_images(root, 20)
    fakes.write_images(root / "sub", 5, prefix="deep", seed=1)
    return root


@pytest.fixture
def mixed_folder(tmp_path: Path, fakes: ModuleType) -> tuple[Path, list[str], list[str]]:
    """12 good JPEGs plus a truncated JPEG, an empty file and a text file named .jpg.

    Returns (folder, good ids, bad ids), ids sorted.
    """
    root = tmp_path / "mixed"
    good = fakes.write_images(root, 12)
    (root / "bad-empty.jpg").write_bytes(b"")
    (root / "bad-text.jpg").write_text("this is not an image\n" * 10)
    (root / "bad-truncated.jpg").write_bytes(good[0].read_bytes()[:60])
    good_ids = sorted(p.name for p in good)
    return root, good_ids, ["bad-empty.jpg", "bad-text.jpg", "bad-truncated.jpg"]


@pytest.fixture
def fake_nvjpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's nvjpeg call replaced by Pillow on CPU tensors (the GPU loader's plumbing on a CPU)."""
    from gpu_fakes import pil_batch_decode

    import clipengine.image.gpu_decode as gd

    monkeypatch.setattr(gd, "_nvjpeg_decode", pil_batch_decode)


@pytest.fixture
def torch_backend_factory(tiny_model):  # type: ignore[no-untyped-def]
    import copy

    from clipengine.backends.torch_backend import TorchBackend

    return lambda: TorchBackend(copy.deepcopy(tiny_model), precision="fp32")


@pytest.fixture
def photo_folder(mixed_folder, fakes):  # type: ignore[no-untyped-def]
    """mixed_folder (12 JPEGs + 3 bad files) plus a PNG (CPU fallback) and larger JPEGs (a real resize)."""
    import numpy as np
    from PIL import Image

    root, good, bad = mixed_folder
    png = fakes.write_images(root, 1, prefix="png", ext=".png", seed=3)
    big = []
    rng = np.random.default_rng(5)
    for i, (w, h) in enumerate([(160, 90), (70, 200)]):
        y, x = np.mgrid[0:h, 0:w]
        smooth = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.int16)
        arr = np.clip(smooth + rng.integers(-20, 20, smooth.shape), 0, 255).astype(np.uint8)
        path = root / f"photo-{i}.jpg"
        Image.fromarray(arr).save(path, quality=92)
        big.append(path.name)
    return root, sorted(good + [p.name for p in png] + big), bad
