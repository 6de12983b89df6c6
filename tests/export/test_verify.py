"""Parity measurement, bounds and the failure message; verification samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipengine.errors import ExportParityError
from clipengine.export.manifest import EngineInfo
from clipengine.export.verify import (
    BOUNDS,
    calibration_texts,
    measure_parity,
    raise_on_failures,
    sample_images,
    sample_texts,
)


def test_bounds_are_the_documented_ones() -> None:
    assert BOUNDS == {"fp32": {"max_abs": 1e-4}, "fp16": {"min_cos": 0.999}, "int8": {"min_cos": 0.99},
                      "int8w": {"min_cos": 0.99}, "bf16": {"min_cos": 0.999}}


def test_measure_parity_on_normalised_rows() -> None:
    ref = np.eye(4, dtype=np.float32)
    p = measure_parity(ref * 3.0, ref, "fp32")  # scale does not matter: rows are normalised first
    assert p.passed and p.max_abs == 0.0 and p.min_cos == pytest.approx(1.0)
    tilted = ref + np.float32(0.2) * np.roll(ref, 1, axis=1)
    p = measure_parity(tilted, ref, "fp16")
    assert not p.passed and p.min_cos == pytest.approx(1 / np.sqrt(1.04), rel=1e-6)
    assert measure_parity(tilted, ref, "int8").passed is False
    assert measure_parity(ref + np.float32(0.01) * np.roll(ref, 1, axis=1), ref, "int8").passed


def test_non_finite_output_fails() -> None:
    ref = np.eye(3, dtype=np.float32)
    bad = ref.copy()
    bad[1, 1] = np.nan
    p = measure_parity(bad, ref, "fp16")
    assert not p.passed and np.isnan(p.min_cos)


def test_failure_message_names_engine_measured_value_and_bound(tmp_path: Path) -> None:
    ref = np.eye(3, dtype=np.float32)
    bad = measure_parity(ref + np.float32(0.5) * np.roll(ref, 1, axis=1), ref, "int8")
    good = measure_parity(ref, ref, "fp32")
    engines = [
        EngineInfo("image", "int8", 8, "image_int8_b8.onnx", "x", [], [], parity=bad),
        EngineInfo("text", "fp32", 4, "text_fp32_b4.onnx", "y", [], [], parity=good),
    ]
    with pytest.raises(ExportParityError) as info:
        raise_on_failures(engines, tmp_path)
    message = str(info.value)
    assert "image_int8_b8.onnx: max-abs" in message and f"min cosine {bad.min_cos:.6f}" in message
    assert "needs cosine >= 0.99" in message and "text_fp32_b4" not in message
    raise_on_failures(engines[1:], tmp_path)  # nothing failed: no error


def test_sample_images_mix_noise_synthetic_and_views(clip_png: Path) -> None:
    from clipengine.image.preprocess import PreprocessConfig

    cfg = PreprocessConfig(image_size=32)
    plain = sample_images(cfg)
    with_png = sample_images(cfg, [clip_png])
    assert plain.shape == (7, 3, 32, 32) and with_png.shape == (11, 3, 32, 32)
    assert plain.dtype == np.float32 and np.isfinite(with_png).all()
    np.testing.assert_array_equal(sample_images(cfg), plain)  # deterministic


def test_sample_and_calibration_texts_differ_and_end_with_eot() -> None:
    samples, calibration = sample_texts(), calibration_texts(n=16)
    assert samples.shape == (8, 77) and calibration.shape == (16, 77)
    assert (samples.argmax(-1) > 0).all() and (samples.max(-1) == 49407).all()
    assert not {tuple(r) for r in samples} & {tuple(r) for r in calibration}


def test_verify_folder_and_cli_report_a_tampered_or_missing_file(
    vit_dynamic_split_export, scratch_copy, capsys
) -> None:  # type: ignore[no-untyped-def]
    """`clipengine export --verify FOLDER` re-checks every listed file's SHA-256 (there was no way to
    check a copied or downloaded export short of loading it with verify_files=True)."""
    from clipengine.cli.app import main
    from clipengine.export.verify import verify_folder

    folder = scratch_copy(vit_dynamic_split_export[0])
    manifest = vit_dynamic_split_export[1]
    assert verify_folder(folder) == (len(manifest.engines) + 1, [])  # + the text projection
    assert main(["export", "--verify", str(folder)]) == 0
    assert "ok (7 files match their SHA-256; every engine passed parity)" in capsys.readouterr().out

    with open(folder / "image_int8_dyn.onnx", "ab") as f:
        f.write(b"\0")
    (folder / manifest.text_projection["file"]).unlink()
    _, problems = verify_folder(folder)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "SHA-256 differs from the manifest (the engine was changed or is corrupt)",
        "text projection listed in the manifest is missing",
    ]
    assert problems[0].startswith(str(folder / "image_int8_dyn.onnx"))
    assert main(["export", "--verify", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "2 problem(s)" in err
    assert "image_int8_dyn.onnx: SHA-256 differs" in err


def test_export_verify_usage_errors(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from clipengine.cli.app import main

    assert main(["export", "--verify", str(tmp_path), "ViT-B-32"]) == 2  # --verify takes no MODEL
    assert main(["export", "ViT-B-32"]) == 2  # an export needs --output
    assert main(["export", "--verify", str(tmp_path / "missing")]) == 2
    assert main(["export", "--verify", str(tmp_path)]) == 1  # a folder with no manifest
    assert "no export manifest here" in capsys.readouterr().err
