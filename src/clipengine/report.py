"""Render run and benchmark results as plain text, Markdown or JSON, plot throughput, and state what a
lower-precision path or an approximate index costs: `fidelity` (deviation from fp32), `index_recall` (no printing)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .files import atomic_path

if TYPE_CHECKING:
    from .bench.timing import BenchResult
    from .pipeline.run import RunStats

__all__ = [
    "DOCUMENTED_DEVIATION",
    "FORMATS",
    "fidelity",
    "fidelity_line",
    "index_recall",
    "plot_throughput",
    "recall_line",
    "render_bench",
    "render_run_stats",
    "seed_block",
]

FORMATS = ("text", "markdown", "json")

_BENCH_COLUMNS = (
    "batch",
    "decode+preprocess ms/img",
    "inference ms/img",
    "end-to-end img/s",
    "text x4 ms",
)


# What docs/performance.md (and docs/embed_bench.md) measured for the paths that are not checked per
# model: a PyTorch precision is cast at load time and never compared with fp32, so these are the
# measurements of one model, stated as such, not bounds for the user's (tests/test_fidelity.py
# keeps each one in its document).
DOCUMENTED_DEVIATION = {
    "torch-bf16": "docs/performance.md, ViT-B/32 on a CPU: min cosine 0.99994 image, 0.99991 text",
    "torch-fp16": "docs/performance.md, ViT-B/32 image tower on an H100 and an H200: cos >= 0.999999",
    "torch-fp8": "docs/performance.md, ViT-B/32 with random weights: 0.9991 on an H200; "
    "CPU reference: image 0.9993, text 0.9986",
    "fast_decode": "docs/performance.md, camera-size JPEGs: cosine 0.9999 to the exact path",
    "gpu_decode-torchvision": "docs/embed_bench.md, 1280x960 JPEGs on an H200: cosine >= 0.99999 to the exact path",
}


def _tower_parity(engines: Sequence[Any], key: str | None) -> dict[str, Any] | None:
    """The worst parity over one tower's engines (`key`: a runtime_parity entry, None: the export's
    own ONNX Runtime check), or None when no engine of it was measured there."""
    measured = [e.parity if key is None else e.runtime_parity.get(key) for e in engines]
    found = [p for p in measured if p is not None]
    if not found:
        return None
    out: dict[str, Any] = {
        "min_cos": min(p.min_cos for p in found),
        "max_abs": max(p.max_abs for p in found),
        "samples": sum(p.samples for p in found),
        "passed": all(p.passed for p in found),
    }
    unmeasured = [e.file for e, p in zip(engines, measured, strict=True) if p is None]
    if unmeasured:
        out["unmeasured_engines"] = unmeasured
    return out


def fidelity(
    backend: Any, *, fast_decode: bool = False, gpu_decoder: str | None = None
) -> dict[str, Any] | None:
    """What a run's lower-precision parts deviate from fp32 by: measured where it was, else "unmeasured".

    Args:
        backend: the run's Backend; an export-folder backend (onnx, openvino) carries the parity its
            export measured per engine in its manifest, a torch one nothing (cast at load time).
        fast_decode: reduced-scale JPEG decoding was on.
        gpu_decoder: the GPU JPEG decoder ("torchvision", "nvimgcodec") when decoding on the GPU.

    Raises:
        InputError: `backend` has no `precision` str (a ClipModel: pass its `.backend`).

    Returns:
        None for an fp32 model on the exact decoder (nothing to state). Else a JSON-able dict:
        `precision`, `backend`, `towers` ({"image", "text"}: the worst `min_cos`, `max_abs`, `samples`
        and `passed` over the engines run, None where unmeasured; None for fp32), `measured` (where
        the tower numbers come from, or "unmeasured ..."), `reference` (a documented measurement of
        another model, or None) and `decode` (None, or {"mode", "reference"}).
    """
    from .export.manifest import Manifest

    if not isinstance(getattr(backend, "precision", None), str):  # else read as fp32: None, "nothing to state"
        raise InputError(f"fidelity takes a Backend (e.g. model.backend), got {type(backend).__name__}")
    precision = str(backend.precision)
    name = str(getattr(backend, "name", "?"))
    out: dict[str, Any] = {"backend": name, "precision": precision, "towers": None, "measured": None,
                           "reference": None, "decode": None}  # fmt: skip
    manifest = getattr(backend, "manifest", None)
    if precision != "fp32" and isinstance(manifest, Manifest):
        engines = str(getattr(backend, "engine_precision", precision))
        key = None if name != "openvino" else ("openvino-bf16" if precision == "bf16" else "openvino")
        towers = {t: _tower_parity(manifest.select(t, engines), key) for t in ("image", "text")}
        where = {None: "under ONNX Runtime (CPU)", "openvino": "under OpenVINO (CPU)"}.get(
            key, "under OpenVINO (CPU) in bf16"
        )
        out["towers"] = towers
        if all(v is None for v in towers.values()):
            out["measured"] = f"unmeasured {where}: the export did not measure these engines there"
            if key is not None:  # what ONNX Runtime measured for the same files, as a hint
                ort = {t: _tower_parity(manifest.select(t, engines), None) for t in ("image", "text")}
                out["reference"] = "the export's ONNX Runtime check of the same engines: " + _cosines(ort)
        else:
            out["measured"] = f"at export {where} against fp32 PyTorch, manifest.json"
            device = str(getattr(backend, "device", "cpu"))
            if device != "cpu":  # the export measures on the CPU only
                out["measured"] += f"; unmeasured on {device}, where this runs"
    elif precision != "fp32":
        out["towers"] = {"image": None, "text": None}
        out["measured"] = "unmeasured for this model"
        out["reference"] = DOCUMENTED_DEVIATION.get(f"{name}-{precision}")
    if gpu_decoder is not None:
        ref = DOCUMENTED_DEVIATION.get(f"gpu_decode-{gpu_decoder}")
        out["decode"] = {"mode": f"gpu_decode ({gpu_decoder})", "reference": ref}
        if fast_decode:  # the CPU share (--gpu-cpu-share) decodes at reduced scale
            out["decode"]["mode"] += " + fast_decode on the CPU share"
            refs = [r for r in (ref, DOCUMENTED_DEVIATION["fast_decode"]) if r]
            out["decode"]["reference"] = "; ".join(refs)
    elif fast_decode:
        out["decode"] = {"mode": "fast_decode", "reference": DOCUMENTED_DEVIATION["fast_decode"]}
    if out["towers"] is None and out["decode"] is None:
        return None
    return out


def _cosines(towers: dict[str, dict[str, Any] | None]) -> str:
    parts = []
    for tower, p in towers.items():
        if p is None:
            parts.append(f"{tower} unmeasured")
        else:
            flag = "" if p["passed"] else " (below its bound)"
            partial = f" (unmeasured: {', '.join(p['unmeasured_engines'])})" if "unmeasured_engines" in p else ""
            parts.append(f"{tower} {p['min_cos']:.5f}{flag}{partial}")
    return "min cosine " + ", ".join(parts)


def fidelity_line(info: dict[str, Any] | None) -> str | None:
    """One line for a CLI's stderr from `fidelity()`'s dict (None when there is nothing to state)."""
    if info is None:
        return None
    parts = []
    towers = info.get("towers")
    if towers is not None:
        what = f"{info['backend']} {info['precision']} is not fp32"
        measured = str(info.get("measured") or "unmeasured")
        if any(v is not None for v in towers.values()):
            text = f"{what}: {_cosines(towers)} to fp32 (measured {measured})"
        else:
            text = f"{what}: deviation from fp32 {measured}"
        if info.get("reference"):
            text += f" [{info['reference']}]"
        parts.append(text)
    decode = info.get("decode")
    if decode is not None:
        ref = decode.get("reference")
        parts.append(
            f"{decode['mode']} is not the exact decode: unmeasured for this model"
            + (f" [{ref}]" if ref else "")
        )
    return "note: " + "; ".join(parts)


_RECALL_BLOCK = 65536  # rows of the exact search per step in `index_recall`


def index_recall(
    index: Any, vectors: Any, ids: Sequence[str], *, k: int = 10, queries: int = 256, seed: int = 0
) -> dict[str, Any] | None:
    """Recall@k of an approximate index, measured: `queries` of its own vectors (a seeded sample)
    searched in it and exactly over `vectors`, each query's own row left out on both sides.

    A hit counts when its exact cosine reaches the k-th best exact one (ties are no misses).

    Args:
        index: a built `clipengine.index.Index`.
        vectors, ids: the (N, D) embeddings it was built from and their ids, in the same order.

    Returns:
        None for an exact index (or one of fewer than two vectors): nothing to state. Else
        {"k", "recall", "queries", "params"} (the search parameters it was measured at).
    """
    import numpy as np

    n = len(ids)
    if index.params.exact or n < 2:
        return None
    v = np.asarray(vectors)  # as given (float16 shards stay float16): converted a block at a time
    k = min(k, n - 1)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
    q = _unit(v[rows])
    row_of = {id_: i for i, id_ in enumerate(ids)}
    hits = index.search_vectors(q, k + 1)
    best = np.full((len(rows), k), -np.inf, dtype=np.float32)  # each query's exact top-k scores so far
    for start in range(0, n, _RECALL_BLOCK):  # (queries, block) scores at a time: bounded at any N
        scores = q @ _unit(v[start : start + _RECALL_BLOCK]).T
        own = (rows >= start) & (rows < start + scores.shape[1])
        scores[own, rows[own] - start] = -np.inf  # the query itself is no neighbour
        both = np.concatenate([best, scores], axis=1)
        best = -np.partition(-both, k - 1, axis=1)[:, :k]
    kth = best.min(axis=1)
    found = 0
    for j, row in enumerate(rows):
        got = [row_of[h] for h, _ in hits[j] if row_of[h] != row][:k]
        if got:
            found += int((_unit(v[got]) @ q[j] >= kth[j] - 1e-6).sum())
    params = {key: val for key, val in index.params.to_dict().items() if key != "kind" and val is not None}
    return {"k": k, "recall": found / (k * len(rows)), "queries": len(rows), "params": params}


def _unit(rows: Any) -> Any:
    import numpy as np

    x = np.asarray(rows, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def recall_line(kind: str, recall: dict[str, Any] | None) -> str:
    """One stderr line on an approximate index: its measured recall, or that it is unmeasured."""
    if recall is None:
        return f"note: {kind} is an approximate index: recall unmeasured (measured by `index build`; not after `index add`)"
    params = ", ".join(f"{k}={v}" for k, v in recall.get("params", {}).items())
    return (f"note: {kind} is an approximate index: recall@{recall['k']} {recall['recall']:.3f} against exact "
            f"search, measured at build on {recall['queries']} of its own vectors" + (f" ({params})" if params else ""))


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def fmt_row(r: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))

    return "\n".join([fmt_row(header), fmt_row(tuple("-" * w for w in widths)), *map(fmt_row, rows)])


def render_run_stats(
    stats: RunStats,
    fmt: str = "text",
    *,
    failures_path: str | Path | None = None,
    fidelity: dict[str, Any] | None = None,
) -> str:
    """Summary of an embedding run: counts, FPS, per-stage ms per image, and what float16 storage
    cost (`RunStats.storage_min_cos`, measured on the shards this run wrote; JSON: its own key).

    Args:
        stats: the run's stats.
        fmt: "text", "markdown" or "json".
        failures_path: where the failures are listed (named in the summary when there are any).
        fidelity: the run's `fidelity()`: the JSON's "fidelity" (null: fp32 on the exact decoder;
            the CLI prints it as a note line, so text and Markdown leave it out).
    """
    _check_format(fmt)
    if fmt == "json":
        d: dict[str, Any] = stats.to_dict()
        d["failures_file"] = str(failures_path) if failures_path else None
        d["fidelity"] = fidelity
        return json.dumps(d, indent=2, sort_keys=True)
    per = stats.per_image_ms()
    stage_rows = [(s, f"{getattr(stats, f'{s}_s'):.3f}", f"{per[s]:.3f}") for s in per]
    head = (
        f"Embedded {stats.embedded} images in {stats.wall_s:.2f}s ({stats.fps:.1f} img/s); "
        f"{stats.shards_written} shards written"
    )
    if stats.shards_skipped:
        head += f"; {stats.skipped} inputs resumed from {stats.shards_skipped} finished shards"
    # As the JSON: `failed` is this run's, `failed_total` all listed in failures.jsonl (resumed shards too).
    n_failed = max(stats.failed_total, stats.failed)
    fail = f"Failed: {stats.failed} this run, {n_failed} in total" if n_failed != stats.failed else f"Failed: {n_failed}"
    fail += f" (listed in {failures_path})" if n_failed and failures_path else ""
    lines = [head, fail]
    if stats.storage_min_cos is not None:
        lines.append(_storage_line(stats.storage_min_cos, stats))
    if not stats.embedded:  # everything resumed or unreadable: no per-image timings to show
        return "\n".join(lines)
    table = _table(("stage", "total s", "ms/img"), stage_rows, markdown=fmt == "markdown")
    return "\n".join([*lines, "", table])


def _storage_line(cos: float, stats: RunStats) -> str:
    """What float16 storage cost the rows this run wrote (`cos`: their worst cosine to float32)."""
    line = (
        f"Stored as float16: min cosine {cos:.8f} (1 - {1.0 - cos:.1e}) to the float32 rows, "
        f"measured over the {stats.embedded} rows this run wrote"
    )
    if stats.skipped:
        line += f" (not the {stats.skipped} resumed inputs)"
    return line


def seed_block(result: BenchResult) -> str:
    """The seed's four headline lines: total images, total ms, average ms per image, FPS.

    Printed values are consistent: avg = total / images and FPS = 1000 / avg (up to the last digit).
    """
    total = round(result.total_ms, 2)
    avg = total / result.images if result.images else 0.0
    fps = 1000.0 / avg if avg > 0 else 0.0
    return "\n".join(
        [
            f"Total images: {result.images}",
            f"Total time use: {total:.2f}ms",
            f"Avg time use: {avg:.4f}ms",
            f"{fps:.2f} FPS",
        ]
    )


def render_bench(result: BenchResult, fmt: str = "text", *, fidelity: dict[str, Any] | None = None) -> str:
    """The seed block then one row per batch size (text/Markdown), or the full result as JSON.

    `fidelity`: the run's `fidelity()` (None: an fp32 model on the exact decoder); JSON carries it as
    "fidelity", text and Markdown as a line under the table.
    """
    _check_format(fmt)
    if fmt == "json":
        return json.dumps({**result.to_dict(), "fidelity": fidelity}, indent=2, sort_keys=True)
    rows = [
        (
            str(b.batch_size),
            f"{b.decode_preprocess_ms_per_image:.3f}",
            f"{b.infer_ms_per_image:.3f}",
            f"{b.end_to_end_fps:.1f}",
            f"{b.text.p50_ms:.3f}" if b.text else "-",
        )
        for b in result.batches
    ]
    title = (
        f"{result.model or 'model'} on {result.backend} {result.device} {result.precision}, "
        f"{result.workers} decode worker{'' if result.workers == 1 else 's'}"
    )
    if result.failed:
        title += f", {result.failed} unreadable image{'' if result.failed == 1 else 's'} skipped"
    block = seed_block(result)
    if fmt == "markdown":
        block = "```\n" + block + "\n```"
    lines = [block, "", title, _table(_BENCH_COLUMNS, rows, markdown=fmt == "markdown")]
    note = fidelity_line(fidelity)
    if note:
        lines += ["", note]
    return "\n".join(lines)


def plot_throughput(result: BenchResult, path: str | Path) -> Path:
    """Write a throughput-vs-batch-size PNG (end-to-end and inference-only img/s)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state touched

    sizes = [b.batch_size for b in result.batches]
    e2e = [b.end_to_end_fps for b in result.batches]
    infer = [1000.0 / b.infer_ms_per_image if b.infer_ms_per_image > 0 else 0.0 for b in result.batches]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(sizes, e2e, marker="o", label="end-to-end")
    ax.plot(sizes, infer, marker="s", linestyle="--", label="inference only")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    label = Path(result.model).name if result.model else "model"  # a checkpoint path -> its file name
    ax.set_title(f"{label}: {result.backend} {result.device} {result.precision}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through a temp file renamed over `path`: a failed save never leaves a truncated plot over a
    # previous one. The temp name ends in .tmp, so the format comes from the final name.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix[1:].lower() or "png")  # Agg canvas by default
    return path
