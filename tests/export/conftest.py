"""Export folders shared by the export tests: built once per session from the tiny fixtures (those
that tests elsewhere read too are in tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from clipengine.export.manifest import Manifest


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory: pytest.TempPathFactory, clip_png: Path) -> Path:
    """A folder of 8 small pictures (CLIP.png views + synthetic) for static INT8 calibration."""
    from PIL import Image

    from clipengine.export.verify import image_variants

    folder = tmp_path_factory.mktemp("calibration")
    views = image_variants(Image.open(clip_png))
    rng = np.random.default_rng(1)
    views += [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(4)]
    for i, img in enumerate(views):
        img.save(folder / f"cal_{i}.png")
    return folder


@pytest.fixture(scope="session")
def vit_fixed_export(tmp_path_factory: pytest.TempPathFactory, tiny_model, clip_png: Path) -> tuple[Path, Manifest]:  # type: ignore[no-untyped-def]
    """Tiny ViT, fp32/fp16/int8, image engines b1 and b4, text engine b4, projection in the graph."""
    from clipengine.export.onnx import export_model

    out = tmp_path_factory.mktemp("vit_fixed") / "tiny-vit"
    manifest = export_model(
        tiny_model, out, precisions=("fp32", "fp16", "int8"), image_batches=(1, 4), text_batches=(4,),
        sample_images_from=[clip_png], model_name="tiny-vit", pretrained="test",
    )
    return out, manifest


@pytest.fixture(scope="session")
def resnet_static_export(  # type: ignore[no-untyped-def]
    tmp_path_factory: pytest.TempPathFactory, tiny_resnet_model, calibration_dir: Path
) -> tuple[Path, Manifest]:
    """Tiny ResNet, fp32/fp16/int8 (static, calibrated on a folder), image b2, dynamic text."""
    from clipengine.export.onnx import export_model

    out = tmp_path_factory.mktemp("rn") / "tiny-rn"
    manifest = export_model(
        tiny_resnet_model, out, precisions=("fp32", "fp16", "int8"), image_batches=(2,), text_batches=None,
        calibration_images=calibration_dir,
    )
    return out, manifest


@pytest.fixture
def scratch_copy(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Copy an export folder into tmp_path so a test may damage it."""

    def copy(folder: Path) -> Path:
        target = tmp_path / folder.name
        shutil.copytree(folder, target)
        return target

    return copy
