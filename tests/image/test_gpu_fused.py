"""The GPU preprocessing's Triton kernels (`image.gpu_triton`) and when they are used (`image.gpu_fused`).

The kernels replace torch ops with the same arithmetic; the `gpu` tests here compare them with those
ops on a CUDA device, and tests/image/test_gpu_preprocess.py's `gpu` tests compare the whole GPU
preprocessing (kernels on by default) with the exact CPU path, pixel for pixel. The CPU tests check
the choice between the two and the fallback.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import clipengine.image
from clipengine.image import gpu_fused
from clipengine.image.gpu_fused import KERNELS_ENV, SKIP_ENV, fused_or_torch, prefer_kernels, triton_kernels
from clipengine.image.preprocess import PreprocessConfig

torch = pytest.importorskip("torch")

from clipengine.image.gpu_preprocess import _device_table, _normalise, preprocess_tensors  # noqa: E402
from clipengine.image.gpu_resample import _combine_digit_sums, device_weights  # noqa: E402
from clipengine.image.pillow_resample import axis_weights  # noqa: E402

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_fused, "_unavailable", False)
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    monkeypatch.delenv(SKIP_ENV, raising=False)


@pytest.fixture
def fake_triton(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """`image.gpu_triton` as importable, whether or not triton is installed here."""
    fake = SimpleNamespace(name="gpu_triton")
    monkeypatch.delattr(clipengine.image, "gpu_triton", raising=False)
    monkeypatch.setitem(sys.modules, "clipengine.image.gpu_triton", fake)
    return fake


def test_cpu_tensors_use_the_torch_ops() -> None:
    with prefer_kernels():
        assert triton_kernels(torch.device("cpu")) is None
        assert fused_or_torch(torch.device("cpu"), lambda k: pytest.fail("kernel on a CPU tensor"), lambda: "torch", name="combine") == "torch"


def test_auto_uses_the_kernels_only_in_threads_that_ask(fake_triton: SimpleNamespace) -> None:
    """One loader thread alone measured faster with torch ops, several loaders with the kernels."""
    assert triton_kernels(CUDA) is None
    seen_elsewhere: list[object] = []
    with prefer_kernels():
        assert triton_kernels(CUDA) is fake_triton
        with prefer_kernels():  # nested: still asked for on the way out of the inner one
            pass
        assert triton_kernels(CUDA) is fake_triton
        other = threading.Thread(target=lambda: seen_elsewhere.append(triton_kernels(CUDA)))
        other.start()
        other.join()
    assert seen_elsewhere == [None] and triton_kernels(CUDA) is None


def test_env_forces_either_way_and_a_bad_value_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                          fake_triton: SimpleNamespace) -> None:  # fmt: skip
    monkeypatch.setenv(KERNELS_ENV, "triton")
    assert triton_kernels(CUDA) is fake_triton  # without asking
    monkeypatch.setenv(KERNELS_ENV, "torch")
    with prefer_kernels():
        assert triton_kernels(CUDA) is None
    monkeypatch.setenv(KERNELS_ENV, " Auto ")
    assert triton_kernels(CUDA) is None
    monkeypatch.setenv(KERNELS_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match=r"CLIPENGINE_GPU_KERNELS='cuda-graphs': use one of auto, triton, torch"):
        triton_kernels(CUDA)


def test_single_kernels_can_be_left_out(monkeypatch: pytest.MonkeyPatch, fake_triton: SimpleNamespace) -> None:
    monkeypatch.setenv(KERNELS_ENV, "triton")
    monkeypatch.delenv(SKIP_ENV, raising=False)  # the default leaves out the operand kernel (unmeasured)
    assert [fused_or_torch(CUDA, lambda k: "kernel", lambda: "torch", name=n) for n in ("operand", "combine")] == ["torch", "kernel"]
    monkeypatch.setenv(SKIP_ENV, "")
    assert fused_or_torch(CUDA, lambda k: "kernel", lambda: "torch", name="operand") == "kernel"
    monkeypatch.setenv(SKIP_ENV, " operand , Normalise")
    ran = [fused_or_torch(CUDA, lambda k: "kernel", lambda: "torch", name=name) for name in ("operand", "combine", "normalise")]
    assert ran == ["torch", "kernel", "torch"]
    monkeypatch.setenv(SKIP_ENV, "operand,epilogue")
    with pytest.raises(ValueError, match="CLIPENGINE_GPU_KERNEL_SKIP: unknown kernel epilogue; the kernels are operand, combine, normalise"):
        fused_or_torch(CUDA, lambda k: "kernel", lambda: "torch", name="combine")


def test_a_bad_environment_value_is_an_error_the_cli_reports_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                         fake_triton: SimpleNamespace) -> None:  # fmt: skip
    """A ClipEngineError, raised from the preprocessing of any GPU decode run (CPU tensors here): a
    bare ValueError reached the CLI as a traceback."""
    from clipengine.errors import ClipEngineError

    image = torch.zeros((3, 40, 50), dtype=torch.uint8)
    monkeypatch.setenv(KERNELS_ENV, "tirton")
    with pytest.raises(ClipEngineError, match=r"CLIPENGINE_GPU_KERNELS='tirton': use one of auto, triton, torch"):
        preprocess_tensors([image], PreprocessConfig())
    monkeypatch.setenv(KERNELS_ENV, "triton")
    monkeypatch.setenv(SKIP_ENV, "epilogue")
    with pytest.raises(ClipEngineError, match=r"CLIPENGINE_GPU_KERNEL_SKIP: unknown kernel epilogue"):
        fused_or_torch(CUDA, lambda k: "kernel", lambda: "torch", name="combine")


def test_kernels_launch_with_their_tensors_device_current(monkeypatch: pytest.MonkeyPatch,
                                                          fake_triton: SimpleNamespace) -> None:  # fmt: skip
    """triton launches on the current CUDA device (and its stream), torch ops on their tensors': for
    "cuda:1" the kernels ran on cuda:0 unless the device is made current around them."""
    events: list[object] = []

    @contextmanager
    def current(device: Any) -> Iterator[None]:
        events.append(("enter", device))
        yield
        events.append("exit")

    monkeypatch.setattr(torch.cuda, "device", current)
    monkeypatch.setenv(KERNELS_ENV, "triton")
    second = torch.device("cuda", 1)
    assert fused_or_torch(second, lambda k: events.append("kernel") or "kernel", lambda: "torch", name="combine") == "kernel"
    assert events == [("enter", second), "kernel", "exit"]
    events.clear()
    assert fused_or_torch(second, lambda k: "kernel", lambda: events.append("torch") or "torch", name="operand") == "torch"
    assert events == ["torch"]  # the torch ops follow their tensors by themselves


def test_missing_triton_means_torch_ops_without_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv(KERNELS_ENV, "triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    monkeypatch.delitem(sys.modules, "clipengine.image.gpu_triton", raising=False)
    monkeypatch.delattr(clipengine.image, "gpu_triton", raising=False)
    with caplog.at_level(logging.WARNING):
        assert fused_or_torch(CUDA, lambda k: pytest.fail("no triton"), lambda: "torch", name="combine") == "torch"
    assert gpu_fused._unavailable and not caplog.records


def test_a_triton_that_fails_to_import_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    import builtins

    real_import = builtins.__import__

    def broken(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "clipengine.image" and args and args[2] and "gpu_triton" in args[2]:
            raise RuntimeError("triton was built for another torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setenv(KERNELS_ENV, "triton")
    monkeypatch.delitem(sys.modules, "clipengine.image.gpu_triton", raising=False)
    monkeypatch.delattr(clipengine.image, "gpu_triton", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    with caplog.at_level(logging.WARNING):
        assert fused_or_torch(CUDA, lambda k: pytest.fail("no kernels"), lambda: "torch", name="combine") == "torch"
        assert fused_or_torch(CUDA, lambda k: pytest.fail("no kernels"), lambda: "torch", name="combine") == "torch"
    assert gpu_fused._unavailable
    assert [r.getMessage() for r in caplog.records] == [
        "triton failed to import (RuntimeError: triton was built for another torch); GPU preprocessing uses torch "
        "ops (same values, slower)"]  # fmt: skip


def test_a_failing_kernel_falls_back_for_good_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    calls: list[str] = []

    def broken(kernels: Any) -> str:
        calls.append("kernel")
        raise RuntimeError("PTX JIT compilation failed")

    monkeypatch.setattr(gpu_fused, "triton_kernels", lambda device: None if gpu_fused._unavailable else SimpleNamespace())
    with caplog.at_level(logging.WARNING):
        assert fused_or_torch(CUDA, broken, lambda: "torch", name="combine") == "torch"
        assert fused_or_torch(CUDA, broken, lambda: "torch", name="combine") == "torch"
    assert calls == ["kernel"]  # not retried
    assert [r.getMessage() for r in caplog.records] == [
        "GPU preprocessing kernel failed (RuntimeError: PTX JIT compilation failed); using torch ops instead "
        "(same values, slower)"]  # fmt: skip


def test_out_of_memory_in_a_kernel_is_raised_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(kernels: Any) -> str:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu_fused, "triton_kernels", lambda device: SimpleNamespace())
    with pytest.raises(torch.OutOfMemoryError):
        fused_or_torch(CUDA, oom, lambda: "torch", name="combine")
    assert not gpu_fused._unavailable


# ---------------------------------------------------------------------------------------------
# On a CUDA device: the kernels against the torch ops


def digit_sums(src: int, dst: int, interpolation: str, pixels: Any) -> tuple[Any, Any, int]:
    """A pass's int32 digit sums for `pixels` (rows, src) uint8 on CUDA, as `resample_last_axis` makes them."""
    weights = device_weights(axis_weights(src, dst, interpolation), CUDA)
    rows = int(pixels.shape[0])
    operand = torch.zeros((max(rows, 17), int(weights.digits.shape[0])), dtype=torch.uint8, device=CUDA)
    operand[:rows, : weights.span] = pixels[:, weights.first : weights.first + weights.span] ^ 0x80
    return torch._int_mm(operand.view(torch.int8), weights.digits)[:rows], weights.offset, weights.n_out


