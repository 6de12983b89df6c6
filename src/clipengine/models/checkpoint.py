"""Read a checkpoint file of any supported kind into a flat state dict, refusing what is unsafe.

`.safetensors`, OpenAI TorchScript archives and `torch.load` pickles (weights only). Separate from
`models.load` (which decides the architecture and builds the module) because reading bytes safely
- no pickled code, one clear CheckpointError for any unreadable file - is a job of its own.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .convert import OPENAI_METADATA_KEYS, unwrap_state_dict

__all__ = ["StateDict", "read_checkpoint"]

StateDict = dict[str, torch.Tensor]


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _zip_kind(path: Path) -> str | None:
    """For a zip archive: "torchscript" (OpenAI's .pt releases carry a code/ folder), "torch" (a
    torch.save file), or "other" (no data.pkl, which both of those hold); None for any other file."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if not any(n.endswith("data.pkl") for n in names):
        return "other"
    return "torchscript" if any("/code/" in n or n.endswith("constants.pkl") for n in names) else "torch"


def read_checkpoint(path: Path) -> tuple[StateDict, bool]:
    """Read a checkpoint file into a flat state dict; second value: it is an OpenAI release.

    `.safetensors` via safetensors; TorchScript archives via `torch.jit.load` (TorchScript runs no
    Python code on load); everything else via `torch.load(weights_only=True)`, which refuses
    pickled code.

    Raises:
        CheckpointError: unreadable file, or a pickle that needs arbitrary code.
    """
    try:
        with open(path, "rb") as f:  # the OS's own reason: safetensors reports an unreadable file
            f.read(1)  # as "No such file or directory", a folder as "No such device"
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(path))
            except SafetensorError as e:  # empty, truncated or not a safetensors file
                raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(e)})") from e
            return unwrap_state_dict(tensors, str(path)), False
        zip_kind = _zip_kind(path)
        if zip_kind == "other":  # torch's own reasons here are its internals ("enforce fail at ...")
            raise CheckpointError(
                f"{path}: not a readable checkpoint (a zip archive, but not one torch.save or torch.jit.save "
                "writes: no data.pkl); if it holds a model folder, unzip it and pass the folder"
            )
        if zip_kind == "torchscript":
            archive = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            raw: Any = archive.state_dict()
            return unwrap_state_dict(dict(raw), str(path)), True
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise CheckpointError(f"{path}: not a readable checkpoint (not a tensor pickle)") from e
        raise CheckpointError(
            f"{path}: refusing to unpickle it: it needs the Python object {found.group(1)}, and loading "
            "it could run arbitrary code; re-save it as a plain state dict or .safetensors"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(e)})") from e
    except (
        KeyError,
        IndexError,
    ) as e:  # torch's unpickler on text: "hello" -> memo KeyError, "a" -> empty stack
        raise CheckpointError(f"{path}: not a readable checkpoint (not a tensor pickle)") from e
    openai = isinstance(raw, dict) and any(k in raw for k in OPENAI_METADATA_KEYS)
    return unwrap_state_dict(raw, str(path)), openai
