"""`clipengine predict` on a saved tiny checkpoint: output format, both --text spellings, bad images."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from clipengine.cli.app import app, main
from clipengine.models.clip import CLIP
from clipengine.models.saving import save_model

TEXTS = ["a diagram", "a dog", "a cat"]
LINE = re.compile(r"^Text: (a diagram|a dog|a cat), Similarity: (\d\.\d{4})$")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: CLIP) -> Path:
    return save_model(tiny_model, tmp_path_factory.mktemp("predict") / "tiny")


def _blocks(stdout: str) -> dict[str, list[tuple[str, float]]]:
    blocks: dict[str, list[tuple[str, float]]] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("Filename: "):
            current = line.removeprefix("Filename: ")
            blocks[current] = []
        elif (m := LINE.match(line)) and current is not None:
            blocks[current].append((m.group(1), float(m.group(2))))
    return blocks


def test_single_image_prints_sorted_probabilities_and_timings(checkpoint: Path, clip_png: Path) -> None:
    result = CliRunner().invoke(
        app, ["predict", str(clip_png), "--text", *TEXTS, "--checkpoint", str(checkpoint)]
    )
    assert result.exit_code == 0, result.output
    blocks = _blocks(result.stdout)
    (scores,) = blocks.values()
    assert list(blocks) == ["CLIP.png"] and sorted(t for t, _ in scores) == sorted(TEXTS)
    probs = [p for _, p in scores]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=2e-4)
    for stage in ("preprocess", "image-encode", "text-encode"):
        assert re.search(rf"^Average {stage} time: \d+\.\d ms per (image|text)$", result.stdout, re.M)


def test_repeated_text_option_equals_one_option_with_many_values(checkpoint: Path, clip_png: Path) -> None:
    runner = CliRunner()
    repeated = runner.invoke(
        app,
        [
            "predict",
            str(clip_png),
            "-t",
            TEXTS[0],
            "-t",
            TEXTS[1],
            "-t",
            TEXTS[2],
            "--checkpoint",
            str(checkpoint),
        ],
    )
    many = runner.invoke(app, ["predict", str(clip_png), "--checkpoint", str(checkpoint), "--text", *TEXTS])
    assert repeated.exit_code == many.exit_code == 0
    assert _blocks(repeated.stdout) == _blocks(many.stdout)


def test_folder_reports_bad_images_and_goes_on(
    checkpoint: Path, clip_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(clip_png, tmp_path / "a.png")
    shutil.copy(clip_png, tmp_path / "c.png")
    (tmp_path / "b.jpg").write_text("this is text, not a JPEG")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    code = main(["predict", str(tmp_path), "--text", *TEXTS, "--checkpoint", str(checkpoint)])
    out, err = capsys.readouterr()
    assert code == 0
    blocks = _blocks(out)
    assert list(blocks) == ["a.png", "c.png"] and blocks["a.png"] == blocks["c.png"]
    assert re.search(r"^Skipped: b\.jpg: .+", err, re.M)


def test_a_folder_is_preprocessed_and_encoded_a_batch_at_a_time(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`predict FOLDER` kept every preprocessed image until the end, and a stacked copy of them all
    (1.2 MB per image at 224 px: 923 images took 1.6 GB, a 20k photo folder would take 24 GB).
    It holds one batch at a time now, and ranks the same."""
    import weakref

    import numpy as np
    from PIL import Image

    from clipengine.api import ClipModel
    from clipengine.cli import predict as predict_cmd

    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "04b.png").write_text("not a PNG")  # a failure inside a batch
    args = ["predict", str(tmp_path), "--text", *TEXTS, "--checkpoint", str(checkpoint)]
    assert main(args) == 0
    expected = _blocks(capsys.readouterr().out)

    alive: set[int] = set()
    peak = 0
    preprocess = ClipModel.preprocess

    def tracked(self: ClipModel, image: Any) -> Any:
        nonlocal peak
        pixels = preprocess(self, image)
        alive.add(id(pixels))
        weakref.finalize(pixels, alive.discard, id(pixels))
        peak = max(peak, len(alive))
        return pixels

    monkeypatch.setattr(ClipModel, "preprocess", tracked)
    monkeypatch.setattr(predict_cmd, "_PREDICT_BATCH", 4, raising=False)
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert _blocks(out) == expected and len(expected) == 10
    assert re.search(r"^Skipped: 04b\.png: ", err, re.M)
    assert peak <= 4  # one batch of preprocessed images at a time


def test_no_readable_image_exits_1(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    assert main(["predict", str(tmp_path), "--text", "a", "--checkpoint", str(checkpoint)]) == 1
    out, err = capsys.readouterr()
    assert "no readable images" in err
    assert out == ""  # no "Average ... time: 0.0 ms" lines for a run that ranked nothing


def test_missing_target_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "nope.jpg"), "--text", "a"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_missing_weights_fail_in_one_line(clip_png: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["predict", str(clip_png), "--text", "a", "--model", "ViT-B-32", "--pretrained", "openai"]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: weights for ViT-B-32@openai are not in the cache") and "\n" not in err


def test_text_is_required(clip_png: Path) -> None:
    result = CliRunner().invoke(app, ["predict", str(clip_png)])
    assert result.exit_code == 2 and "--text" in result.output


def test_folder_is_walked_recursively_with_relative_names(
    checkpoint: Path, clip_png: Path, tmp_path: Path
) -> None:
    (tmp_path / "b" / "c").mkdir(parents=True)
    shutil.copy(clip_png, tmp_path / "a.png")
    shutil.copy(clip_png, tmp_path / "b" / "c" / "d.png")
    (tmp_path / ".hidden.png").write_bytes(clip_png.read_bytes())
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path), "--text", *TEXTS, "--checkpoint", str(checkpoint)]
    )
    assert result.exit_code == 0, result.output
    assert list(_blocks(result.stdout)) == ["a.png", "b/c/d.png"]


