"""`clipengine embed`: a folder or file list -> sharded embeddings, with a progress bar and a summary."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from ..api import ClipModel
    from ..pipeline.run import RunStats
    from ..types import Backend, ImageItem

__all__ = ["BackendFactory", "ModelOptions", "load_clip", "parse_model_options", "register"]

_ENGINES = ("local", "ray")


@dataclass(frozen=True)
class ModelOptions:
    """How to get a model: plain data, so it can be sent to other processes and rebuilt there."""

    model: str = "ViT-B-32"  # registry name, checkpoint file, or ONNX export folder
    pretrained: str | None = None
    checkpoint: str | None = None  # overrides `model` when given
    backend: str = "torch"
    precision: str = "fp32"
    device: str = "cpu"
    allow_download: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.checkpoint or self.model

    @property
    def label(self) -> str:
        """What run.json records as the model: a name@tag, or the resolved path of a file/folder."""
        if os.path.exists(self.source):
            return str(Path(self.source).resolve())
        return f"{self.source}@{self.pretrained}" if self.pretrained else self.source


def load_clip(opts: ModelOptions) -> ClipModel:
    """Load the model described by `opts` through the public API (the hook CLI tests replace)."""
    from ..api import load

    return load(
        opts.source,
        pretrained=opts.pretrained,
        backend=opts.backend,
        device=opts.device,
        precision=opts.precision,
        allow_download=opts.allow_download,
        **opts.extra,
    )


@dataclass(frozen=True)
class BackendFactory:
    """Picklable zero-argument factory: each worker / actor loads the model once from plain options."""

    opts: ModelOptions

    def __call__(self) -> Backend:
        return load_clip(self.opts).backend


def parse_model_options(
    model: str,
    pretrained: str | None,
    checkpoint: Path | None,
    backend: str,
    precision: str,
    device: str,
    download: bool,
) -> ModelOptions:
    if backend not in ("torch", "onnx"):
        raise typer.BadParameter(f"--backend must be torch or onnx, got {backend!r}")
    return ModelOptions(
        model=model,
        pretrained=pretrained,
        checkpoint=str(checkpoint) if checkpoint else None,
        backend=backend,
        precision=precision,
        device=device,
        allow_download=download,
    )


def _run_engine(
    engine: str, items: list[ImageItem], output: Path, clip: ClipModel, opts: ModelOptions, **kwargs: Any
) -> RunStats:
    """Embed in this process (decode workers + the loaded model) or on Ray (one model per actor)."""
    if engine == "ray":
        from ..distributed.ray import embed_with_ray

        factory: Any = BackendFactory(opts)  # plain data: each actor loads its own model
        return embed_with_ray(items, output, factory, clip.preprocess_cfg, **kwargs)
    from ..pipeline.run import embed_folder

    return embed_folder(items, output, lambda: clip.backend, clip.preprocess_cfg, **kwargs)


# Options shared with `clipengine bench` (typer needs them spelled out per command).
MODEL_OPT = typer.Option(
    "ViT-B-32", "--model", "-m", help="Model name, checkpoint file or ONNX export folder."
)
PRETRAINED_OPT = typer.Option(None, "--pretrained", help="Pretrained weights tag, e.g. openai.")
CHECKPOINT_OPT = typer.Option(None, "--checkpoint", help="Checkpoint file (overrides --model).")
BACKEND_OPT = typer.Option("torch", "--backend", help="torch or onnx.")
PRECISION_OPT = typer.Option("fp32", "--precision", help="fp32, fp16, bf16 or int8 (backend dependent).")
DEVICE_OPT = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1 ...")
DOWNLOAD_OPT = typer.Option(False, "--download", help="Allow downloading weights that are not cached.")
_SOURCE_ARG = typer.Argument(..., help="Folder (walked recursively) or text file with one path per line.")
_OUTPUT_OPT = typer.Option(..., "--output", "-o", help="Output folder (shards, failures, run.json).")
FAST_DECODE_OPT = typer.Option(
    False,
    "--fast-decode",
    help="Decode large JPEGs at reduced scale (>= 2x model size): faster, not bit-exact.",
)
WORKERS_HELP = "Decode processes (default: one per core; 0 decodes in the main process)."


def register(app: typer.Typer) -> None:
    """Add the `embed` command to `app`."""

    @app.command("embed")
    def embed_cmd(
        source: Path = _SOURCE_ARG,
        output: Path = _OUTPUT_OPT,
        model: str = MODEL_OPT,
        pretrained: str | None = PRETRAINED_OPT,
        checkpoint: Path | None = CHECKPOINT_OPT,
        backend: str = BACKEND_OPT,
        precision: str = PRECISION_OPT,
        device: str = DEVICE_OPT,
        download: bool = DOWNLOAD_OPT,
        batch: int = typer.Option(32, "--batch", min=1, help="Images per backend call."),
        workers: int | None = typer.Option(None, "--workers", min=0, help=WORKERS_HELP),
        shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Images per output shard."),
        dtype: str = typer.Option("float16", "--dtype", help="float16 or float32 on disk."),
        engine: str = typer.Option("local", "--engine", help="local, or ray (one actor per worker)."),
        as_json: bool = typer.Option(False, "--json", help="Print the run stats as JSON."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
        fast_decode: bool = FAST_DECODE_OPT,
        address: str | None = typer.Option(
            None, "--address", help="Ray cluster: auto, or ray://host:10001 (default: a local Ray instance)."
        ),
        actors: int = typer.Option(2, "--actors", min=1, help="Ray actor pool size (one model per actor)."),
        gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", min=0.0, help="GPUs per Ray actor."),
    ) -> None:
        """Embed every image of a folder or file list into sharded .npy + .jsonl files (resumable)."""
        from tqdm import tqdm

        from ..pipeline.run import check_output
        from ..pipeline.sinks import DTYPES, FAILURES_FILE
        from ..pipeline.sources import list_items
        from ..report import render_run_stats

        if dtype not in DTYPES:
            raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if engine not in _ENGINES:
            raise typer.BadParameter(f"--engine must be one of {', '.join(_ENGINES)}, got {engine!r}")
        opts = parse_model_options(model, pretrained, checkpoint, backend, precision, device, download)
        items = list_items(source)
        # Refuse a mismatched output folder before the (possibly slow) model load.
        check_output(output, model=opts.label, dtype=dtype, shard_size=shard_size, fast_decode=fast_decode)
        clip = load_clip(opts)
        run_kwargs: dict[str, Any] = dict(
            model=opts.label, batch_size=batch, workers=workers, shard_size=shard_size, dtype=dtype,
            source_label=str(source.resolve()),
        )  # fmt: skip
        run_kwargs["fast_decode"] = fast_decode
        if engine == "ray":
            run_kwargs.update(address=address, num_actors=actors, num_gpus=gpus_per_actor)
        with tqdm(total=len(items), unit="img", disable=not progress or as_json, leave=False) as bar:
            stats = _run_engine(engine, items, output, clip, opts, progress=bar.update, **run_kwargs)
        fmt = "json" if as_json else "text"
        typer.echo(render_run_stats(stats, fmt, failures_path=output / FAILURES_FILE))
        if not as_json:
            typer.echo(f"Embeddings: {output / 'shards'} (read with clipengine.pipeline.read_embeddings)")
