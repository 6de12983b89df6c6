"""FP8 linear layers (backends/fp8.py): numerical deviation from fp32, measured on CPU's reference kernel."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from clipengine.backends.accel import optimize
from clipengine.backends.fp8 import Fp8Linear, to_fp8_rows
from clipengine.errors import BackendError

from .test_accel import _min_cos, _tokens


def test_row_quantization_round_trips_within_e4m3_precision() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g) * torch.logspace(-3, 3, 16)[:, None]  # rows of very different magnitude
    q, scale = to_fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (16, 1)
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits (relative error <= 2^-4), down to its subnormal step 2^-9 of the
    # row's scale: elements far below their row's maximum lose precision, whatever the row's magnitude.
    bound = 2**-4 * x.abs() + 2**-10 * scale + 1e-12
    assert bool(((back - x).abs() <= bound).all())
    zero_q, zero_scale = to_fp8_rows(torch.zeros(2, 32))
    assert float(zero_q.float().abs().max()) == 0.0 and bool((zero_scale > 0).all())


def test_fp8_linear_matches_bf16_linear() -> None:
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(128, 96).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 7, 128, generator=g).to(torch.bfloat16)
    y = Fp8Linear.from_linear(layer)(x)
    ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert y.shape == (3, 7, 96) and y.dtype == torch.bfloat16
    assert float(F.cosine_similarity(y.float().reshape(-1, 96), ref.reshape(-1, 96), dim=-1).min()) >= 0.998


def test_fp8_linear_refuses_sizes_tensor_cores_cannot_tile() -> None:
    with pytest.raises(BackendError, match="divisible by 16"):
        Fp8Linear(torch.randn(30, 64), None)


def test_fp8_vit_b32_deviation_from_fp32() -> None:
    """The real architecture (random weights): image >= 0.999, text >= 0.998 (measured 0.9993 / 0.9986)."""
    from clipengine.models.clip import build_model
    from clipengine.models.config import get_config

    torch.manual_seed(0)
    model = build_model(get_config("ViT-B-32"))
    pixels = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    tokens = _tokens([6, 30, 77, 12], seed=5)
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(pixels), model.encode_text(tokens)
    fast = optimize(model, precision="fp8")
    blocks = fast.module.visual.transformer.resblocks
    assert isinstance(blocks[0].mlp.c_fc, Fp8Linear) and not isinstance(blocks[-1].mlp.c_fc, Fp8Linear)
    assert _min_cos(fast.encode_image(pixels), ref_img) >= 0.999
    assert _min_cos(fast.encode_text(tokens), ref_txt) >= 0.998
    # The caller's module is untouched (optimize works on a copy).
    assert isinstance(model.visual.transformer.resblocks[0].mlp.c_fc, torch.nn.Linear)


def test_torch_backend_refuses_fp8_on_cpu(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from clipengine.backends.torch_backend import TorchBackend

    with pytest.raises(BackendError, match="fp8 needs a CUDA GPU"):
        TorchBackend(copy.deepcopy(tiny_model), precision="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize(("compile_mode", "graphs"), [(False, False), (False, True), (True, True)])
def test_cuda_fp8_paths(tiny_model, compile_mode, graphs) -> None:  # type: ignore[no-untyped-def]
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs an FP8 GPU (compute capability >= 8.9)")
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = _tokens([3, 10, 21, 77, 9])
    with torch.no_grad():
        ref_img, ref_txt = tiny_model.encode_image(pixels), tiny_model.encode_text(tokens)
    fast = optimize(tiny_model, device="cuda", precision="fp8", compile=compile_mode, cuda_graphs=graphs)
    for _ in range(2):  # the second call replays the captured graph
        img, txt = fast.encode_image(pixels).cpu(), fast.encode_text(tokens).cpu()
    assert _min_cos(img, ref_img) >= 0.995
    assert _min_cos(txt, ref_txt) >= 0.995
