"""Recall@10 vs exact, build time, search latency and size of each index kind on synthetic unit vectors.

The data are the test suite's (tests/index/conftest.py `clustered`): a Gaussian mixture whose
centres are fixed by seed 1234, points drawn with seed 0 and queries with seed 1 (unseen points
of the same distribution), noise 1.5; or `--data uniform` (no neighbourhood structure: the worst
case for any ANN index). Recall@10 is |ANN top-10 ∩ exact top-10| / 10, averaged over the queries,
as in tests/index/test_index.py. Search time is one query at a time (latency, faiss' own threads).

Usage (the rows of docs/search_scale.md):
    python benchmarks/index_scale.py --n 20000 --dim 64 --kinds ivf hnsw ivfpq
    python benchmarks/index_scale.py --n 20000 --dim 64 --data uniform --kinds ivf hnsw
    python benchmarks/index_scale.py --n 200000 --dim 512 --centres 1000 --kinds flat ivf hnsw

Prints one JSON line per kind: {"kind", "n", "dim", "data", "params", "recall_at_10", "build_s",
"search_ms_per_query", "bytes_per_vector"}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, seed: int, centres: int = 200, noise: float = 1.5) -> np.ndarray:
    """The same mixture as tests/index/conftest.py `clustered` (centres fixed by seed 1234)."""
    c = np.random.default_rng(1234).standard_normal((centres, d))
    rng = np.random.default_rng(seed)
    return _unit(c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d)))


def _files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("vectors-*.faiss"))


def main(argv: list[str] | None = None) -> int:
    from clipengine.index import Index

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--centres", type=int, default=200)
    p.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    p.add_argument("--queries", type=int, default=200, help="queries for recall (latency uses the first 100)")
    p.add_argument("--kinds", nargs="+", default=["ivf", "hnsw"])
    args = p.parse_args(argv)

    if args.data == "clustered":
        x = clustered(args.n, args.dim, 0, args.centres)
        q = clustered(args.queries, args.dim, 1, args.centres)
    else:
        x = _unit(np.random.default_rng(0).standard_normal((args.n, args.dim)))
        q = _unit(np.random.default_rng(1).standard_normal((args.queries, args.dim)))
    ids = [str(i) for i in range(args.n)]
    # Exact top-10 by numpy (the flat index gives the same; numpy keeps the reference independent).
    exact = [set(np.argsort(-(x @ row), kind="stable")[:10].tolist()) for row in q]

    for kind in args.kinds:
        t0 = time.perf_counter()
        index = Index.build(ids, x, model="bench", kind=kind)
        build_s = time.perf_counter() - t0
        hits = index.search_vectors(q, 10)
        recall = float(
            np.mean([len({int(h) for h, _ in row} & e) / 10 for row, e in zip(hits, exact, strict=True)])
        )
        lat_q = q[:100]
        t0 = time.perf_counter()
        for row in lat_q:
            index.search_vectors(row, 10)
        search_ms = (time.perf_counter() - t0) / len(lat_q) * 1000
        with tempfile.TemporaryDirectory() as tmp:
            size = _files_bytes(index.save(Path(tmp) / "b.index"))
        print(
            json.dumps(
                {
                    "kind": kind,
                    "n": args.n,
                    "dim": args.dim,
                    "data": args.data if args.data == "uniform" else f"clustered({args.centres})",
                    "params": index.describe()["params"],
                    "recall_at_10": round(recall, 3),
                    "build_s": round(build_s, 2),
                    "search_ms_per_query": round(search_ms, 2),
                    "bytes_per_vector": round(size / args.n, 1),
                    "load_avg_1m": round(os.getloadavg()[0], 1),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
