"""`clipengine embed --gpu-decode` as a user runs it, whole commands timed: one loader thread against
`--gpu-decode-procs N`, whose processes start while the model loads (session 12).

Session 11-12 measured the decode processes inside `benchmarks/gpu_gap.py`, where the model is loaded
before the clock starts: there their 6.5-7.9 s start-up was all cost, and 2-3 processes lost to the one
loader thread over 65,536 files (3.2-3.5k vs 5.7k img/s) although they ran 6.4-6.7k img/s once started.
A command loads its model too (torch, the checkpoint, the device); the processes now start first, and
this process's loader thread loads from the start beside them (`pipeline.gpu_procs`). This
times the whole command, `python -m clipengine embed ...` from start to exit, rows in turn, on random
ViT-B/32 weights saved as a checkpoint file (speed does not depend on the values) and N 1280x960 JPEGs.

Each row's stderr is kept: with `-v` the decode processes log where their start-up went ("ready ...
slowest: spawn, imports, device, decoder warm-up") and their rate after the first batch.

Usage (device): python benchmarks/gpu_cli_procs.py [--count 65536] [--rounds 2] [--procs 2,3,4] [--out DIR]
Prints a markdown table: per row the median whole-command seconds and img/s, and embed_folder's own
seconds (from `--json`). `--device cpu` runs the same commands without --gpu-decode (a smoke test of
this script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("gpu_cli_procs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=65536, help="1280x960 JPEGs (64 distinct, linked)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--procs", default="3,4", help="--gpu-decode-procs values, each a row beside the default")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--variants", default="", help="each row once per variant, in turn: comma list of LABEL=ENV "
                   "where ENV is KEY=VALUE[+KEY=VALUE...] or empty, e.g. 'torch=CLIPENGINE_GPU_KERNELS=torch,default=' "
                   "(session 15: the GPU preprocessing kernels A/B)")  # fmt: skip
    p.add_argument("--device", default="cuda", help="cuda; cpu: a smoke test of this script (no GPU decode)")
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "clipengine_gpu_cli")
    p.add_argument("--out", type=Path, default=None, help="keep each row's stderr here")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_e2e import SEED, cuda_missing, ensure_jpegs

    if args.device != "cpu" and cuda_missing("gpu_cli_procs.py", "; --device cpu is a smoke test of this script"):
        return 2
    folder = ensure_jpegs(args.folder / "photos", args.count, 64, 0, 16)[0].parent
    checkpoint = _checkpoint(args.folder / "vit-b-32-random.pt", SEED)
    common = ["embed", str(folder), "--model", "ViT-B-32", "--checkpoint", str(checkpoint), "--backend", "torch",
              "--device", args.device, "--batch", str(args.batch), "--no-progress", "--json"]  # fmt: skip
    if args.device != "cpu":
        common += ["--precision", "fp16", "--gpu-decode"]
    # Row A names its one loader: since session 17 the default is 4 loaders from 100,000 files on 8+ cores.
    rows = {"A one loader thread (--gpu-decode-procs 1)": ["--gpu-decode-procs", "1"]} | {
        f"{chr(ord('B') + i)} --gpu-decode-procs {n}": ["--gpu-decode-procs", n]
        for i, n in enumerate(args.procs.split(","))
        if n
    }
    if args.device == "cpu":  # no GPU decode, so no decode processes: the rows only exercise this script
        rows = {name: [] for name in rows}
    variants = dict(_variant(v) for v in args.variants.split(",") if v)
    envs: dict[str, dict[str, str]] = {name: {} for name in rows}
    tags = {name: "" for name in rows}
    if variants:
        envs = {f"{name} [{label}]": env for name in rows for label, env in variants.items()}
        tags = {f"{name} [{label}]": f"_{label}" for name in rows for label in variants}
        rows = {f"{name} [{label}]": extra for name, extra in rows.items() for label in variants}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in rows}
    for r in range(args.rounds):
        for name, extra in rows.items():
            out = Path(tempfile.mkdtemp(prefix="clipengine_gpu_cli_out_"))
            cmd = [sys.executable, "-m", "clipengine", "-v", *common, "-o", str(out / "emb"), *extra]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ | envs[name])
            wall = time.perf_counter() - t0
            shutil.rmtree(out, ignore_errors=True)  # 65,536 rows of embeddings per run, failed or not
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"round{r}_{name.split()[0]}{tags[name]}.stderr.log").write_text(done.stderr)
            if done.returncode != 0:
                log.error("round %d %s: exit %d\n%s", r, name, done.returncode, done.stderr[-3000:])
                continue
            stats = json.loads(done.stdout[done.stdout.index("{") :])
            embedded = int(stats.get("embedded", stats.get("images", 0)))
            row = {"command_s": wall, "embed_s": float(stats.get("wall_s", 0.0)), "images": embedded}
            row.update(_process_lines(done.stderr))
            results[name].append(row)
            log.info("round %d %s: %d images, command %.1f s (%.0f img/s), embed_folder %.1f s; %s", r, name,
                     embedded, wall, embedded / wall, row["embed_s"], _summary(done.stderr))  # fmt: skip
    print(f"{args.count} 1280x960 JPEGs, random ViT-B/32 weights ({'fp32' if args.device == 'cpu' else 'fp16'}), batch {args.batch}, "
          f"{args.rounds} rounds in turn, whole `clipengine embed` commands\n")  # fmt: skip
    print("| row | command s (median) | img/s (command) | embed_folder s | processes ready s | first batch s "
          "| listing s | model load s | model ready at s | embedding done at s | loaders' own img/s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        if not runs:
            print(f"| {name} | failed | | | | |")
            continue
        med = {k: statistics.median(r.get(k, float("nan")) for r in runs) for k in runs[0]}
        cell = {k: f"{med[k]:.1f}" if k in med else "" for k in
                ("ready_s", "first_s", "list_s", "load_s", "loaded_at_s", "done_at_s")}  # fmt: skip
        loaders = f"{med['loaders_img_s']:.0f}" if "loaders_img_s" in med else ""
        print(f"| {name} | {med['command_s']:.1f} | {med['images'] / med['command_s']:.0f} | {med['embed_s']:.1f} | "
              f"{cell['ready_s']} | {cell['first_s']} | {cell['list_s']} | {cell['load_s']} | {cell['loaded_at_s']} | "
              f"{cell['done_at_s']} | {loaders} |")  # fmt: skip
    steps = ("torch_import_s", "checkpoint_s", "engine_s", "cuda_start_s")
    print("\nThe model load's steps (medians, s; `CUDA start-up` is part of `engine`):\n")
    print("| row | torch import | checkpoint read, model built | engine | CUDA start-up |\n| --- | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        cells = [f"{statistics.median(r[k] for r in runs):.2f}" if runs and all(k in r for r in runs) else "" for k in steps]
        print(f"| {name} | {' | '.join(cells)} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    # Non-zero when a row never ran: gpu_check.sh reports this exit status (every command failing
    # printed a table of "failed" rows and exited 0).
    return 1 if any(not runs for runs in results.values()) else 0


def _variant(text: str) -> tuple[str, dict[str, str]]:
    """'old=A=1+B=2' -> ('old', {'A': '1', 'B': '2'}); 'new=' -> ('new', {})."""
    label, _, env = text.partition("=")
    pairs = [pair.partition("=") for pair in env.split("+") if pair]
    return label, {key: value for key, _, value in pairs}


def _checkpoint(path: Path, seed: int) -> Path:
    """Random ViT-B/32 weights saved as a state dict, as `--checkpoint` reads them (made once)."""
    if path.exists():
        return path
    import torch

    from clipengine.models.clip import build_model
    from clipengine.models.config import get_config

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(build_model(get_config("ViT-B-32")).state_dict(), tmp)
    os.replace(tmp, path)
    return path


_LISTED = re.compile(r"listed \d+ files in ([\d.]+) s")
_LOADED = re.compile(r"model loaded in ([\d.]+) s \(([\d.]+) s since the command started\)")
_DONE = re.compile(r"embedding done ([\d.]+) s after the command started")
_READY = re.compile(r"GPU decode processes ready ([\d.]+) s after their start \(slowest: ([^)]*)\)")
_FIRST = re.compile(r"GPU decode processes: first batch ([\d.]+) s after their start")
_LOAD_STEPS = re.compile(r"load \S+: torch import ([\d.]+) s, checkpoint read and model built ([\d.]+) s, \S+ \S+ engine ([\d.]+) s")
_CUDA_START = re.compile(r"CUDA start-up on \S+: ([\d.]+) s")
_LOADERS = re.compile(r"GPU loaders: \d+ images in [\d.]+ s \((\d+) img/s\); images per loader \(0: this process's thread\): (.*)")


def _process_lines(stderr: str) -> dict[str, float]:
    found: dict[str, float] = {}
    if m := _LISTED.search(stderr):  # the command's own timeline (embed -v, session 12 on)
        found["list_s"] = float(m.group(1))
    if m := _LOADED.search(stderr):
        found["load_s"], found["loaded_at_s"] = float(m.group(1)), float(m.group(2))
    if m := _DONE.search(stderr):
        found["done_at_s"] = float(m.group(1))
    if m := _READY.search(stderr):
        found["ready_s"] = float(m.group(1))
    if m := _FIRST.search(stderr):
        found["first_s"] = float(m.group(1))
    if m := _LOAD_STEPS.search(stderr):  # the model load's own steps (session 16 on)
        found["torch_import_s"], found["checkpoint_s"], found["engine_s"] = (float(g) for g in m.groups())
    if m := _CUDA_START.search(stderr):
        found["cuda_start_s"] = float(m.group(1))
    if m := _LOADERS.search(stderr):
        found["loaders_img_s"] = float(m.group(1))
        found["own_thread_images"] = float(m.group(2).split(", ")[0].split(": ")[1])
    return found


def _summary(stderr: str) -> str:
    lines = [line.split(" ", 2)[-1] for line in stderr.splitlines() if "GPU decode processes" in line or "GPU loaders" in line]
    return "; ".join(lines) or "one loader thread"


if __name__ == "__main__":
    raise SystemExit(main())
