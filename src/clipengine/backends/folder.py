"""What every runtime over a `clipengine export` folder shares; the runtimes only open and call engines.

`ExportFolderBackend` reads the manifest, checks the precision, loads the split-off text projection,
picks engines per batch size and normalises the output. `FolderEngine` is one engine file: a
subclass supplies `infer` (the runtime's call), the base pools split-projection text states and
chunks/pads rows for fixed-batch engines. No runtime (onnxruntime, openvino) and no torch is
imported here.

Fixed-batch engines are run the seed's way: the input is cut into pieces the size of an engine
batch (the largest engine batch that fits the rows left, so 40 images on b1/b8/b16/b32 engines run
as 32 + 8), and a piece smaller than every engine (or nearly filling a larger one: 31 -> b32) is
padded and the padding rows dropped. A dynamic engine takes any N (in slices of DEFAULT_MAX_BATCH).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..errors import BackendError, InputError
from ..export.manifest import MANIFEST_FILE, EngineInfo, Manifest, file_sha256, read_manifest
from ..types import FloatArray, IntArray
from .base import l2_normalize, run_in_chunks, truncated_text_length

__all__ = ["DEFAULT_MAX_BATCH", "ExportFolderBackend", "FolderEngine", "plan_batches"]

DEFAULT_MAX_BATCH = 64  # rows per call of a dynamic-batch engine (bounds activation memory)


class FolderEngine(ABC):
    """One engine file of an export folder; `run` returns unnormalised (n, D) features.

    Split-projection text engines return (n, L, W) token states: the engine pools them at each
    text's end-of-text token (its highest id) and applies the saved (W, D) projection.
    """

    def __init__(self, path: Path, info: EngineInfo, projection: np.ndarray | None = None) -> None:
        self.path = path
        self.info = info
        self.batch = info.batch
        if info.split_projection and projection is None:
            raise BackendError(f"{path}: split-projection engine but the folder has no text_projection .npy")
        self.projection = projection
        # Dynamic engines exported with a symbolic text length: each call runs only up to the
        # batch's last EOT (exact under the causal mask; zero-shot prompts use ~16 of 77 positions).
        # The graph as loaded says so; the manifest's record of it only where the runtime does not.
        dims = self.input_dims()
        if dims is not None:
            dynamic_length = len(dims) == 2 and dims[1] is None
        else:
            spec = info.inputs[0].shape if info.inputs else []
            dynamic_length = isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], str)
        self.truncates_text = info.tower == "text" and dynamic_length

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray:
        """The runtime's call: the graph's first output for input `x` (rows = the engine batch)."""

    def input_dims(self) -> list[int | None] | None:
        """The graph input's shape as the runtime loaded it (None: a dynamic axis), or None if unknown."""
        return None

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.truncates_text:
            x = x[:, : truncated_text_length(x)]
        out = np.asarray(self.infer(x), dtype=np.float32)
        if self.info.split_projection:
            assert self.projection is not None
            eot = x.astype(np.int32).argmax(axis=-1)  # EOT has the highest id, as in CLIP.encode_text
            out = out[np.arange(out.shape[0]), eot] @ self.projection  # (n, W) @ (W, D)
        return out

    def run_padded(self, x: np.ndarray) -> np.ndarray:
        """Run any number of rows: chunks of the engine batch, last one padded (fixed engines)."""
        batch = self.batch or DEFAULT_MAX_BATCH
        return run_in_chunks(self.run, x, batch, pad=self.batch is not None)


def plan_batches(n: int, batches: list[int]) -> list[tuple[int, int, int]]:
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


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of `path`, None when it is missing: a file replaced by rename changes it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _host_array(value: object, what: str, expected: str) -> np.ndarray:
    """`value` as a NumPy array, or an InputError: a CUDA or autograd tensor, or a ragged list, was
    numpy's or torch's own TypeError / RuntimeError / ValueError, naming no argument."""
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(
            f"{what} must be a NumPy array in host memory, {expected}; got a {type(value).__name__} "
            f"numpy cannot read ({e})"
        ) from e


