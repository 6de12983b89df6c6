"""Where each thread of `embed_folder(gpu_decode)` spends its time, by sampling their Python stacks.

Session 8 left 30 % between the loader with the model (5.5-5.7k img/s of 1280x960 on an H200) and
the raw nvjpeg decode (8.1k), and a 2-core emulation of the host side had mispredicted what
decoding on a thread of its own would gain. This samples the real run instead: a thread reads
`sys._current_frames()` every `--interval-ms` while `embed_folder` embeds `--count` files, and
prints, per thread (main, the loader thread, reader threads, ...), the share of samples at each
innermost line, and the clipengine functions on the stack (inclusive). A thread inside a native
call that released the GIL (nvjpeg, a CUDA sync, a queue wait) shows the Python line that made the
call. The sampler takes the GIL 1000 / interval times a second, so the rate printed is a little
below an unsampled run's.

Usage (device): python benchmarks/gpu_sample.py [--count 16384] [--interval-ms 2]
Without a GPU (`--device cpu`) the decode, preprocessing and model are gpu_loader_host.py's
stand-ins: a check of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class StackSampler:
    """Counts, per thread name, the innermost line and the clipengine functions on the stack."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.samples: collections.Counter[str] = collections.Counter()
        self.leaf: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.ours: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = _thread_kind(names.get(ident, "?"))
                self.samples[name] += 1
                code = frame.f_code
                self.leaf[name][f"{code.co_name} ({_short(code.co_filename)}:{frame.f_lineno})"] += 1
                seen = set()
                f: Any = frame
                while f is not None:
                    c = f.f_code
                    if "clipengine" in c.co_filename and c.co_name not in seen:
                        seen.add(c.co_name)
                        self.ours[name][f"{c.co_name} ({_short(c.co_filename)})"] += 1
                    f = f.f_back

    def render(self, top: int) -> str:
        lines = []
        for name, n in self.samples.most_common():
            lines += [f"### thread {name}: {n} samples", "", "| innermost line | % |", "| --- | ---: |"]
            lines += [f"| {k} | {100 * v / n:.1f} |" for k, v in self.leaf[name].most_common(top)]
            lines += ["", "| clipengine function on the stack (inclusive) | % |", "| --- | ---: |"]
            lines += [f"| {k} | {100 * v / n:.1f} |" for k, v in self.ours[name].most_common(top)]
            lines.append("")
        return "\n".join(lines)


def _thread_kind(name: str) -> str:
    """Pool threads numbered per pool ("ThreadPoolExecutor-3_1") grouped by pool, not one row each."""
    return name.rsplit("_", 1)[0] if name.startswith("ThreadPoolExecutor-") else name


def _short(filename: str) -> str:
    parts = Path(filename).parts
    return "/".join(parts[parts.index("clipengine"):]) if "clipengine" in parts else "/".join(parts[-2:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=16384, help="1280x960 files (64 distinct, linked)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--interval-ms", type=float, default=2.0)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a check with stand-ins")
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "clipengine_gpu_sample")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_e2e import SEED, cuda_missing, ensure_jpegs

    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.pipeline.run import embed_folder
    from clipengine.pipeline.sources import list_folder

    if args.device != "cpu" and cuda_missing("gpu_sample.py", "; --device cpu checks this script with stand-ins"):
        return 2
    ensure_jpegs(args.folder, args.count, 64, 0, 16)
    items = list_folder(args.folder)
    cfg = PreprocessConfig()
    if args.device == "cpu":
        import numpy as np
        from gpu_loader_host import stand_ins

        class StandIn:
            name, embed_dim, image_size = "stand-in", 512, 8

            def encode_images(self, pixels: Any) -> Any:
                time.sleep(27e-6 * len(pixels))
                return np.zeros((len(pixels), 512), np.float32)

        cfg = PreprocessConfig(image_size=8)
        backend: Any = StandIn()

        def patched() -> Any:
            return stand_ins(argparse.Namespace(decode_us=125.0, preprocess_us=34.0), cfg.image_size)

    else:
        import torch

        from clipengine.backends.torch_backend import TorchBackend
        from clipengine.models.clip import build_model
        from clipengine.models.config import get_config

        torch.manual_seed(SEED)
        backend = TorchBackend(build_model(get_config("ViT-B-32")), device="cuda", precision="fp16", cuda_graphs=True)
        for n in {args.batch, args.count % args.batch} - {0}:  # graph captures, untimed
            backend.encode_images(torch.zeros((n, 3, 224, 224), device="cuda"))
        patched = contextlib.nullcontext  # type: ignore[assignment]

    def run(sampler: StackSampler | None) -> float:
        with tempfile.TemporaryDirectory(prefix="clipengine_gpu_sample_out_") as out, patched():
            t0 = time.perf_counter()
            with sampler if sampler is not None else contextlib.nullcontext():
                stats = embed_folder(items, out, backend, cfg, batch_size=args.batch, shard_size=1000,
                                     dtype="float32", gpu_decode=args.device)  # fmt: skip
            return stats.embedded / (time.perf_counter() - t0)

    run(None)  # nvjpeg's and the kernels' first calls, and the page cache, outside the sampled run
    unsampled = run(None)
    sampler = StackSampler(args.interval_ms / 1e3)
    sampled = run(sampler)
    print(f"embed_folder(gpu_decode={args.device!r}), {args.count} files 1280x960, batch {args.batch}: "
          f"{unsampled:.0f} img/s unsampled, {sampled:.0f} sampled every {args.interval_ms} ms\n")  # fmt: skip
    print(sampler.render(args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
