"""Eval reports: JSON + Markdown files, a per-class accuracy bar chart, and the engine comparison table."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_path

__all__ = ["compare_table", "comparison_rows", "markdown_report", "plot_per_class", "write_report"]

log = logging.getLogger(__name__)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _printable(text: object) -> str:
    """`text` with control characters and lone surrogates (a file name that is not valid UTF-8,
    b"caf\\xe9" -> "caf\\udce9") written as escapes ("\\n", "\\udce9")."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _cell(text: object) -> str:
    """`text` for one Markdown table cell or list line: a "|" in a class or file name ended the cell,
    a newline the row; control characters are written as escapes ("\\n")."""
    return _printable(text).replace("|", "\\|")


def markdown_report(results: Sequence[dict[str, Any]], title: str) -> str:
    """A Markdown summary: one row per result, then the worst classes of the first result."""
    lines = [
        f"# {_printable(title)}",  # a folder name that is not UTF-8 ("caf\\udce9") could not be written
        "",
        "| engine | dataset | n | top-1 % | top-5 % | mean per-class recall % | chance % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {_cell(r.get('engine') or r['model'])} | {_cell(r['dataset'])} | {r.get('n', r.get('n_test'))} | {_pct(r['top1'])} "
            f"| {_pct(r['top5'])} | {_pct(r['mean_per_class_recall'])} | {_pct(r['chance'])} |"
        )
    unreadable = results[0].get("unreadable") if results else None
    if unreadable:
        lines += ["", f"{len(unreadable)} images could not be decoded and are left out of every metric"
                  + (" (the first 20; all in the JSON report):" if len(unreadable) > 20 else ":"), ""]  # fmt: skip
        lines += [f"- {_cell(u['path'])}: {_cell(u['reason'])}" for u in unreadable[:20]]
    if results and results[0].get("per_class"):
        worst = sorted(results[0]["per_class"].items(), key=lambda kv: kv[1])[:10]
        lines += ["", "Lowest per-class recall (first engine):", "", "| class | recall % |", "|---|---:|"]
        lines += [f"| {_cell(name)} | {_pct(v)} |" for name, v in worst]
    return "\n".join(lines) + "\n"


def plot_per_class(per_class: dict[str, float], path: str | Path, title: str) -> Path:
    """Horizontal bar chart of per-class recall (matplotlib, Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_class)
    values = [100 * per_class[n] for n in names]
    # Escaped: matplotlib's font code raises TypeError on a lone surrogate (a class folder named in
    # Latin-1), which ended the eval with a traceback after its JSON and Markdown were written.
    labels, title = [_printable(n) for n in names], _printable(title)
    height = max(3.0, 0.18 * len(names) + 1.0)
    fig, ax = plt.subplots(figsize=(7, min(height, 60.0)))
    try:
        # Names and title are text, never mathtext: "$x^2$" was drawn as a formula and a class
        # named "a $\\frac$" made the whole report fail with matplotlib's ParseSyntaxException.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ax.barh(np.arange(len(names)), values, color="#4c72b0")
            ax.set_yticks(
                np.arange(len(names)), labels=labels, fontsize=max(4, 9 - len(names) // 40), parse_math=False
            )
            ax.invert_yaxis()
            ax.set_xlim(0, 100)
            ax.set_xlabel("recall (%)")
            ax.set_title(title, parse_math=False)
            fig.tight_layout()
            # Through a temp file renamed over `path`: a failed save never leaves a truncated plot over
            # a previous one. The temp name ends in .tmp, so the format comes from the final name.
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=100, format=Path(path).suffix[1:].lower() or "png")
        _pass_on(caught, path)
    finally:
        plt.close(fig)
    return Path(path)


def _pass_on(caught: list[warnings.WarningMessage], path: str | Path) -> None:
    """matplotlib's "Glyph ... missing from font" warnings (an emoji or a script its font lacks, one
    per character and draw) as one log record; any other warning re-issued as it was."""
    glyphs = sorted({str(w.message) for w in caught if "missing from font" in str(w.message)})
    if glyphs:
        log.warning("%s: the plot font lacks %d character(s) of the class names, drawn as boxes: %s",
                    path, len(glyphs), "; ".join(glyphs[:3]))  # fmt: skip
    for w in caught:
        if "missing from font" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def comparison_rows(
    results: Sequence[dict[str, Any]], predictions: Sequence[np.ndarray]
) -> list[dict[str, Any]]:
    """Per engine: top-1, delta vs the first (the reference, normally fp32) and prediction agreement."""
    ref_top1, ref_pred = results[0]["top1"], predictions[0]
    rows = []
    for r, pred in zip(results, predictions, strict=True):
        rows.append(
            {
                "engine": r.get("engine") or r["model"],
                "top1": r["top1"],
                "top5": r["top5"],
                "delta_top1": r["top1"] - ref_top1,
                "agreement": float(np.mean(pred == ref_pred)) if len(pred) else 1.0,
            }
        )
    return rows


def compare_table(rows: Sequence[dict[str, Any]]) -> str:
    """The seed's precision-test table as Markdown: accuracy per engine and its delta vs the first."""
    lines = [
        "| engine | top-1 % | top-5 % | Δ top-1 (pts) | agreement with " + _cell(rows[0]["engine"]) + " % |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {_cell(r['engine'])} | {_pct(r['top1'])} | {_pct(r['top5'])} | {100 * r['delta_top1']:+.2f} "
            f"| {_pct(r['agreement'])} |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | Path,
    stem: str,
    results: Sequence[dict[str, Any]],
    title: str,
    extra: dict[str, Any] | None = None,
    plot: bool = True,
) -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.md` and `<stem>_per_class.png` into out_dir; returns their paths.

    Each file is written atomically (temp file beside it, then os.replace): a failed write keeps the
    previous file and leaves no temp file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "results": list(results), **(extra or {})}
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    md = markdown_report(results, title)
    if extra and extra.get("comparison"):
        md += "\n## Engines compared\n\n" + compare_table(extra["comparison"])
    # Each file goes to a temp name beside it, then os.replace: a failed write keeps the previous one.
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(md, encoding="utf-8")
    if plot and results and results[0].get("per_class"):
        try:
            paths["png"] = plot_per_class(results[0]["per_class"], out / f"{stem}_per_class.png", title)
        except ModuleNotFoundError as e:  # the plot is extra; the numbers above are written already
            if e.name is None or not e.name.startswith("matplotlib"):
                raise
            log.warning("no per-class plot: matplotlib is not installed (pip install \"clipengine[eval]\")")
    return paths
