"""OnnxBackend: engine choice per batch size, padding invariance, errors, providers, and no-torch use."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from clipengine.backends import create_backend
from clipengine.backends.onnx_backend import OnnxBackend, _plan, resolve_providers
from clipengine.errors import BackendError, InputError
from clipengine.types import Backend


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:  # type: ignore[no-untyped-def]
    """Tiny ViT, fp32/fp16/int8, image engines b1/b4, text b2, projection split off (the seed's layout)."""
    from clipengine.export.onnx import export_model

    out = tmp_path_factory.mktemp("onnx_backend") / "tiny"
    export_model(tiny_model, out, precisions=("fp32", "fp16", "int8"), image_batches=(1, 4), text_batches=(2,),
                 split_text_projection=True)
    return out


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((11, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    from clipengine.text.tokenizer import tokenize

    return tokenize(["a cat", "a dog", "a photo of a red bus", "CLIP", "a diagram"])


def _torch_reference(model, pixels=None, tokens=None):  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        out = (model.encode_image(torch.from_numpy(pixels)) if pixels is not None
               else model.encode_text(torch.from_numpy(tokens))).numpy()
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


@pytest.mark.parametrize(
    ("n", "batches", "expected"),
    [
        (40, [1, 8, 16, 32], [(0, 32, 32), (32, 8, 8)]),
        (3, [8, 16], [(0, 3, 8)]),  # smaller than every engine: one padded call
        (11, [1, 4], [(0, 4, 4), (4, 4, 4), (8, 1, 1), (9, 1, 1), (10, 1, 1)]),
        (5, [4], [(0, 4, 4), (4, 1, 4)]),
        (31, [1, 8, 16, 32], [(0, 31, 32)]),  # one padded row beats 16 + 8 + 7 x b1
        (17, [1, 8, 16, 32], [(0, 16, 16), (16, 1, 1)]),  # padding 15 rows would waste more
    ],
)
def test_plan_uses_largest_engine_that_fits(n: int, batches: list[int], expected: list[tuple[int, int, int]]) -> None:
    assert _plan(n, batches) == expected


def test_backend_matches_torch_and_satisfies_protocol(export_dir: Path, tiny_model, pixels, tokens) -> None:  # type: ignore[no-untyped-def]
    backend = create_backend("onnx", export_dir, precision="fp32")
    assert isinstance(backend, Backend)
    assert (backend.name, backend.device, backend.precision) == ("onnx", "cpu", "fp32")
    assert (backend.embed_dim, backend.image_size, backend.context_length) == (32, 32, 77)
    assert backend.providers == ["CPUExecutionProvider"]
    images = backend.encode_images(pixels)
    texts = backend.encode_texts(tokens)
    assert images.dtype == np.float32 and images.shape == (11, 32)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-6)
    assert np.abs(images - _torch_reference(tiny_model, pixels=pixels)).max() <= 1e-4
    assert np.abs(texts - _torch_reference(tiny_model, tokens=tokens)).max() <= 1e-4
    import torch  # normalize=False: the tower's output as it is (the linear probe fits on it)

    with torch.no_grad():
        raw = tiny_model.encode_image(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(backend.encode_images(pixels, normalize=False), raw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("precision", "bound"), [("fp16", 0.999), ("int8", 0.99)])
def test_reduced_precision_within_bound(export_dir: Path, tiny_model, pixels, tokens, precision: str, bound: float) -> None:  # type: ignore[no-untyped-def]
    backend = OnnxBackend(export_dir, precision=precision, intra_op_threads=1)
    cos_img = (backend.encode_images(pixels) * _torch_reference(tiny_model, pixels=pixels)).sum(1)
    cos_txt = (backend.encode_texts(tokens) * _torch_reference(tiny_model, tokens=tokens)).sum(1)
    assert cos_img.min() >= bound and cos_txt.min() >= bound


def test_same_image_alone_or_inside_a_padded_batch(export_dir: Path, pixels) -> None:  # type: ignore[no-untyped-def]
    backend = OnnxBackend(export_dir)
    batched = backend.encode_images(pixels[:3])  # one b4 call with a padding row
    for i in range(3):
        alone = backend.encode_images(pixels[i : i + 1])  # the b1 engine
        np.testing.assert_allclose(alone[0], batched[i], atol=1e-6)
    np.testing.assert_allclose(backend.encode_images(pixels)[:3], batched, atol=1e-6)


def test_text_batch_invariance_with_padding(export_dir: Path, tokens) -> None:  # type: ignore[no-untyped-def]
    backend = OnnxBackend(export_dir)
    together = backend.encode_texts(tokens)  # b2 engine: 2 + 2 + 1 padded
    for i in range(len(tokens)):
        np.testing.assert_allclose(backend.encode_texts(tokens[i : i + 1])[0], together[i], atol=1e-6)


def test_empty_inputs_give_empty_outputs(export_dir: Path) -> None:
    backend = OnnxBackend(export_dir)
    assert backend.encode_images(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 32)
    assert backend.encode_texts(np.zeros((0, 77), np.int64)).shape == (0, 32)


def test_wrong_shapes_are_rejected(export_dir: Path) -> None:
    backend = OnnxBackend(export_dir)
    with pytest.raises(BackendError, match=r"\(N, 3, 32, 32\)"):
        backend.encode_images(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(BackendError, match=r"\(N, 77\)"):
        backend.encode_texts(np.zeros((1, 20), np.int64))


def test_missing_precision_lists_available_ones(export_dir: Path) -> None:
    with pytest.raises(BackendError, match=r"no int8w engines.*has: fp32, fp16, int8.*--precision int8w"):
        OnnxBackend(export_dir, precision="int8w")


@pytest.mark.parametrize("precision", ["bf16", "fp64", "FP32", None])
def test_unknown_precision_is_an_input_error(export_dir: Path, precision: object) -> None:
    # Not "re-export with --precision bf16": no export makes such engines (as OpenVinoBackend says).
    with pytest.raises(InputError, match=r"unknown precision .* onnx backend; use one of fp32, fp16, int8, int8w"):
        OnnxBackend(export_dir, precision=precision)  # type: ignore[arg-type]


def test_not_an_export_folder(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="no export manifest"):
        OnnxBackend(tmp_path)


def test_cuda_without_provider_is_an_error(export_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(BackendError, match="CUDAExecutionProvider"):
        OnnxBackend(export_dir, device="cuda")


def test_changed_file_is_caught_by_verify_files(export_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(export_dir, folder)
    with open(folder / "image_fp32_b4.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BackendError, match="SHA-256"):
        OnnxBackend(folder, verify_files=True).encode_images(np.zeros((4, 3, 32, 32), np.float32))


def test_changed_projection_file_is_caught_by_verify_files(export_dir: Path, tmp_path: Path) -> None:
    """The split text projection is as much a part of the text engine as its graph (was unchecked)."""
    folder = tmp_path / "copy"
    shutil.copytree(export_dir, folder)
    projection = next(folder.glob("text_projection_*.npy"))
    np.save(projection, np.load(projection) * 2)
    OnnxBackend(folder)  # without verify_files: no hashing
    with pytest.raises(BackendError, match=r"text_projection_64_32\.npy: SHA-256 differs"):
        OnnxBackend(folder, verify_files=True)


def test_missing_projection_file_is_an_error(export_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(export_dir, folder)
    (folder / "text_projection_64_32.npy").unlink()
    with pytest.raises(BackendError, match=r"text_projection_64_32\.npy"):
        OnnxBackend(folder)


def test_resolve_providers_prefers_gpu_order_and_rejects_unknown_device() -> None:
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="unknown device"):
        resolve_providers("tpu")


@pytest.mark.parametrize("device", ["cuda:x", "cuda:-1"])
def test_resolve_providers_rejects_a_bad_cuda_index(device: str) -> None:
    with pytest.raises(BackendError, match="unknown device"):
        resolve_providers(device)


def test_empty_provider_list_is_an_error(export_dir: Path) -> None:
    with pytest.raises(BackendError, match="providers"):
        OnnxBackend(export_dir, providers=[])


@pytest.mark.parametrize("threads", [-1, "x"])
def test_bad_thread_count_is_an_error(export_dir: Path, threads: object) -> None:
    with pytest.raises(InputError, match="intra_op_threads"):
        OnnxBackend(export_dir, intra_op_threads=threads)  # type: ignore[arg-type]


def test_create_backend_onnx_bad_option_is_a_backend_error(export_dir: Path) -> None:
    with pytest.raises(BackendError, match="bad options"):
        create_backend("onnx", export_dir, warp_speed=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.bool_, np.complex64])
def test_non_float_pixels_are_rejected(export_dir: Path, dtype: object) -> None:
    with pytest.raises(InputError, match="float"):
        OnnxBackend(export_dir).encode_images(np.zeros((1, 3, 32, 32), dtype=dtype))  # type: ignore[call-overload]


def test_non_integer_tokens_are_rejected(export_dir: Path) -> None:
    with pytest.raises(BackendError, match="integer"):
        OnnxBackend(export_dir).encode_texts(np.full((1, 77), 0.7, np.float32))  # type: ignore[arg-type]


@pytest.mark.parametrize("token", [-5, 49408, 60000])
def test_token_ids_outside_the_vocabulary_are_rejected(export_dir: Path, tokens: np.ndarray, token: int) -> None:
    bad = tokens.copy()
    bad[1, 3] = token
    with pytest.raises(InputError, match=r"token ids must be in \[0, 49408\)"):
        OnnxBackend(export_dir).encode_texts(bad)


@pytest.mark.parametrize(("key", "value"), [("context_length", "77"), ("image_size", None), ("embed_dim", 0),
                                            ("text_projection", "x")])
def test_damaged_manifest_fields_are_backend_errors(export_dir: Path, tmp_path: Path, key: str, value: object) -> None:
    from export_copies import copy_with_manifest

    folder = copy_with_manifest(export_dir, tmp_path / "copy", **{key: value})
    with pytest.raises(BackendError, match=key):
        OnnxBackend(folder)


_NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
            return None

    sys.meta_path.insert(0, BlockTorch())
    import numpy as np
    import clipengine

    model = clipengine.load(sys.argv[1], precision="int8")
    images = model.encode_images(np.zeros((5, 3, 32, 32), np.float32))
    texts = model.encode_texts(["a cat", "a dog", "a bus"])
    probs = model.classify(np.zeros((1, 3, 32, 32), np.float32), ["cat", "dog"])
    print(json.dumps({"images": list(images.shape), "texts": list(texts.shape),
                      "labels": sorted(label for label, _ in probs[0]),
                      "providers": model.backend.providers,
                      "torch_loaded": any(m == "torch" or m.startswith("torch.") for m in sys.modules)}))
    """
)


@pytest.mark.integration
def test_onnx_backend_runs_without_torch(export_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "no_torch.py"
    script.write_text(_NO_TORCH)
    proc = subprocess.run([sys.executable, str(script), str(export_dir)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"images": [5, 32], "texts": [3, 32], "labels": ["cat", "dog"],
                      "providers": ["CPUExecutionProvider"], "torch_loaded": False}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_cuda_provider_matches_cpu(export_dir: Path, pixels, tokens, precision: str) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without CUDAExecutionProvider")
    cpu = OnnxBackend(export_dir, precision=precision)
    gpu = OnnxBackend(export_dir, device="cuda", precision=precision)
    assert gpu.providers[0] == "CUDAExecutionProvider"
    assert (gpu.encode_images(pixels) * cpu.encode_images(pixels)).sum(1).min() >= 0.999
    assert (gpu.encode_texts(tokens) * cpu.encode_texts(tokens)).sum(1).min() >= 0.999


@pytest.mark.gpu
def test_tensorrt_provider_when_installed(export_dir: Path, pixels) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without TensorrtExecutionProvider")
    gpu = OnnxBackend(export_dir, device="cuda", tensorrt=True)
    assert gpu.providers[0] == "TensorrtExecutionProvider"
    cpu = OnnxBackend(export_dir)
    assert (gpu.encode_images(pixels) * cpu.encode_images(pixels)).sum(1).min() >= 0.999


def test_missing_onnxruntime_says_how_to_install(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime is an optional dependency: without it the CLI printed a ModuleNotFoundError traceback."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)  # nor OpenVINO
    with pytest.raises(BackendError, match=r'needs ONNX Runtime: pip install "clipengine\[onnx\]"$'):
        OnnxBackend(export_dir)


def test_missing_onnxruntime_points_to_an_installed_openvino(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With only the openvino extra installed, the folder's default backend told the user to install
    ONNX Runtime, not that the runtime they have runs it."""
    pytest.importorskip("openvino")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendError, match=r'pip install "clipengine\[onnx\]"; or run .* --backend openvino'):
        OnnxBackend(export_dir)


@pytest.mark.parametrize("name", ["../outside.onnx", "/tmp/outside.onnx", ""])
def test_engine_and_projection_files_must_be_in_the_folder(
    export_dir: Path, tmp_path: Path, name: str
) -> None:
    """A manifest naming "../x.onnx" loaded a file outside the folder (no checksum covers it)."""
    folder = tmp_path / "copy"
    shutil.copytree(export_dir, folder)
    data = json.loads((folder / "manifest.json").read_text())
    for engine in data["engines"]:
        engine["file"] = name
    (folder / "manifest.json").write_text(json.dumps(data))
    pixels = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(BackendError, match=r'engine "file" must be a plain file name'):
        OnnxBackend(folder).encode_images(pixels)
    data["text_projection"]["file"] = name
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BackendError, match=r'text_projection "file" must be a plain file name'):
        OnnxBackend(folder)
