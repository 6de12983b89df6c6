"""Export options that a combination would ignore are refused, not dropped without a word.

`--dynamic --image-batch 4,8` built dynamic engines only, the user believing they had b4 and b8;
`--calibration-dir` without int8, `--sample-dir` with `--no-verify` and export options beside
`--verify FOLDER` were dropped the same way. Each is now a usage error (exit 2) raised before the
model loads or the output folder is made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipengine.cli.app import app


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused combination must fail before the (slow) model load."""
    from clipengine.models import load

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for an export that should have been refused")

    monkeypatch.setattr(load, "load_model", refuse)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--dynamic", "--image-batch", "4,8"], ["--image-batch", "--dynamic"]),
        (["--image-batch", "4,8", "--dynamic"], ["--image-batch", "--dynamic"]),
        (["--dynamic", "--text-batch", "2"], ["--text-batch", "--dynamic"]),
        # The default's own value, given explicitly, is still a request for fixed batches.
        (["--dynamic", "--image-batch", "1,8,16,32"], ["--image-batch", "--dynamic"]),
        (["--calibration-dir", "{images}"], ["--calibration-dir", "--precision fp32", "int8"]),
        (["--calibration-dir", "{images}", "--precision", "fp16,int8w"], ["--calibration-dir", "fp16,int8w"]),
        (["--sample-dir", "{images}", "--no-verify"], ["--sample-dir", "--no-verify"]),
    ],
)
def test_an_option_the_export_would_ignore_is_a_usage_error(
    tmp_path: Path, images: Path, no_model_load: None, extra: list[str], named: list[str]
) -> None:
    out = tmp_path / "out"
    args = ["export", "tiny-vit", "-o", str(out), *[a.format(images=images) for a in extra]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    message = " ".join(result.output.split())  # rich wraps the usage panel
    for part in named:
        assert part in message, message
    assert not out.exists()


@pytest.mark.parametrize(
    "extra",
    [["--precision", "fp16"], ["--dynamic"], ["--image-batch", "1"], ["--no-verify", "--sample-dir", "{images}"]],
)
def test_export_options_beside_verify_are_refused(tmp_path: Path, images: Path, extra: list[str]) -> None:
    """`--verify FOLDER` builds nothing: `--precision fp16` there read as if fp16 engines were checked."""
    folder = tmp_path / "export"
    folder.mkdir()
    result = CliRunner().invoke(app, ["export", "--verify", str(folder), *[a.format(images=images) for a in extra]])
    assert result.exit_code == 2, (result.output, result.exception)
    message = " ".join(result.output.split())
    assert "builds none" in message
    assert all(flag in message for flag in extra if flag.startswith("--")), message


def test_the_options_that_are_used_still_export(tmp_path: Path, tiny_model, tiny_config, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Fixed batches without --dynamic, and --dynamic with the batch options left at their defaults."""
    from clipengine.export.manifest import read_manifest
    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.models import load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: load.LoadedModel(
        tiny_model, tiny_config, PreprocessConfig(image_size=32), "tiny-vit", None, "mem"))
    runs = {
        "fixed": ["--image-batch", "2", "--text-batch", "3", "--no-verify"],
        "dynamic": ["--dynamic", "--no-verify"],
    }
    for name, extra in runs.items():
        result = CliRunner().invoke(app, ["export", "tiny-vit", "-o", str(tmp_path / name), *extra])
        assert result.exit_code == 0, (result.output, result.exception)
    batches = {name: {(e.tower, e.batch) for e in read_manifest(tmp_path / name).engines} for name in runs}
    assert batches == {"fixed": {("image", 2), ("text", 3)}, "dynamic": {("image", None), ("text", None)}}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"calibration_images": "{images}", "precisions": ("fp32", "int8w")}, r"calibration_images .* fp32, int8w hold none"),
        ({"sample_images_from": "{images}", "verify": False}, r"sample_images_from .* verify=False"),
    ],
)
def test_export_model_refuses_images_it_would_not_use(tmp_path: Path, tiny_model, images: Path, kwargs: dict[str, object], message: str) -> None:  # type: ignore[no-untyped-def]
    from clipengine.export.onnx import export_model

    given = {k: images if v == "{images}" else v for k, v in kwargs.items()}
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        export_model(tiny_model, out, image_batches=None, text_batches=None, **given)  # type: ignore[arg-type]
    assert not out.exists()


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((0, 3, 32, 32), np.float32), r"shape \(0, 3, 32, 32\); expected \(N, 3, 32, 32\)"),
        (np.zeros((4, 3, 64, 64), np.float32), r"shape \(4, 3, 64, 64\)"),
        (np.zeros((4, 32, 32, 3), np.float32), r"shape \(4, 32, 32, 3\)"),
        (np.zeros((4, 3, 32, 32), np.uint8), r"dtype uint8"),
        (np.where(np.arange(4)[:, None, None, None] == 2, np.nan, np.zeros((4, 3, 32, 32))), r"rows \[2\] hold NaN"),
        ([], r"no images given"),
    ],
)
@pytest.mark.parametrize("image_batches", [None, (2,)])
def test_bad_calibration_pixels_are_refused_naming_the_argument(tmp_path: Path, tiny_model, pixels: object, message: str, image_batches: tuple[int] | None) -> None:  # type: ignore[no-untyped-def]
    """Zero rows calibrated a fixed-batch int8 engine on zeros (np.resize of nothing) and failed in
    ORT's calibration reader for a dynamic one; other shapes failed in ORT after the fp32 export."""
    from clipengine.export.onnx import export_model

    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"calibration_images: {message}"):
        export_model(tiny_model, out, precisions=("int8",), image_batches=image_batches, text_batches=None,
                     calibration_images=pixels, verify=False)  # type: ignore[arg-type]
    assert not out.exists()


def test_a_preprocess_cfg_for_another_image_size_is_refused(tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """It failed in the model's forward ("size of tensor a (65) must match ... (17)"), naming nothing."""
    from clipengine.export.onnx import export_model
    from clipengine.image.preprocess import PreprocessConfig

    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"preprocess_cfg.image_size=64, but the model takes 32 px images"):
        export_model(tiny_model, out, image_batches=(1,), text_batches=(4,), preprocess_cfg=PreprocessConfig(image_size=64))
    assert not out.exists()