@pytest.mark.gpu
@pytest.mark.parametrize(("src", "dst", "interpolation"), [(1280, 298, "bicubic"), (960, 224, "bicubic"),
                         (100, 224, "bicubic"), (7, 224, "bilinear"), (4000, 224, "bicubic"), (3, 1, "bicubic")])  # fmt: skip
@pytest.mark.parametrize("content", ["noise", "edges"])
def test_cuda_combine_kernel_equals_torch_ops(src: int, dst: int, interpolation: str, content: str) -> None:
    """Edges (0 / 255 alternating) overshoot with bicubic: the clamp at both ends is exercised."""
    from clipengine.image import gpu_triton

    gen = torch.Generator().manual_seed(src + dst)
    values = torch.randint(0, 256, (333, src), generator=gen) if content == "noise" else \
        torch.randint(0, 2, (333, src), generator=gen) * 255  # fmt: skip
    sums, offset, n_out = digit_sums(src, dst, interpolation, values.to(torch.uint8).to(CUDA))
    expected = _combine_digit_sums(sums, offset, n_out)
    got = gpu_triton.combine_digit_sums(sums, offset, n_out, 14)
    assert got.dtype == torch.uint8 and torch.equal(got, expected)
    if content == "edges" and dst < src <= 1280:  # a 4000 -> 224 shrink averages the edges away
        assert bool((expected == 0).any()) and bool((expected == 255).any())


