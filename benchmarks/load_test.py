"""Load test for `clipengine serve`: requests/s and p50/p99 latency at 1, 8 and 64 concurrent clients.

A script, not a test. By default it starts its own server in a subprocess on 127.0.0.1 with a
random-weight model of a real architecture (no download), so batching has real work to amortise:

    python benchmarks/load_test.py --random-arch ViT-B-32 --route texts
    python benchmarks/load_test.py --random-arch ViT-B-32 --route images --max-batch 1   # no batching
    python benchmarks/load_test.py --model tiny-synth --route classify
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --route search          # a running server

Only loopback URLs are accepted. Each level sends at most --requests requests or runs at most
--max-seconds, whichever comes first. Batch sizes come from the server's /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

__all__ = ["main"]

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ---- server side (runs in the child process) -----------------------------------------------------
def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from clipengine.serve import ServeSettings, create_app, uvicorn_options

    if args.random_arch:
        import torch

        from clipengine.api import ClipModel
        from clipengine.backends import create_backend
        from clipengine.image.preprocess import PreprocessConfig
        from clipengine.models.clip import build_model
        from clipengine.models.config import get_config

        torch.manual_seed(0)
        cfg = _TINY() if args.random_arch == "tiny" else get_config(args.random_arch)
        backend = create_backend("torch", build_model(cfg), device=args.device)
        model: Any = ClipModel(
            backend, PreprocessConfig(image_size=cfg.vision.image_size), args.random_arch, 100.0
        )
    else:
        from clipengine.api import load

        model = load(args.model, device=args.device)
    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=4096,
        request_timeout_s=args.request_timeout,
    )
    # As `clipengine serve` runs it: with its connection limits (its own protocol class).
    uvicorn.run(create_app(model, None, settings), host="127.0.0.1", port=args.port, log_level="warning",
                **uvicorn_options(settings))  # fmt: skip


def _TINY() -> Any:
    """The tests' tiny CLIP (ViT width 64, 2 layers, 32 px): request overhead dominates, not compute."""
    from clipengine.models.config import CLIPConfig, TextConfig, VisionConfig

    return CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, layers=2, width=64, patch_size=8),
        text=TextConfig(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        quick_gelu=True,
        name="tiny",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cmd = [
        sys.executable,
        __file__,
        "--_serve",
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--device",
        args.device,
        "--request-timeout",
        str(args.request_timeout),
    ]
    cmd += ["--random-arch", args.random_arch] if args.random_arch else ["--model", args.model]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not become ready in 300 s")


# ---- client side ----------------------------------------------------------------------------------
def _png(i: int, size: int = 256) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)).resize(
        (size, size)
    )
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


class _Payloads:
    def __init__(self, route: str) -> None:
        self.route = route
        self.images = [_png(i) for i in range(16)] if route in ("images", "classify") else []

    def request(self, i: int) -> tuple[str, dict[str, Any]]:
        if self.route == "texts":
            return "/v1/embeddings/texts", {"json": {"texts": [f"a photo of object number {i}"]}}
        if self.route == "search":
            return "/v1/search", {"json": {"text": f"a photo of object number {i}", "k": 10}}
        files = [("files", (f"{i}.png", self.images[i % len(self.images)], "image/png"))]
        if self.route == "classify":
            return "/v1/classify", {
                "files": files,
                "data": {"labels": f"a cat, a dog, a car, label {i % 50}"},
            }
        return "/v1/embeddings/images", {"files": files}


def _batch_stats(metrics: str) -> dict[str, tuple[float, float]]:
    """queue -> (batch count, item sum) from the batch-size histogram."""
    out = {}
    for queue in ("image", "text"):
        c = re.search(rf'clipengine_batch_size_count{{queue="{queue}"}} (\S+)', metrics)
        s = re.search(rf'clipengine_batch_size_sum{{queue="{queue}"}} (\S+)', metrics)
        out[queue] = (float(c.group(1)) if c else 0.0, float(s.group(1)) if s else 0.0)
    return out


async def _level(
    url: str, payloads: _Payloads, clients: int, total: int, max_seconds: float, headers: dict[str, str]
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:
        before = _batch_stats((await client.get("/metrics")).text)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        next_i = 0
        stop_at = time.perf_counter() + max_seconds

        async def worker() -> None:
            nonlocal next_i
            while next_i < total and time.perf_counter() < stop_at:
                i = next_i
                next_i += 1
                path, kw = payloads.request(i)
                t0 = time.perf_counter()
                r = await client.post(path, **kw)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
        after = _batch_stats((await client.get("/metrics")).text)
    lat = np.array(latencies) * 1000.0
    batches = {
        q: round((after[q][1] - before[q][1]) / (after[q][0] - before[q][0]), 2)
        for q in after
        if after[q][0] > before[q][0]
    }
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_codes": errors,
        "seconds": round(elapsed, 2),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "mean_batch": batches,
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="A running server on loopback (otherwise one is started).")
    p.add_argument("--model", default="tiny-synth", help="Model for the started server (clipengine.load).")
    p.add_argument(
        "--random-arch",
        help="Start the server with random weights of this architecture ('tiny' = test model).",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--route", choices=["texts", "images", "classify", "search"], default="texts")
    p.add_argument("--concurrency", default="1,8,64", help="Comma-separated client counts.")
    p.add_argument("--requests", type=int, default=256, help="Most requests per level.")
    p.add_argument("--max-seconds", type=float, default=30.0, help="Most seconds per level.")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--request-timeout", type=float, default=120.0, help="Server's 504 limit, seconds.")
    p.add_argument("--api-key", default=os.environ.get("CLIPENGINE_API_KEY"))
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_serve", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args._serve:
        _serve(args)
        return 0
    if args.route == "search" and not args.url:
        # The server started here has no index: every search would be a 404, timed as if served.
        raise SystemExit("--route search needs --url of a running server started with --index")
    proc = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            raise SystemExit("--url must point at this machine (127.0.0.1, localhost or ::1)")
        url = args.url.rstrip("/")
    else:
        proc, url = _start_server(args)
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    try:
        payloads = _Payloads(args.route)
        asyncio.run(_level(url, payloads, 4, 8, 30.0, headers))  # warm-up
        rows = [
            asyncio.run(_level(url, payloads, int(c), args.requests, args.max_seconds, headers))
            for c in args.concurrency.split(",")
        ]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    model = args.random_arch or args.model if not args.url else args.url
    if args.json:
        print(json.dumps({"model": model, "route": args.route, "max_batch": args.max_batch, "levels": rows}))
        return 0
    print(f"model={model} route={args.route} max_batch={args.max_batch} max_wait_ms={args.max_wait_ms}")
    print(
        f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  mean batch"
    )
    for r in rows:
        print(
            f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['rps']:>8} {r['p50_ms']:>8} "
            f"{r['p99_ms']:>8}  {r['mean_batch']}  {r['error_codes'] or ''}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
