"""End to end on CUDA: a folder of camera-size JPEGs -> ViT-B/32 embeddings, GPU decode vs CPU decode workers.

Rows (one random-weight ViT-B/32, `optimize(device="cuda", precision="fp16", cuda_graphs=True)`):

- gpu nvjpeg: `pipeline.gpu_batching.iter_gpu_batches` (reader threads -> nvjpeg batched decode ->
  torch resize / crop / normalise on the GPU) -> model
- gpu nvjpeg, decode only: the same loader without the model
- gpu nvjpeg + model, float32 resize: the loader with session 4's resize (`F.interpolate` in
  float32) instead of Pillow's integer resize on int8 GEMMs (`image.gpu_resample`): before / after
- gpu nvjpeg + model, N reader threads (--thread-sweep): the loader's host side at other thread counts
- gpu_loading: `pipeline.gpu_loading.iter_gpu_loaded` (the loader on its own thread, as
  `embed --gpu-decode` runs it) + model, without and with `decode_ahead` (decode calls on a thread
  of their own)
- gpu nvimgcodec (when nvidia-nvimgcodec is installed): the same loader with nvImageCodec's
  batched decoder (`GpuJpegDecoder(library="nvimgcodec")`), with and without libjpeg's chroma
  upsampling
- cpu exact: `pipeline.batching.iter_batches`, exact Pillow decode in one worker process per core -> model
- cpu fast_decode: the same with libjpeg's reduced-DCT decode
- peer: a plain torchvision GPU pipeline (read_file loop, batched decode_jpeg on the GPU, per-image
  antialiased resize / crop / normalise in float)
- model only: preprocessed pixels already on the GPU

Cosine: per image, each row's embedding vs the cpu exact row's (same model, same files), so it
measures only what the decode / preprocess path changes. Markdown table on stdout, logs on stderr.

Usage:
    python benchmarks/gpu_e2e.py [--count 2048] [--jpeg-dir DIR] [--batch 256] [--json results.json]

Heavy imports (torch, the model) happen inside `main`: the CPU rows' spawned workers re-import this
file as their main module, and must stay light (see benchmarks/e2e_pipeline.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("gpu_e2e")
SEED = 0
SMALL, LARGE = (1280, 960), (4000, 3000)


def make_jpeg(job: tuple[int, int, int, str] | tuple[int, int, int, str, bool]) -> int:
    """One photo-like JPEG (smooth colour fields, edges, sensor-like noise), quality 90, 4:2:0.

    Top-level so a spawned pool can run it. Every 16th image carries EXIF orientation 6, as a
    phone held upright writes it, so the rotation path is timed too. Returns the file size.
    """
    from PIL import Image

    seed, width, height, path = job[:4]
    progressive = len(job) > 4 and bool(job[4])  # type: ignore[misc]
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    channels = []
    for c in range(3):
        fx, fy, px, py = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 6.3), rng.uniform(0, 6.3)
        field = 110 + 70 * np.sin(fx * x * 6.3 + px) * np.cos(fy * y * 6.3 + py) + 40 * (x - y) * (c - 1)
        channels.append(field)
    pixels = np.stack(channels, axis=-1)
    for _ in range(6):  # hard-edged rectangles: objects with edges, where chroma subsampling shows
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        w, h = int(rng.integers(width // 10, width // 3)), int(rng.integers(height // 10, height // 3))
        pixels[y0 : y0 + h, x0 : x0 + w] = rng.uniform(20, 235, 3)
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * 4.0
    image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    if seed % 16 == 5:
        exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, exif=exif.tobytes(), progressive=progressive)
    Path(path).write_bytes(buf.getvalue())
    return len(buf.getvalue())


def cuda_missing(script: str, hint: str = "") -> bool:
    """True, after saying so on stderr, when torch sees no CUDA device: the GPU rows would end in a
    traceback (some after minutes spent writing their JPEG folders)."""
    import torch

    if torch.cuda.is_available():
        return False
    print(f"{script} needs a CUDA GPU: torch.cuda.is_available() is False on this machine{hint}", file=sys.stderr)
    return True


def ensure_jpegs(
    folder: Path, count: int, distinct: int, large_every: int, procs: int, progressive_every: int = 0
) -> list[Path]:
    """`count` JPEGs in `folder` (reused when already there): `distinct` generated ones, hard-linked
    (or copied) to reach `count`. Every `large_every`-th distinct image is 4000x3000, the rest 1280x960;
    every `progressive_every`-th is a progressive JPEG (as many web images are; nvjpeg's batched
    hardware decode takes baseline ones only)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:06d}.jpg" for i in range(count)]
    if all(p.exists() for p in paths):
        log.info("reusing %d JPEGs in %s", count, folder)
        return paths
    t0 = time.perf_counter()
    sources = [folder / f"src_{i:04d}.jpg" for i in range(distinct)]
    jobs = []
    for i, path in enumerate(sources):
        w, h = LARGE if large_every and i % large_every == large_every - 1 else SMALL
        jobs.append((SEED + i, w, h, str(path), bool(progressive_every) and i % progressive_every == 0))
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        sizes = pool.map(make_jpeg, jobs, chunksize=1)
    for i, path in enumerate(paths):
        path.unlink(missing_ok=True)
        try:
            os.link(sources[i % distinct], path)
        except OSError:  # a file system without hard links
            shutil.copyfile(sources[i % distinct], path)
    for src in sources:
        src.unlink()
    log.info("wrote %d distinct JPEGs (mean %.0f kB) as %d files in %.1f s",
             distinct, np.mean(sizes) / 1e3, count, time.perf_counter() - t0)  # fmt: skip
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2048, help="JPEG files to embed (default 2048)")
    p.add_argument("--distinct", type=int, default=64, help="distinct generated images (default 64)")
    p.add_argument("--large-every", type=int, default=8,
                   help="every Nth distinct image is 4000x3000, the rest 1280x960 (default 8; 0: none)")  # fmt: skip
    p.add_argument("--jpeg-dir", type=Path, default=None, help="where the JPEGs live; reused if present, kept")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="CPU decode processes (default: all cores)")
    p.add_argument("--read-threads", type=int, default=2, help="file reader threads of the GPU loader")
    p.add_argument("--product-runs", type=int, default=1, help="times to run the embed_folder row")
    p.add_argument("--split", default="", help="also time the loader with benchmarks/decode_split.py's "
                   "hardware + nvImageCodec hybrid decode, these fractions on the hybrid, e.g. 0.25,0.4")  # fmt: skip
    p.add_argument("--thread-sweep", default="", help="also time the nvjpeg + model row at these reader "
                   "thread counts, e.g. 2,4,16")  # fmt: skip
    p.add_argument("--title", default="", help="a line printed above the table (which set this is)")
    p.add_argument("--seconds", type=float, default=20.0, help="stop a row after this long (default 20)")
    p.add_argument("--skip-cpu", action="store_true", help="GPU rows only (cosines need the cpu exact row)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")

    if cuda_missing("gpu_e2e.py"):
        return 2
    try:
        from torchvision.io import decode_jpeg  # noqa: F401 - the nvjpeg entry point
    except Exception as e:  # a CPU-only or broken torchvision
        print(f"gpu_e2e.py needs torchvision with CUDA image ops: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    from clipengine.pipeline.batching import default_workers

    workers = args.workers or default_workers()
    own_dir = args.jpeg_dir is None
    folder = args.jpeg_dir or Path(tempfile.mkdtemp(prefix="clipengine_gpu_e2e_"))
    try:
        ensure_jpegs(folder, args.count, min(args.distinct, args.count), args.large_every, workers)
        results = run(args, folder, workers)
    finally:
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)
    if args.title:
        print(f"### {args.title}\n")
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


