"""Fixtures shared by the CLI tests."""

from __future__ import annotations

from types import SimpleNamespace

import pipeline_fakes
import pytest

from clipengine.cli import model_options


@pytest.fixture
def fake_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model loading replaced by the fake backend (8-d, 32 px): the CLI's own logic, no model.
    Test files that need to see the options asked for define their own."""
    from clipengine.image.preprocess import PreprocessConfig

    def load(opts: model_options.ModelOptions) -> SimpleNamespace:
        backend = pipeline_fakes.FakeBackend(embed_dim=8, image_size=32)
        return SimpleNamespace(backend=backend, preprocess_cfg=PreprocessConfig(image_size=32), name="fake")

    monkeypatch.setattr(model_options, "load_clip", load)
