"""Fast inference paths for the PyTorch CLIP: low-precision casts, exact graph pruning, torch.compile, CUDA graphs.

`optimize(module)` returns an `AcceleratedCLIP` whose `encode_image` / `encode_text` take and return
torch tensors exactly like `CLIP.encode_image` / `CLIP.encode_text` (unnormalised (N, D), always
float32 out). What it does, each part measured in `benchmarks/compare_peers.py` (see
docs/performance.md):

- precision: a private copy of the weights cast to bf16 / fp16 (the caller's module is untouched);
  "fp8" adds FP8 (e4m3) linear layers in all transformer blocks but the last (`backends/fp8.py`).
  Parameters keep `requires_grad` as they are and every call runs under `torch.no_grad()`. pytorch
  issue 151934 reports a slow CPU path for bf16 weights with `requires_grad=False`; one loaded run
  here saw 3x, two quiet re-checks saw no difference (docs/performance.md, "Pitfalls").
- exact pruning (`prune=True`): only the class token (image) or end-of-text token (text) of the last
  transformer block feeds the output, so that block computes queries, attention output and MLP for
  that one row (keys and values still for every token). Same arithmetic, ~7% less work
  (`models/pooled.py`, shared with the ONNX export).
- exact text truncation (`truncate_text=True`): under the causal mask no position after a text's
  end-of-text (EOT) token can change the EOT state, so each batch runs only up to its longest
  text's EOT, rounded up to a multiple of `TEXT_LENGTH_BUCKET` (few distinct shapes for compile).
- `compile`: torch.compile (inductor) with weight freezing, so on CPU linear layers become prepacked
  oneDNN (AVX-512 BF16 / AMX) kernels with fused bias/activation; on CUDA Triton kernels.
- `cuda_graphs`: each (tower, input shape) is captured once in a CUDA graph and replayed, which
  removes the per-kernel launch cost that dominates small batches.
"""

from __future__ import annotations

import copy as _copy
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import BackendError, InputError
from ..models.pooled import PooledTextTower, PooledVisionTransformer
from .base import TEXT_LENGTH_BUCKET

if TYPE_CHECKING:
    from ..models.clip import CLIP

__all__ = ["PRECISIONS", "TEXT_LENGTH_BUCKET", "AcceleratedCLIP", "default_precision", "optimize"]

logger = logging.getLogger(__name__)

# precision name -> the dtype the module is cast to. "fp8" is bf16 with the transformer blocks'
# linear layers in FP8 (backends/fp8.py; FP8 GPUs, CPUs only as a slow reference).
PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.bfloat16,
}
_MAX_CUDA_GRAPHS = 32  # captured graphs kept per tower (one per input shape), least recently used out
_COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


def default_precision(device: str | torch.device) -> str:
    """The fastest precision that keeps cosine >= 0.999 vs fp32: fp16 on CUDA, bf16 on CPUs with
    native bf16 dot products (AVX-512 BF16 / AMX), else fp32."""
    if torch.device(device).type == "cuda":
        return "fp16"
    mkldnn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return "bf16" if mkldnn and _cpu_has_bf16() else "fp32"


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _ImageTower(nn.Module):
    """Any image tower (ResNet, or ViT without pruning): casts the input, returns float32."""

    def __init__(self, visual: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.visual = visual
        self.dtype = dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels.to(self.dtype)).float()


class _Frozen:
    """Runs a compiled callable with inductor weight freezing on, so each (re)compilation folds the
    weights into the graph: on CPU that turns linears / convs into prepacked oneDNN kernels with
    fused bias and activation. (`torch.compile(options={"freezing": True})` does *not* do this in
    torch 2.13: the output code still calls plain addmm; only the config flag at compile time works.)
    """

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config  # only needed once compile is asked for

        with torch._inductor.config.patch(freezing=True):
            return self.fn(*inputs)


