"""What the user sees of a lower-precision path: predict, embed, bench and serve state its deviation from
fp32 (the export's measured parity, or "unmeasured"), and say nothing for fp32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from clipengine.cli.app import main
from clipengine.export.manifest import read_manifest
from clipengine.models.clip import CLIP
from clipengine.models.saving import save_model

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def export_dir(vit_dynamic_int8_export: Path) -> Path:
    """The tiny model as fp32 + int8 dynamic-batch engines, parity measured at export."""
    return vit_dynamic_int8_export


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: CLIP) -> Path:
    return save_model(tiny_model, tmp_path_factory.mktemp("fidelity_ckpt") / "tiny")


@pytest.fixture
def images(tmp_path: Path, clip_png: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(clip_png, folder / name)
    return folder


def _min_cos(export_dir: Path, tower: str, precision: str) -> float:
    parities = [e.parity for e in read_manifest(export_dir).select(tower, precision)]
    assert parities and all(p is not None for p in parities)
    return min(p.min_cos for p in parities if p is not None)


def _expected_note(export_dir: Path) -> str:
    image, text = _min_cos(export_dir, "image", "int8"), _min_cos(export_dir, "text", "int8")
    return f"note: onnx int8 is not fp32: min cosine image {image:.5f}, text {text:.5f} to fp32 (measured at export"


def test_predict_int8_states_the_exports_measured_cosine(
    export_dir: Path, clip_png: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["predict", str(clip_png), "-t", "a", "b", "-m", str(export_dir), "--backend", "onnx"]
    assert main([*args, "--precision", "int8"]) == 0
    out, err = capsys.readouterr()
    assert _expected_note(export_dir) in err and "Filename: CLIP.png" in out and "note" not in out
    assert main([*args, "--precision", "fp32"]) == 0
    assert "note:" not in capsys.readouterr().err  # fp32: nothing to state


def test_predict_torch_bf16_says_unmeasured(
    checkpoint: Path, clip_png: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(clip_png), "-t", "a", "b", "--checkpoint", str(checkpoint), "--precision", "bf16"]) == 0
    err = capsys.readouterr().err
    assert "note: torch bf16 is not fp32: deviation from fp32 unmeasured for this model [docs/performance.md" in err


def test_embed_records_the_deviation_in_run_json(
    export_dir: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["embed", str(images), "--workers", "0", "--no-progress", "-m", str(export_dir), "--backend", "onnx"]
    assert main([*base, "-o", str(tmp_path / "int8"), "--precision", "int8"]) == 0
    assert _expected_note(export_dir) in capsys.readouterr().err
    info = json.loads((tmp_path / "int8" / "run.json").read_text())
    towers = info["fidelity"]["towers"]
    assert info["fidelity"]["precision"] == "int8" and info["status"] == "complete"
    assert towers["image"]["min_cos"] == _min_cos(export_dir, "image", "int8")
    assert towers["text"]["min_cos"] == _min_cos(export_dir, "text", "int8")
    assert main([*base, "-o", str(tmp_path / "int8"), "--precision", "int8"]) == 0  # finished: no model loaded
    assert _expected_note(export_dir) in capsys.readouterr().err  # the deviation recorded, stated again
    assert json.loads((tmp_path / "int8" / "run.json").read_text())["fidelity"] == info["fidelity"]
    (tmp_path / "int8" / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "fidelity"}))
    assert main([*base, "-o", str(tmp_path / "int8"), "--precision", "int8"]) == 0  # killed before recording it
    assert _expected_note(export_dir) in capsys.readouterr().err  # described from the options and manifest
    assert json.loads((tmp_path / "int8" / "run.json").read_text())["fidelity"] == info["fidelity"]
    assert main([*base, "-o", str(tmp_path / "fp32"), "--fast-decode", "--json"]) == 0
    info = json.loads((tmp_path / "fp32" / "run.json").read_text())
    assert json.loads(capsys.readouterr().out)["fidelity"] == info["fidelity"]
    assert info["fidelity"]["towers"] is None and info["fidelity"]["decode"]["mode"] == "fast_decode"
    assert main([*base, "-o", str(tmp_path / "fp32"), "--fast-decode"]) == 0  # a resume: same settings
    assert "note: fast_decode is not the exact decode" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "exact")]) == 0
    exact = json.loads((tmp_path / "exact" / "run.json").read_text())
    assert "fidelity" not in exact and exact["precision"] == "fp32"
    assert "note:" not in capsys.readouterr().err
    (tmp_path / "int8" / "shards" / "part-00000.npy").unlink()  # unfinished: a rerun computes it
    assert main([*base, "-o", str(tmp_path / "int8")]) == 1  # at fp32 it would mix the two
    err = capsys.readouterr().err
    assert "precision='int8', but this run uses precision='fp32'" in err and "--precision int8" in err


@pytest.mark.parametrize(("backend", "precision"), [("onnx", "int8"), ("openvino", "bf16"), ("openvino", "int8")])
def test_ray_driver_states_what_the_loaded_backend_would(export_dir: Path, backend: str, precision: str) -> None:
    """On Ray the driver loads no model: the deviation comes from the options and the manifest, the same."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    import clipengine
    from clipengine.cli import model_options as mo

    opts = mo.parse_model_options(str(export_dir), None, None, backend, precision, "cpu", False)
    loaded = clipengine.load(str(export_dir), backend=backend, precision=precision)
    assert mo.run_fidelity(None, opts, fast_decode=True) == mo.run_fidelity(loaded, opts, fast_decode=True)
    assert mo.run_fidelity(None, opts)["towers"]["image"] is not None  # type: ignore[index]


def test_bench_json_carries_the_deviation(
    export_dir: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", str(images), "--batch", "1", "--workers", "0", "--warmup", "0", "-m", str(export_dir)]
    assert main([*args, "--backend", "onnx", "--precision", "int8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fidelity"]["towers"]["image"]["min_cos"] == _min_cos(export_dir, "image", "int8")
    assert main([*args, "--backend", "onnx", "--precision", "int8"]) == 0
    assert _expected_note(export_dir) in capsys.readouterr().out  # under the table
    assert main([*args, "--backend", "onnx", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fidelity"] is None


def _info(model: Any) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from clipengine.serve import create_app

    with TestClient(create_app(model)) as client:
        info: dict[str, Any] = client.get("/v1/info").json()
    return info


def test_serve_info_states_the_deviation(export_dir: Path, tiny_model: CLIP) -> None:
    import clipengine
    from clipengine.api import ClipModel
    from clipengine.backends import create_backend
    from clipengine.image.preprocess import PreprocessConfig

    int8 = _info(clipengine.load(str(export_dir), backend="onnx", precision="int8"))["fidelity"]
    assert int8["precision"] == "int8" and int8["towers"]["text"]["min_cos"] == _min_cos(export_dir, "text", "int8")
    assert _info(clipengine.load(str(export_dir), backend="onnx"))["fidelity"] is None
    import copy

    # A copy: TorchBackend casts the module it is given in place (the session's tiny model stays fp32).
    backend = create_backend("torch", copy.deepcopy(tiny_model), precision="bf16")
    bf16 = ClipModel(backend, PreprocessConfig(image_size=32), "t", 100.0)
    fidelity = _info(bf16)["fidelity"]
    assert fidelity["precision"] == "bf16" and fidelity["measured"] == "unmeasured for this model"
