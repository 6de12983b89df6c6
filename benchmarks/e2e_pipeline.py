"""One end-to-end folder run (`embed_folder`: decode workers -> backend -> shards), timed, in its own process.

`compare_peers.py` calls this as a subprocess for each pipeline row. Why a separate, light script:
the pipeline's decode workers are *spawned*, and a spawned worker re-imports the parent's main
module; inside compare_peers that is torch + open_clip + transformers (seconds per worker, which
on a 96-image folder halved the measured throughput). Here the main module imports nothing heavy at
the top, as with the `clipengine embed` command.

Usage:
    python benchmarks/e2e_pipeline.py FOLDER VECTORS.npy --backend openvino --model EXPORT_DIR --precision int8 [--fast-decode]
    python benchmarks/e2e_pipeline.py FOLDER VECTORS.npy --backend torch --model MODEL_DIR --precision bf16 --compile

Prints one JSON line: {"fps", "per_image_ms", "embedded"}; VECTORS.npy gets the embeddings sorted by file name.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("vectors", type=Path)
    p.add_argument("--backend", choices=["torch", "openvino", "onnx"], required=True)
    p.add_argument("--model", required=True, help="clipengine model folder (torch) or export folder")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fast-decode", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: one per core)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per partition / shard (embed's default 1000)")
    args = p.parse_args(argv)

    from clipengine.backends import create_backend
    from clipengine.image.preprocess import PreprocessConfig
    from clipengine.pipeline.run import embed_folder
    from clipengine.pipeline.sinks import read_embeddings

    if args.backend == "torch":
        import torch

        from clipengine.models.load import load_model

        if args.threads:
            torch.set_num_threads(args.threads)
        loaded = load_model(args.model)
        backend = create_backend("torch", loaded.module, precision=args.precision, compile=args.compile)
    else:
        opts = ({"threads": args.threads} if args.backend == "openvino" else {"intra_op_threads": args.threads}) if args.threads else {}
        backend = create_backend(args.backend, args.model, precision=args.precision, **opts)
    size = backend.image_size
    backend.encode_images(np.zeros((args.batch, 3, size, size), np.float32))  # compile / first-call costs outside the timing
    with tempfile.TemporaryDirectory() as out:
        stats = embed_folder(args.folder, Path(out) / "emb", backend, PreprocessConfig(image_size=size),
                             batch_size=args.batch, dtype="float32", fast_decode=args.fast_decode,
                             workers=args.workers, shard_size=args.shard_size)  # fmt: skip
        ids, vecs, _ = read_embeddings(Path(out) / "emb")
    order = np.argsort([Path(i).name for i in ids])
    np.save(args.vectors, vecs[order])
    print(json.dumps({"fps": stats.embedded / stats.wall_s, "per_image_ms": stats.per_image_ms(), "embedded": stats.embedded}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
