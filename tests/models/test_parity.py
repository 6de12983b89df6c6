"""Small-model parity in every checkpoint format vs open_clip / transformers on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

from clipengine.models.load import load_model

from .conftest import Checkpoint
from .parity import FP32_BOUND, max_abs_errors
from .parity import assert_parity as _check


@pytest.mark.parametrize(
    "fixture", ["small_vit_bin", "small_vit_safetensors", "small_vit_training", "small_hf_folder"]
)
def test_small_vit_formats_match_reference(fixture: str, request: pytest.FixtureRequest) -> None:
    _check(request.getfixturevalue(fixture))


@pytest.mark.parametrize("fixture", ["small_rn_torchscript", "small_rn_openai_state_dict"])
def test_small_resnet_openai_formats_match_open_clip(fixture: str, request: pytest.FixtureRequest) -> None:
    _check(request.getfixturevalue(fixture))


def test_wrong_activation_is_detectably_different(small_rn_torchscript: Checkpoint) -> None:
    """Why the QuickGELU flag matters: forcing GELU on QuickGELU weights moves the text embedding."""
    from clipengine.models.config import CLIPConfig

    loaded = load_model(small_rn_torchscript.path)
    gelu_cfg: CLIPConfig = loaded.config.with_quick_gelu(False)
    _, txt_err = max_abs_errors(small_rn_torchscript, arch=gelu_cfg)
    assert txt_err > 10 * FP32_BOUND
    assert np.isfinite(txt_err)
