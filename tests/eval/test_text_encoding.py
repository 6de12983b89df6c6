"""Class-name, prompt, class-map and labels files saved as Latin-1 / cp1252 ("café" as the byte 0xE9),
and class names that are not UTF-8 (a class folder named in Latin-1): refused with the file, line and
byte offset (or the name and byte) and the fix, never embedded with replacement characters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipengine.cli.app import main
from clipengine.errors import DatasetError, InputError
from clipengine.eval import datasets, folders, synthetic
from clipengine.zeroshot import class_embeddings

TINY_SYNTH = Path(__file__).resolve().parents[2] / "src" / "clipengine" / "weights" / "tiny-synth"
PROMPTS = '{"classes": ["dog",\n "café"],\n "templates": ["a photo of a {}."]}'  # é: line 2, char 27


def _two_images(root: Path) -> None:
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(root / name)


def _not_utf8(path: Path, line: int, offset: int) -> str:
    return f"{path}: line {line}: byte 0xE9 at offset {offset} is not UTF-8"


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_prompts_file_in_cp1252_names_line_offset_and_fix(tmp_path: Path, bom: bytes) -> None:
    path = tmp_path / "prompts.json"
    path.write_bytes(bom + PROMPTS.encode("cp1252"))
    with pytest.raises(DatasetError) as caught:
        datasets.prompt_set("x", path)
    assert str(caught.value).startswith(_not_utf8(path, 2, len(bom) + PROMPTS.index("é")))
    assert str(caught.value).endswith("save it as UTF-8")


def test_prompts_file_in_utf8_reads_the_names_as_written(tmp_path: Path) -> None:
    path = tmp_path / "prompts.json"
    path.write_bytes(b"\xef\xbb\xbf" + PROMPTS.encode("utf-8"))
    assert datasets.prompt_set("x", path) == (["dog", "café"], ["a photo of a {}."])


def test_classnames_json_in_cp1252_is_refused(tmp_path: Path) -> None:
    _two_images(tmp_path)
    (tmp_path / "labels.txt").write_text("a.png 0\nb.png 1\n")
    names = json.dumps(["dog", "café"], ensure_ascii=False)
    (tmp_path / "classnames.json").write_bytes(names.encode("cp1252"))
    with pytest.raises(DatasetError) as caught:
        folders.load_flat_folder(tmp_path, "labels.txt")
    assert str(caught.value).startswith(_not_utf8(tmp_path / "classnames.json", 1, names.index("é")))


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [("labels.txt", "a.png 0\r\ncafé.png 1\n", 2), ("labels.json", '{"a.png": 0,\n"café.png": 1}', 2)],
)
def test_labels_file_in_cp1252_is_refused(tmp_path: Path, name: str, text: str, line: int) -> None:
    """The labels file was read strictly before too, but refused as "expected '<file name> <int label>'
    lines" (or "not valid JSON"): the user looked for a format error that was not there."""
    _two_images(tmp_path)
    (tmp_path / name).write_bytes(text.encode("cp1252"))
    with pytest.raises(DatasetError) as caught:
        folders.load_flat_folder(tmp_path, name, ["x", "y"])
    assert str(caught.value).startswith(_not_utf8(tmp_path / name, line, text.index("é")))


def test_class_map_in_cp1252_is_refused(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / folder / "i.png")
    class_map = tmp_path / "map.json"
    mapping = '{"a": "dog", "b": "café"}'
    class_map.write_bytes(mapping.encode("cp1252"))
    with pytest.raises(DatasetError) as caught:
        datasets.load_dataset("folder", tmp_path, class_map=class_map)
    assert str(caught.value).startswith(_not_utf8(class_map, 1, mapping.index("é")))


@pytest.mark.parametrize(
    ("labels", "templates", "match"),
    [
        (["dog", "caf\udce9"], None, r"label \[1\] 'caf\\udce9' is not UTF-8 text: byte 0xE9 at character 3"),
        (["dog"], ["a {}", "\udce9t\udce9 {}"], r"template \[1\] .* byte 0xE9 at character 0"),
        (["x\ud83d"], None, r"label \[0\] .* lone surrogate U\+D83D at character 1"),
    ],
)
def test_class_embeddings_refuse_text_that_is_not_utf8(
    labels: list[str], templates: list[str] | None, match: str
) -> None:
    """Lone surrogates (bytes Python could not decode) became U+FFFD in the tokenizer, silently."""
    encoded: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        encoded.append(texts)
        return np.ones((len(texts), 4), dtype=np.float32)

    with pytest.raises(InputError, match=match):
        class_embeddings(encode, labels, templates)
    assert encoded == []  # refused before anything was embedded


@pytest.mark.skipif(not (TINY_SYNTH / "model.safetensors").is_file(), reason="tiny-synth weights not generated")
def test_eval_of_a_class_folder_named_in_latin1_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    synthetic.write_imagefolder(root, synthetic.generate(20, seed=5, task="shape", image_size=32))
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    os.rename(first, os.fsencode(root) + b"/caf\xe9")
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(root), "-m", str(TINY_SYNTH)]
    code = main([*args, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "label [0] 'caf\\udce9' is not UTF-8 text: byte 0xE9" in err
    assert "Traceback" not in err
