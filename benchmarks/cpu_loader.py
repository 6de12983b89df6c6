"""The CPU loader alone: decode workers -> float32 batches, with no model, to see the loader's own ceiling.

`pipeline.batching.iter_batches` over a folder of JPEGs (default: `--count` 1280x960 photo-like
files made by benchmarks/gpu_e2e.py's generator, 64 distinct, hard-linked), with `--workers`
processes, exact and `--fast-decode`. Prints img/s and the workers' stage costs per image, and the
rate those stage costs allow on `--workers` cores ("ideal"). A loader below its ideal loses time
outside the stages: in the pool's pipes or in the parent.

Usage: python benchmarks/cpu_loader.py [--folder DIR] [--count 512] [--workers 2] [--batch 32]
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
    p.add_argument("--folder", type=Path, default=None, help="JPEGs to load (default: generated)")
    p.add_argument("--count", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)

    from clipengine.errors import ClipEngineError
    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.pipeline.batching import LoadStats, iter_batches, make_executor, warm_executor
    from clipengine.pipeline.sources import list_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from gpu_e2e import ensure_jpegs

            folder = Path(tmp)
            ensure_jpegs(folder, args.count, 64, 0, min(8, multiprocessing.cpu_count()))
        try:
            items = list_folder(folder)
        except ClipEngineError as e:  # not a folder, unreadable
            p.error(f"--folder: {e}")
        if not items:  # else a ZeroDivisionError after the table's header
            p.error(f"--folder {folder}: no image files to load")
        cfg = PreprocessConfig().to_dict()
        print(f"CPU loader alone: {len(items)} files from {folder}, {args.workers} workers, batch {args.batch}\n")
        print("| decode | img/s | ideal img/s | read / decode / preprocess ms per image (summed over workers) |")
        print("| --- | ---: | ---: | --- |")
        for fast in (False, True):
            executor = make_executor(args.workers)
            if executor is not None:
                warm_executor(executor, args.workers, cfg)
            stats = LoadStats()
            t0, n = time.perf_counter(), 0
            for batch in iter_batches(items, cfg, args.batch, executor=executor, stats=stats, fast_decode=fast):
                n += len(batch.ids)
            seconds = time.perf_counter() - t0
            if executor is not None:
                executor.shutdown()
            per = [1000 * s / max(n, 1) for s in (stats.read_s, stats.decode_s, stats.preprocess_s)]
            ideal = max(args.workers, 1) * 1000 / sum(per)
            label = "--fast-decode" if fast else "exact"
            print(f"| {label} | {n / seconds:.0f} | {ideal:.0f} | {per[0]:.2f} / {per[1]:.2f} / {per[2]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
