"""`clipengine embed`: a folder or file list -> sharded embeddings, with a progress bar and a summary."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from . import model_options as mo
from .output_paths import check_output_folder

if TYPE_CHECKING:
    from ..api import ClipModel
    from ..image.preprocess import PreprocessConfig
    from ..pipeline.gpu_procs import StartedDecodeProcesses
    from ..pipeline.run import RunStats
    from ..types import ImageItem

__all__ = ["register"]

_log = logging.getLogger(__name__)

_ENGINES = ("local", "ray")
_RAY_ONLY_SOURCES = (".parquet", ".tar")  # path lists and WebDataset shards: `distributed.ray.list_source`


def _run_engine(
    engine: str,
    items: list[ImageItem],
    output: Path,
    clip: ClipModel | None,
    preprocess: PreprocessConfig | dict[str, Any],
    opts: mo.ModelOptions,
    **kwargs: Any,
) -> RunStats:
    """Embed in this process (decode workers + the loaded `clip`; None when every shard was complete:
    loaded only if one is not by now) or on Ray (one model per actor; the driver holds none)."""
    if engine == "ray":
        from ..distributed.ray import embed_with_ray

        if kwargs.get("num_gpus", 0) > 0 and opts.device == "cpu":  # GPUs reserved per actor: use them
            opts = replace(opts, device="cuda")
        factory: Any = mo.BackendFactory(opts)  # plain data: each actor loads its own model
        return embed_with_ray(items, output, factory, preprocess, **kwargs)
    from ..pipeline.run import embed_folder

    backend = (lambda: clip.backend) if clip is not None else (lambda: mo.load_clip(opts).backend)
    return embed_folder(items, output, backend, preprocess, **kwargs)


def _record_fidelity(output: Path, measured: dict[str, Any] | None) -> None:
    """Add the run's `fidelity` to OUT/run.json (atomically); fp32 on the exact decoder adds nothing.

    A resume cannot change what it describes: another precision or decode setting is refused."""
    from ..pipeline.sinks import RUN_FILE, atomic_write_json, read_run_info

    info = read_run_info(output)
    if info is not None and measured is not None:
        atomic_write_json(output / RUN_FILE, {**info, "fidelity": measured})


_SOURCE_ARG = typer.Argument(
    ...,
    help="Folder (walked recursively) or text file with one path per line; with --engine ray also a "
    ".parquet file with a path column, or a WebDataset .tar shard (or a folder of them).",
)
_OUTPUT_OPT = typer.Option(
    ..., "--output", "-o", file_okay=False, help="Output folder (shards, failures, run.json)."
)
FAST_DECODE_OPT = typer.Option(
    False,
    "--fast-decode",
    help="Decode large JPEGs at reduced scale (>= 2x model size): faster, not bit-exact.",
)
GPU_DECODE_OPT = typer.Option(
    False,
    "--gpu-decode",
    help="Decode JPEGs with nvjpeg and preprocess on the GPU (torch backend, --device cuda); "
    "other formats go to CPU decode workers (--workers). The resize is bit-exact; nvjpeg's chroma upsampling "
    "of 4:2:0 JPEGs is not (cos >= 0.9999 measured).",
)
GPU_DECODER_OPT = typer.Option(
    "torchvision",
    "--gpu-decoder",
    help="With --gpu-decode: torchvision (nvjpeg) or nvimgcodec (NVIDIA nvImageCodec, pip install "
    "'nvidia-nvimgcodec-cu13\\[nvjpeg]'; within 2 grey levels of the exact decoder where torchvision's "
    "differs by up to 37 at sharp colour edges).",
)
GPU_READ_THREADS_OPT = typer.Option(
    None,
    "--gpu-read-threads",
    min=1,
    help="With --gpu-decode: threads reading files and parsing JPEG headers (default 2, measured best "
    "from local storage; more for high-latency storage).",
)
GPU_CPU_SHARE_OPT = typer.Option(
    0.0,
    "--gpu-cpu-share",
    min=0.0,
    max=0.95,
    help="Experimental, with --gpu-decode: decode this share of the files (chosen by file name) in "
    "--workers CPU processes (default: the cores less 4) while the GPU decodes the rest; they get the "
    "exact path's pixels (or --fast-decode's). 0 (default): off. On an H200 it cost 23-57 %: the CPU "
    "workers decode far slower than nvjpeg (docs/performance.md).",
)
GPU_DECODE_PROCS_OPT = typer.Option(
    None,
    "--gpu-decode-procs",
    min=1,
    help="With --gpu-decode: GPU loaders in all, this process's loader thread and N-1 processes, each "
    "decoding and preprocessing the next block of files (the same pixels). The processes start while the "
    "model loads and join when ready. Default: 4 for 100,000 files or more to embed on 8 cores or more, else 1 (the "
    "loader thread alone). On an H200, 4 loaders took 34.6-37.3 s over 196,608 1280x960 JPEGs against "
    "41.6-46.4 s for one, and tied over 65,536 (their start-up is paid once).",
)
WORKERS_HELP = "Decode processes (default: one per core; 0 decodes in the main process)."
_EMBED_WORKERS_HELP = ("Decode processes (default: one per core; with --gpu-decode the cores less 4, for the files nvjpeg "
                       "cannot decode and --gpu-cpu-share; 0 decodes in the main process).")


def _start_decode_procs(
    procs: int,
    device: str,
    decoder: str,
    workers: int | None,
    cpu_share: float,
    fast_decode: bool,
    read_threads: int | None,
) -> StartedDecodeProcesses:
    """GPU decode processes for `embed --gpu-decode-procs`, with the CPU decode workers `embed_folder`
    would start (`--workers`, default the cores less 4) shared among them."""
    from ..pipeline.batching import default_workers
    from ..pipeline.cpu_assist import default_assist_workers
    from ..pipeline.gpu_procs import DecodeProcesses, start_decode_processes

    total = workers if workers is not None else default_assist_workers(default_workers())
    setup = DecodeProcesses.for_run(procs, total, cpu_share=cpu_share, fast_decode=fast_decode,
                                    read_threads=read_threads if read_threads is not None else 2)  # fmt: skip
    return start_decode_processes(setup, device, decoder)


def _default_decode_procs(files: int) -> int:
    """`--gpu-decode-procs` when not given, from the files left to embed (all of them, or a resume's
    rest) and this machine's cores (logged: it changes how the run loads, not its output)."""
    from ..pipeline.batching import default_workers
    from ..pipeline.gpu_procs import default_decode_procs

    cores = default_workers()
    procs = default_decode_procs(files, cores)
    _log.info("GPU loaders: %d (the default for %d files to embed on %d cores; --gpu-decode-procs sets it)", procs, files, cores)
    return procs


