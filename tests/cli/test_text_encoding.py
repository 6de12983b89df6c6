"""Texts that are not UTF-8 (a Latin-1 class list passed as `--text $(cat classes.txt)`, a query typed
in a Latin-1 script) reach Python as lone surrogates ("caf\\udce9"); the tokenizer's cleanup made them
U+FFFD without a word. `predict` and `search` refuse them, naming the text and the byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipengine.cli import model_options
from clipengine.cli.app import main
from clipengine.index import Index
from clipengine.models.clip import CLIP
from clipengine.models.saving import save_model

LATIN1_CAFE = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of the argv bytes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: CLIP) -> Path:
    return save_model(tiny_model, tmp_path_factory.mktemp("encoding") / "tiny")


def test_predict_refuses_a_text_that_is_not_utf8(
    checkpoint: Path, clip_png: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["predict", str(clip_png), "--text", "a dog", LATIN1_CAFE, "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "--text [1] 'caf\\udce9' is not UTF-8 text: byte 0xE9 at character 3" in err
    assert "save the file, script or folder name it came from as UTF-8" in err
    assert "Traceback" not in err


def test_predict_takes_utf8_text(checkpoint: Path, clip_png: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["predict", str(clip_png), "--text", "a dog", "café", "--checkpoint", str(checkpoint)])
    out = capsys.readouterr().out
    assert code == 0
    assert "Text: café, Similarity:" in out


def test_search_refuses_a_query_that_is_not_utf8_before_loading_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_model(*args: object) -> None:
        raise AssertionError("a model was loaded for a query that is refused")

    monkeypatch.setattr(model_options, "load_clip", no_model)
    vectors = np.eye(3, 8, dtype=np.float32)
    Index.build(["a.jpg", "b.jpg", "c.jpg"], vectors, model="tiny-synth").save(tmp_path / "x.index")
    code = main(["search", str(tmp_path / "x.index"), LATIN1_CAFE])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "the query [0] 'caf\\udce9' is not UTF-8 text: byte 0xE9" in err
