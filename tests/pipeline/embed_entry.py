"""Subprocess entry for the kill/resume test: embed a folder with the fake backend, print stats JSON.

Usage: python embed_entry.py SOURCE OUT --delay 0.05 --shard-size 10 --batch 5 --workers 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipengine.image.preprocess import PreprocessConfig
from clipengine.pipeline.run import embed_folder


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
    from pipeline_fakes import FakeBackendFactory

    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    stats = embed_folder(
        args.source,
        args.out,
        FakeBackendFactory(embed_dim=8, image_size=32, delay_s=args.delay),
        PreprocessConfig(image_size=32),
        model="fake",
        batch_size=args.batch,
        workers=args.workers,
        shard_size=args.shard_size,
        dtype="float32",
    )
    print(json.dumps(stats.to_dict()))


if __name__ == "__main__":
    main()