def test_folder_without_images_fails_before_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    code = main(["predict", str(tmp_path), "--text", "a", "--model", "ViT-B-32"])  # not cached: not loaded
    assert code == 1
    assert "no image files" in capsys.readouterr().err


def test_control_characters_in_file_names_are_escaped(
    checkpoint: Path, clip_png: Path, tmp_path: Path
) -> None:
    # A newline in a name would split its "Filename:" line; an escape sequence would reach the terminal.
    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ("new\nline.png", "esc\x1b[31m.png", "été 日本.png"):
        shutil.copy(clip_png, folder / name)
    (folder / "bad\tone.png").write_bytes(b"")
    result = CliRunner().invoke(app, ["predict", str(folder), "-t", *TEXTS, "--checkpoint", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert sorted(_blocks(result.stdout)) == ["esc\\x1b[31m.png", "new\\nline.png", "été 日本.png"]
    assert "Skipped: bad\\tone.png: empty file (0 bytes)" in result.stderr
    assert "\x1b" not in result.output


def test_labels_with_control_characters_are_printed_escaped(checkpoint: Path, clip_png: Path) -> None:
    """A label is one field of a one-line-per-field output: a newline in it must not start a line
    that reads as a label of its own, nor a terminal escape reach the terminal raw."""
    result = CliRunner().invoke(
        app, ["predict", str(clip_png), "--text", "a cat\nText: a dog", "\x1b[31mred", "--checkpoint", str(checkpoint)]
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Text: a cat\\nText: a dog, Similarity:" in out and "Text: \\x1b[31mred, Similarity:" in out
    assert "\x1b" not in out and sum(line.startswith("Text: ") for line in out.splitlines()) == 2


def _run(*args: str) -> Any:
    result = CliRunner().invoke(app, ["predict", *args])
    assert result.exit_code == 0, result.output
    return result


def test_top_k_prints_the_first_k_of_the_full_ranking_per_image(
    checkpoint: Path, clip_png: Path, tmp_path: Path
) -> None:
    shutil.copy(clip_png, tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"")  # empty: skipped
    shutil.copy(clip_png, tmp_path / "c.png")
    full = _blocks(_run(str(tmp_path), "--text", *TEXTS, "--checkpoint", str(checkpoint)).stdout)
    # --top-k after the --text values: they still end at the next option.
    cut = _run(str(tmp_path), "--text", *TEXTS, "--top-k", "2", "--checkpoint", str(checkpoint))
    top2 = _blocks(cut.stdout)
    assert list(top2) == ["a.png", "c.png"] and all(len(scores) == 2 for scores in top2.values())
    assert top2 == {name: scores[:2] for name, scores in full.items()}  # probabilities over all 3 texts
    assert "Skipped: b.png" in cut.stderr
    assert re.search(r"^Average text-encode time: \d+\.\d ms per text$", cut.stdout, re.M)
    more = _run(str(tmp_path), "--top-k", "4", "--checkpoint", str(checkpoint), "-t", *TEXTS)
    assert _blocks(more.stdout) == full  # more than the texts: all of them


def test_json_output_with_and_without_top_k(checkpoint: Path, clip_png: Path, tmp_path: Path) -> None:
    shutil.copy(clip_png, tmp_path / "a.png")
    (tmp_path / "b.jpg").write_text("not a JPEG")
    args = [str(tmp_path), "--checkpoint", str(checkpoint), "--json", "--text", *TEXTS]
    full = json.loads(_run(*args).stdout)
    assert set(full) == {"model", "top_k", "fidelity", "results", "skipped", "timings_ms"}
    assert full["top_k"] is None and full["fidelity"] is None  # fp32: no deviation to state
    assert full["model"] == str(checkpoint.resolve())
    (result,) = full["results"]
    probs = [x["probability"] for x in result["labels"]]
    assert result["name"] == "a.png" and sorted(x["label"] for x in result["labels"]) == sorted(TEXTS)
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)
    (skipped,) = full["skipped"]
    assert skipped["name"] == "b.jpg" and skipped["reason"]
    stages = {"preprocess_per_image", "image_encode_per_image", "text_encode_per_text"}
    assert set(full["timings_ms"]) == stages
    top1 = json.loads(_run(*args, "--top-k", "1").stdout)
    assert top1["top_k"] == 1 and len(top1["results"][0]["labels"]) == 1
    (best,) = top1["results"][0]["labels"]
    assert best["label"] == result["labels"][0]["label"]
    assert best["probability"] == pytest.approx(result["labels"][0]["probability"], rel=1e-6)  # not 1.0


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_top_k_is_a_usage_error_before_any_model_load(clip_png: Path, value: str) -> None:
    # ViT-B-32@openai is not cached here: reaching the load would fail with another message.
    args = ["predict", str(clip_png), "-t", "a", "--pretrained", "openai", "--top-k", value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Invalid value for '--top-k'" in result.output, result.output
    assert "not in the cache" not in result.output
