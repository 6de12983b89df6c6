"""ONNX Runtime backend over an export folder: one session per engine, fixed or dynamic batch, no torch.

The manifest, engine choice per batch size, padding and pooling are shared with the other folder
runtimes (`folder.py`); this module only resolves ORT providers and opens sessions.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, InputError
from ..export.manifest import PRECISIONS, EngineInfo, Manifest
from .base import check_thread_count
from .folder import DEFAULT_MAX_BATCH, ExportFolderBackend, FolderEngine, plan_batches

__all__ = ["DEFAULT_MAX_BATCH", "OnnxBackend", "OnnxEngine", "resolve_providers"]

log = logging.getLogger(__name__)

_TRT = "TensorrtExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
_plan = plan_batches  # the name older code and the tests import


def _import_onnxruntime() -> Any:
    """onnxruntime, or a BackendError saying how to install it (it is an optional dependency)."""
    try:
        import onnxruntime
    except ImportError as e:
        hint = 'the onnx backend needs ONNX Runtime: pip install "clipengine[onnx]"'
        # The onnx backend is an export folder's default: with only the openvino extra installed the
        # user was sent to install a second runtime for a folder the first one runs.
        if importlib.util.find_spec("openvino") is not None:
            hint += '; or run it with OpenVINO, installed here: --backend openvino (backend="openvino")'
        raise BackendError(hint) from e
    return onnxruntime


def resolve_providers(
    device: str, providers: list[str] | None = None, tensorrt: bool = False
) -> list[str | tuple[str, dict[str, Any]]]:
    """The ORT provider list for a device: TensorRT > CUDA > CPU, as available and requested.

    Args:
        device: "cpu", "cuda" or "cuda:N".
        providers: explicit provider names (overrides the device's default order).
        tensorrt: on "cuda", put TensorRT first when ORT has it (engine build takes minutes once).

    Raises:
        BackendError: a requested provider is not in this onnxruntime build.
        InputError (a BackendError): a malformed device name or an empty `providers` list.
    """
    ort = _import_onnxruntime()

    available = ort.get_available_providers()
    device_id = 0
    if device.startswith("cuda"):
        _, sep, idx = device.partition(":")
        if device != "cuda" and not (sep and idx.isascii() and idx.isdigit()):  # "cuda:x", "cudax"
            raise InputError(f"unknown device {device!r} for the onnx backend; use 'cpu', 'cuda' or 'cuda:N'")
        device_id = int(idx) if idx else 0
    elif device != "cpu":
        raise InputError(f"unknown device {device!r} for the onnx backend; use 'cpu', 'cuda' or 'cuda:N'")
    if isinstance(providers, str):  # else "onnxruntime has no C, P, U, ...": one name, letter by letter
        raise InputError(f"providers must be a list of provider names, got one string; pass [{providers!r}]")
    if providers is not None and not providers:
        raise InputError("providers is empty; name at least one, or pass None for the device's default")
    if providers is not None and not all(isinstance(p, str) for p in providers):
        raise InputError(f"providers must be provider names (str), e.g. ['CPUExecutionProvider'], got {providers!r}")
    if providers is None:
        if device == "cpu":
            providers = [_CPU]
        else:
            providers = ([_TRT] if tensorrt and _TRT in available else []) + [_CUDA, _CPU]
    missing = [p for p in providers if p not in available]
    if missing:
        raise BackendError(
            f"onnxruntime has no {', '.join(missing)} (available: {', '.join(available)}); "
            "for CUDA install onnxruntime-gpu, or use device='cpu'"
        )
    gpu_options = {"device_id": device_id}
    return [(p, gpu_options) if p in (_TRT, _CUDA) else p for p in providers]


class OnnxEngine(FolderEngine):
    """One ONNX file in an ORT session; `run` returns unnormalised (n, D) features."""

    def __init__(
        self,
        path: Path,
        info: EngineInfo,
        providers: list[Any],
        options: Any,
        projection: np.ndarray | None = None,
    ) -> None:
        ort = _import_onnxruntime()

        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise BackendError(f"{path}: onnxruntime cannot load this engine ({e})") from e
        self.input_name = self.session.get_inputs()[0].name
        self.providers: list[str] = list(self.session.get_providers())
        super().__init__(path, info, projection)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: x})[0])

    def input_dims(self) -> list[int | None]:
        return [d if isinstance(d, int) else None for d in self.session.get_inputs()[0].shape]


class OnnxBackend(ExportFolderBackend):
    """Backend over a `clipengine export` folder; returns L2-normalised float32 (N, D).

    Example:
        >>> backend = OnnxBackend("models/ViT-B-32", device="cpu", precision="int8")
        >>> backend.encode_images(pixels).shape, backend.providers
        ((16, 512), ['CPUExecutionProvider'])
    """

    name = "onnx"

    def __init__(
        self,
        folder: str | Path | Manifest,
        device: str = "cpu",
        precision: str = "fp32",
        providers: list[str] | None = None,
        *,
        root: str | Path | None = None,
        intra_op_threads: int | None = None,
        tensorrt: bool = False,
        verify_files: bool = False,
    ) -> None:
        """Open an export folder.

        Args:
            folder: the export folder (or an already read Manifest, with `root` = its folder).
            device: "cpu", "cuda" or "cuda:N".
            precision: one of the precisions the folder holds ("fp32", "fp16", "int8", "int8w").
            providers: explicit ORT providers, e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"].
            intra_op_threads: ORT threads per session (default: ORT's choice, all cores; at most 4 per CPU).
            tensorrt: on CUDA, try TensorRT first.
            verify_files: check every engine's SHA-256 against the manifest before loading.

        Raises:
            BackendError: no manifest, a precision the folder lacks, a missing provider or file.
            InputError: a precision no export makes (not one of `export.manifest.PRECISIONS`).
        """
        ort = _import_onnxruntime()

        if precision not in PRECISIONS:  # else "no fp64 engines ... re-export with --precision fp64"
            raise InputError(
                f"unknown precision {precision!r} for the onnx backend; use one of {', '.join(PRECISIONS)} "
                "(bf16 runs on backend 'openvino' over the fp32 engines, or on 'torch')"
            )
        threads = check_thread_count("intra_op_threads", intra_op_threads)
        super().__init__(folder, device, precision, root=root, verify_files=verify_files)
        self._providers = resolve_providers(device, providers, tensorrt)
        self._options = ort.SessionOptions()
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._options.log_severity_level = 3  # ORT's C++ warnings would go straight to stderr
        if threads:
            self._options.intra_op_num_threads = threads

    @property
    def providers(self) -> list[str]:
        """Providers ORT actually assigned (session.get_providers()) for the image engine."""
        engine = self._image.first()
        assert isinstance(engine, OnnxEngine)
        return engine.providers

    def _engine(self, path: Path, info: EngineInfo, projection: np.ndarray | None) -> OnnxEngine:
        engine = OnnxEngine(path, info, self._providers, self._options, projection)
        wanted = self._providers[0] if isinstance(self._providers[0], str) else self._providers[0][0]
        if wanted not in engine.providers:
            raise BackendError(f"{path}: onnxruntime did not use {wanted} (got {engine.providers})")
        log.debug("opened %s on %s", info.file, engine.providers)
        return engine
