"""Manifest round trip, file naming, atomic writes and read errors."""

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
    atomic_path,
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


def test_atomic_path_keeps_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o044  # readable by others like any normal file, not mkstemp's 0600


def test_atomic_path_gives_plain_open_permissions_without_touching_the_umask(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The umask is read, not set to 0 and back: that is process-wide, so a file another thread
    creates in between would get 0o666 / 0o777 permissions."""
    import os

    from clipengine.export import manifest as manifest_module

    def modes(name: str) -> tuple[int, int]:
        with open(tmp_path / f"{name}.plain", "w") as f:
            f.write("x")
        with atomic_path(tmp_path / f"{name}.atomic") as tmp:
            tmp.write_text("x")
        return ((tmp_path / f"{name}.plain").stat().st_mode & 0o777, (tmp_path / f"{name}.atomic").stat().st_mode & 0o777)

    plain, atomic = modes("default")
    assert atomic == plain
    old = os.umask(0o027)
    try:
        plain, atomic = modes("strict")
    finally:
        os.umask(old)
    assert atomic == plain == 0o640

    if not os.access("/proc/self/status", os.R_OK):
        pytest.skip("no /proc/self/status here: the set-and-restore fallback is used (once)")

    def no_umask(mask: int) -> int:
        raise AssertionError("os.umask called: it changes the umask of every thread")

    real = os.umask(0o022)
    os.umask(real)
    monkeypatch.setattr(os, "umask", no_umask)
    plain, atomic = modes("read")
    assert atomic == plain
    assert manifest_module._umask() == real


def test_umask_fallback_sets_and_restores_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Without /proc/self/status the umask is read by setting it and back, at most once per process."""
    import os

    from clipengine.export import manifest as manifest_module

    real = os.umask(0o022)
    os.umask(real)
    calls = []
    original = os.umask

    def counted(mask: int) -> int:
        calls.append(mask)
        return original(mask)

    monkeypatch.setattr(manifest_module, "_UMASK_STATUS", "/nonexistent/status")
    monkeypatch.setattr(os, "umask", counted)
    manifest_module._umask_by_setting.cache_clear()
    try:
        assert manifest_module._umask() == real
        assert manifest_module._umask() == real
    finally:
        manifest_module._umask_by_setting.cache_clear()
    assert calls == [0, real]  # one set-and-restore, then cached
