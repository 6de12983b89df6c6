"""PyTorch backend: runs a CLIP module on CPU or CUDA in fp32 / bf16 / fp16 (fp8 on FP8 GPUs), returns unit-norm float32."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import BackendError, InputError
from ..types import FloatArray, IntArray

if TYPE_CHECKING:
    from ..models.clip import CLIP

__all__ = ["PRECISIONS", "TorchBackend", "check_device_precision"]

log = logging.getLogger(__name__)

# fp8: bf16 weights with FP8 linear layers in the transformer blocks (backends/fp8.py), FP8 GPUs only.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def _resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"bad device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {device!r} requested but CUDA is not available; use device 'cpu' (--device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise InputError(f"unsupported device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return dev


def check_device_precision(device: str, precision: str) -> torch.device:
    """The device `TorchBackend` would run on, or the error it would raise for `device` / `precision`.

    Also called by `api.load` before the checkpoint is read (or downloaded): a machine without CUDA,
    or fp16 on CPU, was refused only once the whole model had been loaded.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    dev = _resolve_device(device)
    if precision == "fp16" and dev.type != "cuda":
        raise BackendError(
            "fp16 needs a CUDA device (CPU kernels for fp16 are slow or missing); use bf16"
        )
    if precision == "fp8" and dev.type != "cuda":
        raise BackendError(
            "fp8 needs a CUDA GPU with FP8 tensor cores (L4, H100, ...); on CPU use bf16, "
            "or the ONNX / OpenVINO int8 engines"
        )
    return dev


class TorchBackend:
    """Arrays in, L2-normalised float32 embeddings out, through a CLIP nn.Module.

    Reduced precision casts the *weights* (no autocast: on CPU autocast is several times slower
    than bf16 weights). The backend takes ownership of `model`: it is moved / cast in place and its
    parameters are frozen. Every call runs under `torch.inference_mode()`. pytorch#151934 reports a
    CPU slow path for bf16 weights with `requires_grad=False` (weights re-packed per call). Measured
    here (torch 2.13, AVX-512 CPU), frozen bf16 weights were not slower: ViT-B/32 batch 32 CPU time
    image 2.29 s vs 2.58 s, text 1.93 s vs 2.01 s with requires_grad=True; a bare bf16 F.linear
    (2048x512, 1 or 77 rows) costs the same either way. So we freeze (no autograd bookkeeping).

    The encode functions come from `accel.optimize` on the backend's own module: the exact
    speed-ups (last-block pruning, text truncation at the batch's longest end-of-text) are on by
    default; `compile=True` (torch.compile + weight freezing) and `cuda_graphs=True` are opt-in
    (see docs/performance.md for what each measured).
    """

    name = "torch"

    def __init__(
        self,
        model: CLIP,
        device: str = "cpu",
        precision: str = "fp32",
        *,
        compile: bool | str = False,
        cuda_graphs: bool = False,
        prune: bool = True,
        truncate_text: bool = True,
    ) -> None:
        dev = check_device_precision(device, precision)
        self.device = str(dev)
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        if dev.type == "cuda":  # timed apart from the weights' copy: see `clipengine.load`'s log line
            t0 = time.perf_counter()
            torch.zeros(1, device=dev)  # creates the CUDA context (the first kernel launch)
            log.info("CUDA start-up on %s: %.2f s", dev, time.perf_counter() - t0)
        self.model = model.eval().to(device=dev, dtype=self.dtype).requires_grad_(False)
        cfg = model.config
        self.embed_dim = cfg.embed_dim
        self.image_size = cfg.vision.image_size
        self.context_length = cfg.text.context_length
        from .accel import optimize

        fast = optimize(
            self.model, device=dev, precision=precision, compile=compile, cuda_graphs=cuda_graphs,
            prune=prune, truncate_text=truncate_text, copy=False,
        )  # fmt: skip
        self._encode_image_fn: Callable[[torch.Tensor], torch.Tensor] = fast.encode_image
        self._encode_text_fn: Callable[[torch.Tensor], torch.Tensor] = fast.encode_text

    def __repr__(self) -> str:
        return f"TorchBackend({self.model.config.name}, device={self.device!r}, precision={self.precision!r})"

    def encode_images(self, pixels: FloatArray | torch.Tensor, *, normalize: bool = True) -> FloatArray:
        """(N, 3, H, W) preprocessed pixels -> (N, D) float32, unit L2 norm (`normalize=False`: as
        the tower gives them).

        `pixels` is a float32 NumPy array, or a float tensor on any device (e.g. already on this
        backend's GPU, as `pipeline.gpu_loading` makes them: no copy through the host).
        """
        expected = (3, self.image_size, self.image_size)
        if isinstance(pixels, torch.Tensor):
            if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected or not pixels.is_floating_point():
                raise InputError(
                    f"pixels must be float (N, {', '.join(map(str, expected))}); got "
                    f"{pixels.dtype} {tuple(pixels.shape)}"
                )
            x = pixels.to(self.device, self.dtype, non_blocking=True)
            return self._run(self._encode_image_fn, x, normalize)
        arr = np.asarray(pixels)
        if arr.ndim != 4 or arr.shape[1:] != expected:
            raise InputError(f"pixels must be (N, {', '.join(map(str, expected))}); got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):  # uint8 would run un-normalised, silently wrong
            raise InputError(f"pixels must be float (preprocessed); got {arr.dtype}")
        finite = np.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1) if arr.size else np.ones(0, bool)
        if not finite.all():  # as the folder backends: a NaN image gave a NaN "embedding", silently
            raise InputError(f"images contain NaN or infinite values ({_rows(~finite)})")
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(self.device, self.dtype)
        return self._run(self._encode_image_fn, x, normalize)

    def encode_texts(self, tokens: IntArray) -> FloatArray:
        """(N, L) int64 token ids -> (N, D) float32, unit L2 norm."""
        arr = np.asarray(tokens)
        if arr.ndim != 2 or arr.shape[1] != self.context_length or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(
                f"tokens must be integer (N, {self.context_length}); got {arr.dtype} {arr.shape}"
            )
        vocab = self.model.config.text.vocab_size
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):  # the embedding lookup's raw IndexError
            raise InputError(f"token ids must be in [0, {vocab}), got {arr.min()}..{arr.max()}")
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64)).to(self.device)
        return self._run(self._encode_text_fn, x)

    def _run(
        self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, normalize: bool = True
    ) -> FloatArray:
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        with torch.inference_mode():
            features = fn(x).float()
            if normalize:
                features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        out: FloatArray = features.cpu().numpy().astype(np.float32, copy=False)
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            # Checked here, on the host copy, not on the input: a check of a device tensor would
            # wait for the GPU before every batch. Either NaN / infinite pixels (a tensor input) or
            # an overflow of the model at this precision.
            raise InputError(
                f"the model returned NaN or infinite features ({_rows(~finite)}): NaN or infinite pixels, "
                f"or an overflow at {self.precision}"
            )
        return out


def _rows(bad: object) -> str:
    """'rows 0, 3 of 8' for a boolean mask of bad rows (at most 10 named)."""
    mask = np.asarray(bad, dtype=bool)
    rows = np.flatnonzero(mask)
    more = ", ..." if rows.size > 10 else ""
    return f"rows {', '.join(map(str, rows[:10]))}{more} of {mask.size}"
