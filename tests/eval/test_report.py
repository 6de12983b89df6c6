"""Eval report files: the JSON, Markdown and per-class PNG are written atomically (a failed write loses nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from disk_full import failing_savefig

from clipengine.eval.report import plot_per_class, write_report

_PER_CLASS = {"cat": 0.9, "dog": 0.5, "bird": 0.25}


def test_plot_per_class_writes_a_png(tmp_path: Path) -> None:
    path = plot_per_class(_PER_CLASS, tmp_path / "recall.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["recall.png"]


def test_failed_plot_keeps_the_previous_file_and_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    results = [
        {
            "model": "m", "dataset": "cifar10", "n": 3, "top1": 0.5, "top5": 0.9,
            "mean_per_class_recall": 0.55, "chance": 0.1, "per_class": _PER_CLASS,
        }
    ]  # fmt: skip
    paths = write_report(tmp_path, "cifar10", results, "title")
    before = paths["png"].read_bytes()
    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="No space left"):
        plot_per_class({"cat": 0.1}, paths["png"], "another title")
    assert paths["png"].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cifar10.json",
        "cifar10.md",
        "cifar10_per_class.png",
    ]


@pytest.mark.parametrize("kind", ["json", "markdown"])
def test_failed_report_write_keeps_the_previous_file_and_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """`<stem>.json` and `<stem>.md` are written atomically: a write dying halfway loses nothing."""
    results = [
        {"model": "m", "dataset": "cifar10", "n": 3, "top1": 0.5, "top5": 0.9,
         "mean_per_class_recall": 0.55, "chance": 0.1}
    ]  # fmt: skip
    paths = write_report(tmp_path, "cifar10", results, "title", plot=False)
    before = paths[kind].read_bytes()
    first_char = {"json": "{", "markdown": "#"}[kind]
    real_write_text = Path.write_text

    def failing_write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if not data.startswith(first_char):
            return real_write_text(self, data, *args, **kwargs)
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)  # part of the file, then the error
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", failing_write_text)
    with pytest.raises(OSError, match="No space left"):
        write_report(tmp_path, "cifar10", [{**results[0], "top1": 0.1}], "another title", plot=False)
    assert paths[kind].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar10.json", "cifar10.md"]


def test_without_matplotlib_the_reports_are_written_and_the_plot_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`clipengine[onnx]` alone: eval wrote its JSON and Markdown, then failed on the plot's import."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    result = {"model": "m", "dataset": "d", "n": 2, "top1": 0.5, "top5": 1.0, "mean_per_class_recall": 0.5,
              "chance": 0.5, "per_class": {"cat": 0.5, "dog": 0.5}}  # fmt: skip
    paths = write_report(tmp_path, "r", [result], "t")
    assert sorted(paths) == ["json", "markdown"] and all(p.is_file() for p in paths.values())
    assert "matplotlib is not installed" in caplog.text and not list(tmp_path.glob("*.png"))


def test_markdown_tables_hold_names_with_pipes_and_newlines(tmp_path: Path) -> None:
    """Class folder names are free text: a "|" ended the table cell and a newline the row."""
    per_class = {"ring|circle": 0.0, "new\nline": 0.25, "a\u2215b": 0.5}
    results = [
        {"model": "m", "engine": "torch|fp32", "dataset": "folder-x", "n": 3, "top1": 0.5, "top5": 0.9,
         "mean_per_class_recall": 0.25, "chance": 0.3, "per_class": per_class,
         "unreadable": [{"path": "bad\n.png", "reason": "not an image"}]}
    ]  # fmt: skip
    md = write_report(tmp_path, "x", results, "title", plot=False)["markdown"].read_text(encoding="utf-8")
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert "| ring\\|circle | 0.00 |" in md and "| new\\nline | 25.00 |" in md
    assert "| a\u2215b | 50.00 |" in md
    assert "| torch\\|fp32 | folder-x |" in md and "- bad\\n.png: not an image" in md
    for header, *body in [rows[:3], rows[3:]]:
        cells = header.replace("\\|", "").count("|")
        assert all(line.replace("\\|", "").count("|") == cells for line in body)


def test_plot_draws_class_names_as_text_not_mathtext(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A name "$x^2$" was drawn as a formula, and "a $\\frac$" raised matplotlib's
    ParseSyntaxException, failing the eval after its numbers were computed; a missing glyph (emoji) is
    one log record, not a UserWarning per character (an error under this suite's warning filter)."""
    names = {"$x^2$": 0.5, "a $\\frac$ b": 0.25, "star \U0001f642": 0.1}
    with caplog.at_level("WARNING", logger="clipengine.eval.report"):
        path = plot_per_class(names, tmp_path / "recall.png", "title $\\frac$")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lacks 1 character(s)" in caplog.text and "SMILING FACE" in caplog.text


def test_plot_draws_names_that_are_not_valid_utf8(tmp_path: Path) -> None:
    """A class folder named in Latin-1 (b"caf\\xe9") is the str "caf\\udce9": matplotlib's font code
    raised TypeError on the lone surrogate, ending the eval with a traceback after its JSON and
    Markdown were written. Such characters are drawn as escapes, as the Markdown report writes them."""
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    path = plot_per_class({name: 0.5, "cat": 1.0}, tmp_path / "recall.png", f"on folder-{name}")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reports_are_written_for_a_dataset_name_that_is_not_valid_utf8(tmp_path: Path) -> None:
    """A dataset folder named in Latin-1 (b"caf\\xe9") puts "caf\\udce9" in the title: writing the
    Markdown raised UnicodeEncodeError, a traceback after the JSON was written."""
    name = "folder-" + b"caf\xe9".decode("utf-8", "surrogateescape")
    result = {"model": "m", "dataset": name, "n": 2, "top1": 0.5, "top5": 1.0, "mean_per_class_recall": 0.5,
              "chance": 0.5, "per_class": {"cat": 0.5, "dog": 0.5}}  # fmt: skip
    paths = write_report(tmp_path, "r", [result], f"Zero-shot m on {name}", plot=False)
    assert paths["markdown"].read_text(encoding="utf-8").startswith("# Zero-shot m on folder-caf\\udce9\n")
