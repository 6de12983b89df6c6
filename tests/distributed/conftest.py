"""Ray fixtures: one local 2-CPU Ray instance per test module, the fake backend, folders of images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import distributed_fakes
import pytest


@pytest.fixture(scope="session")
def fakes() -> ModuleType:
    return distributed_fakes


@pytest.fixture(scope="module")
def ray_local(fakes: ModuleType) -> Iterator[None]:
    """A local Ray instance (2 CPUs, no dashboard) shared by a module's Ray tests.

    Module scope: shut down when test_ray.py ends, not left running (raylet, GCS, idle workers, an
    object store) beside the ~80 % of the suite that runs after it."""
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(fakes)  # actors cannot import the test module by name
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def preprocess_cfg():  # type: ignore[no-untyped-def]
    from clipengine.image.preprocess import PreprocessConfig

    return PreprocessConfig(image_size=32)


@pytest.fixture
def mixed_folder(tmp_path: Path, fakes: ModuleType) -> Path:
    """12 good JPEGs, a truncated one and an empty one."""
    root = tmp_path / "images"
    good = fakes.write_images(root, 12)
    (root / "bad-empty.jpg").write_bytes(b"")
    (root / "bad-truncated.jpg").write_bytes(good[0].read_bytes()[:60])
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """The shared tiny CLIP saved as a clipengine model folder (config.json + model.safetensors)."""
    import json

    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("models") / "tiny-vit"
    folder.mkdir()
    config = {**tiny_model.config.to_dict(), "preprocess": {"image_size": 32}}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(folder / "model.safetensors")
    )
    return folder
