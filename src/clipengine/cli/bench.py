"""`clipengine bench`: the seed's timing block plus a per-batch-size table, as text, JSON and a PNG."""

from __future__ import annotations

from pathlib import Path

import typer

from . import embed as _embed
from . import model_options as mo

__all__ = ["BENCH_TEXTS", "check_plot_path", "parse_batch_sizes", "register"]

# The batch of 4 texts whose encode time the table reports.
BENCH_TEXTS = ("a photo of a cat", "a photo of a dog", "a diagram", "a bowl of soup")

_FOLDER_ARG = typer.Argument(..., help="Folder of images (walked recursively) or a file list.")

_PLOT_OPT = typer.Option(None, "--plot", help="Write a throughput-vs-batch PNG here.")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8,16,32"`` -> [1, 8, 16, 32]; the first size gives the headline block."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"--batch must be comma-separated integers, got {text!r}") from e
    if not sizes or any(s < 1 for s in sizes):
        raise typer.BadParameter(f"--batch sizes must be >= 1, got {text!r}")
    return sizes


def check_plot_path(plot: Path) -> None:
    """Refuse a --plot target that could not be written before the benchmark runs, not after."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as e:
        raise typer.BadParameter(
            "needs matplotlib: pip install 'clipengine[bench]'", param_hint="--plot"
        ) from e
    if plot.is_dir():
        raise typer.BadParameter(
            f"{plot} is a folder; name a file, e.g. {plot / 'bench.png'}", param_hint="--plot"
        )
    from ..files import check_writable_folder

    try:  # a file in the way of its folder, or a read-only one: found by the save, after the benchmark
        check_writable_folder(plot.parent)
    except OSError as e:
        raise typer.BadParameter(f"{e.filename}: {e.strerror}", param_hint="--plot") from e
    kind = plot.suffix[1:].lower() or "png"  # as report.plot_throughput picks it
    formats = FigureCanvasBase.get_supported_filetypes()
    if kind not in formats:
        raise typer.BadParameter(
            f"{plot}: matplotlib cannot write .{kind} files; end the name in .png, .svg or .pdf "
            f"(or one of {', '.join(sorted(formats))})",
            param_hint="--plot",
        )


def register(app: typer.Typer) -> None:
    """Add the `bench` command to `app`."""

    @app.command("bench")
    def bench_cmd(
        folder: Path = _FOLDER_ARG,
        batch: str = typer.Option("1,8,16,32", "--batch", help="Comma-separated batch sizes."),
        model: str = mo.MODEL_OPT,
        pretrained: str | None = mo.PRETRAINED_OPT,
        checkpoint: Path | None = mo.CHECKPOINT_OPT,
        backend: str = mo.BACKEND_OPT,
        precision: str = mo.PRECISION_OPT,
        device: str = mo.DEVICE_OPT,
        download: bool = mo.DOWNLOAD_OPT,
        compile: bool = mo.COMPILE_OPT,
        workers: int | None = typer.Option(None, "--workers", min=0, help=_embed.WORKERS_HELP),
        warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed backend calls per batch size."),
        repeats: int = typer.Option(1, "--repeats", min=1, help="Timed passes per batch size (median kept)."),
        limit: int | None = typer.Option(None, "--limit", min=1, help="Use only the first N images."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
        plot: Path | None = _PLOT_OPT,
        fast_decode: bool = _embed.FAST_DECODE_OPT,
    ) -> None:
        """Time decode+preprocess, inference and text encoding per batch size over a folder of images."""
        from ..bench.timing import bench_pipeline
        from ..errors import DatasetError
        from ..pipeline.batching import default_workers
        from ..pipeline.sources import list_items
        from ..report import fidelity, plot_throughput, render_bench
        from ..text.tokenizer import tokenize

        sizes = parse_batch_sizes(batch)
        if plot is not None:
            check_plot_path(plot)
        opts = mo.parse_model_options(
            model, pretrained, checkpoint, backend, precision, device, download, compile
        )
        items = list_items(folder)[:limit]
        if not items:  # refused before the (possibly slow) model load
            raise DatasetError(f"{folder}: no images to benchmark")
        too_big = [s for s in sizes if s > len(items)]
        if too_big:  # the pass still runs, in batches of all the images: say so, the table cannot
            typer.echo(
                f"note: --batch {', '.join(map(str, too_big))} is more than the {_count(len(items), 'image')}: "
                f"those passes run batches of {len(items)}",
                err=True,
            )
        clip = mo.load_clip(opts)
        tokens = tokenize(list(BENCH_TEXTS), context_length=clip.backend.context_length)
        result = bench_pipeline(
            items, clip.backend, clip.preprocess_cfg, sizes,
            workers=default_workers() if workers is None else workers,
            warmup=warmup, repeats=repeats, text_tokens=tokens, model=opts.label, fast_decode=fast_decode,
        )  # fmt: skip
        measured = fidelity(clip.backend, fast_decode=fast_decode)  # a lower precision's deviation
        typer.echo(render_bench(result, "json" if as_json else "text", fidelity=measured))
        if plot is not None:
            path = plot_throughput(result, plot)
            if not as_json:
                typer.echo(f"Plot: {path}")
