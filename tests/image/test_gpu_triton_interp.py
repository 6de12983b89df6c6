"""The GPU preprocessing's Triton kernels (`image.gpu_triton`) run on the CPU, in triton's interpreter.

CI has no GPU, so the kernels' arithmetic is checked here against the torch ops they replace, on
digit sums of real resize passes (noise, and black / white stripes that overshoot into both ends of
the clamp). `scripts/setup_triton_interp.sh` (run by scripts/test.sh) puts triton in
.venv/triton-interp, outside the venv's packages: each check runs in a subprocess with it on
PYTHONPATH and TRITON_INTERPRET=1 set before triton is imported. The `gpu` tests in
test_gpu_fused.py check the same on a real device, compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")

TRITON_DIR = Path(__file__).resolve().parents[2] / ".venv" / "triton-interp"
needs_triton = pytest.mark.skipif(not (TRITON_DIR / "triton").is_dir(),
                                  reason="triton not installed for the interpreter (scripts/setup_triton_interp.sh)")  # fmt: skip


def run_interpreted(code: str) -> str:
    src = Path(__file__).resolve().parents[2] / "src"
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(TRITON_DIR), str(src)])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs_triton
def test_combine_kernel_equals_the_torch_ops_on_real_resize_sums() -> None:
    out = run_interpreted("""
        import torch
        from clipengine.image import gpu_triton
        from clipengine.image.gpu_resample import _combine_digit_sums, device_weights
        from clipengine.image.pillow_resample import axis_weights

        gen = torch.Generator().manual_seed(0)
        clamped = 0
        cases = [(1280, 298, "bicubic", None), (960, 224, "bicubic", None), (1280, 298, "bicubic", (37, 261)),
                 (100, 224, "bicubic", None), (7, 224, "bilinear", None), (4000, 224, "bicubic", None), (3, 1, "bicubic", None)]
        for src, dst, interpolation, keep in cases:
            weights = device_weights(axis_weights(src, dst, interpolation, keep=keep), torch.device("cpu"))
            for content in ("noise", "stripes"):
                rows = 40
                if content == "noise":
                    pixels = torch.randint(0, 256, (rows, src), generator=gen, dtype=torch.uint8)
                else:
                    pixels = (torch.arange(src) % 2 * 255).to(torch.uint8).repeat(rows, 1)
                operand = torch.zeros((max(rows, 17), weights.digits.shape[0]), dtype=torch.uint8)
                operand[:rows, : weights.span] = pixels[:, weights.first : weights.first + weights.span] ^ 0x80
                sums = torch._int_mm(operand.view(torch.int8), weights.digits)[:rows]  # a row slice, as in use
                expected = _combine_digit_sums(sums, weights.offset, weights.n_out)
                got = gpu_triton.combine_digit_sums(sums, weights.offset, weights.n_out, 14)
                assert got.dtype == torch.uint8 and torch.equal(got, expected), (src, dst, content)
                clamped += int((expected == 0).sum()) + int((expected == 255).sum())
        empty = gpu_triton.combine_digit_sums(sums[:0], weights.offset, weights.n_out, 14)
        assert empty.shape == (0, weights.n_out)
        print("clamped", clamped)
    """)
    assert int(out.split()[-1]) > 1000  # the stripes reached both ends of the clamp


@needs_triton
def test_normalise_kernel_equals_the_torch_ops() -> None:
    # float32 and float16 only: the interpreter casts to bfloat16 by truncation where a GPU rounds to
    # nearest even (the `gpu` test checks bfloat16 there).
    run_interpreted("""
        import torch
        from clipengine.image import gpu_triton
        from clipengine.image.gpu_preprocess import _device_table

        table = _device_table((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
                              torch.device("cpu"))
        crops = torch.randint(0, 256, (3, 3, 17, 19), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        offsets = torch.arange(0, 3 * 256, 256).view(1, 3, 1, 1)
        for dtype in (torch.float32, torch.float16):
            expected = table[crops.long() + offsets].to(dtype)
            got = gpu_triton.normalise_by_table(crops, table, dtype)
            assert got.dtype == dtype and torch.equal(got, expected), dtype
        strided = crops.transpose(2, 3)  # made contiguous first, as `_normalise`'s crops may not be
        assert torch.equal(gpu_triton.normalise_by_table(strided, table, torch.float32),
                           table[strided.long() + offsets])
    """)


@needs_triton
def test_operand_kernel_equals_the_torch_ops_on_strided_views() -> None:
    run_interpreted("""
        import torch
        from clipengine.image import gpu_triton

        batch = torch.randint(0, 256, (3, 3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
        views = (batch[..., 5:66], batch[:, :, 3:40, 7:20].transpose(2, 3), batch[1, 2, :, 9:30], batch[0, 0, 0, :33],
                 batch[:, 1:, ::2, 3:50])
        for source in views:
            rows, span = source[..., 0].numel(), int(source.shape[-1])
            ours = torch.full((max(rows, 17), span + 5), 7, dtype=torch.uint8)
            gpu_triton.write_operand(source, ours)
            assert torch.equal(ours[:rows, :span], (source ^ 0x80).reshape(rows, span)), source.shape
            assert bool((ours[:, span:] == 7).all()) and bool((ours[rows:] == 7).all())  # pads untouched
        try:
            gpu_triton.write_operand(batch[None], torch.empty((2000, 80), dtype=torch.uint8))
        except ValueError as err:
            assert "at most 4 dimensions" in str(err)
        else:
            raise AssertionError("5 dimensions accepted")
    """)


@needs_triton
def test_the_whole_preprocessing_with_the_kernels_equals_the_exact_path() -> None:
    """`preprocess_tensors` with every kernel (CLIPENGINE_GPU_KERNELS=triton: CPU tensors take them
    under the interpreter) against Pillow's exact path: photos of both pass orders, a size that
    needs no resize, an extreme aspect ratio, squash, bilinear."""
    out = run_interpreted("""
        import os
        import numpy as np
        import torch
        from PIL import Image
        from clipengine.image import gpu_fused
        from clipengine.image.gpu_preprocess import preprocess_tensors
        from clipengine.image.preprocess import PreprocessConfig, preprocess_image

        os.environ["CLIPENGINE_GPU_KERNELS"] = "triton"
        os.environ["CLIPENGINE_GPU_KERNEL_SKIP"] = ""  # the operand kernel too (left out by default)
        calls = []
        real = gpu_fused.triton_kernels
        gpu_fused.triton_kernels = lambda device: calls.append(device.type) or real(device)
        rng = np.random.default_rng(0)
        sizes = [(640, 480), (300, 400), (224, 224), (3, 700), (333, 77)]
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
        for cfg in (PreprocessConfig(), PreprocessConfig(interpolation="bilinear", resize_mode="squash")):
            tensors = [torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous() for img in images]
            ours = preprocess_tensors(tensors, cfg).numpy()
            exact = np.stack([preprocess_image(img, cfg) for img in images])
            np.testing.assert_array_equal(ours, exact)
        assert not gpu_fused._unavailable and calls and set(calls) == {"cpu"}
        print(len(calls))
    """)
    assert int(out.split()[-1]) >= 3 * 2  # operand, combine and normalise, for both settings
