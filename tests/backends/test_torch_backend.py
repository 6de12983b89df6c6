"""TorchBackend: unit-norm float32 outputs equal to the module, input validation, precisions, devices."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from clipengine.backends import create_backend
from clipengine.backends.torch_backend import TorchBackend
from clipengine.errors import BackendError, InputError
from clipengine.models.clip import CLIP
from clipengine.types import Backend


@pytest.fixture
def model(tiny_model: CLIP) -> CLIP:
    return copy.deepcopy(tiny_model)  # backends take ownership (cast / move in place)


def _inputs(n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    tokens = np.zeros((n, 77), dtype=np.int64)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, rng.integers(300, 4000, (n, 3)), 49407
    return pixels, tokens


def _reference(model: CLIP, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(pixels))
        txt = model.encode_text(torch.from_numpy(tokens))
    return (
        torch.nn.functional.normalize(img, dim=-1).numpy(),
        torch.nn.functional.normalize(txt, dim=-1).numpy(),
    )


def test_fp32_outputs_are_the_normalised_module_outputs(model: CLIP) -> None:
    pixels, tokens = _inputs()
    ref_img, ref_txt = _reference(model, pixels, tokens)
    backend = create_backend("torch", model)
    assert isinstance(backend, Backend)
    img, txt = backend.encode_images(pixels), backend.encode_texts(tokens)
    assert img.dtype == np.float32 and img.shape == (3, 32) and txt.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(img, ref_img, atol=1e-6)
    np.testing.assert_allclose(txt, ref_txt, atol=1e-6)
    assert (backend.name, backend.device, backend.precision) == ("torch", "cpu", "fp32")
    assert (backend.embed_dim, backend.image_size, backend.context_length) == (32, 32, 77)
    with torch.no_grad():  # normalize=False: the tower's output as it is (the linear probe fits on it)
        raw = model.encode_image(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(backend.encode_images(pixels, normalize=False), raw, atol=1e-6)


def test_bf16_casts_weights_and_stays_close(model: CLIP) -> None:
    pixels, tokens = _inputs()
    ref_img, ref_txt = _reference(model, pixels, tokens)
    backend = TorchBackend(model, precision="bf16")
    assert backend.model.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in backend.model.parameters())
    img, txt = backend.encode_images(pixels), backend.encode_texts(tokens)
    assert img.dtype == np.float32
    assert (img * ref_img).sum(axis=1).min() > 0.99
    assert (txt * ref_txt).sum(axis=1).min() > 0.99


def test_empty_batch(model: CLIP) -> None:
    backend = TorchBackend(model)
    assert backend.encode_images(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": "int4"}, "unknown precision 'int4'; choose one of fp32, bf16, fp16"),
        ({"precision": "fp16"}, "fp16 needs a CUDA device"),
        ({"device": "mps"}, "unsupported device 'mps'"),
        ({"device": "not a device"}, "bad device"),
    ],
)
def test_bad_settings_raise_backend_error(model: CLIP, kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(BackendError, match=match):
        TorchBackend(model, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_gpu_is_a_clear_error(model: CLIP) -> None:
    with pytest.raises(BackendError, match=r"CUDA is not available; use device .cpu. \(--device cpu\)"):
        TorchBackend(model, device="cuda")


def test_wrong_input_shapes_are_rejected(model: CLIP) -> None:
    backend = TorchBackend(model)
    with pytest.raises(InputError, match=r"pixels must be \(N, 3, 32, 32\); got \(2, 3, 64, 64\)"):
        backend.encode_images(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(BackendError, match=r"tokens must be integer \(N, 77\)"):
        backend.encode_texts(np.zeros((2, 10), np.int64))
    with pytest.raises(BackendError, match="tokens must be integer"):
        backend.encode_texts(np.zeros((2, 77), np.float32))


def test_non_float_pixels_and_out_of_vocabulary_tokens_are_rejected(model: CLIP) -> None:
    backend = TorchBackend(model)
    with pytest.raises(InputError, match="pixels must be float"):
        backend.encode_images(np.zeros((1, 3, 32, 32), np.uint8))  # type: ignore[arg-type]
    for token in (-1, 49408):
        tokens = np.zeros((1, 77), np.int64)
        tokens[0, 1] = token
        with pytest.raises(InputError, match=r"token ids must be in \[0, 49408\)"):
            backend.encode_texts(tokens)


def test_nan_pixels_are_an_error_naming_the_rows_as_in_the_folder_backends(model: CLIP) -> None:
    """A NaN image gave a NaN "embedding" (the folder backends refuse it): from NumPy it is caught
    on the input; a device tensor is checked on the features, which are on the host anyway."""
    backend = TorchBackend(model)
    pixels = np.zeros((4, 3, 32, 32), np.float32)
    pixels[2, 0, 5, 5] = np.nan
    with pytest.raises(InputError, match=r"images contain NaN or infinite values \(rows 2 of 4\)"):
        backend.encode_images(pixels)
    pixels[2, 0, 5, 5] = np.inf
    with pytest.raises(InputError, match=r"NaN or infinite features \(rows 2 of 4\).*overflow at fp32"):
        backend.encode_images(torch.from_numpy(pixels))
    pixels[2, 0, 5, 5] = 0.0
    assert np.isfinite(backend.encode_images(pixels)).all()


def test_create_backend_errors(model: CLIP) -> None:
    with pytest.raises(InputError, match="unknown backend 'tensorrt'; choose one of torch, onnx"):
        create_backend("tensorrt", model)
    with pytest.raises(BackendError, match="needs a clipengine CLIP module"):
        create_backend("torch", "ViT-B-32")
    with pytest.raises(BackendError, match="bad options"):
        create_backend("torch", model, warp_speed=True)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_matches_cpu(tiny_model: CLIP, precision: str) -> None:
    pixels, tokens = _inputs()
    ref_img, ref_txt = _reference(tiny_model, pixels, tokens)
    backend = TorchBackend(copy.deepcopy(tiny_model), device="cuda", precision=precision)
    img, txt = backend.encode_images(pixels), backend.encode_texts(tokens)
    bound = 1e-4 if precision == "fp32" else 1e-2
    assert (img * ref_img).sum(axis=1).min() > 1 - bound
    assert (txt * ref_txt).sum(axis=1).min() > 1 - bound


def test_default_fast_paths_are_exact_against_the_plain_module(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Pruning + text truncation (on by default) change no result beyond float rounding."""
    import copy

    import numpy as np

    from clipengine.backends.torch_backend import TorchBackend
    from clipengine.text.tokenizer import tokenize

    plain = TorchBackend(copy.deepcopy(tiny_model), prune=False, truncate_text=False)
    fast = TorchBackend(copy.deepcopy(tiny_model))
    pixels = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    tokens = tokenize(["a", "a photo of a dog.", "a much longer caption " * 8, "", "x y z"])
    np.testing.assert_allclose(fast.encode_images(pixels), plain.encode_images(pixels), atol=1e-5)
    np.testing.assert_allclose(fast.encode_texts(tokens), plain.encode_texts(tokens), atol=1e-5)
