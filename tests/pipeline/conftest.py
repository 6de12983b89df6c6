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
