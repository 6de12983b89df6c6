"""export_model: files, manifest, graph formulation, precisions, split projection, parity failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from clipengine.api import load_export
from clipengine.errors import ExportParityError
from clipengine.export import onnx as onnx_export
from clipengine.export.manifest import file_sha256, read_manifest
from clipengine.export.verify import BOUNDS, sample_texts, verify_folder
from clipengine.text.tokenizer import tokenize

TEXTS = ["a photo of a cat", "a diagram", "a dog", "an illustration of a red bus in the rain", "CLIP"]


def _reference(model, pixels: np.ndarray | None = None, tokens: np.ndarray | None = None) -> np.ndarray:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        if pixels is not None:
            out = model.encode_image(torch.from_numpy(pixels))
        else:
            out = model.encode_text(torch.from_numpy(tokens))
    out = out.numpy()
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def _within(got: np.ndarray, ref: np.ndarray, precision: str) -> None:
    bound = BOUNDS[precision]
    if "max_abs" in bound:
        assert np.abs(got - ref).max() <= bound["max_abs"]
    if "min_cos" in bound:
        assert (got * ref).sum(-1).min() >= bound["min_cos"]


def test_export_writes_engines_named_per_contract(vit_fixed_export) -> None:  # type: ignore[no-untyped-def]
    folder, manifest = vit_fixed_export
    expected = {
        f"{tower}_{p}_b{b}.onnx"
        for p in ("fp32", "fp16", "int8")
        for tower, batches in (("image", (1, 4)), ("text", (4,)))
        for b in batches
    }
    assert {e.file for e in manifest.engines} == expected
    assert expected | {"manifest.json"} == {p.name for p in folder.iterdir()}  # no temp files left


def test_manifest_records_model_preprocess_and_tools(vit_fixed_export, tiny_config) -> None:  # type: ignore[no-untyped-def]
    folder, _ = vit_fixed_export
    data = json.loads((folder / "manifest.json").read_text())
    for key in ("model", "pretrained", "architecture", "preprocess", "context_length", "logit_scale",
                "embed_dim", "engines", "tool_versions"):
        assert key in data
    assert (data["model"], data["pretrained"], data["embed_dim"], data["context_length"]) == ("tiny-vit", "test", 32, 77)
    assert data["architecture"] == tiny_config.to_dict()
    assert data["preprocess"]["image_size"] == 32
    assert data["logit_scale"] == pytest.approx(100.0, rel=1e-3)  # exp(4.6052)
    assert {"torch", "onnx", "onnxruntime"} <= set(data["tool_versions"])
    engine = next(e for e in data["engines"] if e["file"] == "image_fp32_b4.onnx")
    assert engine["inputs"] == [{"name": "pixels", "shape": [4, 3, 32, 32], "dtype": "float32"}]
    assert engine["outputs"] == [{"name": "embeddings", "shape": [4, 32], "dtype": "float32"}]


def test_manifest_sha256_matches_every_file(vit_fixed_export, vit_dynamic_split_export) -> None:  # type: ignore[no-untyped-def]
    for folder, manifest in (vit_fixed_export, vit_dynamic_split_export):
        for engine in manifest.engines:
            assert file_sha256(folder / engine.file) == engine.sha256
        assert read_manifest(folder) == manifest
    folder, manifest = vit_dynamic_split_export
    assert manifest.text_projection is not None
    assert file_sha256(folder / manifest.text_projection["file"]) == manifest.text_projection["sha256"]


def test_every_engine_passes_its_parity_bound(vit_fixed_export, vit_dynamic_split_export, resnet_static_export) -> None:  # type: ignore[no-untyped-def]
    for _, manifest in (vit_fixed_export, vit_dynamic_split_export, resnet_static_export):
        for engine in manifest.engines:
            p = engine.parity
            assert p is not None and p.passed, engine.file
            assert p.bound == BOUNDS[engine.precision]
            assert p.samples >= 7


def test_text_graph_pools_with_argmax_on_int32(vit_fixed_export) -> None:  # type: ignore[no-untyped-def]
    """ArgMax on int64 has no kernel on ORT CUDA / TensorRT: the EOT argmax must see int32."""
    folder, _ = vit_fixed_export
    graph = onnx.load(str(folder / "text_fp32_b4.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    argmaxes = [n for n in graph.node if n.op_type == "ArgMax"]
    assert len(argmaxes) == 1
    cast = producers[argmaxes[0].input[0]]
    assert cast.op_type == "Cast"
    assert onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.INT32


def test_split_text_graph_has_no_pooling_and_outputs_token_states(vit_dynamic_split_export) -> None:  # type: ignore[no-untyped-def]
    folder, manifest = vit_dynamic_split_export
    text = manifest.select("text", "fp32")[0]
    assert text.split_projection and text.outputs[0].name == "token_states"
    # dynamic folders: symbolic batch and length (the backend truncates after the last EOT)
    assert text.inputs[0].shape == ["batch", "length"] and text.outputs[0].shape[1:] == ["length", 64]
    graph = onnx.load(str(folder / text.file)).graph
    assert not [n for n in graph.node if n.op_type in ("ArgMax", "GatherND")]
    assert (folder / "text_projection_64_32.npy").is_file()


def test_fp16_engines_keep_float32_io_and_finite_weights(vit_fixed_export) -> None:  # type: ignore[no-untyped-def]
    folder, manifest = vit_fixed_export
    for engine in manifest.engines:
        if engine.precision != "fp16":
            continue
        model = onnx.load(str(folder / engine.file))
        assert {i.dtype for i in engine.inputs + engine.outputs} <= {"float32", "int64"}
        halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
        assert halves
        assert all(np.isfinite(onnx.numpy_helper.to_array(t)).all() for t in halves)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("export", ["vit_fixed_export", "vit_dynamic_split_export", "resnet_static_export"])
def test_round_trip_export_load_encode(export: str, precision: str, request, clip_png: Path) -> None:  # type: ignore[no-untyped-def]
    folder, _ = request.getfixturevalue(export)
    model = request.getfixturevalue("tiny_resnet_model" if export == "resnet_static_export" else "tiny_model")
    clip = load_export(folder, precision=precision)
    pixels = np.stack([clip.preprocess(clip_png)] + [clip.preprocess(clip_png)[:, ::-1].copy()] * 2)
    rng = np.random.default_rng(3)
    pixels = np.concatenate([pixels, rng.standard_normal((4, *pixels.shape[1:])).astype(np.float32)])  # 7 rows
    images = clip.encode_images(pixels)
    texts = clip.encode_texts(TEXTS)
    assert images.dtype == texts.dtype == np.float32
    assert images.shape == (7, 32) and texts.shape == (5, 32)
    _within(images, _reference(model, pixels=pixels), precision)
    _within(texts, _reference(model, tokens=tokenize(TEXTS)), precision)


def test_resnet_int8_is_static_when_calibrated(resnet_static_export) -> None:  # type: ignore[no-untyped-def]
    folder, manifest = resnet_static_export
    int8 = [e for e in manifest.engines if e.precision == "int8"]
    assert {e.quantization for e in int8} == {"static"}
    graph = onnx.load(str(folder / "image_int8_b2.onnx")).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # QDQ format


def test_split_and_unsplit_projection_give_the_same_embeddings(vit_fixed_export, vit_dynamic_split_export) -> None:  # type: ignore[no-untyped-def]
    tokens = sample_texts()
    unsplit = load_export(vit_fixed_export[0]).backend.encode_texts(tokens)
    split = load_export(vit_dynamic_split_export[0]).backend.encode_texts(tokens)
    np.testing.assert_allclose(split, unsplit, atol=1e-5)


def _corrupt_image_engines(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Image engines get noisy weights, so they fail their parity check."""
    real_save = onnx_export.quantize.save_onnx

    def corrupting_save(model, path, threshold=None):  # type: ignore[no-untyped-def]
        if path.name.startswith("image"):
            biggest = max(model.graph.initializer, key=lambda t: t.ByteSize())
            values = onnx.numpy_helper.to_array(biggest)
            noisy = values + np.random.default_rng(0).normal(0, 0.05, values.shape).astype(values.dtype)
            biggest.CopyFrom(onnx.numpy_helper.from_array(noisy, biggest.name))
        return real_save(model, path, threshold)

    monkeypatch.setattr(onnx_export.quantize, "save_onnx", corrupting_save)


