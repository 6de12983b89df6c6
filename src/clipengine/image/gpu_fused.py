"""Whether the GPU preprocessing runs its fused Triton kernels (`image.gpu_triton`) or torch ops.

The kernels are used on CUDA devices where triton imports (it ships with PyTorch's CUDA wheels).
They give the same values as the torch ops; they only read and write less memory. If triton is
missing, or a kernel fails to compile or launch (no C compiler for its launcher, an old driver),
this process falls back to the torch ops for good, with one warning.

`CLIPENGINE_GPU_KERNELS=torch` turns the kernels off (benchmarks compare the two that way, in
decode processes too, which inherit the environment); `triton`, the default, uses them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = ["KERNELS_ENV", "fused_or_torch", "triton_kernels"]

logger = logging.getLogger(__name__)

KERNELS_ENV = "CLIPENGINE_GPU_KERNELS"
_CHOICES = ("triton", "torch")

_unavailable = False  # triton missing, or one of its kernels failed in this process: not retried

T = TypeVar("T")


def triton_kernels(device: torch.device) -> ModuleType | None:
    """`image.gpu_triton` where its kernels run on `device`, else None (use the torch ops)."""
    global _unavailable
    choice = os.environ.get(KERNELS_ENV, "triton").strip().lower() or "triton"
    if choice not in _CHOICES:
        raise ValueError(f"{KERNELS_ENV}={os.environ[KERNELS_ENV]!r}: use one of {', '.join(_CHOICES)}")
    if _unavailable or choice == "torch" or device.type != "cuda":
        return None
    try:
        from clipengine.image import gpu_triton
    except ImportError as err:
        _unavailable = True
        logger.debug("triton is not importable (%s): GPU preprocessing uses torch ops", err)
        return None
    return gpu_triton


def fused_or_torch(device: torch.device, fused: Callable[[ModuleType], T], torch_ops: Callable[[], T]) -> T:
    """`fused(gpu_triton)` where the kernels run on `device`, else (or if they fail) `torch_ops()`."""
    global _unavailable
    kernels = triton_kernels(device)
    if kernels is None:
        return torch_ops()
    try:
        return fused(kernels)
    except Exception as err:  # triton raises its own types for compile and launch failures
        if type(err).__name__ == "OutOfMemoryError":  # the torch ops would need more memory still
            raise
        _unavailable = True
        logger.warning("GPU preprocessing kernel failed (%s: %s); using torch ops instead (same values, "
                       "slower)", type(err).__name__, err)  # fmt: skip
        return torch_ops()
