"""The GPU loader's host side alone, on any machine: files -> header checks -> batched decode calls.

On the H200 the nvjpeg loader fed the decode call at a third of its raw rate, with reader threads
parsing headers under the GIL (docs/performance.md). This measures that host side without a GPU:
the real reader threads (`np.fromfile` + `inspect_encoded`) and `GpuJpegDecoder.decode`, with the
decoder replaced by a stand-in that releases the GIL for a fixed time per image (time.sleep, like
a native decode call) and returns a small tensor. Rows: the header check by Pillow alone vs with
the fast scan (`image.jpeg_header`), at several reader-thread counts.

`--embed-folder` adds `embed_folder(gpu_decode=...)` itself over the same stand-ins, with shards of
`--shard-size` files and with one shard, to show what the shard boundaries cost.

`--loader` adds the whole loader as `embed --gpu-decode` runs it (`pipeline.gpu_loading.
iter_gpu_loaded`: readers, decode, preprocess, the loader thread) with the decode on the loader
thread or on a thread of its own (`decode_ahead`). The GPU preprocessing is a stand-in too: it
releases the GIL for `--preprocess-us` per image (34: its host time per image on the H200, session
5), and the consumer "runs the model" for `--model-us` per image (27: 36.6k img/s). These rows show
whether the threads overlap as designed; they are not GPU measurements.

`--assist 0,0.1,0.2` adds `embed_folder(gpu_decode=..., gpu_cpu_share=s)` for each share: the
stand-in GPU decode takes the other files while `--assist-workers` real CPU processes decode the
share (`pipeline.cpu_assist`; exact path, or `--fast-decode`). With a stand-in as fast as the
H200's decode the 2 cores here add little; a slower one (`--decode-us 2000`) shows the rates add.

Usage: python benchmarks/gpu_loader_host.py [--count 4096] [--decode-us 125] [--batch 256] [--loader]
       [--embed-folder] [--assist 0,0.1,0.2 --assist-workers 1 --fast-decode]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=4096, help="files (64 distinct 1280x960 JPEGs, linked)")
    p.add_argument("--decode-us", type=float, default=125.0,
                   help="GIL-free time per image of the stand-in decode (125: H200 nvjpeg raw, ~8k img/s)")  # fmt: skip
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", default="2,4,8")
    p.add_argument("--loader", action="store_true", help="also the whole loader, with and without decode_ahead")
    p.add_argument("--embed-folder", action="store_true",
                   help="also embed_folder(gpu_decode) with shards of --shard-size vs one shard")  # fmt: skip
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--preprocess-us", type=float, default=34.0)
    p.add_argument("--model-us", type=float, default=27.0)
    p.add_argument("--model-batch", type=int, default=256)
    p.add_argument("--assist", default="", help="CPU shares for embed_folder(gpu_cpu_share=...) rows, e.g. 0,0.1,0.2")
    p.add_argument("--assist-workers", type=int, default=1, help="CPU decode processes for the --assist rows")
    p.add_argument("--fast-decode", action="store_true", help="--assist rows: reduced-scale decode in the workers")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the --assist rows (rows in turn)")
    p.add_argument("--skip-threads", action="store_true", help="leave out the reader-thread rows")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_e2e import ensure_jpegs

    from clipengine.image import gpu_decode as gd
    from clipengine.pipeline import gpu_batching as gb
    from clipengine.pipeline.sources import list_folder

    stand_in = decode_stand_in(args.decode_us)

    with tempfile.TemporaryDirectory() as tmp:
        ensure_jpegs(Path(tmp), args.count, 64, 0, min(8, multiprocessing.cpu_count()))
        items = list_folder(tmp)
        rows = []
        scan = gd.scan_jpeg_header
        for label, scanner in (() if args.skip_threads else (("Pillow header check", lambda view: None), ("fast header scan", scan))):
            gd.scan_jpeg_header = scanner  # type: ignore[assignment]
            for threads in (int(t) for t in args.threads.split(",")):
                decoder = gd.GpuJpegDecoder("cpu", decode_batch=stand_in)
                t0 = time.perf_counter()
                n = 0
                for group in gb._read_ahead(items, args.batch, threads, 2, decoder.stats):
                    n += len(decoder.decode([r for r in group.read if isinstance(r, gd.EncodedImage)]).ids)
                seconds = time.perf_counter() - t0
                rows.append((label, threads, n / seconds, decoder.stats.decode_s / seconds))
        gd.scan_jpeg_header = scan
        loader_rows = loader_rates(items, args) if args.loader else []
        folder_rows = embed_folder_rates(items, args) if args.embed_folder else []
        assist_rows = assist_rates(items, args) if args.assist else []
    ceiling = 1e6 / args.decode_us
    print(f"GPU loader host side on {multiprocessing.cpu_count()} cores: {args.count} files of 1280x960, batch "
          f"{args.batch}, stand-in decode {args.decode_us:.0f} us/image (ceiling {ceiling:.0f} img/s)\n")  # fmt: skip
    if rows:
        print("| header check | reader threads | img/s | share of the ceiling | time in decode calls |")
        print("| --- | ---: | ---: | ---: | ---: |")
    for label, threads, rate, busy in rows:
        print(f"| {label} | {threads} | {rate:.0f} | {rate / ceiling:.0%} | {busy:.0%} |")
    if loader_rows:
        print(f"\nThe whole loader (`iter_gpu_loaded`, 2 reader threads), stand-ins: decode {args.decode_us:.0f} us, "
              f"preprocess {args.preprocess_us:.0f} us, model {args.model_us:.0f} us per image; model batch {args.model_batch}\n")  # fmt: skip
        print("| loader | img/s | share of the decode ceiling |\n| --- | ---: | ---: |")
        for label, rate in loader_rows:
            print(f"| {label} | {rate:.0f} | {rate / ceiling:.0%} |")
    if folder_rows:
        print(f"\n`embed_folder(gpu_decode)` with the same stand-ins (shards written; model batch {args.model_batch})\n")
        print("| run | img/s | share of the decode ceiling | model waiting for the loader, us/img |")
        print("| --- | ---: | ---: | ---: |")
        for label, rate, wait_us in folder_rows:
            print(f"| {label} | {rate:.0f} | {rate / ceiling:.0%} | {wait_us:.0f} |")
    if assist_rows:
        decode = "reduced-scale (--fast-decode)" if args.fast_decode else "exact"
        print(f"\n`embed_folder(gpu_decode, gpu_cpu_share=s)`: stand-in GPU decode {args.decode_us:.0f} us/img, "
              f"{args.assist_workers} CPU worker process(es), {decode} decode there; {args.rounds} round(s), rows in turn\n")  # fmt: skip
        print("| CPU share | img/s per round | x share 0 (median) | CPU-decoded | loader waited for the workers, s |")
        print("| ---: | --- | ---: | ---: | --- |")
        base = _median([r for r, _, _ in assist_rows[0][1]]) if assist_rows[0][0] == 0 else None
        for share, runs in assist_rows:
            rates = [r for r, _, _ in runs]
            ratio = f"{_median(rates) / base:.2f}" if base else "-"
            print(f"| {share:g} | {' / '.join(f'{r:.0f}' for r in rates)} | {ratio} | {runs[-1][1]} | "
                  f"{' / '.join(f'{w:.2f}' for _, _, w in runs)} |")
    return 0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def decode_stand_in(decode_us: float) -> Callable[[list[Any], Any], list[Any]]:
    """A batched decode (`GpuJpegDecoder`'s `decode_batch`) that sleeps `decode_us` per image, releasing
    the GIL as a native decode call does, and returns 8x8 images."""
    import torch

    small = torch.zeros(3, 8, 8, dtype=torch.uint8)

    def decode(data: list[Any], device: Any) -> list[Any]:
        time.sleep(decode_us * 1e-6 * len(data))
        return [small] * len(data)

    return decode


@contextlib.contextmanager
def stand_ins(args: argparse.Namespace, image_size: int) -> Iterator[None]:
    """The GPU work replaced by sleeps that release the GIL: the batched decode (`--decode-us` per
    image, 8x8 outputs) and the preprocessing (`--preprocess-us`, zeros of `image_size`)."""
    import torch

    from clipengine.image import gpu_decode as gd
    from clipengine.pipeline import gpu_batching as gb

    decode = decode_stand_in(args.decode_us)

    def preprocess(images: list[torch.Tensor], cfg: Any, out_dtype: Any = None) -> torch.Tensor:
        time.sleep(args.preprocess_us * 1e-6 * len(images))
        return torch.zeros(len(images), 3, image_size, image_size)

    # gpu_batching calls preprocess_tensors by the name it imported, so the stand-in goes there.
    saved = gd._nvjpeg_decode, gb.preprocess_tensors
    gd._nvjpeg_decode, gb.preprocess_tensors = decode, preprocess  # type: ignore[assignment]
    try:
        yield
    finally:
        gd._nvjpeg_decode, gb.preprocess_tensors = saved


def loader_rates(items: list[Any], args: argparse.Namespace) -> list[tuple[str, float]]:
    """img/s of `iter_gpu_loaded` with stand-in decode / preprocess / model, without and with decode_ahead."""
    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.pipeline.batching import LoadStats
    from clipengine.pipeline.gpu_loading import iter_gpu_loaded

    rows = []
    with stand_ins(args, 1):
        for _ in range(2):
            for ahead in (False, True):
                t0, n = time.perf_counter(), 0
                for batch in iter_gpu_loaded(items, PreprocessConfig(), args.model_batch, "cpu", LoadStats(),
                                             decode_ahead=ahead):  # fmt: skip
                    time.sleep(args.model_us * 1e-6 * len(batch.ids))
                    n += len(batch.ids)
                label = "decode on its own thread (decode_ahead=True)" if ahead else "decode on the loader thread (default)"
                rows.append((label, n / (time.perf_counter() - t0)))
    return rows


def embed_folder_rates(items: list[Any], args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """img/s of `embed_folder(gpu_decode=...)` over the same stand-ins, in shards of --shard-size and in one shard."""
    import numpy as np

    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.pipeline.run import embed_folder

    cfg = PreprocessConfig(image_size=8)  # tiny rows: the stand-ins stand for the GPU work, not host copies

    class Model:  # the Backend protocol's image side; "runs" for --model-us per image, GIL released
        name, embed_dim, image_size = "stand-in", 512, 8

        def encode_images(self, pixels: Any) -> np.ndarray:
            time.sleep(args.model_us * 1e-6 * len(pixels))
            return np.zeros((len(pixels), 512), np.float32)

    rows = []
    with stand_ins(args, cfg.image_size):
        for _ in range(2):
            for shard, ahead in ((args.shard_size, False), (len(items), False), (args.shard_size, True)):
                with tempfile.TemporaryDirectory() as out:
                    stats = embed_folder(items, Path(out) / "emb", Model(), cfg, batch_size=args.model_batch,
                                         shard_size=shard, dtype="float32", gpu_decode="cpu",
                                         gpu_decode_ahead=ahead)  # fmt: skip
                label = f"{-(-len(items) // shard)} shard(s) of {min(shard, len(items))}" + (", decode_ahead" if ahead else "")
                rows.append((label, stats.embedded / stats.wall_s, 1e6 * stats.wait_s / max(stats.embedded, 1)))
    return rows


def assist_rates(items: list[Any], args: argparse.Namespace) -> list[tuple[float, list[tuple[float, int, float]]]]:
    """Per CPU share: (img/s, files the CPU workers decoded, seconds the loader waited for them) per round."""
    import logging
    import re

    import numpy as np

    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.pipeline.run import embed_folder

    cfg = PreprocessConfig()  # the workers really decode and resize to 224: their cost is the point

    class Model:  # as in embed_folder_rates
        name, embed_dim, image_size = "stand-in", 512, 8

        def encode_images(self, pixels: Any) -> np.ndarray:
            time.sleep(args.model_us * 1e-6 * len(pixels))
            return np.zeros((len(pixels), 512), np.float32)

    notes: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    log = logging.getLogger("clipengine.pipeline.gpu_loading")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    shares = [float(s) for s in args.assist.split(",")]
    results: dict[float, list[tuple[float, int, float]]] = {s: [] for s in shares}
    try:
        with stand_ins(args, 8):  # 8x8 stand-in pixels: host copies of model input are GPU work there
            for _ in range(args.rounds):
                for share in shares:
                    notes.clear()
                    with tempfile.TemporaryDirectory() as out:
                        stats = embed_folder(items, Path(out) / "emb", Model(), cfg, batch_size=args.model_batch,
                                             dtype="float32", gpu_decode="cpu", gpu_cpu_share=share,
                                             workers=args.assist_workers, fast_decode=args.fast_decode)  # fmt: skip
                    found = [re.search(r"CPU assist: (\d+) images.*waited ([\d.]+) s", n) for n in notes]
                    match = next((m for m in found if m), None)
                    assisted, waited = (int(match[1]), float(match[2])) if match else (0, 0.0)
                    results[share].append((stats.embedded / stats.wall_s, assisted, waited))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return list(results.items())


if __name__ == "__main__":
    sys.exit(main())
