"""GPU preprocessing alone (`preprocess_tensors`): fused Triton kernels vs torch ops, and resize call sizes.

Session 5 measured `preprocess_tensors` at 24.7k img/s on 1280x960 photos (H200): about 40 us per
image, beside 91 us per image for 4 decode processes' raw nvjpeg (11.0k img/s together). Their
loaders ran 7.6k img/s, close to 1 / (91 + 40) us, so the preprocessing is a third of a loader's
time. Session 15 fused its memory-bound steps (`image.gpu_triton`). This script times, rows in turn
for --rounds rounds (medians), on --count decoded images already on the GPU (random pixels: the
resize does the same work whatever the values):

- kernels: `CLIPENGINE_GPU_KERNELS` = triton with every kernel (`CLIPENGINE_GPU_KERNEL_SKIP=`),
  triton without the operand kernel (what session 15 measured and the default; the operand kernel
  came after), torch
- `gpu_preprocess._GROUP_ELEMENTS` (same-size images per resize call): 128 Mi (default, ~36
  1280x960 photos), 1 Gi (all 256 in one call)
- the same on a mix (every 8th image 4000x3000)

then one call per kernels setting under torch.profiler: each kernel's GPU time per image.
(Session 15 ran this at 6ba1ddf with a third setting, one resize GEMM per band of 64 or 32 outputs:
slower, 32.9k / 22.1k against 38.6k img/s with the kernels, so the bands were removed.)
Markdown on stdout. `--device cpu` is a smoke test of this script (no kernels there).

Usage (device): python benchmarks/gpu_preprocess_bench.py [--count 256] [--rounds 3] [--seconds 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from gpu_decode_bench import rate  # items per second after one untimed call

GROUPS = {"128 Mi": 1 << 27, "1 Gi": 1 << 30}


@contextmanager
def setting(kernels: str, group: int) -> Any:
    """`kernels`: "torch", "triton", or "triton-no-operand"."""
    from clipengine.image import gpu_preprocess

    env = {"CLIPENGINE_GPU_KERNELS": kernels.split("-")[0],
           "CLIPENGINE_GPU_KERNEL_SKIP": "operand" if kernels.endswith("no-operand") else ""}  # fmt: skip
    old_env, old_group = {k: os.environ.get(k) for k in env}, gpu_preprocess._GROUP_ELEMENTS
    os.environ.update(env)
    gpu_preprocess._GROUP_ELEMENTS = group
    try:
        yield
    finally:
        gpu_preprocess._GROUP_ELEMENTS = old_group
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)

    import torch
    from gpu_e2e import cuda_missing

    from clipengine.image import gpu_fused
    from clipengine.image.gpu_preprocess import preprocess_tensors
    from clipengine.image.preprocess import PreprocessConfig

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and cuda_missing("gpu_preprocess_bench.py", "; --device cpu is a smoke test"):
        return 2
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    small, large = (960, 1280), (3000, 4000)
    if not cuda:
        small, large = (96, 128), (300, 400)  # smoke test: small enough for 2 cores

    def images(every_large: int) -> list[Any]:
        return [torch.randint(0, 256, (3, *(large if every_large and i % every_large == 0 else small)),
                              dtype=torch.uint8, generator=gen).to(device) for i in range(args.count)]  # fmt: skip

    sets = {"1280x960": images(0), "mix (every 8th 4000x3000)": images(8)}
    cfg = PreprocessConfig()
    kernels = ["triton", "triton-no-operand", "torch"] if cuda else ["torch"]
    rows = [(s, k, g) for s in sets for k in kernels for g in GROUPS if s == "1280x960" or g == "128 Mi"]
    results: dict[tuple[str, str, str], list[float]] = {row: [] for row in rows}
    for _ in range(args.rounds):
        for row in rows:
            name, k, g = row
            with setting(k, GROUPS[g]):
                results[row].append(rate(lambda x=sets[name]: len(preprocess_tensors(x, cfg, out_dtype=torch.float16)),
                                         args.seconds, sync))  # fmt: skip
    where = torch.cuda.get_device_name(0) if cuda else "CPU (smoke test)"
    print(f"`preprocess_tensors` on {where}, {args.count} images per call, fp16 out, {args.rounds} rounds in turn "
          f"(median img/s; us per image). Before session 15: torch ops, 128 Mi.\n")  # fmt: skip
    print("| images | kernels | resize call holds | img/s | us/img | x before |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for row in rows:
        name, k, g = row
        med = statistics.median(results[row])
        base = statistics.median(results[(name, "torch", "128 Mi")])
        print(f"| {name} | {k} | {g} | {med:.0f} | {1e6 / med:.1f} | {med / base:.2f} |")
    if gpu_fused._unavailable:
        print("\n**The Triton kernels failed here: the triton rows ran the torch ops (see stderr).**")
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        for k in kernels:
            with setting(k, GROUPS["128 Mi"]):
                preprocess_tensors(sets["1280x960"], cfg, out_dtype=torch.float16)
                sync()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    preprocess_tensors(sets["1280x960"], cfg, out_dtype=torch.float16)
                    sync()
            events = [e for e in prof.key_averages() if e.device_time_total > 0]
            events.sort(key=lambda e: -e.device_time_total)
            total = sum(e.device_time_total for e in events)
            print(f"\nkernels = {k}, 1280x960, one call: GPU time {total / args.count:.1f} us per image "
                  f"in {sum(e.count for e in events)} kernel launches\n")  # fmt: skip
            print("| kernel | launches | us per image | share |\n| --- | ---: | ---: | ---: |")
            for e in events[:10]:
                print(f"| {e.key[:90]} | {e.count} | {e.device_time_total / args.count:.2f} | "
                      f"{e.device_time_total / total:.0%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