class _Tower:
    """The engines of one tower at one precision, each opened on first use."""

    def __init__(self, backend: ExportFolderBackend, engines: list[EngineInfo]) -> None:
        self._backend = backend
        self.fixed = {e.batch: e for e in engines if e.batch is not None}
        self.dynamic = next((e for e in engines if e.batch is None), None)
        self._engines: dict[int | None, FolderEngine] = {}
        self._lock = threading.Lock()  # engines run concurrently; opening one is guarded

    def engine(self, batch: int | None) -> FolderEngine:
        with self._lock:
            if batch not in self._engines:
                info = self.dynamic if batch is None else self.fixed[batch]
                assert info is not None
                self._engines[batch] = self._backend._open(info)
            return self._engines[batch]

    def first(self) -> FolderEngine:
        return self.engine(None if self.dynamic is not None else max(self.fixed))

    def open_all(self) -> None:
        for batch in [*self.fixed, *([None] if self.dynamic is not None else [])]:
            self.engine(batch)

    def run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] in self.fixed or self.dynamic is None:
            pieces = plan_batches(x.shape[0], list(self.fixed))
            return np.concatenate([self._run(b, x[s : s + r]) for s, r, b in pieces], axis=0)
        return self._run(None, x)

    def _run(self, batch: int | None, x: np.ndarray) -> np.ndarray:
        engine = self.engine(batch)
        out = engine.run_padded(x)
        # Another model's engine with the same input (ViT-L/14 beside ViT-B/32: both 224 px) gave
        # embeddings of its own width under this manifest's embed_dim, silently.
        if out.shape != (x.shape[0], self._backend.embed_dim):
            raise BackendError(
                f"{engine.path}: returned {out.shape} for {x.shape[0]} rows, the manifest needs "
                f"({x.shape[0]}, {self._backend.embed_dim}); the file is not this export's engine, re-run the export"
            )
        # Finite inputs, non-finite features: an fp16 engine overflowed (ORT, pixels x 1e6). The NaN
        # rows came back as all-zero "embeddings" (l2_normalize keeps zero rows), silently.
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)
            raise BackendError(
                f"{engine.path}: the engine returned NaN or infinite features for rows "
                f"{', '.join(map(str, rows[:10]))}{', ...' if rows.size > 10 else ''} of {x.shape[0]} "
                f"(finite inputs; an overflow at {engine.info.precision}?); use fp32 engines for these inputs"
            )
        return out


