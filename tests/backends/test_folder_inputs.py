"""Both export-folder runtimes (ONNX Runtime, OpenVINO) on awkward inputs: every batch size against the
PyTorch reference, non-finite pixels, damaged manifests, engines that are not what the manifest says."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipengine.backends import create_backend
from clipengine.errors import BackendError, InputError

NEEDS_OPENVINO = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="openvino not installed"
)
KINDS = ["onnx", pytest.param("openvino", marks=NEEDS_OPENVINO)]


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:  # type: ignore[no-untyped-def]
    """Tiny ViT, fp32 and dynamic int8, image engines b1/b4, text b2 (fixed batches: split and pad)."""
    from clipengine.export.onnx import export_model

    out = tmp_path_factory.mktemp("folder_inputs") / "fixed"
    export_model(tiny_model, out, precisions=("fp32", "int8"), image_batches=(1, 4), text_batches=(2,))
    return out


@pytest.fixture(scope="module")
def dynamic(vit_dynamic_split_export) -> Path:  # type: ignore[no-untyped-def]
    """Tiny ViT, fp32, fp16 and dynamic int8, dynamic batch axis, text projection split off."""
    folder: Path = vit_dynamic_split_export[0]
    return folder


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((70, 3, 32, 32)).astype(np.float32)


def _folder(request: pytest.FixtureRequest, name: str) -> Path:
    folder: Path = request.getfixturevalue(name)
    return folder


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["fixed", "dynamic"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_an_input_error_naming_the_rows(
    request: pytest.FixtureRequest, pixels: np.ndarray, kind: str, layout: str, precision: str, value: float
) -> None:
    """A NaN image came back as an all-zero row (l2_normalize keeps zero rows) with no error, and under
    dynamic INT8 it changed the other images of its batch (one activation scale per batch)."""
    backend = create_backend(kind, _folder(request, layout), precision=precision)
    bad = pixels[:9].copy()
    bad[3, 1, 5, 7] = value
    bad[6, 0, 0, 0] = value
    with pytest.raises(InputError, match=r"NaN or infinite values \(rows 3, 6 of 9\)"):
        backend.encode_images(bad)
    with pytest.raises(InputError, match="NaN or infinite"):
        backend.encode_images(bad, normalize=False)
    assert np.isfinite(backend.encode_images(pixels[:9])).all()  # the backend still works


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [0, -4, "4", 2.5, True])
def test_engine_batch_that_is_not_a_positive_integer_is_a_backend_error(
    fixed: Path, tmp_path: Path, pixels: np.ndarray, kind: str, batch: object
) -> None:
    """Batch 0 or below made plan_batches loop forever (no b1 engine) or run nonsense pieces; "4" and
    2.5 failed as TypeErrors ("bad options []" from create_backend, a slice error at the first call)."""
    folder = tmp_path / "copy"
    shutil.copytree(fixed, folder)
    data = json.loads((folder / "manifest.json").read_text())
    for engine in data["engines"]:
        if engine["file"] == "image_fp32_b4.onnx":
            engine["batch"] = batch
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(
        BackendError, match=r"manifest\.json: engine 'image_fp32_b4\.onnx': \"batch\" must be"
    ):
        create_backend(kind, folder).encode_images(pixels[:9])
    assert create_backend(kind, folder, precision="int8").encode_images(pixels[:9]).shape == (9, 32)


@pytest.mark.parametrize(
    ("kind", "option"),
    [("onnx", "intra_op_threads"), pytest.param("openvino", "threads", marks=NEEDS_OPENVINO)],
)
@pytest.mark.parametrize("value", [True, "too many", 2**40])
def test_thread_counts_that_are_booleans_or_far_above_the_cpus_are_refused(
    dynamic: Path, kind: str, option: str, value: object
) -> None:
    """ONNX Runtime starts every thread when it opens an engine: 1,000 on 2 cores took 51 s, 10**6 never
    finished, 2**40 was a pybind TypeError reported as "bad options"; True ran as 1 thread."""
    too_many = 4 * (os.cpu_count() or 1) + 1
    count = too_many if value == "too many" else value
    with pytest.raises(InputError, match=rf"^{option}"):
        create_backend(kind, dynamic, **{option: count})
    backend = create_backend(kind, dynamic, **{option: os.cpu_count()})
    assert backend.encode_images(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 32)


TEXTS = [
    "",
    "a cat",
    "a photo of a red bus",
    "x " * 100,
    "CLIP",
    "  ",
    "a diagram of a diagram",
]  # "x " * 100: 102 tokens


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    from clipengine.text.tokenizer import tokenize

    return tokenize([f"{TEXTS[i % len(TEXTS)]} {i}" if i % 3 else TEXTS[i % len(TEXTS)] for i in range(70)])


@pytest.fixture(scope="module")
def reference(tiny_model, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        images = tiny_model.encode_image(torch.from_numpy(pixels)).numpy()
        texts = tiny_model.encode_text(torch.from_numpy(tokens)).numpy()
    return images, texts


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["fixed", "dynamic"])
def test_every_batch_size_from_0_to_70_matches_torch_row_by_row(
    request: pytest.FixtureRequest, pixels: np.ndarray, tokens: np.ndarray, reference: tuple[np.ndarray, np.ndarray],
    kind: str, layout: str,
) -> None:  # fmt: skip
    """Split + pad on b1/b4 (image) and b2 (text) engines, slices of 64 on dynamic ones: no padding row
    leaks, no row is lost or moved, 0 rows give (0, D); texts include "" and one past 77 tokens."""
    backend = create_backend(kind, _folder(request, layout))
    images, texts = (r / np.linalg.norm(r, axis=1, keepdims=True) for r in reference)
    for n in range(71):
        out_images, out_texts = backend.encode_images(pixels[:n]), backend.encode_texts(tokens[:n])
        assert (
            out_images.shape == out_texts.shape == (n, 32)
            and out_images.dtype == out_texts.dtype == np.float32
        )
        np.testing.assert_allclose(out_images, images[:n], atol=2e-6, err_msg=f"{n} images")
        np.testing.assert_allclose(out_texts, texts[:n], atol=2e-6, err_msg=f"{n} texts")
    raw = backend.encode_images(pixels[:13], normalize=False)  # 4 + 4 + 4 + 1 on the fixed engines
    np.testing.assert_allclose(raw, reference[0][:13], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["fixed", "dynamic"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
@NEEDS_OPENVINO
def test_onnx_runtime_and_openvino_agree_on_the_same_engines(
    request: pytest.FixtureRequest, pixels: np.ndarray, tokens: np.ndarray, layout: str, precision: str
) -> None:
    """Same engine files, same batches: the two runtimes differ only by kernel rounding (measured here:
    fp32 1.5e-7 apart; dynamic int8 images 3e-3, texts 1e-7)."""
    folder = _folder(request, layout)
    onnx, openvino = (create_backend(k, folder, precision=precision) for k in ("onnx", "openvino"))
    bound = 1e-5 if precision == "fp32" else 1e-2
    for n in (1, 7, 70):
        np.testing.assert_allclose(
            onnx.encode_images(pixels[:n]), openvino.encode_images(pixels[:n]), atol=bound
        )
        np.testing.assert_allclose(
            onnx.encode_texts(tokens[:n]), openvino.encode_texts(tokens[:n]), atol=bound
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("layout", "target", "source", "message"),
    [
        ("fixed", "image_fp32_b4.onnx", "image_fp32_b1.onnx", r"takes image input \(1, 3, 32, 32\), the manifest lists \(4, 3, 32, 32\)"),
        ("fixed", "text_fp32_b2.onnx", "image_fp32_b1.onnx", r"takes text input \(1, 3, 32, 32\), the manifest lists \(2, 77\)"),
        ("dynamic", "image_fp32_dyn.onnx", "image_fp32_b4.onnx", r"takes image input \(4, 3, 32, 32\), the manifest lists \(N, 3, 32, 32\)"),
    ],
)  # fmt: skip
def test_an_engine_file_that_is_not_the_one_listed_is_a_backend_error_naming_it(
    request: pytest.FixtureRequest, fixed: Path, tmp_path: Path, pixels: np.ndarray, kind: str, layout: str,
    target: str, source: str, message: str,
) -> None:  # fmt: skip
    """An engine swapped for another export's (no verify_files) failed inside the runtime at the first
    call ("Got invalid dimensions for input: pixels", "Check 'is_dynamic || ...' failed"), naming no file."""
    folder = tmp_path / "copy"
    shutil.copytree(_folder(request, layout), folder)
    shutil.copyfile(fixed / source, folder / target)
    backend = create_backend(kind, folder)
    with pytest.raises(
        BackendError, match=rf"{target}: the graph {message}; the file is not this export's engine"
    ):
        if target.startswith("text"):
            backend.encode_texts(np.zeros((2, 77), np.int64))
        else:
            backend.encode_images(pixels[:8])


def _damage_engines(source: Path, folder: Path, **changes: object) -> Path:
    shutil.copytree(source, folder)
    data = json.loads((folder / "manifest.json").read_text())
    for engine in data["engines"]:
        engine.update(changes)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_text_truncation_follows_the_loaded_graph_not_the_manifest_record(
    dynamic: Path, tmp_path: Path, tokens: np.ndarray, reference: tuple[np.ndarray, np.ndarray], kind: str
) -> None:
    """A manifest input record with "shape": 5 was a TypeError (len of an int) at the first call."""
    folder = _damage_engines(dynamic, tmp_path / "copy", inputs=[{"name": "x", "shape": 5, "dtype": "int64"}])
    backend = create_backend(kind, folder)
    texts = reference[1][:5] / np.linalg.norm(reference[1][:5], axis=1, keepdims=True)
    np.testing.assert_allclose(backend.encode_texts(tokens[:5]), texts, atol=2e-6)
    assert backend._text.engine(None).truncates_text  # the graph's length axis is dynamic


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", ["yes", 1, True])
def test_split_projection_other_than_false_or_true_on_a_text_engine_is_a_backend_error(
    dynamic: Path, tmp_path: Path, pixels: np.ndarray, kind: str, value: object
) -> None:
    """ "yes" (or true on an image engine) pooled image features as text token states: an IndexError."""
    folder = _damage_engines(dynamic, tmp_path / "copy", split_projection=value)
    with pytest.raises(
        BackendError, match=r"manifest\.json: engine 'image_fp32_dyn\.onnx' \(tower 'image'\): \"split"
    ):
        create_backend(kind, folder).encode_images(pixels[:2])


@pytest.mark.parametrize("kind", KINDS)
def test_a_type_error_inside_the_backend_is_not_reported_as_bad_options(
    dynamic: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """create_backend turned every TypeError raised while building the backend into "bad options []"
    (a manifest batch of "4" read so): only options the constructor does not take are that."""

    def broken(folder: object) -> None:
        raise TypeError("a bug far from the options")

    monkeypatch.setattr("clipengine.backends.folder.read_manifest", broken)
    with pytest.raises(TypeError, match="a bug far from the options"):
        create_backend(kind, dynamic)
    with pytest.raises(InputError, match=r"^backend '\w+': bad options \['warp_speed'\]"):
        create_backend(kind, dynamic, warp_speed=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", [5, None])
def test_a_device_that_is_not_a_string_is_an_input_error(dynamic: Path, kind: str, device: object) -> None:
    with pytest.raises(InputError, match=r"^device must be a device name \(str\)"):  # was AttributeError
        create_backend(kind, dynamic, device=device)  # type: ignore[arg-type]


@pytest.mark.parametrize("providers", [[5], [("CPUExecutionProvider", {})]])
def test_onnx_providers_that_are_not_names_are_an_input_error(dynamic: Path, providers: list[object]) -> None:
    with pytest.raises(InputError, match=r"^providers must be provider names \(str\)"):  # was "bad options"
        create_backend("onnx", dynamic, providers=providers)


@pytest.mark.parametrize("kind", KINDS)
def test_the_manifest_file_itself_opens_its_folder(dynamic: Path, pixels: np.ndarray, kind: str) -> None:
    """read_manifest takes the manifest file too, but the backend then took that file as the folder
    ("manifest.json/text_projection_64_32.npy: text projection listed in the manifest is missing")."""
    backend = create_backend(kind, dynamic / "manifest.json")
    assert backend.root == dynamic
    np.testing.assert_array_equal(
        backend.encode_images(pixels[:3]), create_backend(kind, dynamic).encode_images(pixels[:3])
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.ones((64, 16), np.float32), r"is \(64, 16\), the manifest needs \(64, 32\)"),
        (np.ones((64,), np.float32), r"is \(64,\), the manifest needs \(64, 32\)"),
        (np.ones((32, 32), np.float32), r"is \(32, 32\), the manifest needs \(64, 32\)"),
        (b"not a numpy file", "cannot be read as a float array"),
        (np.array([{"a": 1}], dtype=object), "cannot be read as a float array"),
    ],
)
def test_a_text_projection_of_the_wrong_shape_or_format_is_a_backend_error(
    dynamic: Path, tmp_path: Path, kind: str, content: object, message: str
) -> None:
    """A (64, 16) projection for a D = 32 manifest gave 16-wide text embeddings and a (64,) one 1-D
    output, silently; (32, 32) and unreadable files were numpy ValueErrors naming no file."""
    folder = tmp_path / "copy"
    shutil.copytree(dynamic, folder)
    path = folder / "text_projection_64_32.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    with pytest.raises(BackendError, match=rf"text_projection_64_32\.npy: the text projection {message}"):
        create_backend(kind, folder).encode_texts(np.zeros((2, 77), np.int64))


@pytest.fixture(scope="module")
def other_width(tmp_path_factory: pytest.TempPathFactory, tiny_config) -> Path:  # type: ignore[no-untyped-def]
    """Another tiny ViT with the same inputs (32 px, 77 tokens) but 16-wide embeddings, dynamic fp32."""
    import dataclasses

    import torch

    from clipengine.export.onnx import export_model
    from clipengine.models.clip import build_model

    torch.manual_seed(1)
    model = build_model(dataclasses.replace(tiny_config, embed_dim=16))
    out = tmp_path_factory.mktemp("folder_inputs") / "other"
    export_model(model, out, precisions=("fp32",), image_batches=None, text_batches=None)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("layout", "target", "source"), [
    ("dynamic", "image_fp32_dyn.onnx", "image_fp32_dyn.onnx"), ("fixed", "text_fp32_b2.onnx", "text_fp32_dyn.onnx"),
])  # fmt: skip
def test_an_engine_of_another_embedding_width_is_a_backend_error(
    request: pytest.FixtureRequest, other_width: Path, tmp_path: Path, pixels: np.ndarray, tokens: np.ndarray,
    kind: str, layout: str, target: str, source: str,
) -> None:  # fmt: skip
    """Same inputs, another model: its 16-wide embeddings came back under this manifest's embed_dim 32."""
    folder = tmp_path / "copy"
    shutil.copytree(_folder(request, layout), folder)
    shutil.copyfile(other_width / source, folder / target)
    backend = create_backend(kind, folder)
    with pytest.raises(
        BackendError, match=rf"{target}: returned \(2, 16\) for 2 rows, the manifest needs \(2, 32\)"
    ):
        if target.startswith("text"):
            backend.encode_texts(tokens[:2])
        else:
            backend.encode_images(pixels[:2])


