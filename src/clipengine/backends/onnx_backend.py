"""ONNX Runtime backend over an export folder: one session per engine, fixed or dynamic batch, no torch.

Fixed-batch engines are run the seed's way: the input is cut into pieces the size of an engine
batch (the largest engine batch that fits the rows left, so 40 images on b1/b8/b16/b32 engines run
as 32 + 8), and a piece smaller than every engine (or nearly filling a larger one: 31 -> b32) is
padded and the padding rows dropped. A dynamic engine takes any N (in slices of DEFAULT_MAX_BATCH).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..export.manifest import EngineInfo, Manifest, read_manifest
from ..types import FloatArray, IntArray
from .base import l2_normalize, run_in_chunks

__all__ = ["DEFAULT_MAX_BATCH", "OnnxBackend", "OnnxEngine", "resolve_providers"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64  # rows per call of a dynamic-batch engine (bounds activation memory)
_TRT = "TensorrtExecutionProvider"
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


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
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    device_id = 0
    if device.startswith("cuda"):
        _, _, idx = device.partition(":")
        device_id = int(idx) if idx else 0
    elif device != "cpu":
        raise BackendError(f"unknown device {device!r} for the onnx backend; use 'cpu', 'cuda' or 'cuda:N'")
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


class OnnxEngine:
    """One ONNX file in an ORT session; `run` returns unnormalised (n, D) features.

    Split-projection text engines return (n, L, W) token states: the engine pools them at each
    text's end-of-text token (its highest id) and applies the saved (W, D) projection.
    """

    def __init__(
        self,
        path: Path,
        info: EngineInfo,
        providers: list[Any],
        options: Any,
        projection: np.ndarray | None = None,
    ) -> None:
        import onnxruntime as ort

        self.info = info
        self.batch = info.batch
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise BackendError(f"{path}: onnxruntime cannot load this engine ({e})") from e
        self.input_name = self.session.get_inputs()[0].name
        self.providers: list[str] = list(self.session.get_providers())
        if info.split_projection and projection is None:
            raise BackendError(f"{path}: split-projection engine but the folder has no text_projection .npy")
        self.projection = projection

    def run(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)
        if self.info.split_projection:
            assert self.projection is not None
            eot = x.astype(np.int32).argmax(axis=-1)  # EOT has the highest id, as in CLIP.encode_text
            out = out[np.arange(out.shape[0]), eot] @ self.projection  # (n, W) @ (W, D)
        return out

    def run_padded(self, x: np.ndarray) -> np.ndarray:
        """Run any number of rows: chunks of the engine batch, last one padded (fixed engines)."""
        batch = self.batch or DEFAULT_MAX_BATCH
        return run_in_chunks(self.run, x, batch, pad=self.batch is not None)


def _plan(n: int, batches: list[int]) -> list[tuple[int, int, int]]:
    """Cut n rows into (start, rows, engine_batch) pieces.

    Per piece: the largest engine batch <= rows left; but when a larger engine would be padded by at
    most a quarter of the rows left (31 rows -> one b32 call, not 16 + 8 + 7 x b1), that one.
    Rows left below every engine batch go to the smallest engine, padded.
    """
    pieces, start = [], 0
    ordered = sorted(batches)
    while start < n:
        left = n - start
        fitting = [b for b in ordered if b <= left]
        larger = [b for b in ordered if b > left]
        if not fitting or (larger and fitting[-1] != left and larger[0] - left <= left // 4):
            b = larger[0]
        else:
            b = fitting[-1]
        rows = min(b, left)
        pieces.append((start, rows, b))
        start += rows
    return pieces


class _Tower:
    """The engines of one tower at one precision, sessions created on first use."""

    def __init__(self, backend: OnnxBackend, engines: list[EngineInfo]) -> None:
        self._backend = backend
        self.fixed = {e.batch: e for e in engines if e.batch is not None}
        self.dynamic = next((e for e in engines if e.batch is None), None)
        self._sessions: dict[int | None, OnnxEngine] = {}
        self._lock = threading.Lock()  # ORT sessions run concurrently; creating one is guarded

    def engine(self, batch: int | None) -> OnnxEngine:
        with self._lock:
            if batch not in self._sessions:
                info = self.dynamic if batch is None else self.fixed[batch]
                assert info is not None
                self._sessions[batch] = self._backend._open(info)
            return self._sessions[batch]

    def first(self) -> OnnxEngine:
        return self.engine(None if self.dynamic is not None else max(self.fixed))

    def run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] in self.fixed or self.dynamic is None:
            pieces = _plan(x.shape[0], list(self.fixed))
            outs = [self.engine(b).run_padded(x[s : s + r]) for s, r, b in pieces]
            return np.concatenate(outs, axis=0)
        return self.engine(None).run_padded(x)


class OnnxBackend:
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
            precision: one of the precisions the folder holds ("fp32", "fp16", "int8").
            providers: explicit ORT providers, e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"].
            intra_op_threads: ORT threads per session (default: ORT's choice, all cores).
            tensorrt: on CUDA, try TensorRT first.
            verify_files: check every engine's SHA-256 against the manifest before loading.

        Raises:
            BackendError: no manifest, a precision the folder lacks, a missing provider or file.
        """
        import onnxruntime as ort

        if isinstance(folder, Manifest):
            if root is None:
                raise BackendError("OnnxBackend(manifest) needs root=<export folder>")
            self.manifest, self.root = folder, Path(root)
        else:
            self.root = Path(folder)
            self.manifest = read_manifest(self.root)
        m = self.manifest
        if precision not in m.precisions:
            raise BackendError(
                f"{self.root}: no {precision} engines in this export (has: {', '.join(m.precisions)}); "
                f"re-export with --precision {precision} or pick one of those"
            )
        self.device, self.precision = device, precision
        self.embed_dim, self.image_size, self.context_length = m.embed_dim, m.image_size, m.context_length
        self._providers = resolve_providers(device, providers, tensorrt)
        self._options = ort.SessionOptions()
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._options.log_severity_level = 3  # ORT's C++ warnings would go straight to stderr
        if intra_op_threads:
            self._options.intra_op_num_threads = int(intra_op_threads)
        self._verify_files = verify_files
        self._projection = self._load_projection()
        self._image = _Tower(self, m.select("image", precision))
        self._text = _Tower(self, m.select("text", precision))
        for tower, label in ((self._image, "image"), (self._text, "text")):
            if not tower.fixed and tower.dynamic is None:
                raise BackendError(f"{self.root}: no {label} engine at {precision}")

    def __repr__(self) -> str:
        return f"OnnxBackend({str(self.root)!r}, device={self.device!r}, precision={self.precision!r})"

    @property
    def providers(self) -> list[str]:
        """Providers ORT actually assigned (session.get_providers()) for the image engine."""
        return self._image.first().providers

    def _load_projection(self) -> np.ndarray | None:
        spec = self.manifest.text_projection
        if not spec:
            return None
        path = self.root / spec["file"]
        if not path.is_file():
            raise BackendError(f"{path}: text projection listed in the manifest is missing")
        projection: np.ndarray = np.load(path).astype(np.float32)  # (W, D)
        return projection

    def _open(self, info: EngineInfo) -> OnnxEngine:
        path = self.root / info.file
        if not path.is_file():
            raise BackendError(f"{path}: engine listed in the manifest is missing; re-run the export")
        if self._verify_files:
            from ..export.manifest import file_sha256

            if file_sha256(path) != info.sha256:
                raise BackendError(f"{path}: SHA-256 differs from the manifest (file changed or corrupt)")
        engine = OnnxEngine(path, info, self._providers, self._options, self._projection)
        wanted = self._providers[0] if isinstance(self._providers[0], str) else self._providers[0][0]
        if wanted not in engine.providers:
            raise BackendError(f"{path}: onnxruntime did not use {wanted} (got {engine.providers})")
        log.debug("opened %s on %s", info.file, engine.providers)
        return engine

    def encode_images(self, pixels: FloatArray) -> FloatArray:
        """(N, 3, H, W) float32 -> (N, D) float32, unit L2 norm."""
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        expected = (3, self.image_size, self.image_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise BackendError(f"images must be (N, {', '.join(map(str, expected))}), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return l2_normalize(self._image.run(x))

    def encode_texts(self, tokens: IntArray) -> FloatArray:
        """(N, L) int64 token ids -> (N, D) float32, unit L2 norm."""
        x = np.ascontiguousarray(tokens, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != self.context_length:
            raise BackendError(f"tokens must be (N, {self.context_length}), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        return l2_normalize(self._text.run(x))
