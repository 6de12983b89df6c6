"""`clipengine models` and `clipengine download` (local file:// and unreachable URLs, no network)."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipengine.cli.app import app, main
from clipengine.models import registry
from clipengine.models.weights import cache_path


def test_models_lists_tags_cache_state_and_cache_root() -> None:
    src = registry.get_source("ViT-B-16", "openai")
    path = cache_path(src)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"placed by hand")
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    # Placed by hand, not checked yet (these bytes would fail OpenAI's SHA-256): not a plain "yes".
    assert any(line.split()[:3] == ["ViT-B-16@openai", "openai", "unchecked"] for line in lines)
    assert "unchecked: present, its SHA-256 not checked yet" in result.stdout
    assert any(line.split()[:3] == ["ViT-B-32@laion2b_s34b_b79k", "open_clip", "no"] for line in lines)
    assert any(line.startswith("tiny-synth@synthetic") for line in lines)
    assert f"Weights cache: {path.parents[2]}" in result.stdout


def _patch_source(monkeypatch: pytest.MonkeyPatch, url: str, sha256: str | None) -> registry.WeightSource:
    src = replace(registry.get_source("RN50", "openai"), url=url, sha256=sha256)
    monkeypatch.setattr(registry, "get_source", lambda arch, tag=None: src)
    return src


def test_download_fetches_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"weights" * 1000
    (tmp_path / "RN50.pt").write_bytes(payload)
    src = _patch_source(monkeypatch, (tmp_path / "RN50.pt").as_uri(), hashlib.sha256(payload).hexdigest())
    result = CliRunner().invoke(app, ["download", "RN50@openai"])
    assert result.exit_code == 0, result.output
    assert cache_path(src).read_bytes() == payload
    assert str(cache_path(src)) in result.stdout


def test_download_offline_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = _patch_source(monkeypatch, f"http://127.0.0.1:{port}/RN50.pt", None)
    assert main(["download", "RN50@openai"]) == 1
    # The whole of stderr is the error line: no empty progress bar is drawn before the connection.
    err_lines = capsys.readouterr().err.splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), err_lines
    assert f"http://127.0.0.1:{port}/RN50.pt" in err_lines[0] and str(cache_path(src)) in err_lines[0]


def test_download_of_a_local_path_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.pt").write_bytes(b"x")
    assert main(["download", str(tmp_path / "m.pt")]) == 1
    assert "nothing to download" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["nosuch", "RN50@nosuchtag"])
def test_download_of_an_unknown_name_prints_only_the_error(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The name is checked before the progress bar is drawn: the one-line error is all the output."""
    assert main(["download", name]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and out.err.count("\n") == 1, out.err


def test_download_option_of_a_command_shows_the_progress_bar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--download` on predict (embed, eval...) loaded through `load` alone: no bar for minutes."""
    payload = b"not really weights" * 1000
    (tmp_path / "RN50.pt").write_bytes(payload)
    src = _patch_source(monkeypatch, (tmp_path / "RN50.pt").as_uri(), hashlib.sha256(payload).hexdigest())
    code = main(["predict", "--model", "RN50@openai", "--download", str(tmp_path / "RN50.pt"), "-t", "a", "b"])
    err = capsys.readouterr().err
    assert cache_path(src).read_bytes() == payload  # fetched by the CLI, with its bar:
    assert "RN50@openai: 100%" in err and "17.6k/17.6k" in err, err
    assert code == 1 and err.splitlines()[-1].startswith("error: ")  # then loaded: these bytes are no model