def _check_gpu_decoder(gpu_decode: bool, gpu_decoder: str) -> None:
    from ..image.gpu_decode import GPU_DECODE_LIBRARIES

    if gpu_decoder not in GPU_DECODE_LIBRARIES:
        raise typer.BadParameter(f"--gpu-decoder must be one of {', '.join(GPU_DECODE_LIBRARIES)}, got {gpu_decoder!r}")
    if gpu_decoder != "torchvision" and not gpu_decode:
        raise typer.BadParameter("--gpu-decoder needs --gpu-decode")
    if gpu_decoder == "nvimgcodec":
        from ..image import nvimgcodec_decode

        if not nvimgcodec_decode.available():
            raise typer.BadParameter(
                "--gpu-decoder nvimgcodec needs NVIDIA nvImageCodec: pip install 'nvidia-nvimgcodec-cu13[nvjpeg]' "
                "(cu12 for CUDA 12)"
            )


def _check_gpu_decode(opts: mo.ModelOptions, engine: str, fast_decode: bool, cpu_share: float) -> None:
    """--gpu-decode hands the backend pixels already on the GPU: only the torch backend on CUDA takes them."""
    if opts.backend != "torch" or not opts.device.startswith("cuda"):
        raise typer.BadParameter(
            f"--gpu-decode needs --backend torch --device cuda (got --backend {opts.backend} "
            f"--device {opts.device}); on CPUs use decode workers, with --fast-decode for large photos"
        )
    if engine != "local":
        raise typer.BadParameter("--gpu-decode runs with --engine local (Ray actors decode on their CPUs)")
    if fast_decode and cpu_share == 0:
        raise typer.BadParameter(
            "--fast-decode with --gpu-decode needs --gpu-cpu-share: it applies to the CPU's share "
            "(nvjpeg decodes at full size)"
        )


