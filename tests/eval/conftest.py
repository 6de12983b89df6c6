"""Eval fixtures: synthetic datasets written in the real on-disk formats, and the tiny-synth model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clipengine.eval import synthetic

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_SYNTH_DIR = REPO_ROOT / "src" / "clipengine" / "weights" / "tiny-synth"

# Held-out seeds: the tiny model was trained on seed 0 (+100 for its 64 px renders).
TEST_SEED = 7
TRAIN_SEED = 8


@pytest.fixture(scope="session")
def shape_sets() -> tuple[synthetic.SyntheticDataset, synthetic.SyntheticDataset]:
    """(train, test) for the 10-class shape task, 32 px."""
    return (
        synthetic.generate(300, seed=TRAIN_SEED, task="shape"),
        synthetic.generate(400, seed=TEST_SEED, task="shape"),
    )


@pytest.fixture(scope="session")
def colour_sets() -> tuple[synthetic.SyntheticDataset, synthetic.SyntheticDataset]:
    """(train, test) for the 100-class colour x shape task, 32 px."""
    return (
        synthetic.generate(1000, seed=TRAIN_SEED, task="colour"),
        synthetic.generate(500, seed=TEST_SEED, task="colour"),
    )


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory, shape_sets) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cifar10")
    synthetic.write_cifar10(root, *shape_sets)
    return root


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory, colour_sets) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cifar100")
    synthetic.write_cifar100(root, *colour_sets)
    return root


@pytest.fixture(scope="session")
def imagefolder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px ImageFolder of the shape task: exercises decode + resize in preprocessing."""
    root = tmp_path_factory.mktemp("folder")
    synthetic.write_imagefolder(
        root, synthetic.generate(200, seed=TEST_SEED + 1, task="shape", image_size=64)
    )
    return root


@pytest.fixture(scope="session")
def tiny_synth():  # type: ignore[no-untyped-def]
    """The committed self-trained model as a ClipModel (torch, fp32, CPU)."""
    if not (TINY_SYNTH_DIR / "model.safetensors").is_file():
        pytest.skip("tiny-synth weights not generated (scripts/train_tiny_clip.py)")
    import clipengine

    return clipengine.load(str(TINY_SYNTH_DIR))


@pytest.fixture(autouse=True)
def _one_torch_thread():  # type: ignore[no-untyped-def]
    """On an oversubscribed shared box two spinning intra-op threads run ~10x slower than one."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
