"""Experiment: decode one batch on two decoders at once, the hardware JPEG engines and host cores + CUDA cores.

torchvision's batched `decode_jpeg` uses the GPU's hardware JPEG engines (NVJPG) on A100 / H100 /
H200; on an H200 it tops out near 7.7k 1280x960 images/s, and the SMs are mostly idle meanwhile
(the model needs ~36k img/s of them). nvImageCodec can decode on the CUDA cores instead
(`BackendKind.GPU_ONLY`: Huffman and IDCT in kernels). `make_split_decode` hands a fraction of
each batch to that decoder on a thread and a stream of its own while torchvision decodes the rest,
so both run together; `GpuJpegDecoder(decode_batch=...)` takes it as it is.

A prototype for benchmarks/gpu_decode_bench.py and benchmarks/gpu_e2e.py, not library code: it
goes into `image.gpu_decode` only if it pays on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def cuda_core_decoder(device: Any, kind: str = "GPU_ONLY") -> Callable[[list[Any]], list[Any]]:
    """nvImageCodec restricted to one backend kind (HW_GPU_ONLY, GPU_ONLY, HYBRID_CPU_GPU), as a
    function of encoded tensors -> (3, H, W) uint8 tensors on `device`, allocated on its own
    stream and synchronised before returning (None where it cannot decode one)."""
    import torch

    from clipengine.image.nvimgcodec_decode import _module, _params

    nv = _module()
    index = device.index if device.index is not None else torch.cuda.current_device()
    decoder = nv.Decoder(device_id=index, backends=[nv.Backend(getattr(nv.BackendKind, kind))])
    stream = torch.cuda.Stream(device)

    def decode(data: list[Any]) -> list[Any]:
        with torch.cuda.device(device), torch.cuda.stream(stream):
            images = decoder.decode([nv.CodeStream(t.numpy()) for t in data], params=_params(),
                                    cuda_stream=stream.cuda_stream)  # fmt: skip
            out = [None if im is None else torch.as_tensor(im, device=device).clone() for im in images]
        stream.synchronize()  # nvImageCodec's buffers go with `images`: the copies must be done
        return out

    return decode


def make_split_decode(device: Any, fraction: float, kind: str = "HYBRID_CPU_GPU") -> Callable[[list[Any], Any], list[Any]]:
    """A `gpu_decode.DecodeBatch`: the first `fraction` of each batch to nvImageCodec with
    backend `kind` (a worker thread), the rest to torchvision's hardware decode (this thread).

    GPU_ONLY (Huffman on the GPU) could not be created on the H200 (nvImageCodec 0.9: "Could not
    create decoder. Code: 7"); HYBRID_CPU_GPU decodes Huffman on the host's cores (16 there, idle)
    and the rest on the CUDA cores, 4.8k img/s alone on that machine."""
    import torch

    from clipengine.image.gpu_decode import _nvjpeg_decode

    cores = cuda_core_decoder(device, kind)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cuda-core-decode")

    def decode(data: list[Any], dev: Any) -> list[Any]:
        k = int(len(data) * fraction)
        on_cores = pool.submit(cores, data[:k]) if k else None
        on_engines = _nvjpeg_decode(data[k:], dev) if k < len(data) else []
        first = on_cores.result() if on_cores is not None else []
        consumer = torch.cuda.current_stream(dev)
        for image in first:
            if image is not None:
                image.record_stream(consumer)  # allocated on the worker's stream
        return [*first, *on_engines]

    return decode
