"""What a new user gets wrong on the command line: each mistake gets a clear answer, not a surprise."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pipeline_fakes
import pytest

from clipengine.cli import model_options
from clipengine.cli.app import main


@pytest.fixture
def fake_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipengine.image.preprocess import PreprocessConfig

    def load(opts: model_options.ModelOptions) -> SimpleNamespace:
        backend = pipeline_fakes.FakeBackend(embed_dim=8, image_size=32)
        return SimpleNamespace(backend=backend, preprocess_cfg=PreprocessConfig(image_size=32), name="fake")

    monkeypatch.setattr(model_options, "load_clip", load)


def test_a_tilde_the_shell_left_alone_is_the_home_folder(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_load
) -> None:
    # `--output=~/emb` and a quoted "~/photos" reach the program unexpanded: bash expands neither.
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    pipeline_fakes.write_images(home / "photos", 2)
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)

    code = main(["embed", "~/photos", "--output=~/emb", "--workers", "0", "--no-progress", "-m", "RN50"])

    assert code == 0
    assert (home / "emb" / "run.json").is_file()
    assert not (cwd / "~").exists()  # not a folder named `~` (which `rm -rf ~` would then "clean up")
