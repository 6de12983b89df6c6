"""What each end-to-end stage costs alone on one idle core, and the folder rate those costs allow.

`benchmarks/e2e_pipeline.py` times the stages inside a running pipeline, where decode workers and
the model share the cores, so its stage times include waiting for a core. This script times each
stage alone, in this process, with one thread: the JPEG decode (`--fast-decode`'s reduced DCT scale
or the exact full-size decode), the resize + crop + normalise, and the model at the batch size.
The bound is `cores * 1000 / (sum of the per-image costs)` img/s: no schedule of these stages on
`--cores` cores can beat it.

Usage:
    python benchmarks/e2e_stage_costs.py FOLDER --backend openvino --model EXPORT_DIR --precision int8 [--fast-decode]

Prints a Markdown table: one row per image size, the model row, and the bound.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--backend", choices=["openvino", "onnx"], required=True)
    p.add_argument("--model", required=True, help="a clipengine export folder")
    p.add_argument("--precision", default="int8")
    p.add_argument("--fast-decode", action="store_true")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cores", type=int, default=2, help="cores the bound is computed for")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    from clipengine.backends import create_backend
    from clipengine.image.decode import open_image
    from clipengine.image.preprocess import PreprocessConfig, draft_size, preprocess_image

    threads = {"threads": 1} if args.backend == "openvino" else {"intra_op_threads": 1}
    backend = create_backend(args.backend, args.model, precision=args.precision, **threads)
    cfg = PreprocessConfig(image_size=backend.image_size)
    draft = draft_size(cfg, args.fast_decode)
    decode_ms: dict[str, list[float]] = defaultdict(list)
    prep_ms: dict[str, list[float]] = defaultdict(list)
    files = sorted(f for f in args.folder.iterdir() if f.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        p.error(f"no JPEGs in {args.folder}")
    for path in files:
        data = path.read_bytes()
        image = open_image(data, path.name, draft_size=draft)
        with _header(data) as header:
            key = f"{header.width}x{header.height} (decoded at {image.width}x{image.height})"
        decode_ms[key].append(median_ms(lambda d=data: open_image(d, draft_size=draft), args.repeats))
        prep_ms[key].append(median_ms(lambda im=image: preprocess_image(im, cfg), args.repeats))
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    model_ms = median_ms(lambda b=backend: b.encode_images(pixels), args.repeats) / args.batch
    del backend  # frees the 1-thread engine before the wide one compiles
    every = {"threads": args.cores} if args.backend == "openvino" else {"intra_op_threads": args.cores}
    wide = create_backend(args.backend, args.model, precision=args.precision, **every)
    wide_ms = median_ms(lambda: wide.encode_images(pixels), args.repeats) / args.batch

    mode = "--fast-decode" if args.fast_decode else "exact decode"
    print(f"Stage costs alone, one thread, {len(files)} files ({mode}); model: {args.backend} {args.precision}, batch {args.batch}\n")
    print("| stage | files | ms per image |\n| --- | ---: | ---: |")
    per_file = []
    for key in sorted(decode_ms):
        d, q = statistics.mean(decode_ms[key]), statistics.mean(prep_ms[key])
        per_file += [a + b for a, b in zip(decode_ms[key], prep_ms[key], strict=True)]
        print(f"| decode {key} | {len(decode_ms[key])} | {d:.1f} |")
        print(f"| resize + crop + normalise, {key} | {len(prep_ms[key])} | {q:.1f} |")
    load = statistics.mean(per_file)
    print(f"| model, batch {args.batch}, 1 thread | | {model_ms:.1f} |")
    print(f"| (model, batch {args.batch}, {args.cores} threads: wall ms per image; not in the sum) | | {wide_ms:.1f} |")
    total = load + model_ms
    print(f"| **all stages, mean over the files** | | **{total:.1f}** |")
    print(f"\nBound on {args.cores} cores: {args.cores} x 1000 / {total:.1f} = **{args.cores * 1000 / total:.1f} img/s**")
    return 0


def _header(data: bytes) -> Image.Image:
    """The file as stored (size from its header; nothing decoded until asked)."""
    return Image.open(io.BytesIO(data))


if __name__ == "__main__":
    sys.exit(main())
