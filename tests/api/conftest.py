"""A tiny CLIP saved as a clipengine folder and loaded through the public API, once per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

import clipengine
from clipengine.api import ClipModel
from clipengine.models.clip import CLIP
from clipengine.models.saving import save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: CLIP) -> Path:
    return save_model(tiny_model, tmp_path_factory.mktemp("api") / "tiny")


@pytest.fixture(scope="module")
def model(model_dir: Path) -> ClipModel:
    return clipengine.load(model_dir)
