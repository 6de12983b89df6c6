"""OpenVINO backend over an export folder: the fast CPU path for static (QDQ) INT8 engines, no torch.

It runs the same folders as the ONNX Runtime backend (the shared part is `folder.py`): OpenVINO
reads the ONNX files directly. Measured on a 2-core Zen 4 CPU, ViT-B/32 image tower at batch 32:
static INT8 91 img/s here vs 56 img/s for ORT's dynamic INT8; dynamic INT8 under OpenVINO 18.7.

The inference precision is always set explicitly: OpenVINO's CPU plugin otherwise runs fp32 graphs
in bf16 on CPUs with AMX, a silent accuracy loss. Precision "bf16" opts into that on the fp32
engines. An OpenVINO infer request is not thread-safe, so each thread gets its own per engine.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, InputError
from ..export.manifest import EngineInfo, Manifest
from .base import check_thread_count
from .folder import ExportFolderBackend, FolderEngine

__all__ = ["DYNAMIC_QUANTIZATION_GROUP", "OpenVinoBackend", "OpenVinoEngine", "openvino_config", "resolve_device"]

log = logging.getLogger(__name__)

_INSTALL = 'the openvino backend needs OpenVINO: pip install "clipengine[openvino]"'
# Our precision -> (the engines it runs, OpenVINO's INFERENCE_PRECISION_HINT).
_HINTS = {"fp32": ("fp32", "f32"), "fp16": ("fp16", "f32"), "int8": ("int8", "f32"), "bf16": ("fp32", "bf16"),
          "int8w": ("int8w", "bf16")}  # fmt: skip
# int8w engines (int8 weights only): OpenVINO quantizes activations at run time, one scale per token
# and 256 input channels. ViT-B/32, 2 Zen 4 cores, batch 32 (groups 32 / 128 / 256 / 512 tried):
# text 77 tokens 100 seq/s at cos 0.9992 (bf16 hint 68), image 66 img/s at cos 0.9998.
DYNAMIC_QUANTIZATION_GROUP = 256
# What the dynamic-INT8 warning quotes: one model's measurement (module docstring), not every model's.
_DYNAMIC_INT8_SPEED = (
    "measured on ViT-B/32's image tower, batch 32, 2 CPU cores: 18.7 img/s vs 91 for static INT8"
)


def openvino_config(precision: str) -> tuple[str, dict[str, Any]]:
    """Our precision -> (the engine precision it runs, the OpenVINO compile config it needs).

    The inference precision is always explicit: OpenVINO defaults to bf16 on CPUs with AMX.
    """
    if precision not in _HINTS:
        raise InputError(f"unknown precision {precision!r} for the openvino backend; use one of {', '.join(_HINTS)}")
    engines, hint = _HINTS[precision]
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint}
    if precision == "int8w":
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = DYNAMIC_QUANTIZATION_GROUP
    return engines, config


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise BackendError(_INSTALL) from e
    return openvino


def resolve_device(device: str, available: list[str]) -> str:
    """Our device name -> OpenVINO's: "cpu" -> "CPU"; "GPU", "GPU.1", "NPU" if OpenVINO lists them.

    Raises:
        BackendError: "cuda..." (OpenVINO does not run on NVIDIA GPUs) or a device OpenVINO lacks.
    """
    if device == "cpu":
        return "CPU"
    if device.startswith("cuda"):
        raise BackendError(
            f"OpenVINO does not run on NVIDIA GPUs (device {device!r}); "
            "use backend 'onnx' (onnxruntime-gpu) or 'torch' for CUDA"
        )
    for name in available:
        if name.upper() == device.upper():
            return name
    raise BackendError(
        f"unknown device {device!r} for the openvino backend; OpenVINO here has: "
        f"{', '.join(available) or 'none'} (use 'cpu' or one of those names)"
    )


class OpenVinoEngine(FolderEngine):
    """One ONNX file compiled by OpenVINO; one infer request per calling thread."""

    def __init__(
        self,
        path: Path,
        info: EngineInfo,
        core: Any,
        device: str,
        config: dict[str, Any],
        projection: np.ndarray | None = None,
    ) -> None:
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), device, config)
        except Exception as e:  # OpenVINO raises RuntimeError / its own types
            raise BackendError(f"{path}: OpenVINO cannot load this engine on {device} ({e})") from e
        self.device = device
        self._local = threading.local()
        super().__init__(path, info, projection)

    @property
    def inference_precision(self) -> str:
        """The precision the compiled model actually computes in ("f32", "bf16", ...)."""
        value = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type
        return str(value.get_type_name() if hasattr(value, "get_type_name") else value)

    def infer(self, x: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        outputs = request.infer({0: x})  # copies the output out of the request's buffer
        return np.asarray(outputs[0])

    def input_dims(self) -> list[int | None]:
        shape = self.compiled.inputs[0].get_partial_shape()
        return [int(d.get_length()) if d.is_static else None for d in shape]


class OpenVinoBackend(ExportFolderBackend):
    """Backend over a `clipengine export` folder run by OpenVINO; returns L2-normalised float32 (N, D).

    Example:
        >>> backend = OpenVinoBackend("models/ViT-B-32", precision="int8")
        >>> backend.encode_images(pixels).shape, backend.providers
        ((16, 512), ['openvino:CPU'])
    """

    name = "openvino"

    def __init__(
        self,
        folder: str | Path | Manifest,
        device: str = "cpu",
        precision: str = "fp32",
        *,
        root: str | Path | None = None,
        threads: int | None = None,
        verify_files: bool = False,
    ) -> None:
        """Open an export folder.

        Args:
            folder: the export folder (or an already read Manifest, with `root` = its folder).
            device: "cpu", or an OpenVINO device name it lists ("GPU", "GPU.1", ...); not CUDA.
            precision: "fp32", "fp16", "int8" (engines the folder holds, computed in f32),
                "bf16" (the fp32 engines computed in bf16: fast on CPUs with AMX / AVX512-BF16), or
                "int8w" (int8-weight engines, activations quantized per token group at run time).
            threads: INFERENCE_NUM_THREADS per engine (default: OpenVINO's choice, all cores; at most 4 per CPU).
            verify_files: check every engine's SHA-256 against the manifest before loading.

        Raises:
            BackendError: no openvino package, no manifest, a precision the folder lacks, a CUDA or
                unknown device, a missing or unloadable engine file.
        """
        engines, config = openvino_config(precision)
        threads = check_thread_count("threads", threads)
        ov = _import_openvino()
        self._core = ov.Core()
        ov_device = resolve_device(device, list(self._core.available_devices))
        super().__init__(folder, device, precision, root=root, verify_files=verify_files,
                         engine_precision=engines)
        self.ov_device = ov_device
        self.inference_precision = str(config["INFERENCE_PRECISION_HINT"])
        self._config: dict[str, Any] = {**config, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = threads
        if precision == "int8":
            if any(e.quantization == "dynamic" for e in self.manifest.select("image", "int8")):
                model = self.manifest.model
                other = "" if model == "ViT-B-32" else f"; unmeasured for {model}"
                log.warning(
                    "%s: the int8 image engines are dynamically quantized (ORT-style); OpenVINO runs "
                    "those slowly (%s%s). Re-export with `clipengine export --calibration-dir <images>` "
                    "for static INT8.", self.root, _DYNAMIC_INT8_SPEED, other
                )

    @property
    def providers(self) -> list[str]:
        """Where the engines run, as "openvino:<OpenVINO device>" (cf. OnnxBackend.providers)."""
        return [f"openvino:{self.ov_device}"]

    def _engine(self, path: Path, info: EngineInfo, projection: np.ndarray | None) -> OpenVinoEngine:
        key = "openvino-bf16" if self.precision == "bf16" else "openvino"
        parity = info.runtime_parity.get(key)
        if parity is not None and parity.passed is not True:  # a damaged manifest's "no" is no pass
            raise BackendError(
                f"{path}: under OpenVINO ({self.inference_precision}) this engine missed its bound at export "
                f"(max-abs {parity.max_abs:.3g}, min cosine {parity.min_cos:.6f}, needs {parity.bound}); "
                "use the onnx backend or another precision"
            )
        if parity is None:
            why = "openvino was not installed then, or --no-verify"
            why += ", or that CPU computes no bf16" if self.precision == "bf16" else ""
            log.info("%s: not measured under OpenVINO at export (%s); re-export to record its deviation", path.name, why)
        engine = OpenVinoEngine(path, info, self._core, self.ov_device, self._config, projection)
        actual = engine.inference_precision
        if actual != self.inference_precision:
            log.warning("%s: asked OpenVINO %s for %s inference, it compiled %s",
                        path.name, self.ov_device, self.inference_precision, actual)
        log.debug("opened %s on openvino:%s (%s)", info.file, self.ov_device, actual)
        return engine
