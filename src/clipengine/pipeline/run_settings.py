"""What an output folder's run.json pins: a rerun (a resume) must use the same model and settings.

Both engines (`run.embed_folder` and `distributed.ray`) check a run against the folder's run.json
here before writing anything; `check_output` lets the CLI do it before loading a model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import IndexMismatchError
from .sinks import read_run_info

__all__ = ["check_compatible", "check_cpu_share", "check_output"]


def check_cpu_share(share: float, gpu_decode: str | None, workers: int | None) -> None:
    """Refuse a `gpu_cpu_share` that `embed_folder` cannot run, before anything is written."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"gpu_cpu_share must be in [0, 1), got {share}")
    if share > 0 and gpu_decode is None:
        raise ValueError("gpu_cpu_share is the CPU's share of a GPU decode: it needs gpu_decode")
    if share > 0 and workers == 0:
        raise ValueError("gpu_cpu_share needs CPU decode workers (workers >= 1, or None for the default)")


def check_output(out_dir: str | Path, **settings: Any) -> None:
    """Fail fast (before loading a model) if ``out_dir`` holds a run with other settings.

    Args:
        settings: any of model=, embed_dim=, dtype=, shard_size= for the run about to start.

    Raises:
        IndexMismatchError: a setting differs from the one recorded in ``out_dir/run.json``.
    """
    previous = read_run_info(out_dir)
    if previous is not None:
        check_compatible(Path(out_dir), previous, settings)


def check_compatible(out_dir: Path, previous: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to mix runs in one folder: same model, embed_dim, dtype, shard size and decode settings
    (both engines: `embed_folder` and the Ray one), or a clear error naming the option that differs."""
    hints: dict[str, Callable[[Any], str]] = {
        "model": lambda old: f"--model {old}",
        "embed_dim": lambda old: f"the model that gives {old}-d embeddings",
        "dtype": lambda old: f"--dtype {old}",
        "shard_size": lambda old: f"--shard-size {old}",
        "fast_decode": lambda old: "--fast-decode" if old else "no --fast-decode",
        "gpu_decode": lambda old: "--gpu-decode" if old else "no --gpu-decode",
        "gpu_decoder": lambda old: f"--gpu-decoder {old}",
        "gpu_cpu_share": lambda old: f"--gpu-cpu-share {old}",
    }
    for key, hint in hints.items():
        old, new = previous.get(key), current.get(key)
        if key in current and old is not None and new is not None and old != new:
            raise IndexMismatchError(
                f"{out_dir} holds embeddings made with {key}={old!r}, but this run uses {key}={new!r}; "
                f"use another output folder, delete {out_dir}, or use {hint(old)}"
            )
