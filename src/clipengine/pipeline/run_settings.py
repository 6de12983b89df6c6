"""What an output folder's run.json pins: a rerun (a resume) must use the same model and settings.

Both engines (`run.embed_folder` and `distributed.ray`) check a run against the folder's run.json
here before writing anything; `check_output` lets the CLI do it before loading a model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import IndexMismatchError
from ..files import check_writable_folder
from .sinks import read_run_info

__all__ = ["check_compatible", "check_cpu_share", "check_decode_procs", "check_output", "model_files"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".onnx")
_SAMPLES, _SAMPLE_BYTES = 16, 64 << 10  # blocks read per file for its digest


def check_cpu_share(share: float, gpu_decode: str | None, workers: int | None) -> None:
    """Refuse a `gpu_cpu_share` that `embed_folder` cannot run, before anything is written."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"gpu_cpu_share must be in [0, 1), got {share}")
    if share > 0 and gpu_decode is None:
        raise ValueError("gpu_cpu_share is the CPU's share of a GPU decode: it needs gpu_decode")
    if share > 0 and workers == 0:
        raise ValueError("gpu_cpu_share needs CPU decode workers (workers >= 1, or None for the default)")


def check_decode_procs(procs: object, gpu_decode: str | None, decode_ahead: bool, **run: Any) -> None:
    """Refuse a `gpu_decode_procs` that `embed_folder` cannot run, before anything is written: a count,
    or processes started ahead (`gpu_procs.start_decode_processes`) for this run's `gpu_decoder`,
    `gpu_cpu_share` and `fast_decode` (given in `run`)."""
    from .gpu_procs import StartedDecodeProcesses

    if isinstance(procs, StartedDecodeProcesses):
        if gpu_decode is None:
            raise ValueError("gpu_decode_procs are GPU decode processes: they need gpu_decode")
        if decode_ahead:
            raise ValueError("gpu_decode_ahead cannot be combined with gpu_decode_procs")
        started = {"gpu_decode": procs.device, "gpu_decoder": procs.decoder, "gpu_cpu_share": procs.setup.cpu_share,
                   "fast_decode": procs.setup.fast_decode, "gpu_read_threads": procs.setup.read_threads}  # fmt: skip
        wanted = {"gpu_decode": gpu_decode, **run}
        differ = [f"{k} {started[k]!r} (the run: {v!r})" for k, v in wanted.items() if started.get(k, v) != v]
        if differ:
            raise ValueError("the decode processes were started with other settings: " + ", ".join(differ))
        return
    if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
        raise ValueError(f"gpu_decode_procs must be an integer >= 1 (or started processes), got {procs!r}")
    if procs > 1 and gpu_decode is None:
        raise ValueError("gpu_decode_procs are GPU decode processes: they need gpu_decode")
    if procs > 1 and decode_ahead:  # CUDA work on a second thread of a sending process (`gpu_procs`)
        raise ValueError("gpu_decode_ahead cannot be combined with gpu_decode_procs > 1")


def check_output(out_dir: str | Path, **settings: Any) -> None:
    """Fail fast (before loading a model) if ``out_dir`` holds a run with other settings, or cannot
    be made or written.

    Args:
        settings: any of model=, embed_dim=, dtype=, shard_size= for the run about to start.

    Raises:
        IndexMismatchError: a setting differs from the one recorded in ``out_dir/run.json``.
        NotADirectoryError, PermissionError: ``out_dir`` (or the folder it would be made in) is a
            file, or not writable.
    """
    check_writable_folder(Path(out_dir))
    previous = read_run_info(out_dir)
    if previous is not None:
        if "model" in settings and "model_files" not in settings:
            settings = {**settings, "model_files": model_files(settings["model"])}
        check_compatible(Path(out_dir), previous, settings)


def model_files(model: str | None) -> dict[str, str] | None:
    """A digest per file of the model that `model` names when it is a path (an export folder, a model
    folder, a checkpoint file), so that a resume can tell its files changed; None for registry names
    (their weights are fixed by checksum).

    An export folder's image engines are named with the sha256 its manifest records (no hashing).
    Other files get a cheap digest: size and 17 blocks spread over the file, enough to tell a
    re-saved or re-trained model. The path alone does not: re-exporting into the same folder, or
    saving a fine-tuned checkpoint over the old one, kept the label, and a resume mixed the
    embeddings of two models in one folder.
    """
    path = Path(model) if model else None
    if path is None or not path.exists():
        return None
    if path.is_file():
        return {path.name: _digest(path)}
    try:
        engines = json.loads((path / "manifest.json").read_text(encoding="utf-8"))["engines"]
        return {str(e["file"]): str(e["sha256"]) for e in engines if e.get("tower") == "image"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # not an export folder (or one the load will report)
    files = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    return {p.name: _digest(p) for p in files}


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        h.update(str(size).encode())
        for k in range(_SAMPLES + 1):
            f.seek(max(0, min(size - _SAMPLE_BYTES, size * k // _SAMPLES)))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:32]


def _check_model_files(out_dir: Path, previous: dict[str, Any], current: dict[str, Any]) -> None:
    old, new = previous.get("model_files"), current.get("model_files")
    if not old or not new:  # a registry name, or a run.json of an older clipengine
        return
    changed = sorted(f for f in old.keys() & new.keys() if old[f] != new[f])
    changed = changed or sorted(old.keys() - new.keys())  # an engine the run used is gone
    if changed:
        raise IndexMismatchError(
            f"{out_dir} holds embeddings made with {previous.get('model')}, whose files have changed "
            f"since ({changed[0]} differs): a resume would mix the embeddings of two models; use "
            f"another output folder, or delete {out_dir}"
        )


def check_compatible(out_dir: Path, previous: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to mix runs in one folder: same model, embed_dim, dtype, shard size and decode settings
    (both engines: `embed_folder` and the Ray one), or a clear error naming the option that differs."""
    hints: dict[str, Callable[[Any], str]] = {
        "model": lambda old: f"--model {old}",
        "embed_dim": lambda old: f"the model that gives {old}-d embeddings",
        "precision": lambda old: f"--precision {old}",
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
    _check_model_files(out_dir, previous, current)  # the same model path, other files
