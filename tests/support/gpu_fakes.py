"""Stand-ins for nvjpeg that spawned processes can import (tests/support is on every test process's path)."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import torch
from PIL import Image


def pil_batch_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Stands in for nvjpeg: RGB as stored (the decoder applies EXIF orientation itself)."""
    out = []
    for t in data:
        with Image.open(io.BytesIO(t.numpy().tobytes())) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device))
    return out


def black_unless_kernels_preferred(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """`pil_batch_decode` in a thread that asked for the fused preprocessing kernels
    (`gpu_fused.prefer_kernels`, as every loader of a multi-loader run does); black images elsewhere
    (not an error: the decoder would hand the files to the CPU path and hide it)."""
    from clipengine.image import gpu_fused

    decoded = pil_batch_decode(data, device)
    return decoded if getattr(gpu_fused._thread, "preferred", False) else [torch.zeros_like(t) for t in decoded]


def exit_at_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A decode process that dies mid-run (a driver crash, the OOM killer). In the test's own process
    (its loader thread) it decodes, slowly, so files are still unclaimed when the process dies."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        os._exit(3)
    time.sleep(1.0)
    return pil_batch_decode(data, device)


def tiny_model_cfg(model):  # type: ignore[no-untyped-def]
    """The preprocessing of the test suite's tiny ClipModel."""
    from clipengine.image.preprocess import PreprocessConfig

    return PreprocessConfig(image_size=model.config.vision.image_size)


def slow_in_children(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode processes that take a minute to start (their warm-up decode); this process decodes at once."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        time.sleep(60)
    return pil_batch_decode(data, device)


def slow_here(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """This process's loader thread decodes slowly (0.5 s a call); the decode processes at once."""
    import multiprocessing

    if multiprocessing.parent_process() is None:
        time.sleep(0.5)
    return pil_batch_decode(data, device)
