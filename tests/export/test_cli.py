"""`clipengine export`: option parsing, progress lines and the parity summary table."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from clipengine.cli.app import app
from clipengine.cli.export import parse_batches, parse_precisions


def test_parse_options() -> None:
    assert parse_precisions("fp16, int8,fp16") == ["fp16", "int8"]
    assert parse_batches("32,1,8,8") == [1, 8, 32]
    with pytest.raises(typer.BadParameter, match="fp32, fp16, int8"):
        parse_precisions("fp32,int4")
    with pytest.raises(typer.BadParameter, match="positive"):
        parse_batches("0,4")
    with pytest.raises(typer.BadParameter, match="comma list"):
        parse_batches("a")


def test_bad_precision_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", "ViT-B-32", "-o", str(tmp_path), "--precision", "int4"])
    assert result.exit_code == 2 and "int4" in result.output


@pytest.mark.parametrize(
    ("option", "exists"), [("--output", True), ("--sample-dir", True), ("--sample-dir", False)]
)
def test_bad_output_or_sample_dir_is_a_usage_error(tmp_path: Path, tiny_model, tiny_config, monkeypatch, option: str, exists: bool) -> None:  # type: ignore[no-untyped-def]
    """A file where a folder belongs, or a missing sample folder: exit 2 naming it, not a traceback."""
    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.models import load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: load.LoadedModel(
        tiny_model, tiny_config, PreprocessConfig(image_size=32), "tiny-vit", None, "mem"))
    path = tmp_path / "given"
    if exists:
        path.write_text("a file, not a folder")
    args = {"--output": str(tmp_path / "out"), option: str(path)}
    result = CliRunner().invoke(app, ["export", "tiny-vit", "--dynamic", *[x for kv in args.items() for x in kv]])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "given" in result.output and not (tmp_path / "out").exists()


def test_export_command_prints_progress_and_summary(tmp_path: Path, tiny_model, tiny_config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from clipengine.cli import downloads
    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.models import load

    seen = {}

    def fake_load_model(name_or_path, pretrained=None, *, allow_download=False, arch=None):  # type: ignore[no-untyped-def]
        seen.update(name=str(name_or_path), pretrained=pretrained, allow_download=allow_download)
        return load.LoadedModel(tiny_model, tiny_config, PreprocessConfig(image_size=32), "tiny-vit", "test", "mem")

    def fake_fetch(name: str, pretrained: str | None = None) -> None:  # the CLI's download, with its bar
        seen.update(fetched=(name, pretrained))

    monkeypatch.setattr(load, "load_model", fake_load_model)
    monkeypatch.setattr(downloads, "fetch_with_progress", fake_fetch)
    out = tmp_path / "models" / "tiny"
    result = CliRunner().invoke(app, ["export", "tiny-vit", "-o", str(out), "--pretrained", "test",
                                      "--precision", "fp32,int8", "--dynamic", "--download"])
    assert result.exit_code == 0, result.output
    assert seen == {"name": "tiny-vit", "pretrained": "test", "allow_download": True, "fetched": ("tiny-vit", "test")}
    lines = result.output.splitlines()
    assert any(line.startswith("exported image dynamic batch") for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("engine"))
    table = lines[header + 1 :]
    assert len(table) == 4 and all(line.rstrip().endswith("yes") for line in table)
    assert any("text_int8_dyn.onnx" in line and "int8/dynamic" in line for line in table)
    assert (out / "manifest.json").is_file()


def test_a_missing_export_tool_is_named_before_the_download_and_load(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Without onnxruntime (needed by the parity check) the export failed only after the model had
    been downloaded and loaded."""
    import sys

    from clipengine.cli import downloads
    from clipengine.cli.app import main
    from clipengine.models import load

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    called: list[str] = []
    monkeypatch.setattr(load, "load_model", lambda *a, **k: called.append("load"))
    monkeypatch.setattr(downloads, "fetch_with_progress", lambda *a, **k: called.append("download"))
    assert main(["export", "ViT-B-32", "-o", str(tmp_path / "out"), "--dynamic", "--download"]) == 1
    err = capsys.readouterr().err
    assert called == [] and err.startswith('error: onnxruntime is not installed: pip install "clipengine[onnx]"')
    assert not (tmp_path / "out").exists()


def test_summary_shows_openvino_parity_and_flags_a_failure() -> None:
    from clipengine.cli.export import format_summary
    from clipengine.export.manifest import EngineInfo, Manifest, Parity

    def parity(cos: float, ok: bool = True) -> Parity:
        return Parity(max_abs=1e-3, min_cos=cos, bound={"min_cos": 0.99}, passed=ok, samples=8)

    engines = [
        EngineInfo("image", "fp32", None, "image_fp32_dyn.onnx", "0", [], [], parity=parity(1.0),
                   runtime_parity={"openvino": parity(1.0), "openvino-bf16": parity(0.99995)}),
        EngineInfo("image", "int8", None, "image_int8_dyn.onnx", "0", [], [], quantization="static",
                   parity=parity(0.9996), runtime_parity={"openvino": parity(0.95, ok=False)}),
        EngineInfo("text", "fp32", None, "text_fp32_dyn.onnx", "0", [], [], parity=parity(1.0)),
    ]
    manifest = Manifest(model="m", pretrained=None, architecture={}, preprocess={}, context_length=77,
                        logit_scale=100.0, embed_dim=8, image_size=32, engines=engines)
    lines = format_summary(manifest).splitlines()
    assert "openvino min-cos" in lines[0]
    assert "1.000000 / bf16 0.999950" in lines[1]
    assert "0.950000!" in lines[2]
    assert lines[3].split()[-2:] == ["-", "yes"]


def test_sample_and_calibration_dirs_skip_hidden_and_non_image_files(tmp_path: Path, tiny_model, tiny_config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Both folders are listed as `embed` lists one: recursively, without hidden files (macOS `._x.jpg`)
    or files that are not images (a README), which the export would otherwise fail to decode."""
    import numpy as np
    from PIL import Image

    from clipengine.export.manifest import read_manifest
    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.models import load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: load.LoadedModel(
        tiny_model, tiny_config, PreprocessConfig(image_size=32), "tiny-vit", None, "mem"))
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / name)
    (images / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (images / "README.txt").write_text("photos for calibration")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "tiny-vit", "-o", str(out), "--dynamic", "--precision", "int8",
                                      "--calibration-dir", str(images), "--sample-dir", str(images)])
    assert result.exit_code == 0, (result.output, result.exception)
    image_engine = next(e for e in read_manifest(out).engines if e.tower == "image")
    assert image_engine.quantization == "static"
    assert image_engine.parity is not None
    assert image_engine.parity.samples == 4 + 3 + 4 * 3  # noise, synthetic, 4 views of each of the 3 images
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["export", "tiny-vit", "-o", str(tmp_path / "out2"), "--dynamic",
                                      "--sample-dir", str(empty)])
    assert result.exit_code == 1 and "no images" in str(result.exception)
    assert "hidden files skipped" in str(result.exception) and "leave it out" in str(result.exception)  # the fix