@pytest.mark.parametrize(
    ("kind", "precision"), [("onnx", "fp32"), pytest.param("openvino", "bf16", marks=NEEDS_OPENVINO)]
)
def test_a_manifest_without_engines_says_so(dynamic: Path, tmp_path: Path, kind: str, precision: str) -> None:
    """Was "no fp32 engines in this export (has: ); ... or pick one of those"."""
    folder = tmp_path / "copy"
    shutil.copytree(dynamic, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["engines"] = []
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BackendError, match=r"\(has: no engines\); re-export with --precision fp32"):
        create_backend(kind, folder, precision=precision)


def _tensor_numpy_refuses() -> object:
    import torch

    return torch.zeros((2, 3, 32, 32), requires_grad=True)  # as a CUDA tensor: "can't convert"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("tower", "make"),
    [
        ("images", _tensor_numpy_refuses),
        ("images", lambda: [np.zeros((3, 32, 32)), np.zeros((3, 31, 32))]),
        ("tokens", lambda: [np.zeros(77, np.int64), np.zeros(70, np.int64)]),
    ],
)
def test_inputs_numpy_cannot_read_are_an_input_error(dynamic: Path, kind: str, tower: str, make) -> None:  # type: ignore[no-untyped-def]
    """A tensor that needs grad (or is on a GPU) and ragged lists were torch's RuntimeError / numpy's
    ValueError ("setting an array element with a sequence"), naming no argument."""
    backend = create_backend(kind, dynamic)
    encode = backend.encode_images if tower == "images" else backend.encode_texts
    with pytest.raises(InputError, match=rf"^{tower} must be a NumPy array in host memory"):
        encode(make())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["fixed", "dynamic"])
