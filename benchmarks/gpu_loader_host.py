"""The GPU loader's host side alone, on any machine: files -> header checks -> batched decode calls.

On the H200 the nvjpeg loader fed the decode call at a third of its raw rate, with reader threads
parsing headers under the GIL (docs/performance.md). This measures that host side without a GPU:
the real reader threads (`np.fromfile` + `inspect_encoded`) and `GpuJpegDecoder.decode`, with the
decoder replaced by a stand-in that releases the GIL for a fixed time per image (time.sleep, like
a native decode call) and returns a small tensor. Rows: the header check by Pillow alone vs with
the fast scan (`image.jpeg_header`), at several reader-thread counts.

Usage: python benchmarks/gpu_loader_host.py [--count 4096] [--decode-us 125] [--batch 256]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=4096, help="files (64 distinct 1280x960 JPEGs, linked)")
    p.add_argument("--decode-us", type=float, default=125.0,
                   help="GIL-free time per image of the stand-in decode (125: H200 nvjpeg raw, ~8k img/s)")  # fmt: skip
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", default="2,4,8")
    args = p.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_e2e import ensure_jpegs

    from clipengine.image import gpu_preprocess as gp
    from clipengine.pipeline.sources import list_folder

    small = torch.zeros(3, 8, 8, dtype=torch.uint8)

    def stand_in(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        time.sleep(args.decode_us * 1e-6 * len(data))  # releases the GIL, as a native decode call does
        return [small] * len(data)

    with tempfile.TemporaryDirectory() as tmp:
        ensure_jpegs(Path(tmp), args.count, 64, 0, min(8, multiprocessing.cpu_count()))
        items = list_folder(tmp)
        rows = []
        scan = gp.scan_jpeg_header
        for label, scanner in (("Pillow header check", lambda view: None), ("fast header scan", scan)):
            gp.scan_jpeg_header = scanner  # type: ignore[assignment]
            for threads in (int(t) for t in args.threads.split(",")):
                decoder = gp.GpuJpegDecoder("cpu", decode_batch=stand_in)
                t0 = time.perf_counter()
                n = 0
                for group in gp._read_ahead(items, args.batch, threads, 2, decoder.stats):
                    n += len(decoder.decode([r for r in group if isinstance(r, gp.EncodedImage)]).ids)
                seconds = time.perf_counter() - t0
                rows.append((label, threads, n / seconds, decoder.stats.decode_s / seconds))
        gp.scan_jpeg_header = scan
    ceiling = 1e6 / args.decode_us
    print(f"GPU loader host side on {multiprocessing.cpu_count()} cores: {args.count} files of 1280x960, batch "
          f"{args.batch}, stand-in decode {args.decode_us:.0f} us/image (ceiling {ceiling:.0f} img/s)\n")  # fmt: skip
    print("| header check | reader threads | img/s | share of the ceiling | time in decode calls |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, threads, rate, busy in rows:
        print(f"| {label} | {threads} | {rate:.0f} | {rate / ceiling:.0%} | {busy:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
