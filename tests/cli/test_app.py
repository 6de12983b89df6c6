"""`clipengine` as a whole: OS errors and Ctrl-C become one line and an exit code, never a traceback."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pipeline_fakes
import pytest
from disk_full import failing_savefig

from clipengine.cli import model_options
from clipengine.cli.app import EXIT_STDOUT_CLOSED, main


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    pipeline_fakes.write_images(tmp_path / "imgs", 3)
    return tmp_path / "imgs"


def test_disk_full_is_one_line_naming_the_file_and_the_fix(  # type: ignore[no-untyped-def]
    folder: Path, tmp_path: Path, fake_load, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing_savefig)
    plot = tmp_path / "plot.png"
    assert main(["bench", str(folder), "--batch", "1", "--workers", "0", "--plot", str(plot)]) == 1
    err = capsys.readouterr().err.splitlines()
    fix = "free some space or write somewhere else (run with -v for the traceback)"
    assert err == [f"error: No space left on device; {fix}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no plot, no temp file left


def test_an_os_error_names_the_file_the_user_asked_for_not_the_temp_file(  # type: ignore[no-untyped-def]
    folder: Path, tmp_path: Path, fake_load, capsys, monkeypatch
) -> None:
    # A parent that is a file: the OS refuses whoever runs it (chmod tests would pass as root).
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "emb"
    assert main(["embed", str(folder), "-o", str(out), "--workers", "0", "--no-progress"]) == 2  # usage
    err = capsys.readouterr().err.splitlines()  # refused before the model loads
    assert err[-1] == (
        f"Error: Invalid value for --output: {tmp_path / 'afile'}: a file, not a folder: the output folder cannot go there"
    ), err
    # Found by the write itself (the folder changed after the checks): the error names `out`, not
    # the temp file the atomic write used.
    monkeypatch.setattr("clipengine.cli.output_paths.check_writable_folder", lambda folder: None)
    monkeypatch.setattr("clipengine.pipeline.run_settings.check_writable_folder", lambda out_dir: None)
    assert main(["embed", str(folder), "-o", str(out), "--workers", "0", "--no-progress"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {out}: Not a directory; a folder on that path is a file; use another path"], err


def test_verbose_shows_the_traceback_of_an_os_error(
    folder: Path, tmp_path: Path, fake_load: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past the CLI's own check (a usage error), as a folder changed after it: the library's OS error.
    monkeypatch.setattr("clipengine.cli.output_paths.check_writable_folder", lambda folder: None)
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "emb"
    with pytest.raises(NotADirectoryError):
        main(["-v", "embed", str(folder), "-o", str(out), "--workers", "0", "--no-progress"])


def test_ctrl_c_exits_130_with_one_line(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(opts: model_options.ModelOptions) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(model_options, "load_clip", interrupted)
    assert main(["embed", str(folder), "-o", str(tmp_path / "out"), "--no-progress"]) == 130
    assert capsys.readouterr().err.splitlines() == ["interrupted"]


# A command that prints `n` lines, added to the real app in a child process.
_PRINTER = """
import sys
import typer
from clipengine.cli.app import app, main

@app.command("lines")
def lines(n: int) -> None:
    for i in range(n):
        typer.echo(f"line {i}")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
"""


def test_stdout_closed_by_its_reader_is_a_quiet_exit_141() -> None:
    """`clipengine ... | head -1`: what the shell reports for `yes | head -1`, and no message."""
    # 2 MB: far more than a pipe holds, so the writes meet the closed pipe.
    command = [sys.executable, "-c", _PRINTER, "lines", "200000"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as writer:
        assert writer.stdout is not None and writer.stderr is not None
        head = subprocess.run(
            ["head", "-1"], stdin=writer.stdout, capture_output=True, timeout=120, check=True
        )
        writer.stdout.close()
        err = writer.stderr.read()
        assert (head.stdout, writer.wait(timeout=120), err) == (b"line 0\n", EXIT_STDOUT_CLOSED, b"")


def test_stdout_closed_before_buffered_output_is_flushed_is_quiet_too() -> None:
    # A few lines stay in the buffer until exit; the reader is gone before the child has even started,
    # so the final flush meets the closed pipe (was "Exception ignored ... BrokenPipeError", exit 120).
    command = [sys.executable, "-c", _PRINTER, "lines", "3"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as writer:
        assert writer.stdout is not None
        writer.stdout.close()
        _, err = writer.communicate(timeout=120)
        assert (writer.returncode, err) == (EXIT_STDOUT_CLOSED, b"")


def test_a_broken_pipe_inside_a_command_is_an_error_line(  # type: ignore[no-untyped-def]
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """click turned every EPIPE into a silent exit 1, so a dead worker's pipe looked like `| head`."""

    def dead_worker(opts: model_options.ModelOptions) -> None:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(model_options, "load_clip", dead_worker)
    stdout = sys.stdout
    args = ["embed", str(folder), "-o", str(tmp_path / "out"), "--workers", "0", "--no-progress"]
    assert main(args) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: Broken pipe: a pipe or connection clipengine was writing to had closed (a worker process "
        "ended?) (run with -v for the traceback)"
    ]
    assert sys.stdout is stdout  # not swapped for click's PacifyFlushWrapper
    with pytest.raises(BrokenPipeError):
        main(["-v", *args])


def test_log_lines_escape_control_characters_but_keep_tracebacks() -> None:
    """Log messages name files: a newline in a file name split a log line into a second line that
    read as a log record of its own, and a terminal escape reached the terminal raw."""
    import logging

    from clipengine.cli.app import _PrintableFormatter

    fmt = _PrintableFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("clipengine.x", logging.WARNING, __file__, 1, "skipped %s", ("a\nb\x1b[2J.jpg",), None)
    assert fmt.format(record) == "WARNING clipengine.x: skipped a\\nb\\x1b[2J.jpg"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("clipengine.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = fmt.format(failed).splitlines()
    assert lines[0] == "ERROR clipengine.x: failed" and lines[1].startswith("Traceback") and len(lines) > 2