Rows = Iterator[tuple[list[str], Any]]  # (ids, pixels) per batch


@contextlib.contextmanager
def float_resize() -> Iterator[None]:
    """Session 4's GPU resize (`F.interpolate` in float32, within one grey level of Pillow) in place
    of the exact integer one, for a before / after row: the switch the loader itself flips when a
    device's int8 GEMM fails."""
    from clipengine.image import gpu_preprocess

    saved = gpu_preprocess._int_resize_failed
    gpu_preprocess._int_resize_failed = True
    try:
        yield
    finally:
        gpu_preprocess._int_resize_failed = saved


def run(args: argparse.Namespace, folder: Path, workers: int) -> dict[str, Any]:
    import torch
    import torchvision

    from clipengine.backends.accel import optimize
    from clipengine.image.gpu_decode import GpuJpegDecoder
    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.models.clip import build_model
    from clipengine.models.config import get_config
    from clipengine.pipeline.batching import iter_batches, make_executor, warm_executor
    from clipengine.pipeline.gpu_batching import iter_gpu_batches
    from clipengine.pipeline.sources import list_folder

    items = list_folder(folder)
    cfg = PreprocessConfig()
    device = torch.device("cuda")
    torch.manual_seed(SEED)
    model = optimize(build_model(get_config("ViT-B-32")).eval(), device=device, precision="fp16",
                     cuda_graphs=True)  # fmt: skip
    shapes = {min(args.batch, len(items)), len(items) % args.batch} - {0}
    for n in shapes:  # capture the CUDA graphs outside the timings
        model.encode_image(torch.zeros((n, 3, 224, 224), device=device))
    torch.cuda.synchronize()

    def gpu_rows(decoder: GpuJpegDecoder, subset: list[Any] = items, threads: int = args.read_threads) -> Rows:
        for b in iter_gpu_batches(subset, cfg, device, args.batch, read_threads=threads,
                                  out_dtype=torch.float16, decoder=decoder):  # fmt: skip
            yield b.ids, b.pixels

    def timed(name: str, rows: Callable[[], Rows], embed: bool = True,
              decoder: GpuJpegDecoder | None = None) -> dict[str, Any]:  # fmt: skip
        feats: list[tuple[list[str], Any]] = []
        n = 0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        batches = rows()
        for ids, pixels in batches:
            if embed:
                feats.append((ids, model.encode_image(pixels)))
            n += len(ids)
            if time.perf_counter() - t0 > args.seconds:
                log.info("%s: stopped after %.0f s (--seconds)", name, args.seconds)
                break
        torch.cuda.synchronize()
        batches.close()  # a row stopped early drops its queued reads / decodes
        seconds = time.perf_counter() - t0
        log.info("%s: %d images in %.2f s = %.0f img/s", name, n, seconds, n / seconds)
        vectors = {}
        for ids, f in feats:
            f = torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy()
            vectors.update(zip(ids, f, strict=True))
        row = {"name": name, "images": n, "seconds": seconds, "img_per_s": n / seconds, "_vectors": vectors}
        if decoder is not None:  # where the loader's time went (decode_s: wall time in decode calls)
            row["loader"] = dataclasses.asdict(decoder.stats)
        return row

    rows: list[dict[str, Any]] = []
    executor = None
    if not args.skip_cpu:
        executor = make_executor(workers)
        assert executor is not None
        warm_executor(executor, workers, cfg.to_dict())  # process start-up outside the timings

        def cpu_rows(fast: bool) -> Rows:
            for b in iter_batches(items, cfg, args.batch, executor=executor, fast_decode=fast):
                yield b.ids, torch.from_numpy(b.pixels).to(device)

        rows.append(timed(f"cpu exact ({workers} workers)", lambda: cpu_rows(False)))
        rows.append(timed(f"cpu fast_decode ({workers} workers)", lambda: cpu_rows(True)))
    # Warm-up: torchvision / nvjpeg initialisation and the resize kernels, outside the timings.
    for _ in gpu_rows(GpuJpegDecoder(device), items[: 2 * args.batch]):
        pass
    decode_only = GpuJpegDecoder(device)
    rows.append(timed("gpu nvjpeg, decode only (no model)", lambda: gpu_rows(decode_only), False, decode_only))
    if args.large_every:  # The default before session 8: one nvjpeg call per batch, 12 MP and 1 MP together.
        one_call = GpuJpegDecoder(device, large_pixels=None)
        rows.append(timed("gpu nvjpeg, decode only, one call per batch (large_pixels=None)",
                          lambda: gpu_rows(one_call), False, one_call))  # fmt: skip
    end_to_end = GpuJpegDecoder(device)
    rows.append(timed("gpu nvjpeg + model", lambda: gpu_rows(end_to_end), True, end_to_end))
    with float_resize():
        for _ in gpu_rows(GpuJpegDecoder(device), items[: 2 * args.batch]):
            pass  # the float kernels' first calls, untimed
        before = GpuJpegDecoder(device)
        rows.append(timed("gpu nvjpeg + model, float32 resize (session 4)", lambda: gpu_rows(before), True, before))
    def loaded_rows(decode_ahead: bool) -> Rows:
        from clipengine.pipeline.batching import LoadStats
        from clipengine.pipeline.gpu_loading import iter_gpu_loaded

        for b in iter_gpu_loaded(items, cfg, args.batch, "cuda", LoadStats(), decode_ahead=decode_ahead):
            yield b.ids, b.pixels.half()

    for ahead in (False, True):  # what embed_folder(gpu_decode) loads with, without the shard writes
        label = "gpu_loading: loader thread + decode thread (decode_ahead)" if ahead else "gpu_loading: loader thread"
        try:  # decode_ahead is experimental: a failure must not take the other rows with it
            rows.append(timed(f"{label} + model", lambda a=ahead: loaded_rows(a)))  # type: ignore[misc]
        except Exception:
            log.exception("%s: failed; row left out", label)
    for fraction in (float(f) for f in args.split.split(",") if f.strip()):
        try:
            from decode_split import make_split_decode

            split_decoder = GpuJpegDecoder(device, decode_batch=make_split_decode(device, fraction))
            for _ in gpu_rows(split_decoder, items[: 2 * args.batch]):
                pass  # the CUDA-core decoder's set-up, untimed
            split_decoder = GpuJpegDecoder(device, decode_batch=make_split_decode(device, fraction))
            rows.append(timed(f"gpu torchvision + nvimgcodec hybrid ({fraction:.0%}) + model",
                              lambda d=split_decoder: gpu_rows(d), True, split_decoder))  # type: ignore[misc]  # fmt: skip
        except Exception:
            log.exception("split %s: failed; row left out", fraction)
    for threads in (int(t) for t in args.thread_sweep.split(",") if t.strip()):
        swept = GpuJpegDecoder(device)
        rows.append(timed(f"gpu nvjpeg + model, {threads} reader threads",
                          lambda d=swept, n=threads: gpu_rows(d, threads=n), True, swept))  # type: ignore[misc]  # fmt: skip
    rows += nvimgcodec_rows(timed, gpu_rows, device, items[: 2 * args.batch])
    try:  # the peer: what a user writes with torchvision alone (the 4.7k img/s reference)
        rows.append(timed("peer: torchvision read_file + decode_jpeg(cuda) + resize, one thread",
                          lambda: peer_rows(items, args.batch, device)))  # fmt: skip
    except Exception:
        log.exception("peer row: failed; left out")
    for run_index in range(args.product_runs):
        product = pipeline_row(items, cfg, args.batch, f" (run {run_index + 1})" if args.product_runs > 1 else "")
        if product is not None:
            rows.append(product)
    # The CLI's default shards (1000 images): since session 7 one loader feeds them all; before,
    # each shard drained and refilled the loader (16-26 % in benchmarks/gpu_loader_host.py's emulation).
    sharded = pipeline_row(items, cfg, args.batch, ", 1000-image shards (the CLI default)", shard_size=1000)
    ahead = pipeline_row(items, cfg, args.batch, ", decode_ahead (experimental)", decode_ahead=True)
    rows += [row for row in (sharded, ahead) if row is not None]
    first = gpu_rows(GpuJpegDecoder(device))
    pixels = next(first)[1]
    first.close()
    calls = -(-len(items) // args.batch)
    rows.append(timed("model only (pixels on GPU)", lambda: ((list(map(str, range(len(pixels)))), pixels)
                                                              for _ in range(calls))))  # fmt: skip
    if executor is not None:
        executor.shutdown(wait=True, cancel_futures=True)

    reference = rows[0]["_vectors"] if not args.skip_cpu else {}
    for row in rows:
        vectors = row.pop("_vectors")
        common = [i for i in vectors if i in reference] if not row["name"].startswith("model only") else []
        if common and row is not rows[0]:
            cos = np.array([float(np.dot(vectors[i], reference[i])) for i in common])
            row["cos_min"], row["cos_mean"], row["cos_images"] = float(cos.min()), float(cos.mean()), len(common)
    return {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu_workers": workers,
        "count": len(items),
        "batch": args.batch,
        "large_every": args.large_every,
        "rows": rows,
        "gpu_decode": dataclasses.asdict(end_to_end.stats),
    }


def peer_rows(items: list[Any], batch: int, device: Any) -> Rows:
    """A plain torchvision GPU pipeline: files read in a loop, one batched `decode_jpeg` on the
    GPU per batch (`apply_exif_orientation=True`, which torchvision 0.26 - 0.28 ignores on CUDA:
    rotated photos stay as stored, and the cosine column shows it), then per image an antialiased bicubic resize of the
    short side to 224 in float, center crop and CLIP normalisation, as torchvision's transforms
    do. No CPU fallback: a file it cannot decode raises (the benchmark's JPEGs are all plain)."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(3, 1, 1)
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        data = [read_file(str(item.source)) for item in chunk]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        out = []
        for image in images:
            h, w = image.shape[1:]
            scale = 224 / min(h, w)
            size = (max(224, round(h * scale)), max(224, round(w * scale)))
            x = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)
            top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
            x = x[0, :, top : top + 224, left : left + 224].clamp(0, 255) / 255
            out.append(((x - mean) / std).half())
        yield [item.id for item in chunk], torch.stack(out)


def nvimgcodec_rows(timed: Callable[..., dict[str, Any]], gpu_rows: Callable[..., Rows], device: Any,
                    warm_items: list[Any]) -> list[dict[str, Any]]:  # fmt: skip
    """The same loader with nvImageCodec as the batched decoder (`library="nvimgcodec"`): decode
    only, with the model, and with libjpeg's chroma upsampling (fidelity); none if not installed."""
    from clipengine.image import nvimgcodec_decode
    from clipengine.image.gpu_decode import GpuJpegDecoder

    if not nvimgcodec_decode.available():
        log.info("nvimgcodec rows left out: nvidia-nvimgcodec is not installed")
        return []
    rows = []
    try:
        for fancy in (False, True):
            for _ in gpu_rows(GpuJpegDecoder(device, library="nvimgcodec", fancy_upsampling=fancy), warm_items):
                pass  # decoder creation, its thread pool and the hardware decoder's set-up: untimed
        only = GpuJpegDecoder(device, library="nvimgcodec")
        rows.append(timed("gpu nvimgcodec, decode only (no model)", lambda: gpu_rows(only), False, only))
        full = GpuJpegDecoder(device, library="nvimgcodec")
        rows.append(timed("gpu nvimgcodec + model", lambda: gpu_rows(full), True, full))
        fancy = GpuJpegDecoder(device, library="nvimgcodec", fancy_upsampling=True)
        rows.append(timed("gpu nvimgcodec fancy_upsampling + model", lambda: gpu_rows(fancy), True, fancy))
    except Exception:
        log.exception("nvimgcodec rows: failed; the rows measured so far are kept")
    return rows


def pipeline_row(items: list[Any], cfg: Any, batch: int, suffix: str = "", shard_size: int | None = None,
                 decode_ahead: bool = False) -> dict[str, Any] | None:  # fmt: skip
    """What `clipengine embed --gpu-decode` runs: embed_folder with the nvjpeg loader and the torch
    backend (same weights, fp16, CUDA graphs), shards written to a temporary folder (one shard
    unless `shard_size`); None if it fails."""
    import torch

    from clipengine.backends.torch_backend import TorchBackend
    from clipengine.models.clip import build_model
    from clipengine.models.config import get_config
    from clipengine.pipeline.run import embed_folder
    from clipengine.pipeline.sinks import read_embeddings

    name = "clipengine embed_folder(gpu_decode), shards written" + suffix
    try:
        torch.manual_seed(SEED)  # the same random weights as the other rows
        backend = TorchBackend(build_model(get_config("ViT-B-32")), device="cuda", precision="fp16",
                               cuda_graphs=True)  # fmt: skip
        for n in {min(batch, len(items)), len(items) % batch} - {0}:  # CUDA graph captures, untimed
            backend.encode_images(torch.zeros((n, 3, 224, 224), device="cuda"))
        with tempfile.TemporaryDirectory(prefix="clipengine_gpu_e2e_out_") as out:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            stats = embed_folder(items, out, backend, cfg, batch_size=batch, shard_size=shard_size or len(items),
                                 dtype="float32", gpu_decode="cuda", gpu_decode_ahead=decode_ahead)  # fmt: skip
            seconds = time.perf_counter() - t0
            ids, vectors, _ = read_embeddings(out)
    except Exception:
        log.exception("%s: failed; row left out", name)
        return None
    log.info("%s: %d images in %.2f s = %.0f img/s (model %.2f s, waiting for the loader %.2f s)", name,
             stats.embedded, seconds, stats.embedded / seconds, stats.infer_s, stats.wait_s)  # fmt: skip
    loader = {"decode_s": stats.decode_s, "preprocess_s": stats.preprocess_s, "read_s": stats.read_s}
    return {"name": name, "images": stats.embedded, "seconds": seconds, "img_per_s": stats.embedded / seconds,
            "loader": loader, "infer_s": stats.infer_s, "wait_s": stats.wait_s,
            "_vectors": dict(zip(ids, vectors, strict=True))}  # fmt: skip


def render(results: dict[str, Any]) -> str:
    lines = [
        f"ViT-B/32 fp16 + CUDA graphs on {results['device']} (torch {results['torch']}, torchvision "
        f"{results['torchvision']}); {results['count']} JPEGs (1280x960; every {results['large_every']}th "
        f"distinct one 4000x3000, 0 = none), batch {results['batch']}",
        "",
        "| path | img/s | images | s | cos vs cpu exact (min / mean) | loader: decode s / preprocess s / read s (threads summed) |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in results["rows"]:
        cos = f"{row['cos_min']:.5f} / {row['cos_mean']:.5f}" if "cos_min" in row else "reference" if row[
            "name"].startswith("cpu exact") else "-"  # fmt: skip
        stats = row.get("loader")
        loader = f"{stats['decode_s']:.2f} / {stats['preprocess_s']:.2f} / {stats['read_s']:.2f}" if stats else "-"
        lines.append(f"| {row['name']} | {row['img_per_s']:.0f} | {row['images']} | {row['seconds']:.2f} | {cos} "
                     f"| {loader} |")  # fmt: skip
    g = results["gpu_decode"]
    lines += ["", f"gpu loader (e2e row): nvjpeg {g['nvjpeg']}, cpu fallback {g['cpu_fallback']}, failures "
                  f"{g['failures']}, batch retries {g['batch_retries']}"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
