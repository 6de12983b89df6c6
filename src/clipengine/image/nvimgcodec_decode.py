"""Batched JPEG decode with NVIDIA nvImageCodec, as a `gpu_decode.DecodeBatch`.

The alternative to torchvision's `decode_jpeg` for `GpuJpegDecoder(library="nvimgcodec")`.
torchvision decodes a batch under one global lock with a single-threaded host parse, so the
hardware JPEG engines idle while the host prepares each batch; nvImageCodec (the decoder DALI
uses) parses on a thread pool and feeds the hardware decoder and the CUDA decoder together.
Install it with `pip install "nvidia-nvimgcodec-cu13[nvjpeg]"` (cu12 for CUDA 12).

Only GPU backends are enabled on a CUDA device: an image they cannot decode comes back None, and
`GpuJpegDecoder` hands it to the exact CPU decoder (libjpeg-turbo through Pillow), so the CPU
fallback stays the exact path. On a CPU device (tests, machines without a GPU) nvImageCodec's own
CPU backend decodes, which is how this adapter is tested without a GPU.

`fancy_upsampling` asks the JPEG decoders for libjpeg's interpolated chroma upsampling instead of
nvjpeg's default replication: closer to the exact path's pixels (what is measured is in
benchmarks/gpu_e2e.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["available", "decode_batch", "make_decode_batch"]

logger = logging.getLogger(__name__)


def available() -> bool:
    """Whether nvImageCodec's Python package imports here (it says nothing about a GPU)."""
    try:
        _module()
    except (ImportError, OSError):  # not installed, or its shared libraries do not load here
        return False
    return True


@lru_cache(maxsize=1)
def _module() -> Any:
    """The imported package. Its C++ side reports each codec library it cannot load (nvjpeg2k,
    nvtiff: not needed for JPEG) on the process's stderr at import, so fd 2 is pointed at
    /dev/null for the import. A missing nvjpeg shows later instead: every JPEG comes back None and
    `GpuJpegDecoder` warns that the CPU decoder took the batch."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):  # no usable fd 2: import as it is
            sys.stderr.flush()
            saved = os.dup(2)
            stack.callback(os.close, saved)
            devnull = os.open(os.devnull, os.O_WRONLY)
            stack.callback(os.close, devnull)
            os.dup2(devnull, 2)
            stack.callback(os.dup2, saved, 2)
        from nvidia import nvimgcodec  # type: ignore[import-not-found,unused-ignore]
    return nvimgcodec


@lru_cache(maxsize=8)
def _decoder(device: torch.device, fancy_upsampling: bool) -> Any:
    """One decoder per device and option set: creating one starts its thread pool and CUDA state."""
    nv = _module()
    options = ":fancy_upsampling=1" if fancy_upsampling else ""
    if device.type == "cpu":
        backends = [nv.Backend(nv.BackendKind.CPU_ONLY)]
        return nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=backends, options=options)
    kinds = (nv.BackendKind.HW_GPU_ONLY, nv.BackendKind.GPU_ONLY, nv.BackendKind.HYBRID_CPU_GPU)
    index = device.index if device.index is not None else _current_device()
    return nv.Decoder(device_id=index, backends=[nv.Backend(k) for k in kinds], options=options)


def _current_device() -> int:
    import torch

    return int(torch.cuda.current_device())


@lru_cache(maxsize=1)
def _params() -> Any:
    nv = _module()
    # Planar RGB is nvjpeg's native output and our (3, H, W) layout; grey JPEGs come back as RGB.
    # EXIF orientation stays off: `gpu_decode.orient` applies the header's, as for torchvision.
    return nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB, sample_format=nv.SampleFormat.P_RGB)


def make_decode_batch(fancy_upsampling: bool = False) -> Any:
    """A `DecodeBatch` with the given chroma upsampling (see the module docstring)."""

    def decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        return decode_batch(data, device, fancy_upsampling=fancy_upsampling)

    return decode


def decode_batch(
    data: list[torch.Tensor], device: torch.device, *, fancy_upsampling: bool = False
) -> list[torch.Tensor | None]:
    """Encoded JPEGs (1-D uint8 CPU tensors) -> (3, H, W) uint8 tensors on `device`; None where
    nvImageCodec could not decode one (the caller's CPU decoder takes those).

    The outputs are copies in torch's memory, made on a stream of their own that is waited for
    before nvImageCodec's buffers are released: nvImageCodec frees its images when the Python
    objects go, and queued torch work must never read freed memory (the race that a
    stream-unaware handover caused with torchvision, see `gpu_decode._nvjpeg_decode`).
    """
    import torch

    nv = _module()
    decoder = _decoder(device, fancy_upsampling)
    streams = [nv.CodeStream(t.numpy()) for t in data]  # no copy of the bytes
    if device.type == "cpu":
        images = decoder.decode(streams, params=_params())
        return [None if im is None else torch.from_numpy(im.cpu().__array__()).clone() for im in images]
    from clipengine.image.gpu_decode import _decode_stream

    consumer = torch.cuda.current_stream(device)
    stream = _decode_stream(device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        images = decoder.decode(streams, params=_params(), cuda_stream=stream.cuda_stream)
        out = [None if im is None else torch.as_tensor(im, device=device).clone() for im in images]
    stream.synchronize()  # the copies are done: nvImageCodec's buffers may go now
    del images
    consumer.wait_stream(stream)
    for image in out:
        if image is not None:
            image.record_stream(consumer)  # allocated on `stream`, used on the consumer's
    return out
