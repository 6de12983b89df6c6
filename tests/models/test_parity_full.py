"""Full-size parity: ViT-B/32 (transformers, open_clip, OpenAI TorchScript) and RN50, fp32, <= 1e-4."""

from __future__ import annotations

import pytest

from clipengine.models.load import load_model

from .conftest import Checkpoint
from .parity import assert_parity as _check

pytestmark = pytest.mark.slow


def test_full_vit_b32_hf_folder_matches_transformers(full_vit_b32_hf: Checkpoint) -> None:
    loaded = load_model(full_vit_b32_hf.path)
    assert loaded.config.quick_gelu and loaded.config.vision.width == 768
    _check(full_vit_b32_hf, loaded)


def test_full_vit_b32_open_clip_safetensors_matches_open_clip(full_vit_b32_open_clip: Checkpoint) -> None:
    loaded = load_model(full_vit_b32_open_clip.path)
    assert loaded.name == "ViT-B-32" and not loaded.config.quick_gelu  # open_clip format -> GELU
    _check(full_vit_b32_open_clip, loaded)


def test_full_vit_b32_openai_torchscript_matches_open_clip_quickgelu(
    full_vit_b32_torchscript: Checkpoint,
) -> None:
    loaded = load_model(full_vit_b32_torchscript.path)
    assert loaded.name == "ViT-B-32" and loaded.config.quick_gelu  # OpenAI archive -> QuickGELU
    _check(full_vit_b32_torchscript, loaded)


def test_full_rn50_matches_open_clip_modified_resnet(full_rn50_open_clip: Checkpoint) -> None:
    _check(full_rn50_open_clip, arch="RN50-quickgelu")
