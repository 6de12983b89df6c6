"""The GPU loader on a folder where every 10th file is a PNG, emulated on any machine (session 9).

nvjpeg cannot decode PNGs: they used to be decoded on the loader's own thread, between the GPU's
decode calls; now the reader threads hand them to CPU decode processes (`pipeline.cpu_assist`).
Rows: all JPEG; every 10th file a PNG decoded on the loader's thread (no workers: the old way);
the same with `--workers` decode processes. The GPU work is stood in for as in
`gpu_loader_host.py` (decode 125 us/img, an 8k img/s ceiling; preprocess 34 us; model 27 us, all
sleeps); the PNG decode and exact resize are real.

Usage: python benchmarks/gpu_loader_png.py [--count 1024] [--workers 2] [--folder /tmp/clipengine_png_mix]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1024, help="files (1280x960, 64 distinct, linked)")
    p.add_argument("--workers", type=int, default=2, help="CPU decode processes for the third row")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "clipengine_png_mix")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_e2e import ensure_jpegs
    from gpu_gap import _png_mix
    from gpu_loader_host import stand_ins

    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.pipeline.batching import LoadStats
    from clipengine.pipeline.cpu_assist import CpuAssist
    from clipengine.pipeline.decode_pool import DecodePool
    from clipengine.pipeline.gpu_loading import iter_gpu_loaded
    from clipengine.pipeline.sources import list_folder

    jpegs = list_folder(ensure_jpegs(args.folder / "jpg", args.count, 64, 0, 2)[0].parent)
    mixed = list_folder(_png_mix(args.folder / "mixed", jpegs, every=10))
    cfg = PreprocessConfig()
    timing = argparse.Namespace(decode_us=125.0, preprocess_us=34.0, model_us=27.0)
    pool = DecodePool(args.workers)
    for _ in range(2 * args.workers):
        pool.submit(time.sleep, 0.01).result()  # processes started outside the timings
    rows = [
        ("all JPEG", jpegs, None),
        ("every 10th PNG, on the loader thread", mixed, None),
        (f"every 10th PNG, {args.workers} CPU decode process(es)", mixed,
         CpuAssist(pool, args.workers, 0.0, cfg.to_dict())),
    ]  # fmt: skip
    print(f"GPU loader, stand-in GPU work (8k img/s ceiling), {args.count} files of 1280x960\n")
    print("| folder | img/s per round |\n| --- | --- |")
    try:
        with stand_ins(timing, 8):
            for label, items, assist in rows:
                rates = []
                for _ in range(args.rounds):
                    t0, n = time.perf_counter(), 0
                    for batch in iter_gpu_loaded(items, cfg, 256, "cpu", LoadStats(), assist=assist):
                        time.sleep(timing.model_us * 1e-6 * len(batch.ids))
                        n += len(batch.ids)
                    rates.append(n / (time.perf_counter() - t0))
                print(f"| {label} | {' / '.join(f'{r:.0f}' for r in rates)} |", flush=True)
    finally:
        pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
