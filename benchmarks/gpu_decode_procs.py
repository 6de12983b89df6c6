"""Does the GPU JPEG decode scale with more decoding processes, or are the NVJPG engines full?

Session 8 found the loader thread of `embed --gpu-decode` busy 75 % of its time inside
torchvision's batched `decode_jpeg`, which holds one process-wide mutex: threads never decode at
once, but processes can. The raw call runs at ~8.1k img/s of 1280x960 on an H200, the issue's 8k
end-to-end target. If k processes together decode faster than one, a loader with several decode
processes can pass that rate; if not, the hardware engines are the limit and 8k is the ceiling.

For k in --procs, k spawned processes each decode the same in-memory JPEGs (benchmarks/gpu_e2e.py's
1280x960 generator) for --seconds after a shared start, batch --batch:
  raw     torchvision `decode_jpeg(list, device="cuda")` alone
  nvimgcodec  nvImageCodec's batched decode alone (no process-wide mutex; its own backends)
  loader  `GpuJpegDecoder.decode` + `preprocess_tensors` (what the loader thread does per group,
          less the file reads): the per-process rate a multi-process loader would get
Beside each row, `nvidia-smi dmon -s u` samples the NVJPG engines' utilisation (`jpg`, %).

Usage (device): python benchmarks/gpu_decode_procs.py [--procs 1,2,3,4] [--modes raw,nvimgcodec,loader]
Markdown on stdout.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _decode_worker(
    mode: str, paths: list[str], batch: int, seconds: float, barrier: Any, results: Any
) -> None:
    """One decoding process: warm up, wait for the others, decode for `seconds`; report (n, s)."""
    import torch

    from clipengine.image.gpu_decode import GpuJpegDecoder, _nvjpeg_decode
    from clipengine.image.gpu_preprocess import preprocess_tensors
    from clipengine.image.preprocess import PreprocessConfig

    device = torch.device("cuda")
    blobs = [Path(p).read_bytes() for p in paths]
    picks = [i % len(blobs) for i in range(batch)]
    tensors = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in picks]
    items = [(str(i), blobs[i]) for i in picks]
    decoder = GpuJpegDecoder(device)
    cfg = PreprocessConfig()

    def once() -> int:
        if mode == "raw":
            return len(_nvjpeg_decode(tensors, device))
        if mode == "nvimgcodec":
            from clipengine.image import nvimgcodec_decode

            return len(nvimgcodec_decode.decode_batch(tensors, device))
        decoded = decoder.decode(items)
        return len(preprocess_tensors(decoded.images, cfg, out_dtype=torch.float16))

    for _ in range(2):
        once()
    torch.cuda.synchronize()
    barrier.wait(timeout=90)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += once()
    torch.cuda.synchronize()
    results.put((n, time.perf_counter() - t0))


def _jpg_column(lines: list[str]) -> float | None:
    """Mean of dmon's `jpg` column (NVJPG utilisation, %), or None if it has none."""
    header = next((ln.lstrip("#").split() for ln in lines if ln.startswith("#") and "gpu" in ln), None)
    if not header or "jpg" not in header:
        return None
    col = header.index("jpg")
    values = []
    for ln in lines:
        parts = ln.split()
        if not ln.startswith("#") and len(parts) > col and parts[col].isdigit():
            values.append(int(parts[col]))
    return statistics.mean(values) if values else None


def run_case(
    mode: str, procs: int, paths: list[str], batch: int, seconds: float
) -> tuple[float, float | None]:
    """Aggregate img/s of `procs` processes in `mode`, and the NVJPG utilisation meanwhile."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_decode_worker, args=(mode, paths, batch, seconds, barrier, results))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    barrier.wait(timeout=90)
    try:
        dmon = subprocess.Popen(
            ["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE, text=True
        )
    except OSError:
        dmon = None
    got = [results.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join()
    lines: list[str] = []
    if dmon is not None:
        dmon.terminate()
        lines = (dmon.communicate(timeout=10)[0] or "").splitlines()
    return sum(n / s for n, s in got), _jpg_column(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", default="1,2,3,4")
    p.add_argument("--modes", default="raw,nvimgcodec,loader")
    p.add_argument("--distinct", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from gpu_e2e import SMALL, cuda_missing, make_jpeg

    if cuda_missing("gpu_decode_procs.py"):
        return 2
    name = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(i, *SMALL, str(Path(tmp) / f"{i}.jpg")) for i in range(args.distinct)]
        with multiprocessing.get_context("spawn").Pool(min(16, multiprocessing.cpu_count())) as pool:
            pool.map(make_jpeg, jobs)
        paths = [j[3] for j in jobs]
        print(f"GPU JPEG decode in k processes at once, {name}, torch {torch.__version__}; {args.distinct} distinct "
              f"{SMALL[0]}x{SMALL[1]} JPEGs, batch {args.batch}, {args.seconds:g} s per case\n")  # fmt: skip
        print(
            "| mode | processes | img/s (sum) | x 1 process | NVJPG util % (dmon jpg) |\n| --- | ---: | ---: | ---: | ---: |"
        )
        for mode in args.modes.split(","):
            base = None
            for k in (int(x) for x in args.procs.split(",")):
                try:
                    rate, jpg = run_case(mode, k, paths, args.batch, args.seconds)
                except Exception as e:  # a case that fails is a row, not the end of the run
                    print(f"| {mode} | {k} | {type(e).__name__}: {e} | | |", flush=True)
                    continue
                base = base or rate
                util = "-" if jpg is None else f"{jpg:.0f}"
                print(f"| {mode} | {k} | {rate:.0f} | {rate / base:.2f} | {util} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
