"""Where `embed_folder(gpu_decode)` loses to the bare loader on a GPU, and whether two loader options pay.

Session 5 and 8 (H200) measured `embed_folder(gpu_decode)` 12-15 % below "loader thread + model" on
4096 files, in runs of under a second, where fixed costs (file listing, shard writes, thread starts)
weigh a lot. This script separates them, with every row repeated `--rounds` times in turn (A B C D,
A B C D, ...) so that drift hits all rows alike, on a folder `--count` files long:

  uniform 1280x960 set:
    A  loader thread (`iter_gpu_loaded`) + model, features left on the GPU (no per-batch sync)
    B  loader thread + `TorchBackend.encode_images` (features to NumPy per batch, as embed_folder does)
    C  `embed_folder`, 1000-image shards (the CLI default)
    D  C with `gpu_decode_ahead=True` (experimental)
  mix (every 8th distinct image 4000x3000):
    E  decode only, one nvjpeg call per batch (default)
    F  decode only, JPEGs over 4 MP in a call of their own (`GpuJpegDecoder(large_pixels=4e6)`,
       the default since session 8)
    G  `embed_folder`, default loader
    H  G with the loader's decoder built with large_pixels=None (one call per batch: the default
       before session 8; session 8's first run measured G as the default, H as the split)
    K  G with decode_ahead (session 8's one-second runs had it 11-13 % faster on this mix, before
       the 4 MP split; added after session 8's runs)
  progressive (every 4th distinct 1280x960 image a progressive JPEG; added after session 8's runs):
    I  decode only
    J  `embed_folder`
  CPU assist (`gpu_cpu_share`, session 9, unmeasured on a GPU: CPU worker processes decode a share
  of the files beside nvjpeg; workers = the cores less 4, spawned inside each timed row):
    L  uniform: C with a CPU share of 0.1 (exact decode in the workers)
    M  uniform: C with a CPU share of 0.2
    N  uniform: C with a CPU share of 0.2, reduced-scale decode in the workers (`fast_decode`)
    O  mix: G with a CPU share of 0.2, reduced-scale decode in the workers
  GPU decode processes (`gpu_decode_procs`, session 11: torchvision decodes one call at a time per
  process; each process decodes and preprocesses its blocks, the batches come here by CUDA IPC;
  the processes start inside each timed row, a few seconds: give these rows a large --count):
    R  uniform: C with 2 decode processes
    S  uniform: C with 3 decode processes
    T  mix: G with 2 decode processes
  PNG mix (every 10th file a 1280x960 PNG, which nvjpeg cannot decode; session 9):
    P  `embed_folder`: the PNGs go to the CPU workers (the default since session 9)
    Q  the same with workers=0: the PNGs decoded on the loader's thread (before session 9;
       over a quarter of the files, as it is slow)

Each row also counts the caching allocator's device calls during it (`torch.cuda.memory_stats`:
cudaMalloc, cudaFree, and retries after freeing the cache). cudaMalloc / cudaFree synchronise the
device: if a row makes many, the decode and the preprocessing contend through the allocator
(session 8's guess for decode_ahead's loss; try `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`).

Usage (device): python benchmarks/gpu_gap.py [--count 16384] [--mix-count 4096] [--rounds 3] [--rows ACLMN]
Prints a markdown table of the median img/s per row (and min / max); `--json` saves every round.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu_gap")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=16384, help="files in the uniform set (64 distinct, linked)")
    p.add_argument("--mix-count", type=int, default=4096, help="files in the mix set")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "clipengine_gpu_gap")
    p.add_argument("--json", type=Path)
    p.add_argument("--rows", default="", help="only these rows, by letter (e.g. CLMN); default every row")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from gpu_e2e import SEED, cuda_missing, ensure_jpegs

    if cuda_missing("gpu_gap.py"):
        return 2
    from clipengine.backends.torch_backend import TorchBackend
    from clipengine.image.gpu_decode import GpuJpegDecoder
    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.models.clip import build_model
    from clipengine.models.config import get_config
    from clipengine.pipeline import gpu_loading
    from clipengine.pipeline.batching import LoadStats
    from clipengine.pipeline.gpu_batching import iter_gpu_batches
    from clipengine.pipeline.run import embed_folder
    from clipengine.pipeline.sources import list_folder

    uniform = list_folder(ensure_jpegs(args.folder / "uniform", args.count, 64, 0, 16)[0].parent)
    mix = list_folder(ensure_jpegs(args.folder / "mix", args.mix_count, 64, 8, 16)[0].parent)
    progressive = list_folder(
        ensure_jpegs(args.folder / "progressive", args.mix_count, 64, 0, 16, progressive_every=4)[0].parent
    )
    png_mix = list_folder(_png_mix(args.folder / "png_mix", uniform[: args.mix_count], every=10))
    cfg = PreprocessConfig()
    torch.manual_seed(SEED)
    backend = TorchBackend(
        build_model(get_config("ViT-B-32")), device="cuda", precision="fp16", cuda_graphs=True
    )
    for n in {args.batch, args.count % args.batch, args.mix_count % args.batch} - {
        0
    }:  # graph captures, untimed
        backend.encode_images(torch.zeros((n, 3, 224, 224), device="cuda"))
    for _ in iter_gpu_batches(mix[: 2 * args.batch], cfg, "cuda", args.batch):
        pass  # nvjpeg's and the resize kernels' first calls, untimed

    @contextlib.contextmanager
    def one_call_loader() -> Iterator[None]:
        saved = gpu_loading.GpuJpegDecoder
        gpu_loading.GpuJpegDecoder = functools.partial(GpuJpegDecoder, large_pixels=None)  # type: ignore[misc]
        try:
            yield
        finally:
            gpu_loading.GpuJpegDecoder = saved  # type: ignore[misc]

    def loader_model(on_gpu: bool) -> int:
        n = 0
        for b in gpu_loading.iter_gpu_loaded(uniform, cfg, args.batch, "cuda", LoadStats()):
            pixels = b.pixels.half()
            if on_gpu:
                with torch.inference_mode():
                    backend._encode_image_fn(pixels)
            else:
                backend.encode_images(pixels)
            n += len(b.ids)
        return n

    def decode_only(large: int | None, items: list[Any] = mix) -> int:
        decoder = GpuJpegDecoder("cuda", large_pixels=large)
        return sum(len(b.ids) for b in iter_gpu_batches(items, cfg, "cuda", args.batch, out_dtype=torch.float16,
                                                         decoder=decoder))  # fmt: skip

    def pipeline(items: list[Any], ahead: bool = False, one_call: bool = False, share: float = 0.0,
                 fast: bool = False, workers: int | None = None, procs: int = 1) -> int:  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="clipengine_gpu_gap_out_") as out:
            with one_call_loader() if one_call else contextlib.nullcontext():
                stats = embed_folder(items, out, backend, cfg, batch_size=args.batch, shard_size=1000,
                                     dtype="float32", gpu_decode="cuda", gpu_decode_ahead=ahead,
                                     gpu_cpu_share=share, fast_decode=fast, workers=workers,
                                     gpu_decode_procs=procs)  # fmt: skip
        if stats.failed:
            raise RuntimeError(f"{stats.failed} images failed")
        return stats.embedded

    rows: dict[str, Callable[[], int]] = {
        "A uniform: loader thread + model, features stay on the GPU": lambda: loader_model(True),
        "B uniform: loader thread + backend.encode_images (NumPy per batch)": lambda: loader_model(False),
        "C uniform: embed_folder, 1000-image shards": lambda: pipeline(uniform),
        "D uniform: embed_folder, decode_ahead": lambda: pipeline(uniform, ahead=True),
        "E mix: decode only, one nvjpeg call per batch": lambda: decode_only(None),
        "F mix: decode only, > 4 MP in their own call": lambda: decode_only(4_000_000),
        "G mix: embed_folder (default: > 4 MP apart)": lambda: pipeline(mix),
        "H mix: embed_folder, loader with one call per batch (large_pixels None)": lambda: pipeline(mix, one_call=True),
        "K mix: embed_folder, decode_ahead": lambda: pipeline(mix, ahead=True),
        "I progressive (every 4th): decode only": lambda: decode_only(4_000_000, progressive),
        "J progressive (every 4th): embed_folder": lambda: pipeline(progressive),
        "L uniform: embed_folder, CPU share 0.1 (exact)": lambda: pipeline(uniform, share=0.1),
        "M uniform: embed_folder, CPU share 0.2 (exact)": lambda: pipeline(uniform, share=0.2),
        "N uniform: embed_folder, CPU share 0.2 (fast_decode)": lambda: pipeline(uniform, share=0.2, fast=True),
        "O mix: embed_folder, CPU share 0.2 (fast_decode)": lambda: pipeline(mix, share=0.2, fast=True),
        "P PNG mix (every 10th): embed_folder, PNGs on the CPU workers": lambda: pipeline(png_mix),
        "Q PNG mix (every 10th, a quarter of the files): PNGs on the loader thread (workers=0)":
            lambda: pipeline(png_mix[: len(png_mix) // 4], workers=0),
        "R uniform: embed_folder, 2 GPU decode processes": lambda: pipeline(uniform, procs=2),
        "S uniform: embed_folder, 3 GPU decode processes": lambda: pipeline(uniform, procs=3),
        "T mix: embed_folder, 2 GPU decode processes": lambda: pipeline(mix, procs=2),
    }
    if args.rows:
        rows = {name: row for name, row in rows.items() if name[0] in args.rows.upper()}
    rates: dict[str, list[float]] = {name: [] for name in rows}
    device_calls: dict[str, list[tuple[int, int, int]]] = {name: [] for name in rows}
    counters = ("num_device_alloc", "num_device_free", "num_alloc_retries")
    for r in range(args.rounds):
        for name, row in rows.items():
            try:
                torch.cuda.synchronize()
                before = torch.cuda.memory_stats()
                t0 = time.perf_counter()
                n = row()
                torch.cuda.synchronize()
                rates[name].append(n / (time.perf_counter() - t0))
                after = torch.cuda.memory_stats()
                calls = tuple(int(after.get(c, 0) - before.get(c, 0)) for c in counters)
                device_calls[name].append(calls)  # type: ignore[arg-type]
                log.info("round %d %s: %d images, %.0f img/s; cudaMalloc %d, cudaFree %d, alloc retries %d",
                         r, name, n, rates[name][-1], *calls)  # fmt: skip
            except Exception:
                log.exception("%s: failed", name)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; uniform {args.count} files 1280x960, "
          f"mix {args.mix_count} files (every 8th 4000x3000), progressive {args.mix_count} (every 4th), batch {args.batch}, {args.rounds} rounds in turn\n")  # fmt: skip
    print("| row | median img/s | min | max | cudaMalloc / cudaFree / retries (last round) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, values in rates.items():
        if values:
            last = device_calls[name][-1] if device_calls[name] else (0, 0, 0)
            print(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f} | {max(values):.0f} | "
                  f"{' / '.join(str(c) for c in last)} |")
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "device_calls": device_calls}, indent=1))
    return 0


def _png_mix(folder: Path, jpegs: list[Any], every: int) -> Path:
    """`folder` with links to `jpegs`, every `every`-th replaced by a PNG of the same picture (one
    PNG per distinct source file, linked like the JPEGs)."""
    import os

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pngs: dict[int, Path] = {}
    for i, item in enumerate(jpegs):
        src = Path(item.source)
        if i % every:
            dst = folder / src.name
            if not dst.exists():
                os.link(src, dst)
            continue
        dst = folder / f"{src.stem}.png"
        if dst.exists():
            continue
        inode = src.stat().st_ino  # hard links of one distinct JPEG share it
        if inode not in pngs:
            with Image.open(src) as im:
                im.convert("RGB").save(dst, format="PNG", compress_level=1)  # fast to write; a bit fast to decode too
            pngs[inode] = dst
        else:
            os.link(pngs[inode], dst)
    return folder


if __name__ == "__main__":
    sys.exit(main())
