"""Where the GPU JPEG loader's time goes: each stage alone, on in-memory JPEGs (no file reads).

Rows, each on the same 1280x960 JPEGs (benchmarks/gpu_e2e.py's generator), timed for >= --seconds:

- header inspection (`inspect_encoded`, one thread): the reader threads' per-file work
- torchvision `decode_jpeg(list, device="cuda")`, raw, at several batch sizes
- nvImageCodec `Decoder.decode`, raw (through `nvimgcodec_decode.decode_batch`), same batches
- `GpuJpegDecoder.decode` for each library: raw decode + per-image bookkeeping + EXIF orientation
- nvImageCodec with one backend kind only (hardware engines / CUDA cores / CPU Huffman + GPU),
  and torchvision + nvImageCodec-on-CUDA-cores together (benchmarks/decode_split.py)
- `preprocess_tensors` on a decoded batch (resize / crop / normalise on the GPU), with Pillow's
  integer resize on int8 GEMMs (the default) and with session 4's float32 `F.interpolate`

Markdown on stdout. Usage: python benchmarks/gpu_decode_bench.py [--distinct 256] [--seconds 1.5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def rate(fn: Callable[[], int], seconds: float, sync: Callable[[], None]) -> float:
    """Items per second of `fn` (returns items per call), after one untimed call."""
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    sync()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--distinct", type=int, default=256)
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("--batches", default="64,256,1024")
    p.add_argument("--kinds", default="HW_GPU_ONLY,GPU_ONLY,HYBRID_CPU_GPU", help="nvImageCodec backend kinds to time alone")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test (nvImageCodec's CPU backend, no torchvision)")
    args = p.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_e2e import SMALL, cuda_missing, float_resize, make_jpeg

    from clipengine.image import nvimgcodec_decode
    from clipengine.image.gpu_decode import GpuJpegDecoder, _nvjpeg_decode, inspect_encoded
    from clipengine.image.gpu_preprocess import preprocess_tensors
    from clipengine.image.preprocess import PreprocessConfig

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and cuda_missing("gpu_decode_bench.py", "; --device cpu is a smoke test"):
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(i, *SMALL, str(Path(tmp) / f"{i}.jpg")) for i in range(args.distinct)]
        with multiprocessing.get_context("spawn").Pool(min(16, multiprocessing.cpu_count())) as pool:
            pool.map(make_jpeg, jobs)
        blobs = [Path(j[3]).read_bytes() for j in jobs]
    arrays = [np.frombuffer(b, np.uint8) for b in blobs]
    tensors = [torch.from_numpy(a.copy()) for a in arrays]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows: list[tuple[str, float]] = []

    def pick(n: int) -> list[int]:
        return [i % len(tensors) for i in range(n)]

    rows.append(("inspect_encoded (1 thread)", rate(lambda: len([inspect_encoded("x", a) for a in arrays]),
                                                    args.seconds, lambda: None)))  # fmt: skip
    libraries: list[tuple[str, Callable[..., object]]] = [("torchvision decode_jpeg", _nvjpeg_decode)] if cuda else []
    if nvimgcodec_decode.available():
        libraries.append(("nvimgcodec decode", nvimgcodec_decode.decode_batch))
    for name, decode in libraries:
        for b in (int(x) for x in args.batches.split(",")):
            batch = [tensors[i] for i in pick(b)]
            try:
                rows.append((f"{name}, batch {b} (raw)", rate(lambda d=decode, x=batch: len(d(x, device)), args.seconds, sync)))  # type: ignore[misc]
            except Exception as e:  # a row that fails is reported, the rest still run
                rows.append((f"{name}, batch {b}: {type(e).__name__}: {e}", float("nan")))
    if cuda and nvimgcodec_decode.available():
        from decode_split import cuda_core_decoder, make_split_decode

        batch = [tensors[i] for i in pick(256)]
        for kind in args.kinds.split(","):
            try:
                one = cuda_core_decoder(device, kind)
                rows.append((f"nvimgcodec {kind} only, batch 256 (raw + copy)",
                             rate(lambda d=one: sum(x is not None for x in d(batch)), args.seconds, sync)))  # type: ignore[misc]  # fmt: skip
            except Exception as e:
                rows.append((f"nvimgcodec {kind} only: {type(e).__name__}: {e}", float("nan")))
        for fraction in (0.25, 0.4):
            try:
                split = make_split_decode(device, fraction)
                rows.append((f"torchvision + nvimgcodec HYBRID_CPU_GPU together ({fraction:.0%} on the hybrid), batch 256",
                             rate(lambda d=split: len(d(batch, device)), args.seconds, sync)))  # type: ignore[misc]  # fmt: skip
            except Exception as e:
                rows.append((f"split {fraction}: {type(e).__name__}: {e}", float("nan")))
    cfg = PreprocessConfig()
    for library in [*(["torchvision"] if cuda else []), *(["nvimgcodec"] if nvimgcodec_decode.available() else [])]:
        decoder = GpuJpegDecoder(device, library=library)
        items = [(str(i), blobs[i]) for i in pick(256)]
        rows.append((f"GpuJpegDecoder({library}).decode, batch 256 (inspect + decode + orient)",
                     rate(lambda d=decoder, x=items: len(d.decode(x).ids), args.seconds, sync)))  # fmt: skip
        decoded = decoder.decode(items).images
        rows.append((f"preprocess_tensors of 256 decoded ({library}), exact integer resize",
                     rate(lambda x=decoded: len(preprocess_tensors(x, cfg, out_dtype=torch.float16)), args.seconds, sync)))  # fmt: skip
        with float_resize():
            rows.append((f"preprocess_tensors of 256 decoded ({library}), float32 resize (session 4)",
                         rate(lambda x=decoded: len(preprocess_tensors(x, cfg, out_dtype=torch.float16)), args.seconds, sync)))  # fmt: skip
    print(f"GPU JPEG loader stages on {torch.cuda.get_device_name(0) if cuda else 'CPU'}, {len(blobs)} distinct {SMALL[0]}x{SMALL[1]} "
          f"JPEGs (mean {np.mean([len(b) for b in blobs]) / 1e3:.0f} kB)\n")  # fmt: skip
    print("| stage | img/s |\n| --- | ---: |")
    for name, r in rows:
        print(f"| {name} | {r:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