class _CudaGraphs:
    """Replays one captured CUDA graph per input shape of `fn` (static input/output buffers)."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.graphs: OrderedDict[tuple[tuple[int, ...], ...], tuple[object, list[torch.Tensor], torch.Tensor]]
        self.graphs = OrderedDict()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple(tuple(t.shape) for t in inputs)
        # Streams, capture and replay on the inputs' GPU, not the current device: for "cuda:1" the
        # capture ran on cuda:0's stream, recorded nothing, and every replay returned the first output.
        with torch.cuda.device(inputs[0].device):
            entry = self.graphs.get(key)
            if entry is None:
                entry = self._capture(inputs)
                self.graphs[key] = entry
                if len(self.graphs) > _MAX_CUDA_GRAPHS:
                    self.graphs.popitem(last=False)
            else:
                self.graphs.move_to_end(key)
            graph, static_in, static_out = entry
            for buf, t in zip(static_in, inputs, strict=True):
                buf.copy_(t, non_blocking=True)
            graph.replay()  # type: ignore[attr-defined]
            return static_out.clone()

    def _capture(
        self, inputs: tuple[torch.Tensor, ...]
    ) -> tuple[object, list[torch.Tensor], torch.Tensor]:
        static_in = [t.clone() for t in inputs]
        stream = torch.cuda.Stream(inputs[0].device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture (cuBLAS/SDPA workspace, autotune)
            for _ in range(3):
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # "thread_local", as inductor captures: in the default "global" mode a CUDA call another
        # thread makes meanwhile (the GPU loader's decode, its cudaMalloc or host copies) is refused
        # ("operation not permitted when stream is capturing") and invalidates this capture.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out


def _to_fp8(module: CLIP, device: torch.device) -> None:
    """FP8 linears in every transformer block but the last, both towers (ResNet towers stay bf16)."""
    from ..models.clip import VisionTransformer
    from .fp8 import check_fp8_device, quantize_blocks_fp8

    check_fp8_device(device)
    if isinstance(module.visual, VisionTransformer):
        quantize_blocks_fp8(module.visual.transformer.resblocks)
    quantize_blocks_fp8(module.transformer.resblocks)


class AcceleratedCLIP:
    """A CLIP prepared for fast inference; `encode_image` / `encode_text` mirror `CLIP`'s methods.

    Outputs are float32 and unnormalised, like `CLIP.encode_*`. Build it with `optimize`.
    """

    def __init__(
        self,
        module: CLIP,
        *,
        device: torch.device,
        precision: str,
        compile_mode: str | None,
        cuda_graphs: bool,
        prune: bool,
        truncate_text: bool,
        patch_matmul: bool = False,
    ) -> None:
        self.module = module
        self.device = device
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.compile_mode = compile_mode
        self.cuda_graphs = cuda_graphs
        self.truncate_text = truncate_text
        self.context_length = module.context_length
        from ..models.clip import VisionTransformer

        if prune and isinstance(module.visual, VisionTransformer):
            image: nn.Module = PooledVisionTransformer(module.visual, patch_matmul=patch_matmul)
        else:
            image = _ImageTower(module.visual, self.dtype)
        text: nn.Module = PooledTextTower(module, prune)
        self._image = self._wrap(image)
        self._text = self._wrap(text)

    def _wrap(self, tower: nn.Module) -> Callable[..., torch.Tensor]:
        fn: Callable[..., torch.Tensor] = tower
        if self.compile_mode is not None:
            mode = None if self.compile_mode == "default" else self.compile_mode
            fn = torch.compile(tower, mode=mode, dynamic=False)
            if self.device.type == "cpu":
                fn = _Frozen(fn)
        if self.cuda_graphs:
            fn = _CudaGraphs(fn)
        return fn

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D) float32."""
        return self._image(pixels.to(self.device, non_blocking=True))

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, D) float32, pooled at each text's EOT token (its highest id)."""
        tokens = tokens.to(self.device, non_blocking=True)
        eot = tokens.to(torch.int32).argmax(dim=-1).long()  # (N,)
        if self.truncate_text and tokens.shape[0] > 0:
            length = self.text_length(int(eot.max()) + 1, tokens.shape[1])
            tokens = tokens[:, :length]
        return self._text(tokens, eot)

    @staticmethod
    def text_length(needed: int, available: int) -> int:
        """Tokens to keep: `needed` (longest EOT + 1) rounded up to the bucket, at most `available`."""
        bucket = -(-needed // TEXT_LENGTH_BUCKET) * TEXT_LENGTH_BUCKET
        return min(bucket, available)


def optimize(
    module: CLIP,
    *,
    device: str | torch.device = "cpu",
    precision: str | None = None,
    compile: bool | str = False,
    cuda_graphs: bool = False,
    prune: bool = True,
    truncate_text: bool = True,
    copy: bool = True,
    patch_matmul: bool = True,
) -> AcceleratedCLIP:
    """Prepare `module` for fast inference on `device` (on a copy of it unless `copy=False`).

    Args:
        module: a `clipengine.models.clip.CLIP` (any tower type; pruning applies to ViT towers).
        device: "cpu", "cuda", "cuda:1", ...
        precision: "fp32", "bf16", "fp16" or "fp8"; None picks `default_precision(device)`.
            "fp8" needs an FP8 GPU (compute capability >= 8.9) for speed; its deviation from
            fp32 is measured, not bounded at 0.999 (docs/performance.md).
        compile: False, True (inductor default mode) or a torch.compile mode name
            ("max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"). On CPU the weights
            are frozen into the graph (oneDNN prepacked bf16 kernels): later edits to the module's
            weights are not seen, and the packed copies add one weight-sized buffer. Compilation
            happens on the first call for each input shape (text: each length bucket), so warm up
            once per batch size; inductor caches compiled code on disk across processes.
        cuda_graphs: capture each input shape in a CUDA graph (CUDA only; best for small batches).
        prune: compute only the pooled row in the last block (exact; ViT and text towers).
        truncate_text: run text only up to the batch's longest EOT (exact, bucketed by 8).
        copy: work on a private copy of the weights (default). False casts / moves `module`
            itself, for owners such as TorchBackend that already hold their own cast module.
        patch_matmul: ViT patch embedding as one GEMM instead of the convolution (same sums,
            `models.pooled.patch_embed_matmul`): on an H200 cuDNN's kernel for it took a third of
            a batch-1024 forward; on this 2-core CPU compiled bf16 gains ~4 %. Applies to the
            pruned ViT tower (`prune=True`).

    Returns:
        An `AcceleratedCLIP` with `encode_image(pixels)` and `encode_text(tokens)` -> float32 (N, D).

    Raises:
        InputError (a BackendError): unknown precision or compile mode.
        BackendError: CUDA requested but unavailable, or CUDA graphs requested on a non-CUDA device.

    Example:
        >>> fast = optimize(model, precision="bf16", compile=True)
        >>> feats = fast.encode_image(torch.randn(32, 3, 224, 224))
    """
    dev = torch.device(device)
    precision = precision or default_precision(dev)
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {str(dev)!r} requested but CUDA is not available; use device='cpu'")
    if cuda_graphs and dev.type != "cuda":
        raise BackendError(f"cuda_graphs=True needs a CUDA device, got {str(dev)!r}")
    compile_mode: str | None
    if compile is True:
        compile_mode = "default"
    elif compile is False or compile is None:
        compile_mode = None
    elif compile in _COMPILE_MODES:
        compile_mode = str(compile)
    else:
        raise InputError(f"unknown compile mode {compile!r}; expected a bool or one of {_COMPILE_MODES}")
    if cuda_graphs and compile_mode in ("reduce-overhead", "max-autotune"):
        # Those modes already capture CUDA graphs (inductor cudagraph trees); do not nest captures.
        cuda_graphs = False
    # By default a private copy: casting in place would change the caller's model. requires_grad
    # stays True (see module docstring: bf16 + requires_grad=False is a slow CPU path).
    fast = _copy.deepcopy(module) if copy else module
    fast = fast.eval().to(device=dev, dtype=PRECISIONS[precision])
    if precision == "fp8":
        _to_fp8(fast, dev)
        if compile_mode is None:
            logger.warning(
                "precision fp8 without compile quantizes activations in separate kernels: measured 2x "
                "slower than fp16 on an H200 (docs/performance.md); use compile=True"
            )
    logger.info(
        "accelerated CLIP: device=%s precision=%s compile=%s cuda_graphs=%s prune=%s truncate_text=%s "
        "patch_matmul=%s", dev, precision, compile_mode, cuda_graphs, prune, truncate_text, patch_matmul,
    )
    return AcceleratedCLIP(
        fast,
        device=dev,
        precision=precision,
        compile_mode=compile_mode,
        cuda_graphs=cuda_graphs,
        prune=prune,
        truncate_text=truncate_text,
        patch_matmul=patch_matmul,
    )
