"""What a new user gets wrong on the command line: each mistake gets a clear answer, not a surprise."""

from __future__ import annotations

import json
from pathlib import Path

import pipeline_fakes
import pytest

from clipengine.cli.app import main


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


def test_a_second_image_is_refused_not_ranked_as_a_text(  # type: ignore[no-untyped-def]
    tmp_path: Path, fake_load, capsys
) -> None:
    pipeline_fakes.write_images(tmp_path, 2)
    first, second = sorted(str(p) for p in tmp_path.glob("*.jpg"))

    code = main(["predict", first, second, "--text", "a dog", "a cat", "-m", "RN50"])

    assert code == 2
    err = capsys.readouterr().err
    assert f"{second!r} is an image, not a text" in err and "pass their folder" in err


def test_texts_after_a_single_text_option_are_still_texts(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pipeline_fakes.write_images(tmp_path, 1)
    (image,) = tmp_path.glob("*.jpg")
    (tmp_path / "dog").mkdir()  # a folder named like a text is no image: still a text

    code = main(["predict", str(image), "--text", "dog", "cat.png", "-m", "tiny-synth", "--json"])

    assert code == 0
    labels = {label["label"] for label in json.loads(capsys.readouterr().out)["results"][0]["labels"]}
    assert labels == {"dog", "cat.png"}


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "{image}", "--text", "a dog", "-m", "RN50"],
        ["embed", "{folder}", "-o", "{out}", "-m", "RN50"],
        ["serve", "-m", "RN50"],
    ],
)
def test_a_precision_no_backend_has_is_a_usage_error(  # type: ignore[no-untyped-def]
    command: list[str], tmp_path: Path, fake_load, capsys
) -> None:
    # As export's --precision: exit 2 naming the choices, not the backend's exit 1 after the model load.
    pipeline_fakes.write_images(tmp_path / "imgs", 1)
    (image,) = (tmp_path / "imgs").glob("*.jpg")
    where = {"image": str(image), "folder": str(tmp_path / "imgs"), "out": str(tmp_path / "out")}

    code = main([arg.format(**where) for arg in command] + ["--precision", "fp64"])

    assert code == 2
    assert "--precision must be one of fp32, fp16, bf16, int8, int8w, fp8, got 'fp64'" in capsys.readouterr().err


def test_version_prints_the_version_not_a_suggestion_of_verbose(capsys) -> None:  # type: ignore[no-untyped-def]
    from clipengine import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"clipengine {__version__}\n"


def test_a_compare_precision_no_backend_has_is_named_as_compare(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pipeline_fakes.write_images(tmp_path / "dogs", 1)
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(tmp_path), "-m", "tiny-synth", "--compare", "fp32,fp64"]

    code = main([*args, "--no-cache", "--out", str(tmp_path / "reports")])

    assert code == 2
    err = capsys.readouterr().err
    assert "--compare" in err and "'fp64' is no precision" in err and "--precision" not in err


@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_text_is_refused_not_ranked(blank: str, tmp_path: Path, fake_load, capsys) -> None:  # type: ignore[no-untyped-def]
    pipeline_fakes.write_images(tmp_path, 1)
    (image,) = tmp_path.glob("*.jpg")

    code = main(["predict", str(image), "--text", "a dog", blank, "-m", "RN50"])

    assert code == 2
    assert "--text" in (err := capsys.readouterr().err) and "a text is empty" in err


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_verbose_after_the_command_says_where_it_goes(flag: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["index", "info", str(tmp_path), flag])

    assert code == 2
    err = capsys.readouterr().err  # the program's name is pytest's here
    assert f"No such option: {flag}; {flag} goes before the command: " in err and f" {flag} index info ...\n" in err


def test_download_data_into_a_file_names_the_file(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "data").write_bytes(b"not a folder")

    code = main(["download-data", "cifar10", "--root", str(tmp_path / "data")])

    assert code == 2  # refused before any download (was "error: <root>: File exists")
    assert f"'{tmp_path / 'data'}' is a file" in capsys.readouterr().err


def test_an_output_under_a_file_says_a_folder_on_the_path_is_a_file(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "photo.png").write_bytes(b"a file")
    output = tmp_path / "photo.png" / "eval"

    code = main(["download-data", "cifar10", "--root", str(output)])

    assert code == 2  # a usage error, as --root photo.png is (was 1: "Not a directory", from the mkdir)
    err = capsys.readouterr().err
    assert err.endswith(f"Invalid value for --root: {output.parent}: a file, not a folder: the output folder cannot go there\n")


def test_an_export_folder_under_a_file_is_refused_before_the_model_loads(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded (or downloaded) before the output was checked")

    monkeypatch.setattr("clipengine.models.load.load_model", no_load)
    (tmp_path / "photo.png").write_bytes(b"a file")

    code = main(["export", "tiny-synth", "-o", str(tmp_path / "photo.png" / "export")])

    assert code == 2  # a usage error, as -o photo.png is
    out, err = capsys.readouterr()
    assert out == "" and err.endswith(
        f"Invalid value for --output: {tmp_path / 'photo.png'}: a file, not a folder: the output folder cannot go there\n"
    )
