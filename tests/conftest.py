"""Shared fixtures: isolated cache dir, GPU skipping, a tiny random-weight CLIP, test data paths."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# typer draws usage errors in a rich box as wide as the terminal (80 columns under CliRunner), so a
# message holding a tmp_path wraps at a place that depends on the path's length ("pytest-2" vs
# "pytest-12"), splitting the words tests look for. Read by typer.rich_utils at import: set first.
os.environ["TERMINAL_WIDTH"] = "1000"

TESTS_DIR = Path(__file__).parent
DATA_DIR = TESTS_DIR / "data"
REPO_ROOT = TESTS_DIR.parent


def _patch_torchvision_ops() -> None:
    """torchvision here is a CUDA build beside CPU torch: its C++ ops fail to load and
    `import torchvision` dies on `torchvision::nms does not exist`. Declaring the two op schemas
    first lets it import (we never call nms); open_clip and transformers import torchvision.
    """
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    try:
        torch.ops.load_library(
            str(Path(importlib.util.find_spec("torchvision").origin).parent / "_C.so")  # type: ignore[arg-type]
        )
        return
    except (OSError, RuntimeError):
        pass
    try:
        torch.ops.torchvision.nms  # noqa: B018 - already defined
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)  # the Library object must outlive the session


_KEEP: list[object] = []
_patch_torchvision_ops()


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pytest_report_header(config: pytest.Config) -> str:
    """Free space where the tests write: the suite needs about 1.5 GB of temp space at its peak
    (full-size checkpoints and exports, one at a time), and a full disk fails tests far from the cause."""
    import shutil
    import tempfile

    free_gb = shutil.disk_usage(tempfile.gettempdir()).free / 1e9
    low = "  (LOW: tests that write full-size models may fail)" if free_gb < 3 else ""
    return f"temp space free: {free_gb:.1f} GB in {tempfile.gettempdir()}{low}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own CLIPENGINE_HOME so nothing reads or writes the user's cache."""
    home = tmp_path_factory.mktemp("clipengine_home")
    monkeypatch.setenv("CLIPENGINE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def clip_png() -> Path:
    return DATA_DIR / "CLIP.png"


@pytest.fixture(scope="session")
def tiny_config():  # type: ignore[no-untyped-def]
    """A CLIP small enough to run in milliseconds: ViT width 64, 2 layers, 32 px, embed 32."""
    from clipengine.models.config import CLIPConfig, TextConfig, VisionConfig

    return CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, layers=2, width=64, patch_size=8),
        text=TextConfig(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        quick_gelu=True,
        name="tiny-vit",
    )


@pytest.fixture(scope="session")
def tiny_resnet_config():  # type: ignore[no-untyped-def]
    """A small ModifiedResNet CLIP: stem width 16, one block per stage, 64 px, embed 32."""
    from clipengine.models.config import CLIPConfig, TextConfig, VisionConfig

    return CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=16),
        text=TextConfig(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        quick_gelu=True,
        name="tiny-rn",
    )


def _seeded_model(cfg):  # type: ignore[no-untyped-def]
    import torch

    from clipengine.models.clip import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    # Random BatchNorm statistics so the ResNet tower's eval-mode BN is not an identity.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_config):  # type: ignore[no-untyped-def]
    return _seeded_model(tiny_config)


@pytest.fixture(scope="session")
def tiny_resnet_model(tiny_resnet_config):  # type: ignore[no-untyped-def]
    return _seeded_model(tiny_resnet_config)


# Export folders that tests in several folders read (never write: a test that damages one copies it
# first). Built once per session: each export is seconds of torch.export, the suite's main cost.


@pytest.fixture(scope="session")
def vit_dynamic_split_export(tmp_path_factory: pytest.TempPathFactory, tiny_model):  # type: ignore[no-untyped-def]
    """Tiny ViT, fp32/fp16/int8, dynamic batch, text projection split off to .npy."""
    from clipengine.export.onnx import export_model

    out = tmp_path_factory.mktemp("vit_dyn") / "tiny-vit-split"
    manifest = export_model(
        tiny_model, out, precisions=("fp32", "fp16", "int8"), image_batches=None, text_batches=None,
        split_text_projection=True,
    )
    return out, manifest


@pytest.fixture(scope="session")
def vit_dynamic_int8_export(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:  # type: ignore[no-untyped-def]
    """Tiny ViT, fp32 + int8 (dynamic INT8: no calibration images), dynamic batch, projection in the
    graph, parity measured at export."""
    from clipengine.export.onnx import export_model

    out = tmp_path_factory.mktemp("vit_dyn_int8") / "tiny"
    export_model(tiny_model, out, precisions=("fp32", "int8"), image_batches=None, text_batches=None)
    return out


@pytest.fixture(scope="session")
def vit_b1_export(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:  # type: ignore[no-untyped-def]
    """Tiny ViT, fp32, image and text engines of batch 1, not verified."""
    from clipengine.export.onnx import export_model

    out = tmp_path_factory.mktemp("vit_b1") / "tiny"
    export_model(tiny_model, out, image_batches=(1,), text_batches=(1,), verify=False)
    return out
