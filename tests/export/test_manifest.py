"""Manifest round trip, file naming and read errors (atomic writes: tests/test_files.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipengine.errors import BackendError
from clipengine.export.manifest import (
    EngineInfo,
    Manifest,
    Parity,
    TensorSpec,
    engine_file_name,
    projection_file_name,
    read_manifest,
    write_manifest,
)


def _manifest() -> Manifest:
    engine = EngineInfo(
        tower="image", precision="fp16", batch=None, file="image_fp16_dyn.onnx", sha256="ab" * 32,
        inputs=[TensorSpec("pixels", ["batch", 3, 32, 32], "float32")],
        outputs=[TensorSpec("embeddings", ["batch", 32], "float32")],
        parity=Parity(max_abs=1e-4, min_cos=0.9999, bound={"min_cos": 0.999}, passed=True, samples=7),
    )
    fixed = EngineInfo(tower="text", precision="int8", batch=4, file="text_int8_b4.onnx", sha256="cd" * 32,
                       inputs=[], outputs=[], quantization="dynamic")
    return Manifest(model="tiny", pretrained=None, architecture={"embed_dim": 32}, preprocess={"image_size": 32},
                    context_length=77, logit_scale=100.0, embed_dim=32, image_size=32, engines=[engine, fixed])


def test_file_names_follow_the_contract() -> None:
    assert engine_file_name("image", "fp32", 8) == "image_fp32_b8.onnx"
    assert engine_file_name("text", "int8", None) == "text_int8_dyn.onnx"
    assert projection_file_name(512, 512) == "text_projection_512_512.npy"


def test_round_trip_through_json(tmp_path: Path) -> None:
    manifest = _manifest()
    write_manifest(manifest, tmp_path)
    assert read_manifest(tmp_path) == manifest
    assert read_manifest(tmp_path / "manifest.json") == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_select_and_precisions() -> None:
    manifest = _manifest()
    assert manifest.precisions == ["fp16", "int8"]
    assert [e.file for e in manifest.select("text", "int8")] == ["text_int8_b4.onnx"]
    assert manifest.select("image", "fp32") == []


def test_unknown_keys_from_newer_writers_are_ignored(tmp_path: Path) -> None:
    data = _manifest().to_dict()
    data["future_field"] = 1
    data["engines"][0]["future_engine_field"] = "x"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(tmp_path).engines[0].file == "image_fp16_dyn.onnx"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no export manifest"),
        ("{not json", "not a valid clipengine export manifest"),
        (json.dumps({"model": "x"}), "not a valid clipengine export manifest"),
    ],
)
def test_bad_manifests_raise_backend_error(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(BackendError, match=message):
        read_manifest(tmp_path)


def _edited(**changes: object) -> bytes:
    data = _manifest().to_dict()
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    "content",
    [
        b'"a manifest"',
        b"\xff\xfe\x00 binary garbage",
        _edited(format_version="2"),
        _edited(format_version=None),
        _edited(engines=["image_fp32_dyn.onnx"]),
        _edited(engines=[{**_manifest().to_dict()["engines"][0], "runtime_parity": ["openvino"]}]),
    ],
)
def test_damaged_manifests_raise_backend_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(BackendError, match="not a valid clipengine export manifest"):
        read_manifest(tmp_path)


def test_newer_format_asks_for_upgrade(tmp_path: Path) -> None:
    data = _manifest().to_dict()
    data["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BackendError, match="upgrade clipengine"):
        read_manifest(tmp_path)


def _without(key: str, engine_key: str | None = None) -> dict[str, object]:
    data = _manifest().to_dict()
    if engine_key is None:
        del data[key]
    else:
        del data["engines"][0][engine_key]
        if key:
            del data["engines"][0]["parity"][key]
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_without("model"), r"\(the manifest lacks 'model'\); re-export it"),
        (_without("", engine_key="sha256"), r"\(engine 'image_fp16_dyn.onnx' lacks 'sha256'\)"),
        (_without("passed", engine_key="tower"), r"\(engine 'image_fp16_dyn.onnx' parity lacks 'passed'\)"),
        ({**_manifest().to_dict(), "format_version": 0}, r"format_version must be a positive integer, got 0"),
        ({**_manifest().to_dict(), "format_version": True}, r"must be a positive integer, got True"),
    ],
)
def test_missing_fields_and_older_formats_are_named(
    tmp_path: Path, data: dict[str, object], message: str
) -> None:
    """A missing field was reported as `Manifest.__init__() missing 1 required positional argument`,
    and format_version 0 / true (no clipengine writes them) were read as the current format."""
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BackendError, match=message):
        read_manifest(tmp_path)
