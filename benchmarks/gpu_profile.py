"""Where the image tower's time goes: torch profiler table of one ViT-B/32 batch (random weights).

Answers what the throughput table cannot: how much of a batch is matrix products (the part FP8 or
better GEMMs could speed up) and how much is attention, LayerNorm, GELU, the patch convolution and
casts. Prints the top kernels by device time and the share of GEMM-like kernels.

Usage:
    python benchmarks/gpu_profile.py [--device cuda] [--batch 1024] [--precision fp16] [--compile]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from clipengine.backends.accel import optimize
from clipengine.models.clip import build_model
from clipengine.models.config import get_config

_GEMM_MARKERS = ("gemm", "matmul", "mm_", "addmm", "cutlass", "sm90_xmma", "nvjet", "scaled_mm", "linear")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--precision", default=None, help="fp16 on CUDA, bf16 on CPU by default; fp8 on FP8 GPUs")
    p.add_argument("--compile", action="store_true", help="torch.compile (inductor default mode)")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--conv", action="store_true", help="patch embedding as cuDNN's convolution (patch_matmul=False)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("gpu_profile: CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = build_model(get_config("ViT-B-32"))
    precision = args.precision or ("fp16" if cuda else "bf16")
    # No CUDA graphs here: kernels replayed from a graph may not show up one by one in the profile,
    # and each kernel's device time is the same either way (graphs remove launch gaps, not work).
    fast = optimize(model, device=args.device, precision=precision, compile=args.compile,
                    patch_matmul=not args.conv)  # fmt: skip
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    for _ in range(3):  # compile / capture / autotune outside the profile
        fast.encode_image(x)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            fast.encode_image(x)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # Kernels only on CUDA: an aten op's self device time is its kernels' time again (session 3's
    # table counted both, so its shares were half the real ones).
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0
              and (not cuda or e.device_type == DeviceType.CUDA)]  # fmt: skip
    total = sum(getattr(e, key) for e in events) or 1.0
    gemm = sum(getattr(e, key) for e in events if any(m in e.key.lower() for m in _GEMM_MARKERS))
    label = (f"ViT-B/32 image tower, batch {args.batch}, {precision}, {'compiled' if args.compile else 'eager'}"
             f"{', patch convolution' if args.conv else ''}")  # fmt: skip
    print(f"## {label} on {torch.cuda.get_device_name() if cuda else 'CPU'}\n")
    print(f"per batch: {total / 5 / 1000:.2f} ms of {'device' if cuda else 'CPU'} time; "
          f"GEMM-like kernels {100 * gemm / total:.0f} %\n")  # fmt: skip
    print("| kernel | ms per batch | share |\n| --- | ---: | ---: |")
    for e in sorted(events, key=lambda e: -getattr(e, key))[: args.rows]:
        t = getattr(e, key)
        print(f"| {e.key[:90]} | {t / 5 / 1000:.3f} | {100 * t / total:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
