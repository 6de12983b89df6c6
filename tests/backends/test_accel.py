"""Numerical bounds of accel's fast paths vs the fp32 module (not their speed)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from clipengine.backends.accel import TEXT_LENGTH_BUCKET, AcceleratedCLIP, optimize
from clipengine.errors import BackendError

SOT, EOT = 49406, 49407


def _tokens(lengths: list[int], context: int = 77, seed: int = 0) -> torch.Tensor:
    """(N, context) token rows: SOT, random ids, EOT at position length-1, zero padding after."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(len(lengths), context, dtype=torch.long)
    for i, n in enumerate(lengths):
        tok[i, 0] = SOT
        tok[i, 1 : n - 1] = torch.randint(1, 49000, (n - 2,), generator=g)
        tok[i, n - 1] = EOT
    return tok


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).min())


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, 32, 32, generator=g), _tokens([3, 10, 21, 77, 9])


@pytest.fixture(scope="module")
def reference(tiny_model, inputs):  # type: ignore[no-untyped-def]
    pixels, tokens = inputs
    with torch.no_grad():
        return tiny_model.encode_image(pixels), tiny_model.encode_text(tokens)


def test_fp32_prune_and_truncate_match_module_exactly_up_to_rounding(tiny_model, inputs, reference) -> None:  # type: ignore[no-untyped-def]
    fast = optimize(tiny_model, precision="fp32")
    img, txt = fast.encode_image(inputs[0]), fast.encode_text(inputs[1])
    assert img.dtype == txt.dtype == torch.float32
    torch.testing.assert_close(img, reference[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, reference[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("patch", "size"), [(8, (32, 32)), (8, (35, 42)), (16, (64, 48)), (32, (224, 224))])
def test_patch_embed_matmul_equals_the_convolution(patch: int, size: tuple[int, int]) -> None:
    """The GEMM form sums what the strided convolution sums, token order included; sizes that
    are not a multiple of the patch drop the same remainder rows / columns as the convolution."""
    from clipengine.models.pooled import patch_embed_matmul

    g = torch.Generator().manual_seed(patch)
    conv = torch.nn.Conv2d(3, 24, kernel_size=patch, stride=patch, bias=False)
    pixels = torch.randn(3, 3, *size, generator=g)
    with torch.no_grad():
        expected = conv(pixels).flatten(2).transpose(1, 2)
        got = patch_embed_matmul(conv, pixels)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_patch_matmul_tower_matches_the_convolution_tower(tiny_model, inputs, reference, precision) -> None:  # type: ignore[no-untyped-def]
    fast = optimize(tiny_model, precision=precision, patch_matmul=True)
    conv = optimize(tiny_model, precision=precision, patch_matmul=False)
    img, img_conv = fast.encode_image(inputs[0]), conv.encode_image(inputs[0])
    if precision == "fp32":
        torch.testing.assert_close(img, reference[0], atol=1e-5, rtol=1e-5)
    assert _min_cos(img, img_conv) >= 0.9999 and _min_cos(img, reference[0]) >= 0.999


def test_text_truncation_is_exact_for_short_batches(tiny_model) -> None:  # type: ignore[no-untyped-def]
    tokens = _tokens([4, 7, 12], seed=3)
    # Junk after EOT must not matter either: the causal mask hides it from the EOT position.
    noisy = tokens.clone()
    noisy[:, 20:] = torch.randint(1, 49000, (3, 57))
    with torch.no_grad():
        ref = tiny_model.encode_text(tokens)
    fast = optimize(tiny_model, precision="fp32", prune=False)
    torch.testing.assert_close(fast.encode_text(tokens), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.encode_text(noisy), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("needed", "available", "expected"),
    [(1, 77, TEXT_LENGTH_BUCKET), (8, 77, 8), (9, 77, 16), (76, 77, 77), (77, 77, 77), (5, 4, 4)],
)
def test_text_length_rounds_up_to_bucket_and_caps_at_context(needed: int, available: int, expected: int) -> None:
    assert AcceleratedCLIP.text_length(needed, available) == expected


@pytest.mark.parametrize("prune", [True, False])
def test_bf16_cosine_at_least_0999(tiny_model, inputs, reference, prune: bool) -> None:  # type: ignore[no-untyped-def]
    fast = optimize(tiny_model, precision="bf16", prune=prune)
    assert _min_cos(fast.encode_image(inputs[0]), reference[0]) >= 0.999
    assert _min_cos(fast.encode_text(inputs[1]), reference[1]) >= 0.999


def test_resnet_tower_bf16_cosine_at_least_0999(tiny_resnet_model) -> None:  # type: ignore[no-untyped-def]
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_resnet_model.encode_image(pixels)
    fast = optimize(tiny_resnet_model, precision="bf16")
    assert _min_cos(fast.encode_image(pixels), ref) >= 0.999


def test_optimize_leaves_callers_module_untouched(tiny_model) -> None:  # type: ignore[no-untyped-def]
    before = copy.deepcopy(tiny_model.state_dict())
    optimize(tiny_model, precision="bf16")
    after = tiny_model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


def test_empty_batches(tiny_model) -> None:  # type: ignore[no-untyped-def]
    fast = optimize(tiny_model, precision="fp32")
    assert fast.encode_text(torch.zeros(0, 77, dtype=torch.long)).shape == (0, 32)


@pytest.mark.parametrize(
    "kwargs",
    [dict(precision="int4"), dict(compile="fastest"), dict(cuda_graphs=True, device="cpu")],
)
def test_bad_options_raise_backend_error(tiny_model, kwargs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackendError):
        optimize(tiny_model, **kwargs)


@pytest.mark.slow
def test_compiled_bf16_cosine_at_least_0999(tiny_model, inputs, reference) -> None:  # type: ignore[no-untyped-def]
    # torch.compile (inductor, frozen weights -> oneDNN bf16 kernels); tens of seconds on 2 cores.
    fast = optimize(tiny_model, precision="bf16", compile=True)
    assert _min_cos(fast.encode_image(inputs[0]), reference[0]) >= 0.999
    assert _min_cos(fast.encode_text(inputs[1]), reference[1]) >= 0.999


@pytest.mark.slow
def test_vit_b32_bf16_cosine_at_least_0999() -> None:
    # One full-size bound: bf16 error grows with depth and width, the tiny model would hide it.
    from clipengine.models.clip import build_model
    from clipengine.models.config import get_config

    torch.manual_seed(0)
    model = build_model(get_config("ViT-B-32"))
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    tokens = _tokens([6, 30], seed=5)
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(pixels), model.encode_text(tokens)
    fast = optimize(model, precision="bf16")
    assert _min_cos(fast.encode_image(pixels), ref_img) >= 0.999
    assert _min_cos(fast.encode_text(tokens), ref_txt) >= 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
# compile + our CUDA graphs is the measured best GPU path (docs/performance.md); max-autotune spends
# minutes autotuning even a tiny model, which the device budget for the GPU tests cannot spare.
@pytest.mark.parametrize(("compile_mode", "graphs"), [(False, False), (False, True), (True, True)])
def test_cuda_paths_cosine_at_least_0999(tiny_model, inputs, reference, precision, compile_mode, graphs) -> None:  # type: ignore[no-untyped-def]
    fast = optimize(tiny_model, device="cuda", precision=precision, compile=compile_mode, cuda_graphs=graphs)
    for _ in range(2):  # second call replays the captured graph
        img = fast.encode_image(inputs[0]).cpu()
        txt = fast.encode_text(inputs[1]).cpu()
    assert _min_cos(img, reference[0]) >= 0.999
    assert _min_cos(txt, reference[1]) >= 0.999


def test_cuda_graphs_capture_and_replay_on_the_inputs_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA-free check of `_CudaGraphs`' calls into torch.cuda (faked here): the warm-up stream, the
    capture and the replay are on the inputs' device, not the current one (for "cuda:1" a capture
    on cuda:0's stream records nothing, and every replay returned the first batch's output), and
    the capture is "thread_local" (in "global" mode the GPU loader's thread, decoding meanwhile,
    has its CUDA calls refused and invalidates the capture)."""
    import contextlib

    from clipengine.backends import accel

    current = ["cuda:0"]  # the fake current device
    seen: dict[str, object] = {}

    @contextlib.contextmanager
    def device(dev: object) -> object:
        saved, current[0] = current[0], str(dev)
        try:
            yield
        finally:
            current[0] = saved

    class Stream:
        def __init__(self, dev: object = None) -> None:
            seen["stream"] = str(dev) if dev is not None else current[0]

        def wait_stream(self, other: object) -> None:
            pass

    class Graph:
        def replay(self) -> None:
            seen["replay"] = current[0]

    @contextlib.contextmanager
    def graph(cuda_graph: Graph, pool: object = None, stream: object = None,
              capture_error_mode: str = "global") -> object:  # fmt: skip
        seen["capture"], seen["mode"] = current[0], capture_error_mode
        yield

    for name, fake in {"device": device, "Stream": Stream, "current_stream": lambda: Stream(),
                       "stream": lambda s: contextlib.nullcontext(), "CUDAGraph": Graph, "graph": graph}.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, fake)
    graphs = accel._CudaGraphs(lambda x: x * 2)
    x = torch.ones(2, 3)  # on "cpu": a device other than the current one
    out = graphs(x)
    assert torch.equal(out, x * 2)  # the (eager, faked) capture's output, cloned
    assert seen == {"stream": "cpu", "capture": "cpu", "mode": "thread_local", "replay": "cpu"}


@pytest.mark.gpu
def test_cuda_graph_capture_while_another_thread_uses_the_gpu(tiny_model, inputs, reference) -> None:  # type: ignore[no-untyped-def]
    """As `embed --gpu-decode --compile` runs: the loader thread decodes (allocates, copies from
    the host, launches kernels) while the model thread captures a new batch shape. Each capture
    must succeed and each replay give the model's output; the other thread's calls must not fail."""
    import sys
    import threading

    import numpy as np

    fast = optimize(tiny_model, device="cuda", precision="fp16", cuda_graphs=True)
    stop, errors = threading.Event(), []

    def busy() -> None:
        rng = np.random.default_rng(0)
        try:
            while not stop.is_set():
                # A size new to the caching allocator each time (cudaMalloc: the capture empties
                # the cache first) and a pageable host copy, as the loader's CPU fallback makes.
                host = torch.from_numpy(rng.random(int(rng.integers(1, 1 << 20)), dtype=np.float32))
                (host.to("cuda") * 2).sum()
        except Exception as e:  # reported by the assert below
            errors.append(e)

    thread = threading.Thread(target=busy)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # let the busy thread run between the capture's launches
    thread.start()
    try:
        pixels = inputs[0].cuda()
        for n in range(1, 6):  # five shapes: five captures with the other thread at work
            for _ in range(2):
                out = fast.encode_image(pixels[:n]).cpu()
            assert _min_cos(out, reference[0][:n]) >= 0.999
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert not errors


def test_torchbackend_hook_keeps_unit_norm_outputs_within_bound(tiny_model) -> None:  # type: ignore[no-untyped-def]
    # The hook proposed for TorchBackend: accelerate its own (already cast) module in place and
    # swap the two encode functions; TorchBackend._run still normalises under inference_mode.
    import numpy as np

    from clipengine.backends.torch_backend import TorchBackend

    ref = TorchBackend(copy.deepcopy(tiny_model), precision="fp32")
    fast_backend = TorchBackend(copy.deepcopy(tiny_model), precision="bf16")
    fast = optimize(fast_backend.model, device=fast_backend.device, precision="bf16", copy=False)
    fast_backend._encode_image_fn, fast_backend._encode_text_fn = fast.encode_image, fast.encode_text
    pixels = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    tokens = _tokens([3, 8, 15, 30]).numpy()
    for a, b in ((fast_backend.encode_images(pixels), ref.encode_images(pixels)),
                 (fast_backend.encode_texts(tokens), ref.encode_texts(tokens))):  # fmt: skip
        assert a.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
        assert float((a * b).sum(axis=1).min()) >= 0.999
