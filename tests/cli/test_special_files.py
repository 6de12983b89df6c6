"""`predict` and `embed` given a named pipe or a device instead of an image, folder or file list: one
line naming what it is, before any model is loaded and without opening it (a pipe waits for a writer)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clipengine.cli import model_options
from clipengine.cli.app import main

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes and /dev/null are POSIX")


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded for an input that cannot be read")

    monkeypatch.setattr(model_options, "load_clip", load)


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "x.png"
    os.mkfifo(path)
    return path


@posix_only
@pytest.mark.timeout(60)
def test_predict_on_a_named_pipe_says_it_is_not_a_regular_file(
    fifo: Path, no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "not a folder": the single-image check asked is_file(), false for a pipe."""
    assert main(["predict", str(fifo), "--text", "a", "b"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {fifo}: not a regular file but a named pipe (FIFO); pass an image file or a folder"


@posix_only
def test_predict_on_a_device_names_it(no_model_load: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", os.devnull, "--text", "a"]) == 1
    assert "not a regular file but a character device" in capsys.readouterr().err


@posix_only
@pytest.mark.timeout(60)
def test_predict_on_a_link_to_a_named_pipe_names_the_pipe(
    fifo: Path, tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    assert main(["predict", str(link), "--text", "a"]) == 1
    assert f"{link}: not a regular file but a named pipe (FIFO)" in capsys.readouterr().err


@posix_only
@pytest.mark.timeout(60)
def test_embed_on_a_named_pipe_says_what_it_is_not_that_it_is_missing(
    fifo: Path, tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "no such folder or file list" of a path that exists."""
    assert main(["embed", str(fifo), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {fifo}: not a folder or file list but a named pipe (FIFO); pass a folder or a regular file"
    assert not (tmp_path / "out" / "shards").exists()
