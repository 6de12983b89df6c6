"""The export folder's `manifest.json`: what was built, from what, and how well each engine matches.

NumPy-free and torch-free so the ONNX Runtime path can read it anywhere. Layout of a folder:

    models/ViT-B-32/
      manifest.json
      image_fp32_b1.onnx  image_fp32_b8.onnx ...   (or image_fp32_dyn.onnx)
      text_fp32_b4.onnx                            (or text_fp32_dyn.onnx)
      text_projection_512_512.npy                  (only with split_projection)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendError
from ..files import atomic_path

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "PRECISIONS",
    "PREVIOUS_FILE",
    "TOWERS",
    "WORK_PREFIX",
    "EngineInfo",
    "Manifest",
    "Parity",
    "TensorSpec",
    "atomic_path",
    "engine_file_name",
    "file_sha256",
    "projection_file_name",
    "read_manifest",
    "unfinished_export",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"
# What an export writes before its manifest (export.rewrite): its work folder, and its note of the
# files it moves in. Left behind, they mark an export that did not finish.
WORK_PREFIX = ".export-"
PREVIOUS_FILE = ".previous-engines.json"
MANIFEST_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8", "int8w")  # int8w: int8 weights only (activations at run time)
TOWERS = ("image", "text")


def engine_file_name(tower: str, precision: str, batch: int | None) -> str:
    """`image_fp16_b8.onnx`, `text_fp32_dyn.onnx` (batch None = dynamic batch axis)."""
    return f"{tower}_{precision}_{'dyn' if batch is None else f'b{batch}'}.onnx"


def projection_file_name(width: int, embed_dim: int) -> str:
    """`text_projection_<W>_<D>.npy`, the seed's name for the split-off text projection."""
    return f"text_projection_{width}_{embed_dim}.npy"


def _known_fields(cls: Any, d: dict[str, Any], where: str) -> dict[str, Any]:
    """The entries of `d` that `cls` has fields for (unknown ones, from newer writers, are
    dropped); a missing required field is named, not reported as a constructor's TypeError."""
    fields = cls.__dataclass_fields__
    required = [n for n, f in fields.items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in d]
    if missing:
        raise KeyError(f"{where} lacks {', '.join(repr(n) for n in missing)}")
    return {k: v for k, v in d.items() if k in fields}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; a str in `shape` is a symbolic (dynamic) axis."""

    name: str
    shape: list[int | str]
    dtype: str  # numpy dtype name: "float32", "int64"


@dataclass(frozen=True)
class Parity:
    """An engine compared with the fp32 PyTorch reference on L2-normalised embeddings."""

    max_abs: float  # largest |engine - reference| over all samples and dims
    min_cos: float  # lowest cosine between engine and reference rows
    bound: dict[str, float]  # {"max_abs": 1e-4} or {"min_cos": 0.999}
    passed: bool
    samples: int = 0  # rows compared


@dataclass(frozen=True)
class EngineInfo:
    """One ONNX file: a tower at one precision and batch size."""

    tower: str  # "image" | "text"
    precision: str  # "fp32" | "fp16" | "int8"
    batch: int | None  # fixed batch size, None = dynamic
    file: str  # relative to the folder
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    split_projection: bool = False  # text only: graph returns (N, L, W) token states
    quantization: str | None = None  # int8 only: "dynamic" | "static"
    external_data: str | None = None  # weights file beside `file` for models > 2 GB
    external_data_sha256: str | None = None
    parity: Parity | None = None  # measured under ONNX Runtime (CPU): the export's gate
    # Also measured under other runtimes when installed at export time, keyed "openvino" (the
    # engine's own precision) and "openvino-bf16" (fp32 engines computed in bf16); informative:
    # the OpenVINO backend refuses an engine whose entry failed.
    runtime_parity: dict[str, Parity] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineInfo:
        d = dict(d)
        where = f"engine {d.get('file', '?')!r}"
        d["inputs"] = [TensorSpec(**_known_fields(TensorSpec, t, where)) for t in d.get("inputs", [])]
        d["outputs"] = [TensorSpec(**_known_fields(TensorSpec, t, where)) for t in d.get("outputs", [])]
        if d.get("parity") is not None:
            d["parity"] = Parity(**_known_fields(Parity, d["parity"], f"{where} parity"))
        d["runtime_parity"] = {
            k: Parity(**_known_fields(Parity, v, f"{where} runtime_parity"))
            for k, v in (d.get("runtime_parity") or {}).items()
        }
        return cls(**_known_fields(cls, d, where))


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs besides the ONNX files: model identity, preprocessing, engines."""

    model: str  # architecture / model name, e.g. "ViT-B-32"
    pretrained: str | None  # weights tag ("openai", "laion2b_s34b_b79k") or None (custom checkpoint)
    architecture: dict[str, Any]  # CLIPConfig.to_dict()
    preprocess: dict[str, Any]  # PreprocessConfig.to_dict()
    context_length: int  # L
    logit_scale: float  # the multiplier exp(module.logit_scale), e.g. 100.0
    embed_dim: int  # D
    image_size: int  # H == W
    engines: list[EngineInfo]
    text_projection: dict[str, Any] | None = None  # {"file", "sha256", "shape": [W, D]} when split
    tool_versions: dict[str, str] = field(default_factory=dict)
    export_seconds: float | None = None
    format_version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["engines"] = [EngineInfo.from_dict(e) for e in d.get("engines", [])]
        return cls(**_known_fields(cls, d, "the manifest"))

    def select(self, tower: str, precision: str) -> list[EngineInfo]:
        """Engines of one tower and precision, fixed batches ascending, dynamic last."""
        found = [e for e in self.engines if e.tower == tower and e.precision == precision]
        return sorted(found, key=lambda e: (e.batch is None, e.batch or 0))

    @property
    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if any(e.precision == p for e in self.engines)]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(manifest: Manifest, folder: str | Path, name: str = MANIFEST_FILE) -> Path:
    """Write `folder/manifest.json` (or `folder/name`) atomically (readers never see a half-written file)."""
    final = Path(folder) / name
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return final


def unfinished_export(folder: Path) -> list[str]:
    """What an export killed before its manifest's rename left in `folder` (none: []): a folder
    without a manifest that is one export short of being an export folder."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(WORK_PREFIX) or p.name == PREVIOUS_FILE)


def read_manifest(folder: str | Path) -> Manifest:
    """Read `folder/manifest.json` (or the manifest file itself).

    Raises:
        BackendError: no manifest, unreadable JSON, or a newer format than this version reads.
    """
    path = Path(folder)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        if left := unfinished_export(path.parent):
            raise BackendError(
                f"{path}: missing: an export into {path.parent} did not finish (it left {', '.join(left)}); "
                "re-run `clipengine export` into it, which completes it and removes those"
            )
        raise BackendError(f"{path}: no export manifest here; create one with `clipengine export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got a JSON {type(data).__name__}")
        manifest = Manifest.from_dict(data)
        version = manifest.format_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise TypeError(f"format_version must be a positive integer, got {version!r}")
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # ValueError: not UTF-8 / not JSON
        reason = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() quotes it
        raise BackendError(f"{path}: not a valid clipengine export manifest ({reason}); re-export it") from e
    if manifest.format_version > MANIFEST_VERSION:
        raise BackendError(
            f"{path}: manifest format {manifest.format_version} is newer than this clipengine reads "
            f"({MANIFEST_VERSION}); upgrade clipengine"
        )
    return manifest