def register(app: typer.Typer) -> None:
    """Add the `embed` command to `app`."""

    @app.command("embed")
    def embed_cmd(
        source: Path = _SOURCE_ARG,
        output: Path = _OUTPUT_OPT,
        model: str = mo.MODEL_OPT,
        pretrained: str | None = mo.PRETRAINED_OPT,
        checkpoint: Path | None = mo.CHECKPOINT_OPT,
        backend: str = mo.BACKEND_OPT,
        precision: str = mo.PRECISION_OPT,
        device: str = mo.DEVICE_OPT,
        download: bool = mo.DOWNLOAD_OPT,
        compile: bool = mo.EMBED_COMPILE_OPT,
        batch: int = typer.Option(32, "--batch", min=1, help="Images per backend call."),
        workers: int | None = typer.Option(None, "--workers", min=0, help=_EMBED_WORKERS_HELP),
        shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Images per output shard."),
        dtype: str = typer.Option("float16", "--dtype", help="float16 or float32 on disk."),
        engine: str = typer.Option("local", "--engine", help="local, or ray (a pool of --actors actors, one model each; --workers is not used)."),
        as_json: bool = typer.Option(False, "--json", help="Print the run stats as JSON."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
        fast_decode: bool = FAST_DECODE_OPT,
        gpu_decode: bool = GPU_DECODE_OPT,
        gpu_decoder: str = GPU_DECODER_OPT,
        gpu_read_threads: int | None = GPU_READ_THREADS_OPT,
        gpu_cpu_share: float = GPU_CPU_SHARE_OPT,
        gpu_decode_procs: int | None = GPU_DECODE_PROCS_OPT,
        retry_failed: bool = typer.Option(
            False, "--retry-failed", help="On a rerun, recompute the shards that list unreadable files too "
            "(after fixing or replacing them); a plain rerun only resumes the unfinished shards.",
        ),
        address: str | None = typer.Option(
            None, "--address", help="Ray cluster: auto, or ray://host:10001 (default: a local Ray instance)."
        ),
        actors: int = typer.Option(2, "--actors", min=1, help="Ray actor pool size (one model per actor)."),
        gpus_per_actor: float = typer.Option(
            0.0, "--gpus-per-actor", min=0.0, help="GPUs per Ray actor (the actors then run on --device, default cuda)."
        ),
    ) -> None:
        """Embed every image of a folder or file list into sharded .npy + .jsonl files (resumable)."""
        t_start = time.perf_counter()
        from tqdm import tqdm

        from ..errors import DatasetError
        from ..pipeline.run import check_output, pending_images, reusable_run_info
        from ..pipeline.run_lock import exclusive_output
        from ..pipeline.sinks import DTYPES, FAILURES_FILE
        from ..pipeline.sources import list_items
        from ..report import fidelity_line, render_run_stats

        if dtype not in DTYPES:
            raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if engine not in _ENGINES:
            raise typer.BadParameter(f"--engine must be one of {', '.join(_ENGINES)}, got {engine!r}")
        opts = mo.parse_model_options(
            model, pretrained, checkpoint, backend, precision, device, download, compile
        )
        _check_gpu_decoder(gpu_decode, gpu_decoder)
        if gpu_read_threads is not None and not gpu_decode:
            raise typer.BadParameter("--gpu-read-threads needs --gpu-decode")
        if gpu_cpu_share > 0 and not gpu_decode:
            raise typer.BadParameter("--gpu-cpu-share needs --gpu-decode")
        if gpu_cpu_share > 0 and workers == 0:
            raise typer.BadParameter("--gpu-cpu-share needs CPU decode workers: --workers 1 or more")
        if gpu_decode_procs is not None and gpu_decode_procs > 1 and not gpu_decode:
            raise typer.BadParameter("--gpu-decode-procs needs --gpu-decode")
        if gpu_decode:
            _check_gpu_decode(opts, engine, fast_decode, gpu_cpu_share)
        if compile and opts.device.startswith("cuda"):
            # Measured best on an H200 (docs/performance.md): compiled graphs replayed as CUDA graphs.
            # Safe here: one thread calls the image tower (the server does not get this).
            opts = replace(opts, extra={**opts.extra, "cuda_graphs": True})
        if engine == "ray":  # Ray reads Parquet path lists and WebDataset shards too
            from ..distributed.ray import list_source

            items = list_source(source)
        else:
            if source.suffix in _RAY_ONLY_SOURCES and source.is_file():
                raise typer.BadParameter(
                    f"{source}: {source.suffix} sources are read by the Ray engine only: add --engine ray "
                    "(or pass a folder, or a text file with one path per line)"
                )
            items = list_items(source)
        if not items:  # a mistyped folder is not a successful run (predict, bench, index build agree)
            raise DatasetError(f"{source}: no images to embed")
        _log.info("listed %d files in %.1f s", len(items), time.perf_counter() - t_start)
        # Refuse a mismatched output folder before the (possibly slow) model load.
        check_output_folder(output, "--output")
        check_output(
            output, model=opts.label, dtype=dtype, shard_size=shard_size, fast_decode=fast_decode,
            gpu_decode=gpu_decode, gpu_decoder=gpu_decoder if gpu_decode else None,
            gpu_cpu_share=gpu_cpu_share if gpu_decode else None, precision=opts.precision,
        )  # fmt: skip
        with ExitStack() as stack:
            # Held to the fidelity write: a second run into `output` meanwhile is refused now, before
            # its model load, not after (`embed_folder` holds it too, for library callers).
            stack.enter_context(exclusive_output(output))
            # A rerun of a finished folder loads no model (seconds to minutes for nothing), and the
            # default GPU loaders follow the files left, not the folder's size.
            pending = pending_images(items, output, shard_size=shard_size, dtype=dtype, retry_failed=retry_failed)
            if gpu_decode_procs is None:
                gpu_decode_procs = _default_decode_procs(pending) if gpu_decode else 1
            procs = None
            if gpu_decode_procs > 1 and pending:  # their start-up (torch, CUDA, nvjpeg) runs while the model loads
                procs = stack.enter_context(_start_decode_procs(gpu_decode_procs, opts.device, gpu_decoder, workers,
                                                                gpu_cpu_share, fast_decode, gpu_read_threads))  # fmt: skip
            finished = reusable_run_info(output) if not pending else None  # Ray then starts no job either
            clip = None
            decode = {"fast_decode": fast_decode, "gpu_decoder": gpu_decoder if gpu_decode else None}
            if finished is not None:
                _log.info("%s: every shard is complete; no model loaded", output)
                preprocess: PreprocessConfig | dict[str, Any] = finished["preprocess"]
                # What the run that made them recorded; described from the options (as on Ray) when
                # it was killed after its last shard, before it recorded anything.
                measured = finished.get("fidelity") or mo.run_fidelity(None, opts, **decode)
            else:
                t_load = time.perf_counter()
                clip = mo.load_clip(opts) if engine == "local" else None
                if clip is not None:  # with -v: where a command's time goes outside the embedding (performance.md)
                    _log.info("model loaded in %.1f s (%.1f s since the command started)",
                              time.perf_counter() - t_load, time.perf_counter() - t_start)  # fmt: skip
                preprocess = clip.preprocess_cfg if clip is not None else mo.preprocess_only(opts)
                measured = mo.run_fidelity(clip, opts, **decode)
            if measured is not None:  # a lower precision (or decode) states its measured deviation
                typer.echo(fidelity_line(measured), err=True)
            run_kwargs: dict[str, Any] = dict(
                model=opts.label, batch_size=batch, workers=workers, shard_size=shard_size, dtype=dtype,
                source_label=str(source.resolve()),
            )  # fmt: skip
            run_kwargs.update(fast_decode=fast_decode, retry_failed=retry_failed)
            if gpu_decode:
                run_kwargs.update(gpu_decode=opts.device, gpu_decoder=gpu_decoder, gpu_cpu_share=gpu_cpu_share)
                if gpu_read_threads is not None:
                    run_kwargs["gpu_read_threads"] = gpu_read_threads
                if procs is not None:
                    run_kwargs["gpu_decode_procs"] = procs
            if engine == "ray":
                run_kwargs.update(address=address, num_actors=actors, num_gpus=gpus_per_actor)
            with tqdm(total=len(items), unit="img", disable=not progress or as_json, leave=False) as bar:
                stats = _run_engine(
                    engine, items, output, clip, preprocess, opts, progress=bar.update, **run_kwargs
                )
            _record_fidelity(output, measured)
        _log.info("embedding done %.1f s after the command started", time.perf_counter() - t_start)
        fmt = "json" if as_json else "text"
        typer.echo(render_run_stats(stats, fmt, failures_path=output / FAILURES_FILE, fidelity=measured))
        if stats.images and stats.failed_total >= stats.images:
            # A folder of only unreadable files is not a successful run (predict and bench agree): a
            # script would go on to index nothing. The output folder is complete all the same.
            raise DatasetError(
                f"{source}: none of the {stats.images} images could be read, nothing was embedded; "
                f"the reasons are in {output / FAILURES_FILE}"
            )
        if not as_json:
            typer.echo(f"Embeddings: {output / 'shards'} (read with clipengine.pipeline.read_embeddings)")
