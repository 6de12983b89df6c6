"""Whether the GPU preprocessing runs its fused Triton kernels (`image.gpu_triton`) or torch ops.

The kernels give the same values as the torch ops and take a third less GPU time per image
(H200, session 15: 25.9 against 39.0 us per 1280x960 photo), at a higher host cost per launch
(triton's launcher is Python). So they pay where the GPU is the limit and not the loader's host
thread, which is what the same session measured over 196,608 1280x960 JPEGs:

- `embed --gpu-decode-procs 4` (4 loaders share one GPU): the loaders ran 8,541 / 8,347 img/s
  with the kernels against 7,786 / 7,844 / 7,750 without;
- one loader thread (the default): `embed_folder` took 34.1 / 37.1 s with them against
  32.5 / 33.1 / 34.7 s without.

Hence the default, "auto": the kernels run in the threads that ask for them (`prefer_kernels`),
which the multi-loader path (`pipeline.gpu_procs`) does for its loader thread and its processes,
and nowhere else. `CLIPENGINE_GPU_KERNELS=triton` uses them everywhere, `torch` nowhere (benchmarks
compare the two that way; decode processes inherit the environment). `CLIPENGINE_GPU_KERNEL_SKIP`
(a comma list of `KERNEL_NAMES`) leaves single kernels out, for the benchmarks' A/B of each; unset,
it leaves out `operand`, not yet measured on a GPU.

If triton is missing (it ships with PyTorch's CUDA wheels), or a kernel fails to compile or launch
(no C compiler for its launcher, an old driver), this process falls back to the torch ops for good,
with one warning.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

from clipengine.errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = ["KERNELS_ENV", "KERNEL_NAMES", "SKIP_ENV", "check_environment", "fused_or_torch", "prefer_kernels",
           "triton_kernels"]

logger = logging.getLogger(__name__)

KERNELS_ENV = "CLIPENGINE_GPU_KERNELS"
_CHOICES = ("auto", "triton", "torch")

_unavailable = False  # triton missing, or one of its kernels failed in this process: not retried
_thread = threading.local()  # .preferred: this thread asked for the kernels (`prefer_kernels`)

T = TypeVar("T")

SKIP_ENV = "CLIPENGINE_GPU_KERNEL_SKIP"
KERNEL_NAMES = ("operand", "combine", "normalise")
# Left out unless SKIP_ENV is set (even empty): `operand` came after session 15's GPU run, and stays
# out of the default until a GPU run measures it (`bash scripts/gpu_check.sh fused`).
_DEFAULT_SKIP = "operand"


@contextmanager
def prefer_kernels() -> Iterator[None]:
    """Within: this thread's GPU preprocessing uses the kernels where they run (CUDA, triton),
    unless `CLIPENGINE_GPU_KERNELS=torch`."""
    before = getattr(_thread, "preferred", False)
    _thread.preferred = True
    try:
        yield
    finally:
        _thread.preferred = before


def check_environment() -> None:
    """Raise InputError for a bad `CLIPENGINE_GPU_KERNELS` or `CLIPENGINE_GPU_KERNEL_SKIP` now: the
    multi-loader path calls it before its processes start, whose errors would come back as tracebacks."""
    _choice()
    _skipped()


def _choice() -> str:
    choice = os.environ.get(KERNELS_ENV, "").strip().lower() or "auto"
    if choice not in _CHOICES:
        # InputError (a ValueError): the CLI reports it in one line, not as a loader's traceback.
        raise InputError(f"{KERNELS_ENV}={os.environ[KERNELS_ENV]!r}: use one of {', '.join(_CHOICES)}")
    return choice


def triton_kernels(device: torch.device) -> ModuleType | None:
    """`image.gpu_triton` where its kernels are to run on `device`, else None (use the torch ops)."""
    global _unavailable
    choice = _choice()
    if choice == "auto":
        choice = "triton" if getattr(_thread, "preferred", False) else "torch"
    # Under triton's interpreter (TRITON_INTERPRET=1: the kernels run in numpy) CPU tensors take them
    # too: tests/image/test_gpu_triton_interp.py runs the whole preprocessing that way in CI.
    on_device = device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    if _unavailable or choice == "torch" or not on_device:
        return None
    try:
        from clipengine.image import gpu_triton
    except ImportError as err:
        _unavailable = True
        logger.debug("triton is not importable (%s): GPU preprocessing uses torch ops", err)
        return None
    except Exception as err:  # a triton that imports but breaks (another torch's build, say)
        _unavailable = True
        logger.warning("triton failed to import (%s: %s); GPU preprocessing uses torch ops (same values, "
                       "slower)", type(err).__name__, err)  # fmt: skip
        return None
    return gpu_triton


def fused_or_torch(device: torch.device, fused: Callable[[ModuleType], T], torch_ops: Callable[[], T], *,
                   name: str) -> T:  # fmt: skip
    """`fused(gpu_triton)` where the kernels are to run on `device`, else (or if they fail) `torch_ops()`.

    `name` is the kernel's, for `CLIPENGINE_GPU_KERNEL_SKIP` (a comma list: those use torch ops)."""
    global _unavailable
    kernels = triton_kernels(device)
    if kernels is None or name in _skipped():
        return torch_ops()
    try:
        with _launching_on(device):
            return fused(kernels)
    except Exception as err:  # triton raises its own types for compile and launch failures
        if type(err).__name__ == "OutOfMemoryError":  # the torch ops would need more memory still
            raise
        _unavailable = True
        logger.warning("GPU preprocessing kernel failed (%s: %s); using torch ops instead (same values, "
                       "slower)", type(err).__name__, err)  # fmt: skip
        return torch_ops()


def _skipped() -> set[str]:
    names = {n.strip().lower() for n in os.environ.get(SKIP_ENV, _DEFAULT_SKIP).split(",") if n.strip()}
    unknown = names - set(KERNEL_NAMES)
    if unknown:
        raise InputError(f"{SKIP_ENV}: unknown kernel {', '.join(sorted(unknown))}; the kernels are {', '.join(KERNEL_NAMES)}")
    return names


def _launching_on(device: torch.device) -> AbstractContextManager[object]:
    """`device` as the current CUDA device while its kernels launch: triton launches on the current
    device and that device's current stream, not on its tensors' device as torch ops do. Without it,
    for a "cuda:1" loader the kernels ran on cuda:0, on another stream than the GEMM between them."""
    if device.type != "cuda" or device.index is None:  # plain "cuda" is the current device already
        return nullcontext()
    import torch

    return torch.cuda.device(device)
