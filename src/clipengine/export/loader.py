"""Open an export folder as a `ClipModel` on ONNX Runtime (no torch needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..api import ClipModel

__all__ = ["load_export"]


def load_export(folder: str | Path, device: str = "cpu", precision: str = "fp32", **opts: Any) -> ClipModel:
    """A ClipModel over the folder's engines, with the preprocessing and context length it was built with.

    Args:
        folder: a `clipengine export` folder (with manifest.json).
        device: "cpu", "cuda" or "cuda:N".
        precision: a precision the folder holds ("fp32", "fp16", "int8").
        **opts: OnnxBackend options (providers, intra_op_threads, tensorrt, verify_files).

    Raises:
        BackendError: not an export folder, missing precision, provider or engine file.
    """
    from ..api import ClipModel
    from ..backends.onnx_backend import OnnxBackend
    from ..image.preprocess import PreprocessConfig

    backend = OnnxBackend(folder, device=device, precision=precision, **opts)
    m = backend.manifest
    name = m.model if m.pretrained is None else f"{m.model}@{m.pretrained}"
    return ClipModel(backend, PreprocessConfig.from_dict(m.preprocess), name, m.logit_scale, m.context_length)