class ExportFolderBackend(ABC):
    """A backend over an export folder's engines; returns L2-normalised float32 (N, D).

    Subclasses set `name` and implement `_engine` (open one engine file in their runtime).
    """

    name: str

    def __init__(
        self,
        folder: str | Path | Manifest,
        device: str,
        precision: str,
        *,
        root: str | Path | None = None,
        verify_files: bool = False,
        engine_precision: str | None = None,
    ) -> None:
        """Read the manifest and pick the engines; nothing is opened until first use.

        Args:
            folder: the export folder, its manifest file, or an already read Manifest (with
                `root` = its folder).
            device: the device as the caller named it (recorded; the subclass interprets it).
            precision: the precision this backend reports.
            root: the export folder when `folder` is a Manifest.
            verify_files: check every engine's SHA-256 against the manifest before loading it.
            engine_precision: which engines to run, when not `precision` (OpenVINO runs bf16 on
                the fp32 engines).

        Raises:
            BackendError: no manifest, engines of that precision missing or with a bad batch size,
                projection file missing.
        """
        if isinstance(folder, Manifest):
            if root is None:
                raise InputError(f"{type(self).__name__}(manifest) needs root=<export folder>")
            self.manifest, self.root = folder, Path(root)
        else:
            self.manifest = read_manifest(folder)  # the folder, or its manifest file itself
            # The engines lie beside the manifest: a manifest path taken as the root looked for
            # "manifest.json/image_fp32_b1.onnx" and called the engines missing.
            self.root = Path(folder).parent if Path(folder).is_file() else Path(folder)
        # Engines open on first use, maybe hours later (a server): a re-export in between gave its
        # engines the old names back (docs/export.md: names), and one model's image embeddings met
        # another's text embeddings, silently. The manifest is replaced by a rename on every export.
        self._manifest_stamp = _file_stamp(self.root / MANIFEST_FILE)
        m = self.manifest
        for key in ("embed_dim", "image_size", "context_length"):
            value = getattr(m, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BackendError(
                    f'{self.root / MANIFEST_FILE}: "{key}" must be a positive integer, got {value!r}'
                )
        if m.text_projection is not None and not (
            isinstance(m.text_projection, dict) and isinstance(m.text_projection.get("file"), str)
        ):
            raise BackendError(
                f'{self.root / MANIFEST_FILE}: "text_projection" must be an object with a "file", '
                f"got {m.text_projection!r}"
            )
        engines = engine_precision or precision
        if engines not in m.precisions and engines != precision:
            raise BackendError(
                f"{self.root}: precision {precision} runs the {engines} engines, and this export has "
                f"none (has: {', '.join(m.precisions) or 'no engines'}); re-export with --precision {engines}"
            )
        if engines not in m.precisions:
            raise BackendError(
                f"{self.root}: no {engines} engines in this export (has: {', '.join(m.precisions) or 'no engines'}); "
                f"re-export with --precision {engines} or pick one of those"
            )
        self.device, self.precision, self.engine_precision = device, precision, engines
        self.embed_dim, self.image_size, self.context_length = m.embed_dim, m.image_size, m.context_length
        self._verify_files = verify_files
        text_arch = m.architecture.get("text") if isinstance(m.architecture, dict) else None
        vocab = text_arch.get("vocab_size") if isinstance(text_arch, dict) else None
        self.vocab_size: int | None = vocab if isinstance(vocab, int) and vocab > 0 else None
        self._projection = self._load_projection()
        for info in (e for e in m.engines if e.precision == engines):  # before select() sorts them
            # A batch of 0 or less made plan_batches loop forever or slice backwards; "8" or 2.5 failed
            # as a TypeError far from the manifest.
            if info.batch is not None and (
                isinstance(info.batch, bool) or not isinstance(info.batch, int) or info.batch < 1
            ):
                raise BackendError(
                    f'{self.root / MANIFEST_FILE}: engine {info.file!r}: "batch" must be a positive '
                    f"integer or null (dynamic), got {info.batch!r}; re-export it"
                )
            split = info.split_projection  # a truthy "yes" pooled image features as text token states
            if not isinstance(split, bool) or (split and info.tower != "text"):
                raise BackendError(
                    f'{self.root / MANIFEST_FILE}: engine {info.file!r} (tower {info.tower!r}): '
                    f'"split_projection" must be false, or true on a text engine, got {split!r}; re-export it'
                )
        self._image = _Tower(self, m.select("image", engines))
        self._text = _Tower(self, m.select("text", engines))
        for tower, label in ((self._image, "image"), (self._text, "text")):
            if not tower.fixed and tower.dynamic is None:
                raise BackendError(f"{self.root}: no {label} engine at {engines}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.root)!r}, device={self.device!r}, "
            f"precision={self.precision!r})"
        )

    @abstractmethod
    def _engine(self, path: Path, info: EngineInfo, projection: np.ndarray | None) -> FolderEngine:
        """Open one engine file (checked to exist and, if asked, its SHA-256) in the runtime."""

    def _load_projection(self) -> np.ndarray | None:
        spec = self.manifest.text_projection
        if not spec:
            return None
        path = self._member(spec["file"], "text_projection")
        if not path.is_file():
            raise BackendError(f"{path}: text projection listed in the manifest is missing")
        self._check_sha256(path, spec.get("sha256"))
        try:
            projection: np.ndarray = np.load(path).astype(np.float32)  # (W, D)
        except (OSError, ValueError, TypeError) as e:  # not a .npy, pickled objects, strings
            raise BackendError(f"{path}: the text projection cannot be read as a float array ({e})") from e
        # A (W, 16) file for a D = 32 manifest gave 16-wide text embeddings, a (W,) one 1-D output.
        recorded = spec.get("shape")
        width = recorded[0] if isinstance(recorded, list) and len(recorded) == 2 else None
        if projection.ndim != 2 or projection.shape[1] != self.embed_dim or width not in (None, projection.shape[0]):
            raise BackendError(
                f"{path}: the text projection is {projection.shape}, the manifest needs "
                f"({width or 'W'}, {self.embed_dim}); the file is not this export's, re-run the export"
            )
        return projection

    def _member(self, name: object, what: str) -> Path:
        """`root / name` for a plain file name: "../x.onnx" or "/abs/x.onnx" would load a file
        outside the folder, one its checksums were never taken over."""
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise BackendError(
                f'{self.root / MANIFEST_FILE}: {what} "file" must be a plain file name, got {name!r}'
            )
        return self.root / name

    def _open(self, info: EngineInfo) -> FolderEngine:
        if _file_stamp(self.root / MANIFEST_FILE) != self._manifest_stamp:
            raise BackendError(
                f"{self.root}: exported again since this backend read its manifest; its engine "
                f"{info.file!r} may now be another model's: load the folder again"
            )
        path = self._member(info.file, "engine")
        if not path.is_file():
            raise BackendError(f"{path}: engine listed in the manifest is missing; re-run the export")
        self._check_sha256(path, info.sha256)
        if info.external_data:  # the weights of a > 2 GB engine: as much a part of it as the graph
            self._check_sha256(self._member(info.external_data, "external_data"), info.external_data_sha256)
        engine = self._engine(path, info, self._projection)
        self._check_input_dims(engine, info)
        return engine

    def _check_input_dims(self, engine: FolderEngine, info: EngineInfo) -> None:
        """The loaded graph must take what the manifest says: an engine file from another export (a
        b4 engine listed as b8, a fixed-batch one listed as dynamic) failed inside the runtime at the
        first call, with an error naming no file."""
        dims = engine.input_dims()
        if dims is None:
            return
        size = self.image_size
        expected = [info.batch, 3, size, size] if info.tower == "image" else [info.batch, self.context_length]
        # A dynamic graph axis (None) takes any size; a fixed one must be the size listed (a fixed
        # graph batch listed as dynamic, None, is a mismatch too).
        if len(dims) != len(expected) or not all(d is None or d == e for d, e in zip(dims, expected, strict=True)):

            def show(shape: list[int | None]) -> str:
                return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"

            raise BackendError(
                f"{engine.path}: the graph takes {info.tower} input {show(dims)}, the manifest lists "
                f"{show(expected)}; the file is not this export's engine, re-run the export"
            )

    def _check_sha256(self, path: Path, expected: object) -> None:
        """With verify_files: the file must be the one the manifest recorded (engines, their external
        weights and the text projection alike; only engine graphs were checked before)."""
        if self._verify_files and (not path.is_file() or file_sha256(path) != expected):
            raise BackendError(f"{path}: SHA-256 differs from the manifest (file changed or corrupt)")

    def open_engines(self) -> None:
        """Open every engine of both towers now, not on first use: a long-lived process (the server,
        at start) then fails at once on a broken engine, and keeps running this export's engines
        after the folder is exported again (engines opened later would be refused then).

        Raises:
            BackendError: as the first use of an engine would.
        """
        self._image.open_all()
        self._text.open_all()

    def encode_images(self, pixels: FloatArray, *, normalize: bool = True) -> FloatArray:
        """(N, 3, H, W) float32 -> (N, D) float32, unit L2 norm (`normalize=False`: as the engine gives them).

        Raises:
            InputError: not float, not (N, 3, S, S), or NaN / infinite values (the rows are named).
        """
        arr = _host_array(pixels, "images", "float (N, 3, S, S)")
        if not np.issubdtype(arr.dtype, np.floating):  # uint8 would run un-normalised
            raise InputError(f"images must be float (preprocessed), got {arr.dtype}")
        x = np.ascontiguousarray(arr, dtype=np.float32)
        expected = (3, self.image_size, self.image_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise InputError(f"images must be (N, {', '.join(map(str, expected))}), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        # A NaN row came back as an all-zero "embedding" (l2_normalize keeps zero rows), and under
        # dynamic INT8 it moved the other rows of its batch too (one activation scale per batch).
        finite = np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)
            raise InputError(
                f"images contain NaN or infinite values (rows {', '.join(map(str, rows[:10]))}"
                f"{', ...' if rows.size > 10 else ''} of {x.shape[0]})"
            )
        features = self._image.run(x)
        return l2_normalize(features) if normalize else np.asarray(features, dtype=np.float32)

    def encode_texts(self, tokens: IntArray) -> FloatArray:
        """(N, L) int64 token ids -> (N, D) float32, unit L2 norm."""
        arr = _host_array(tokens, "tokens", f"integer (N, {self.context_length})")
        if not np.issubdtype(arr.dtype, np.integer):  # floats would be truncated
            raise InputError(f"tokens must be integer ids, got {arr.dtype}")
        x = np.ascontiguousarray(arr, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != self.context_length:
            raise InputError(f"tokens must be (N, {self.context_length}), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        # Negative ids would wrap around in the embedding Gather (a silently wrong text), ids past
        # the vocabulary fail inside the runtime with an error naming no input.
        if x.min() < 0 or (self.vocab_size is not None and x.max() >= self.vocab_size):
            raise InputError(
                f"token ids must be in [0, {self.vocab_size or 'vocab size'}), got {x.min()}..{x.max()}"
            )
        return l2_normalize(self._text.run(x))
