"""Benchmark backends x precisions x batch sizes for both towers, with cosine to fp32 PyTorch per row.

Not a test. Examples:

    # random-weight ViT-B/32, export on the fly into a temp folder (fp32, fp16, int8, dynamic batch)
    python benchmarks/bench_backends.py --model ViT-B-32 --random-weights
    # an existing export folder + the torch reference from registry weights
    python benchmarks/bench_backends.py --model ViT-B-32 --pretrained openai --export models/ViT-B-32
    # GPU rows too
    python benchmarks/bench_backends.py --model ViT-B-32 --random-weights --device cuda

Prints one Markdown row per (backend, precision, tower, batch): ms/batch (p50), items/s, min cosine
of the normalised embeddings to the fp32 PyTorch reference, and the ORT providers used.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32", help="architecture / model name")
    p.add_argument("--pretrained", default=None, help="weights tag (needs the weights in the cache)")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights, no checkpoint")
    p.add_argument("--export", type=Path, default=None, help="existing export folder (else: export now)")
    p.add_argument("--precisions", default="fp32,fp16,int8")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch + onnx rows on that device)")
    p.add_argument("--torch-precisions", default="fp32", help="torch backend rows, e.g. fp32,bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    return p.parse_args(argv)


def _model(args: argparse.Namespace) -> Any:
    import torch

    from clipengine.models.clip import build_model
    from clipengine.models.config import get_config

    if args.random_weights:
        torch.manual_seed(0)
        return build_model(get_config(args.model))
    from clipengine.models.load import load_model

    return load_model(args.model, args.pretrained).module


def _inputs(model: Any, batch: int) -> dict[str, np.ndarray]:
    from clipengine.export.verify import SAMPLE_TEXTS
    from clipengine.text.tokenizer import tokenize

    rng = np.random.default_rng(batch)
    size = model.config.vision.image_size
    texts = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] + f" {i}" for i in range(batch)]
    return {
        "image": rng.standard_normal((batch, 3, size, size)).astype(np.float32),
        "text": tokenize(texts, context_length=model.config.text.context_length),
    }


def _reference(model: Any, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = {"image": model.encode_image(torch.from_numpy(x["image"])).numpy(),
               "text": model.encode_text(torch.from_numpy(x["text"])).numpy()}
    return {k: v / np.linalg.norm(v, axis=-1, keepdims=True) for k, v in out.items()}


def _rows(label: str, backend: Any, model: Any, batches: list[int], repeats: int) -> list[dict[str, Any]]:
    from clipengine.bench.timing import time_call

    rows = []
    for batch in batches:
        x = _inputs(model, batch)
        ref = _reference(model, x)
        for tower, fn in (("image", backend.encode_images), ("text", backend.encode_texts)):
            out = fn(x[tower])
            timing = time_call(lambda fn=fn, inp=x[tower]: fn(inp), warmup=1, repeats=repeats)
            rows.append({
                "backend": label, "precision": backend.precision, "tower": tower, "batch": batch,
                "ms_per_batch": round(timing.p50_ms, 2),
                "items_per_s": round(batch / (timing.p50_ms / 1000), 1) if timing.p50_ms else 0.0,
                "min_cos_to_fp32": round(float((out * ref[tower]).sum(-1).min()), 6),
                "providers": ",".join(getattr(backend, "providers", []) or [backend.device]),
            })
            print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r: dict[str, Any]) -> str:
    return (f"| {r['backend']:<5} | {r['precision']:<5} | {r['tower']:<5} | {r['batch']:>5} | "
            f"{r['ms_per_batch']:>9.2f} | {r['items_per_s']:>9.1f} | {r['min_cos_to_fp32']:.6f} | {r['providers']} |")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from clipengine.backends import create_backend

    model = _model(args)
    batches = [int(b) for b in args.batches.split(",")]
    precisions = [p for p in args.precisions.split(",") if p]
    print("| backend | prec | tower | batch | ms/batch | items/s | cos to fp32 | providers |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    rows: list[dict[str, Any]] = []
    for precision in [p for p in args.torch_precisions.split(",") if p]:
        # A copy: the torch backend casts and moves the module it gets in place, and `model` must
        # stay the fp32 CPU reference for the cosines and the export (bf16 here broke both).
        backend = create_backend("torch", copy.deepcopy(model), device=args.device, precision=precision)
        rows += _rows("torch", backend, model, batches, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.export
        if folder is None:
            from clipengine.export.onnx import export_model

            folder = Path(tmp) / args.model
            export_model(model, folder, precisions=precisions, image_batches=None, text_batches=None,
                         progress=lambda line: print(f"<!-- {line} -->", file=sys.stderr))
        for precision in precisions:
            backend = create_backend("onnx", folder, device=args.device, precision=precision,
                                     intra_op_threads=args.threads)
            rows += _rows("onnx", backend, model, batches, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
