"""Model-selection options shared by the CLI commands, as plain data that other processes can rebuild."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from ..api import ClipModel
    from ..image.preprocess import PreprocessConfig
    from ..types import Backend

__all__ = [
    "BACKEND_CHOICES",
    "BACKEND_OPT",
    "CHECKPOINT_OPT",
    "COMPILE_OPT",
    "DEVICE_OPT",
    "DOWNLOAD_OPT",
    "EMBED_COMPILE_OPT",
    "MODEL_OPT",
    "PRECISION_OPT",
    "PRETRAINED_OPT",
    "BackendFactory",
    "ModelOptions",
    "load_clip",
    "parse_model_options",
    "preprocess_only",
]


# torch runs checkpoints; onnx (ONNX Runtime) and openvino (OpenVINO) run `clipengine export` folders.
BACKEND_CHOICES = ("torch", "onnx", "openvino")


@dataclass(frozen=True)
class ModelOptions:
    """How to get a model: plain data, so it can be sent to other processes and rebuilt there."""

    model: str = "ViT-B-32"  # registry name, checkpoint file, or ONNX export folder (onnx, openvino)
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
    """Load the model described by `opts` through the public API (the hook CLI tests replace).

    With `--download`, registered weights missing from the cache are fetched first with a progress
    bar (`downloads.fetch_with_progress`); the load then finds them cached. Only for the torch
    backend: onnx and openvino run export folders, which are never downloaded, so a registry name
    there fails in `load` at once rather than after fetching a checkpoint nothing would use.
    """
    from ..api import load

    if opts.allow_download and opts.backend == "torch":
        from .downloads import check_before_download, fetch_with_progress

        check_before_download(opts.source, opts.pretrained, opts.device, opts.precision)
        fetch_with_progress(opts.source, opts.pretrained)

    return load(
        opts.source,
        pretrained=opts.pretrained,
        backend=opts.backend,
        device=opts.device,
        precision=opts.precision,
        allow_download=opts.allow_download,
        **opts.extra,
    )


def preprocess_only(opts: ModelOptions) -> PreprocessConfig:
    """The model's preprocessing without holding the model, for a Ray driver (its actors load the
    model): read from the files that describe the model where they tell (`distributed.model_info`),
    else from a load whose model is dropped before the job starts."""
    from ..distributed.model_info import preprocess_config

    cfg = preprocess_config(opts.source, opts.pretrained, allow_download=opts.allow_download)
    return cfg if cfg is not None else load_clip(opts).preprocess_cfg


def run_fidelity(clip: ClipModel | None, opts: ModelOptions, **decode: Any) -> dict[str, Any] | None:
    """`report.fidelity` of a run: of the loaded backend, or, with no model in this process (a Ray
    driver, a rerun of finished shards), of what the options name: the export folder's manifest is
    read, not its engines."""
    from types import SimpleNamespace

    from ..report import fidelity

    if clip is not None:
        return fidelity(clip.backend, **decode)
    described = SimpleNamespace(name=opts.backend, precision=opts.precision, engine_precision=opts.precision)
    if opts.backend != "torch" and opts.precision != "fp32":
        from ..export.manifest import read_manifest

        described.manifest = read_manifest(opts.source)
        if opts.backend == "openvino":  # bf16 runs the fp32 engines
            from ..backends.openvino_backend import openvino_config

            described.engine_precision = openvino_config(opts.precision)[0]
    return fidelity(described, **decode)


@dataclass(frozen=True)
class BackendFactory:
    """Picklable zero-argument factory: each worker / actor loads the model once from plain options."""

    opts: ModelOptions

    def __call__(self) -> Backend:
        return load_clip(self.opts).backend


# Every backend's precisions together; each backend refuses the ones it lacks (torch has no int8) with its own
# line. Listed here, not imported: the backends' lists live beside torch / onnxruntime imports.
ANY_BACKEND_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8w", "fp8")


def parse_model_options(
    model: str,
    pretrained: str | None,
    checkpoint: Path | None,
    backend: str,
    precision: str,
    device: str,
    download: bool,
    compile: bool = False,
) -> ModelOptions:
    if backend not in BACKEND_CHOICES:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    if compile and backend != "torch":
        raise typer.BadParameter("--compile applies to --backend torch only")
    if precision not in ANY_BACKEND_PRECISIONS:  # a typo is a usage error (exit 2), as export's --precision
        raise typer.BadParameter(f"--precision must be one of {', '.join(ANY_BACKEND_PRECISIONS)}, got {precision!r}")
    return ModelOptions(
        model=model,
        pretrained=pretrained,
        checkpoint=str(checkpoint) if checkpoint else None,
        backend=backend,
        precision=precision,
        device=device,
        allow_download=download,
        extra={"compile": True} if compile else {},
    )


# typer options (each command lists them in its signature).
MODEL_OPT = typer.Option(
    "ViT-B-32", "--model", "-m", help="Model name, checkpoint file or ONNX export folder."
)
PRETRAINED_OPT = typer.Option(None, "--pretrained", help="Pretrained weights tag, e.g. openai.")
CHECKPOINT_OPT = typer.Option(None, "--checkpoint", help="Checkpoint file (overrides --model).")
BACKEND_OPT = typer.Option(
    "torch",
    "--backend",
    help="torch (checkpoints), or onnx / openvino (export folders; openvino: fast CPU INT8).",
)
PRECISION_OPT = typer.Option("fp32", "--precision", help="fp32, fp16, bf16, int8, int8w (onnx/openvino) or fp8 (torch, FP8 GPUs); backend dependent.")
DEVICE_OPT = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1 ...")
DOWNLOAD_OPT = typer.Option(False, "--download", help="Allow downloading weights that are not cached.")
_COMPILE_HELP = "torch.compile the model (torch backend): faster long runs, first batch of each size compiles"
COMPILE_OPT = typer.Option(False, "--compile", help=_COMPILE_HELP + ".")
# Only `embed` replays the compiled model as CUDA graphs on CUDA; `bench` times plain compile.
EMBED_COMPILE_OPT = typer.Option(
    False, "--compile", help=_COMPILE_HELP + "; on CUDA also replays CUDA graphs."
)