def test_corrupted_engine_fails_export_with_measured_value(tmp_path: Path, tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An engine that differs from PyTorch must stop the export, naming the file and the error."""
    _corrupt_image_engines(monkeypatch)
    out = tmp_path / "bad"
    with pytest.raises(ExportParityError, match=r"image_fp32_dyn\.onnx: max-abs [0-9.e-]+.*needs max-abs <= 0\.0001"):
        onnx_export.export_model(tiny_model, out, image_batches=None, text_batches=None)
    assert not (out / "manifest.json").exists()
    assert not (out / "image_fp32_dyn.onnx").exists()  # failed engines never land in the folder
    report = json.loads((out / "parity_report.json").read_text())
    verdicts = {e["file"]: e["parity"]["passed"] for e in report["engines"]}
    assert verdicts == {"image_fp32_dyn.onnx": False, "text_fp32_dyn.onnx": True}


def test_failed_export_never_shows_a_manifest_even_if_killed(tmp_path: Path, tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The parity report of a failed export goes straight to its own name: a crash while it is
    written must not leave a manifest.json listing engines that failed and never landed."""
    _corrupt_image_engines(monkeypatch)

    def crash(self: Path, target: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(Path, "rename", crash)
    out = tmp_path / "bad"
    with pytest.raises((OSError, ExportParityError)):
        onnx_export.export_model(tiny_model, out, image_batches=None, text_batches=None)
    assert not (out / "manifest.json").exists()


def test_a_successful_export_removes_an_earlier_failures_parity_report(tmp_path: Path, tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """parity_report.json describes the failed export that wrote it: once a later export into the
    folder succeeds, it would contradict the manifest beside it."""
    out = tmp_path / "exp"
    with monkeypatch.context() as patched:
        _corrupt_image_engines(patched)
        with pytest.raises(ExportParityError):
            onnx_export.export_model(tiny_model, out, image_batches=None, text_batches=None)
    assert (out / "parity_report.json").is_file()
    onnx_export.export_model(tiny_model, out, image_batches=None, text_batches=None)
    assert (out / "manifest.json").is_file() and not (out / "parity_report.json").exists()


def test_unknown_precision_is_rejected(tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="int4"):
        onnx_export.export_model(tiny_model, tmp_path, precisions=("int4",))


def test_re_export_replaces_engines_of_the_previous_export(tmp_path: Path, tiny_model, scratch_copy, vit_fixed_export) -> None:  # type: ignore[no-untyped-def]
    folder = scratch_copy(vit_fixed_export[0])
    (folder / "notes.txt").write_text("mine")
    onnx_export.export_model(tiny_model, folder, image_batches=None, text_batches=None)
    assert {p.name for p in folder.iterdir()} == {
        "manifest.json", "image_fp32_dyn.onnx", "text_fp32_dyn.onnx", "notes.txt"
    }


@pytest.mark.parametrize("bad_input", ["calibration", "samples"])
def test_bad_calibration_or_sample_images_keep_the_previous_export(tmp_path: Path, tiny_model, bad_input: str) -> None:  # type: ignore[no-untyped-def]
    """Inputs are checked before anything in the folder changes: a failed re-export leaves a usable one."""
    from clipengine.errors import ClipEngineError
    from clipengine.export.manifest import Manifest, write_manifest

    out = tmp_path / "export"
    out.mkdir()
    previous = Manifest(model="tiny-vit", pretrained=None, architecture={}, preprocess={}, context_length=77,
                        logit_scale=100.0, embed_dim=32, image_size=32, engines=[])
    write_manifest(previous, out)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    kwargs = ({"calibration_images": tmp_path / "empty", "precisions": ("int8",)} if bad_input == "calibration"
              else {"sample_images_from": [tmp_path / "bad.png"]})
    with pytest.raises(ClipEngineError):
        onnx_export.export_model(tiny_model, out, image_batches=None, text_batches=None, **kwargs)
    assert read_manifest(out) == previous


def test_image_folders_are_listed_as_embed_lists_them(tmp_path: Path, tiny_model, tiny_config) -> None:  # type: ignore[no-untyped-def]
    """A folder for calibration_images or sample_images_from is walked like `embed` walks one: a macOS
    `._x.jpg` (AppleDouble, not a JPEG), a README and hidden folders are skipped, not decoded."""
    from PIL import Image

    from clipengine.errors import DatasetError
    from clipengine.image.preprocess import PreprocessConfig

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / ".cache").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / name)
    for garbage in ("._x.jpg", "sub/._c.png", ".cache/d.jpg"):
        (images / garbage).write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (images / "README.txt").write_text("photos for calibration")

    pixels = onnx_export._calibration_pixels(str(images), PreprocessConfig(image_size=32))
    assert pixels is not None and pixels.shape == (3, 3, 32, 32)
    manifest = onnx_export.export_model(
        tiny_model, tmp_path / "out", precisions=("int8",), image_batches=None, text_batches=None,
        calibration_images=images, sample_images_from=str(images),
    )
    image_engine = next(e for e in manifest.engines if e.tower == "image")
    assert image_engine.quantization == "static"
    assert image_engine.parity is not None
    assert image_engine.parity.samples == 4 + 3 + 4 * 3  # noise, synthetic, 4 views of each of the 3 images

    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    (empty / "._x.jpg").write_bytes(b"\x00")
    (empty / "notes.txt").write_text("no pictures")
    for kwargs in ({"calibration_images": empty}, {"sample_images_from": empty}):
        name = next(iter(kwargs))
        with pytest.raises(DatasetError, match=rf"{name} {empty}: no images found \(files ending in .*\.jpg.*\)"):
            onnx_export.export_model(tiny_model, tmp_path / "out2", precisions=("int8",), image_batches=None,
                                     text_batches=None, **kwargs)
    with pytest.raises(DatasetError, match=rf"calibration_images {tmp_path / 'missing'}: not a folder"):
        onnx_export.export_model(tiny_model, tmp_path / "out2", precisions=("int8",), image_batches=None,
                                 text_batches=None, calibration_images=tmp_path / "missing")
    assert not (tmp_path / "out2").exists()


@pytest.fixture(scope="module")
def fp32_b1_b4_export(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:  # type: ignore[no-untyped-def]
    """The export that the re-export tests below start from (each on a copy), built once."""
    out = tmp_path_factory.mktemp("fp32_b1_b4") / "export"
    onnx_export.export_model(tiny_model, out, image_batches=(1,), text_batches=(4,), verify=False)
    return out


_KILLED_EXPORT = """
import os, signal, sys
from clipengine.export import onnx as onnx_export, rewrite
from clipengine.models.load import load_model

def killed(*args, **kwargs):  # SIGKILL as the first finished engine is moved into the folder
    os.kill(os.getpid(), signal.SIGKILL)

rewrite.move_files = killed
module = load_model(sys.argv[1]).module
onnx_export.export_model(module, sys.argv[2], image_batches=None, text_batches=None, verify=False)
"""


def test_export_killed_midway_leaves_no_litter_after_the_rerun(tmp_path: Path, tiny_model, fp32_b1_b4_export) -> None:  # type: ignore[no-untyped-def]
    """A SIGKILL mid-export leaves the export before it published and whole (its files keep their
    bytes: the new ones have other names); the rerun removes the killed run's temp folder and the
    engines of the export before it, as an unkilled one would."""
    import signal
    import subprocess
    import sys

    from clipengine.models.saving import save_model

    checkpoint = save_model(tiny_model, tmp_path / "tiny")
    out = tmp_path / "export"
    shutil.copytree(fp32_b1_b4_export, out)
    (out / "notes.txt").write_text("mine")
    killed = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(checkpoint), str(out)], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert verify_folder(out) == (2, [])  # the old export, intact
    onnx_export.export_model(tiny_model, out, image_batches=None, text_batches=None, verify=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "image_fp32_dyn.onnx", "manifest.json", "notes.txt", "text_fp32_dyn.onnx"
    ]


def test_a_first_export_killed_midway_is_named_as_unfinished(tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """A folder whose only export was killed said "no export manifest here; create one", as if
    nothing had been exported into it, beside the killed run's work folder."""
    import signal
    import subprocess
    import sys

    from clipengine.errors import BackendError
    from clipengine.models.saving import save_model

    checkpoint = save_model(tiny_model, tmp_path / "tiny")
    out = tmp_path / "export"
    killed = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(checkpoint), str(out)], check=False)
    assert killed.returncode == -signal.SIGKILL
    import clipengine

    for load in (load_export, clipengine.load):  # load() took it for a model folder: "no config.json"
        with pytest.raises(BackendError, match=r"an export into .* did not finish \(it left \.export-.*\); re-run"):
            load(out)
    onnx_export.export_model(tiny_model, out, image_batches=None, text_batches=None, verify=False)
    assert sorted(p.name for p in out.iterdir()) == ["image_fp32_dyn.onnx", "manifest.json", "text_fp32_dyn.onnx"]


