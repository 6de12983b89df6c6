"""An output path that is a file, or has a file on its way, is a usage error (exit 2, naming the option)
in every command that writes a folder, refused before any model load or download. `-o photo.png` was
2 (typer's file_okay=False) but `-o photo.png/out` was 1, and `index build -o photo.png` embedded
every image before its save found the file (exit 1)."""

from __future__ import annotations

from pathlib import Path

import pipeline_fakes
import pytest

from clipengine.cli import model_options
from clipengine.cli.app import main


def _commands(images: Path, tmp: Path, out: Path) -> dict[str, list[str]]:
    nowhere = str(tmp / "no-data")
    return {
        "embed -o": ["embed", str(images), "-o", str(out), "--workers", "0", "--no-progress", "-m", "RN50"],
        "export -o": ["export", "tiny-synth", "-o", str(out)],
        "index build -o": ["index", "build", str(images), "-o", str(out), "--workers", "0", "-m", "RN50"],
        "index build --embeddings": [
            "index", "build", str(images), "-o", str(tmp / "photos.index"), "--embeddings", str(out), "-m", "RN50",
        ],
        "index add --embeddings": ["index", "add", str(tmp / "photos.index"), str(images), "--embeddings", str(out)],
        "eval zeroshot --out": ["eval", "zeroshot", "-d", "folder", "--root", nowhere, "-m", "RN50", "--out", str(out)],
        "eval linear-probe --out": [
            "eval", "linear-probe", "-d", "folder", "--root", nowhere, "-m", "RN50", "--out", str(out),
        ],
        "download-data --root": ["download-data", "cifar10", "--root", str(out)],
    }


COMMANDS = list(_commands(Path(), Path(), Path()))


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load (or download before it) fails the test: the output is checked first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(model_options, "load_clip", refuse)
    monkeypatch.setattr("clipengine.models.load.load_model", refuse)
    monkeypatch.setattr("clipengine.eval.download.download_dataset", refuse)


@pytest.mark.usefixtures("no_load")
@pytest.mark.parametrize("under", [False, True], ids=["the file", "under the file"])
@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_path_that_is_a_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, under: bool
) -> None:
    images = tmp_path / "imgs"
    pipeline_fakes.write_images(images, 2)
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"a file, not a folder")
    out = photo / "out" if under else photo

    code = main(_commands(images, tmp_path, out)[command])

    err = capsys.readouterr().err
    assert code == 2, err  # was 1 under the file; and for `index build -o` the file itself
    option = command.split()[-1]
    assert "Invalid value for" in err and option in err and str(photo.name) in err, err
    assert photo.read_bytes() == b"a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "photo.png"]  # nothing written


def test_bench_plot_under_a_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_load: None
) -> None:
    pipeline_fakes.write_images(tmp_path / "imgs", 2)
    (tmp_path / "photo.png").write_bytes(b"a file")

    code = main(["bench", str(tmp_path / "imgs"), "--plot", str(tmp_path / "photo.png" / "bench.png")])

    assert code == 2
    assert "--plot" in (err := capsys.readouterr().err) and "a file, not a folder" in err, err
