"""`clipengine bench`: the seed's block with consistent arithmetic, the table, JSON and the plot."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pipeline_fakes
import pytest
from typer.testing import CliRunner

from clipengine.cli import model_options
from clipengine.cli.app import app, main

_TESTS = Path(__file__).parents[1]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    pipeline_fakes.write_images(root, 10)
    return root


@pytest.fixture
def fake_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipengine.image.preprocess import PreprocessConfig

    def load(opts: model_options.ModelOptions) -> SimpleNamespace:
        backend = pipeline_fakes.FakeBackend(image_size=32)
        return SimpleNamespace(backend=backend, preprocess_cfg=PreprocessConfig(image_size=32), name="fake")

    monkeypatch.setattr(model_options, "load_clip", load)


def _check_seed_block(text: str, n: int) -> None:
    lines = text.splitlines()
    assert lines[0] == f"Total images: {n}"
    total = float(re.fullmatch(r"Total time use: ([\d.]+)ms", lines[1]).group(1))  # type: ignore[union-attr]
    avg = float(re.fullmatch(r"Avg time use: ([\d.]+)ms", lines[2]).group(1))  # type: ignore[union-attr]
    fps = float(re.fullmatch(r"([\d.]+) FPS", lines[3]).group(1))  # type: ignore[union-attr]
    assert total > 0
    assert abs(avg * n - total) <= 0.00005 * n + 0.005  # avg x N = total, to the printed digits
    assert abs(fps - 1000.0 / avg) <= 0.005 + 1000.0 * 0.00005 / avg**2  # FPS = 1000 / avg


def test_bench_prints_seed_block_and_table(folder: Path, tmp_path: Path, fake_load) -> None:  # type: ignore[no-untyped-def]
    plot = tmp_path / "bench.png"
    result = CliRunner().invoke(
        app, ["bench", str(folder), "--batch", "1,4", "--workers", "0", "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    _check_seed_block(result.output, 10)
    header = next(line for line in result.output.splitlines() if "decode+preprocess ms/img" in line)
    assert "inference ms/img" in header and "end-to-end img/s" in header and "text x4 ms" in header
    rows = result.output.split(header)[1].splitlines()[2:4]
    assert [r.split()[0] for r in rows] == ["1", "4"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_json(folder: Path, fake_load, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", str(folder), "--batch", "2", "--workers", "1", "--json", "--limit", "6"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["images"] == 6 and data["workers"] == 1
    assert data["avg_ms"] * 6 == pytest.approx(data["total_ms"]) and data["fps"] == pytest.approx(
        1000 / data["avg_ms"]
    )
    assert data["batches"][0]["text_batch4"]["n"] == 10


def test_bad_batch_list_is_a_usage_error(folder: Path, fake_load) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    result = runner.invoke(app, ["bench", str(folder), "--batch", "1,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output
    assert runner.invoke(app, ["bench", str(folder), "--batch", "0"]).exit_code == 2


def test_folder_without_images_is_one_line_error_before_loading(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    loaded: list[object] = []
    monkeypatch.setattr(model_options, "load_clip", loaded.append)
    (tmp_path / "empty").mkdir()
    assert main(["bench", str(tmp_path / "empty")]) == 1  # was a ValueError traceback
    err = capsys.readouterr().err
    assert err.strip() == f"error: {tmp_path / 'empty'}: no images to benchmark"
    assert loaded == []  # refused before the model load


def test_a_batch_bigger_than_the_folder_never_reaches_the_backend_bigger(  # type: ignore[no-untyped-def]
    folder: Path, monkeypatch, capsys
) -> None:
    backends: list[pipeline_fakes.FakeBackend] = []

    def load(opts: model_options.ModelOptions) -> SimpleNamespace:
        from clipengine.image.preprocess import PreprocessConfig

        backends.append(pipeline_fakes.FakeBackend(image_size=32))
        pre = PreprocessConfig(image_size=32)
        return SimpleNamespace(backend=backends[-1], preprocess_cfg=pre, name="fake")

    monkeypatch.setattr(model_options, "load_clip", load)
    # The warm-up ran 100000 zero images through the model (hung for minutes; 60 GB at 224 px).
    assert main(["bench", str(folder), "--batch", "2,100000", "--workers", "0"]) == 0
    assert max(backends[0].calls) == 10
    err = capsys.readouterr().err
    assert "note: --batch 100000 is more than the 10 images: those passes run batches of 10" in err


@pytest.mark.parametrize(
    ("plot", "message"),
    [
        ("FOLDER", "is a folder; name a file"),
        ("bench.txt", "matplotlib cannot write .txt files"),
        # was "error: a-file: File exists", from the plot's mkdir after the whole benchmark
        ("a-file/bench.png", "a file, not a folder"),
    ],
)
def test_an_unwritable_plot_is_refused_before_the_benchmark(  # type: ignore[no-untyped-def]
    folder: Path, tmp_path: Path, monkeypatch, plot: str, message: str
) -> None:
    loaded: list[object] = []
    monkeypatch.setattr(model_options, "load_clip", loaded.append)
    target = tmp_path if plot == "FOLDER" else tmp_path / plot
    (tmp_path / "a-file").write_text("in the way of a folder")
    # Both were a traceback after the whole benchmark had run.
    result = CliRunner().invoke(app, ["bench", str(folder), "--plot", str(target)])
    assert result.exit_code == 2 and message in result.output and "--plot" in result.output
    assert loaded == []


def test_unreadable_images_are_counted_apart_from_the_averages(folder: Path, fake_load, capsys) -> None:  # type: ignore[no-untyped-def]
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["bench", str(folder), "--batch", "4", "--workers", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["images"], data["failed"], data["batches"][0]["images"]) == (10, 1, 10)
    assert data["avg_ms"] == pytest.approx(data["total_ms"] / 10)  # the 10 embedded, not the 11 inputs
    assert main(["bench", str(folder), "--batch", "4", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    _check_seed_block(out, 10)
    assert ", 1 decode worker, 1 unreadable image skipped" in out  # was "1 decode workers, 1 ... images"


def test_one_image(tmp_path: Path, fake_load, capsys) -> None:  # type: ignore[no-untyped-def]
    pipeline_fakes.write_images(tmp_path / "one", 1)
    assert main(["bench", str(tmp_path / "one"), "--batch", "1,4", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    _check_seed_block(captured.out, 1)
    assert captured.err.strip() == "note: --batch 4 is more than the 1 image: those passes run batches of 1"


def test_the_seed_block_counts_the_images_of_the_pass_it_times(  # type: ignore[no-untyped-def]
    folder: Path, fake_load, monkeypatch, capsys
) -> None:
    """A file still being written when the first pass read it, whole by the second: the block took
    `Total time use` from the first pass but `Total images` from the last, so avg and FPS were off."""
    from clipengine.bench import timing

    late = folder / "late.jpg"
    late.write_bytes(b"")  # being copied in: empty at the first pass
    one_pass = timing._one_pass

    def pass_then_finish_copy(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = one_pass(*args, **kwargs)
        late.write_bytes((folder / "img-0000.jpg").read_bytes())
        return result

    monkeypatch.setattr(timing, "_one_pass", pass_then_finish_copy)
    assert main(["bench", str(folder), "--batch", "2,4", "--workers", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [b["images"] for b in data["batches"]] == [10, 11]
    assert (data["images"], data["failed"]) == (10, 1)
    assert data["avg_ms"] == pytest.approx(data["batches"][0]["wall_ms"] / 10)