def test_one_backend_from_four_threads_gives_the_serial_results(
    request: pytest.FixtureRequest, pixels: np.ndarray, tokens: np.ndarray, kind: str, layout: str
) -> None:
    """The server calls one backend from several threads: engines opened once under a lock, ORT
    sessions shared, one OpenVINO infer request per thread; every slice must equal the serial call."""
    import threading

    one_thread = (
        {"intra_op_threads": 1} if kind == "onnx" else {"threads": 1}
    )  # 4 x 2 spinning on 2 cores: 11 s
    backend = create_backend(kind, _folder(request, layout), **one_thread)
    serial = create_backend(kind, _folder(request, layout), **one_thread)
    images, texts = serial.encode_images(pixels), serial.encode_texts(tokens)
    failures: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(15):
            n = int(rng.integers(1, 40))
            s = int(rng.integers(0, 70 - n))
            try:
                np.testing.assert_allclose(
                    backend.encode_images(pixels[s : s + n]), images[s : s + n], atol=1e-6
                )
                np.testing.assert_allclose(
                    backend.encode_texts(tokens[s : s + n]), texts[s : s + n], atol=1e-6
                )
            except Exception as e:  # reported below, from the main thread
                failures.append(f"{seed}: {n} rows at {s}: {e}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:2]


def test_an_engine_that_overflows_is_a_backend_error_not_a_zero_embedding(
    dynamic: Path, pixels: np.ndarray
) -> None:
    """ORT's fp16 image engine returns NaN for pixels scaled by 1e6 (finite inputs): the row came back
    as an all-zero "embedding" (l2_normalize keeps zero rows), silently."""
    backend = create_backend("onnx", dynamic, precision="fp16")
    bad = pixels[:4].copy()
    bad[1] *= 1e6
    assert np.isfinite(bad).all()
    with pytest.raises(
        BackendError,
        match=r"image_fp16_dyn\.onnx: the engine returned NaN or infinite features for rows 1 of 4",
    ):
        backend.encode_images(bad)
    np.testing.assert_allclose(np.linalg.norm(backend.encode_images(pixels[:4]), axis=1), 1.0, atol=1e-5)