def test_a_parity_miss_leaves_the_previous_export_published_and_unchanged(
    tmp_path: Path, tiny_model, monkeypatch, fp32_b1_b4_export
) -> None:  # type: ignore[no-untyped-def]
    """ExportParityError publishes nothing: the old manifest and every old file stay byte for byte,
    and not even the new engines that passed land in the folder (they were moved in one by one
    after the old manifest was removed, so a failed re-export destroyed a working one)."""
    from clipengine.backends.onnx_backend import OnnxBackend

    out = tmp_path / "export"
    shutil.copytree(fp32_b1_b4_export, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setitem(BOUNDS, "int8", {"min_cos": 1.5})  # unreachable: every int8 engine misses it
    with pytest.raises(ExportParityError, match=r"image_int8_b1\.onnx: .*needs cosine >= 1\.5"):
        onnx_export.export_model(
            tiny_model, out, precisions=("fp32", "int8"), image_batches=(1,), text_batches=(4,)
        )
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "parity_report.json"}
    assert after == before
    report = json.loads((out / "parity_report.json").read_text())
    assert {e["file"]: e["parity"]["passed"] for e in report["engines"]} == {
        "image_fp32_b1.onnx": True,
        "image_int8_b1.onnx": False,
        "text_fp32_b4.onnx": True,
        "text_int8_b4.onnx": False,
    }
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert OnnxBackend(out).encode_images(pixels).shape == (2, 32)  # still the working fp32 export


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_batches": ()}, r"image_batches=\(\): give positive integer batch sizes"),
        ({"text_batches": [0]}, r"text_batches=\[0\]"),
        ({"image_batches": [1.5]}, r"image_batches=\[1\.5\]"),
        ({"image_batches": [True]}, r"image_batches=\[True\]"),
    ],
)
def test_bad_batch_sizes_are_refused_before_anything_runs(
    tmp_path: Path, tiny_model, kwargs, message: str
) -> None:  # type: ignore[no-untyped-def]
    """() used to export a dynamic engine, 0 failed inside torch.export, 1.5 was truncated to 1."""
    with pytest.raises(ValueError, match=message):
        onnx_export.export_model(tiny_model, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_repeated_precisions_and_batches_export_each_engine_once(tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    manifest = onnx_export.export_model(
        tiny_model,
        tmp_path / "out",
        precisions=("fp32", "fp32"),
        image_batches=(2, 1, 2),
        text_batches=(4, 4),
        verify=False,
    )
    files = [e.file for e in manifest.engines]
    assert files == ["image_fp32_b1.onnx", "image_fp32_b2.onnx", "text_fp32_b4.onnx"]


@pytest.mark.parametrize(
    ("missing", "kwargs"),
    [
        ("onnxruntime", {"precisions": ("fp32",)}),  # verification runs the engines under ONNX Runtime
        ("onnxruntime", {"precisions": ("int8",), "verify": False}),  # its quantizer
        ("onnxconverter_common", {"precisions": ("fp16",), "verify": False}),
    ],
)
def test_a_missing_tool_is_named_before_any_graph_is_exported(
    tmp_path: Path, tiny_model, monkeypatch, missing: str, kwargs: dict[str, object]
) -> None:  # type: ignore[no-untyped-def]
    """Without onnxruntime the export failed only after torch.export of the first graph (minutes for
    a large model), leaving an empty output folder."""
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: importing it fails

    def exported(*args: object, **kw: object) -> None:
        raise AssertionError("a graph was exported before the missing tool was noticed")

    monkeypatch.setattr(onnx_export, "export_graph", exported)
    with pytest.raises(ModuleNotFoundError) as caught:
        onnx_export.export_model(tiny_model, tmp_path / "out", image_batches=None, text_batches=None, **kwargs)
    assert caught.value.name == missing
    assert not (tmp_path / "out").exists()