@pytest.mark.gpu
def test_cuda_operand_kernel_equals_torch_ops() -> None:
    """Crops of a batch, a transposed crop (the vertical pass), 2-D and 1-D views, rows under 17."""
    from clipengine.image import gpu_triton

    batch = torch.randint(0, 256, (3, 3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)).to(CUDA)
    for source in (batch[..., 5:66], batch[:, :, 3:40, 7:20].transpose(2, 3), batch[1, 2, :, 9:30], batch[0, 0, 0, :33]):
        rows, span = source[..., 0].numel(), int(source.shape[-1])
        ours = torch.full((max(rows, 17), span + 5), 7, dtype=torch.uint8, device=CUDA)
        gpu_triton.write_operand(source, ours)
        assert torch.equal(ours[:rows, :span], (source ^ 0x80).reshape(rows, span))
        assert bool((ours[:, span:] == 7).all()) and bool((ours[rows:] == 7).all())  # pads untouched


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_normalise_kernel_equals_torch_ops(dtype: str) -> None:
    from clipengine.image import gpu_triton

    out_dtype = getattr(torch, dtype)
    crops = torch.randint(0, 256, (5, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)).to(CUDA)
    table = _device_table((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), CUDA)
    offsets = torch.arange(0, 3 * 256, 256, device=CUDA).view(1, 3, 1, 1)
    expected = table[crops.long() + offsets].to(out_dtype)
    got = gpu_triton.normalise_by_table(crops, table, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, expected)
    with prefer_kernels():
        assert torch.equal(_normalise(crops, PreprocessConfig(), out_dtype), expected)  # through the dispatch
    assert not gpu_fused._unavailable


@pytest.mark.gpu
def test_cuda_preprocess_with_and_without_kernels_is_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    """Images of several sizes (both pass orders, an upscale, a no-resize) through `preprocess_tensors`."""
    rng = np.random.default_rng(5)
    sizes = [(1280, 960), (1280, 960), (960, 1280), (100, 50), (224, 224), (333, 777), (3, 500)]
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)).to(CUDA) for w, h in sizes]
    cfg = PreprocessConfig()
    monkeypatch.setenv(KERNELS_ENV, "triton")
    monkeypatch.setenv(SKIP_ENV, "")  # every kernel, the operand's too
    with_kernels = preprocess_tensors(images, cfg, out_dtype=torch.float16)
    assert not gpu_fused._unavailable  # the kernels ran: no fallback
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert torch.equal(preprocess_tensors(images, cfg, out_dtype=torch.float16), with_kernels)


@pytest.mark.gpu
def test_cuda_kernels_on_a_second_gpu_equal_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels on "cuda:1" while cuda:0 is current (a `--gpu-decode cuda:1` loader)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    second = torch.device("cuda", 1)
    rng = np.random.default_rng(6)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)).to(second) for w, h in [(640, 480), (300, 700)]]
    monkeypatch.setenv(KERNELS_ENV, "torch")
    expected = preprocess_tensors(images, PreprocessConfig(), out_dtype=torch.float16)
    monkeypatch.setenv(KERNELS_ENV, "triton")
    monkeypatch.setenv(SKIP_ENV, "")
    with torch.cuda.device(0):
        got = preprocess_tensors(images, PreprocessConfig(), out_dtype=torch.float16)
    assert not gpu_fused._unavailable and torch.equal(got, expected)
