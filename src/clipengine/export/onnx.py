"""Export a CLIP module to ONNX engines (per tower, precision and batch size), verified against PyTorch.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). On torch 2.13 the
legacy TorchScript exporter still works but is deprecated and gives ~1.7x more nodes (Shape /
Gather / Constant chains for every view); the dynamo graphs are clean, static shapes stay static,
and `Dim("batch")` gives a real symbolic batch axis. EOT pooling is exported as Cast(int32) ->
ArgMax -> GatherND: ArgMax never sees int64 (unsupported by ORT's CUDA and TensorRT providers).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..files import atomic_write_bytes
from ..image.files import folder_images
from ..models.clip import VisionTransformer
from ..models.pooled import PooledTextTower, PooledVisionTransformer
from ..types import ImageInput
from . import quantize
from .manifest import (
    MANIFEST_FILE,
    PRECISIONS,
    EngineInfo,
    Manifest,
    Parity,
    TensorSpec,
    engine_file_name,
    file_sha256,
    projection_file_name,
    write_manifest,
)
from .verify import calibration_texts, check_parity, raise_on_failures, sample_images, sample_texts

if TYPE_CHECKING:
    from ..image.preprocess import PreprocessConfig
    from ..models.clip import CLIP

__all__ = ["DEFAULT_IMAGE_BATCHES", "DEFAULT_TEXT_BATCHES", "OPSET", "export_model"]

log = logging.getLogger(__name__)

DEFAULT_IMAGE_BATCHES = (1, 8, 16, 32)  # the seed's image engines
DEFAULT_TEXT_BATCHES = (4,)  # the seed's text engine
OPSET = 18  # LayerNormalization (17+) as one op; supported by ORT >= 1.14 and TensorRT 8.6+
_DYNAMIC_EXAMPLE_BATCH = 2  # example rows for dynamic export (1 would specialise the axis)
Progress = Callable[[str], None]
_WORK_PREFIX = ".export-"  # the work folder inside the export folder (same filesystem: renames)
_WORK_DIR = re.compile(re.escape(_WORK_PREFIX) + r"[a-z0-9_]{8}")  # as tempfile names it
_PARITY_REPORT_FILE = "parity_report.json"  # a failed export's manifest, under another name
_PREVIOUS_FILE = ".previous-engines.json"  # files of the export being replaced, until it is


class _ImageGraph(nn.Module):
    """(N, 3, H, W) float32 pixels -> (N, D) unnormalised image features.

    ViT towers export with the last block pruned to the class token (exact, ~7% fewer FLOPs in
    every runtime); ResNet towers as they are.
    """

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model
        self.pooled = PooledVisionTransformer(model.visual) if isinstance(model.visual, VisionTransformer) else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.pooled(pixels) if self.pooled is not None else self.model.encode_image(pixels)
        return features


class _TextGraph(nn.Module):
    """(N, L) int64 tokens -> (N, D) features (last block pruned to the EOT row, exact), or
    (N, L, W) token states when split."""

    def __init__(self, model: CLIP, split: bool) -> None:
        super().__init__()
        self.model, self.split = model, split
        self.pooled = PooledTextTower(model, prune=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.split:
            return self.model.encode_text_tokens(tokens)
        # EOT has the highest id; argmax over int32 keeps ORT's CUDA / TensorRT providers happy.
        eot = tokens.to(torch.int32).argmax(dim=-1)
        features: torch.Tensor = self.pooled(tokens, eot)
        return features


def _tower_bytes(model: CLIP, tower: str) -> int:
    params = model.visual.parameters() if tower == "image" else (
        p for n, p in model.named_parameters() if not n.startswith("visual.")
    )
    return sum(p.numel() * 4 for p in params)


def _export_graph(model: CLIP, tower: str, batch: int | None, split: bool, path: Path) -> str | None:
    """torch.onnx.export one tower to `path`; returns the external-data file name (models > 2 GB)."""
    cfg = model.config
    rows = batch or _DYNAMIC_EXAMPLE_BATCH
    if tower == "image":
        graph: nn.Module = _ImageGraph(model)
        size = cfg.vision.image_size
        example = torch.zeros(rows, 3, size, size)
        names = (["pixels"], ["embeddings"])
    else:
        graph = _TextGraph(model, split)
        example = torch.zeros(rows, cfg.text.context_length, dtype=torch.int64)
        example[:, 0], example[:, 1] = 49406, 49407  # SOT, EOT
        names = (["tokens"], ["token_states" if split else "embeddings"])
    dynamic: tuple[dict[int, Any], ...] | None = None
    if batch is None:  # dynamic batch; text also a dynamic length, so runtimes can stop after the last EOT
        axes: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=65536)}
        if tower == "text":
            axes[1] = torch.export.Dim("length", min=2, max=cfg.text.context_length)
        dynamic = (axes,)
    with warnings.catch_warnings():
        # torch 2.13's own exporter trips its own deprecation (torch.utils._pytree's LeafSpec) once
        # per graph: noise for the user, nothing they could act on.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.onnx.export(
            graph.eval(), (example,), None, input_names=names[0], output_names=names[1],
            opset_version=OPSET, dynamo=True, dynamic_shapes=dynamic, verbose=False, optimize=True,
        )
    assert program is not None  # dynamo=True always returns the ONNXProgram
    return quantize.save_onnx(program.model_proto, path)


def _tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dtypes = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT16: "float16"}

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        shape: list[int | str] = [d.dim_param or d.dim_value for d in t.shape.dim]
        return TensorSpec(name=v.name, shape=shape, dtype=dtypes.get(t.elem_type, str(t.elem_type)))

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def _tool_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for dist in ("clipengine", "torch", "onnx", "onnxruntime", "onnxscript", "onnxconverter-common"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _calibration_pixels(images: Any, cfg: PreprocessConfig) -> np.ndarray | None:
    """Calibration images -> (N, 3, H, W): a folder (listed as `embed` lists one), a list of image
    inputs, or an array as is."""
    if images is None:
        return None
    if isinstance(images, np.ndarray):
        return images.astype(np.float32)
    from ..image.preprocess import preprocess

    if isinstance(images, (str, Path)):
        images = folder_images(images, "calibration_images")
    return np.stack([preprocess(source, cfg) for source in images]).astype(np.float32)


def _listed_files(folder: Path) -> set[str]:
    """Files an existing manifest in `folder` lists (engines, their data, the projection)."""
    from ..errors import BackendError
    from .manifest import read_manifest

    if not (folder / MANIFEST_FILE).is_file():
        return set()
    try:
        m = read_manifest(folder)
    except BackendError:
        return set()
    names = {e.file for e in m.engines} | {e.external_data for e in m.engines if e.external_data}
    if m.text_projection:
        names.add(m.text_projection["file"])
    return _plain_names(names)


def _plain_names(names: Iterable[object]) -> set[str]:
    """Plain file names only, never paths elsewhere."""
    return {n for n in names if isinstance(n, str) and n and Path(n).name == n}


def _begin_rewrite(out: Path) -> set[str]:
    """Unpublish `out`'s manifest and clear what a killed export left; return the files to replace.

    The files the old manifest listed are noted in `_PREVIOUS_FILE` before the manifest goes, so an
    export killed midway still leaves the next one the list of engines to remove once it succeeds.
    """
    noted = out / _PREVIOUS_FILE
    previous = _listed_files(out)
    try:
        previous |= _plain_names(json.loads(noted.read_text(encoding="utf-8")))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError) as e:  # damaged: only some old engines stay behind
        log.warning("ignoring %s (%s)", noted, e)
    atomic_write_bytes(noted, json.dumps(sorted(previous)).encode())
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a half-rewritten folder must not look complete
    for work in out.iterdir():  # the work folders of exports killed before their cleanup ran
        if _WORK_DIR.fullmatch(work.name) and work.is_dir():
            shutil.rmtree(work, ignore_errors=True)
    return previous


def _batch_list(batches: Sequence[int] | None) -> list[int | None]:
    """Fixed batch sizes, or [None] for one dynamic-batch engine."""
    return [int(b) for b in batches] if batches else [None]


def _move(work: Path, out: Path, names: Sequence[str | None]) -> None:
    """Rename finished files into the export folder (weights data before the graph that needs it)."""
    for name in reversed([n for n in names if n]):
        shutil.move(str(work / name), str(out / name))  # same filesystem: an atomic rename


def export_model(
    module: CLIP,
    out_dir: str | Path,
    *,
    precisions: Sequence[str] = ("fp32",),
    image_batches: Sequence[int] | None = DEFAULT_IMAGE_BATCHES,
    text_batches: Sequence[int] | None = DEFAULT_TEXT_BATCHES,
    split_text_projection: bool = False,
    calibration_images: str | Path | Sequence[ImageInput] | np.ndarray | None = None,
    sample_images_from: str | Path | Sequence[ImageInput] | None = None,
    model_name: str | None = None,
    pretrained: str | None = None,
    preprocess_cfg: PreprocessConfig | None = None,
    verify: bool = True,
    progress: Progress | None = None,
) -> Manifest:
    """Export both towers of `module` to ONNX engines in `out_dir` and verify each one.

    Args:
        module: an fp32 CLIP (a copy is exported; the module is not changed).
        out_dir: the export folder (created); an old manifest.json there is removed first.
        precisions: any of "fp32", "fp16", "int8".
        image_batches / text_batches: fixed batch sizes, or None for one dynamic-batch engine.
        split_text_projection: the text graph returns (N, L, W) token states and the (W, D)
            projection is saved as `text_projection_<W>_<D>.npy` (the seed's layout).
        calibration_images: a folder, image inputs or (N, 3, H, W) pixels: INT8 image engines are
            then quantized statically (QDQ) with these; otherwise dynamically.
        sample_images_from: a folder or image inputs: extra verification images (each adds 4 views:
            as is, mirrored, cropped, grayscale) beside random and synthetic ones.
            A folder (either argument) is listed as `clipengine embed` lists one
            (`image.files.walk_images`: recursive, sorted, hidden files and non-images skipped).
        model_name / pretrained / preprocess_cfg: recorded in the manifest.
        verify: compare every engine with the fp32 PyTorch reference (strongly recommended).
        progress: called with one line per step (the CLI prints them).

    Returns:
        The manifest written to `out_dir/manifest.json`.

    Raises:
        ExportParityError: an engine misses its precision's bound (see verify.BOUNDS); the message
            names each engine and its measured error; `parity_report.json` holds the details.
        DatasetError: a calibration or sample folder is not a folder or holds no images.
    """
    from ..image.preprocess import PreprocessConfig

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    started = time.perf_counter()
    say = progress or (lambda line: log.info("%s", line))
    model = copy.deepcopy(module).float().eval()
    cfg = model.config
    pre = preprocess_cfg or PreprocessConfig(image_size=cfg.vision.image_size)
    # Sample and calibration images first: a bad one fails the export before the folder changes.
    if isinstance(sample_images_from, (str, Path)):
        sample_images_from = folder_images(sample_images_from, "sample_images_from")
    samples: dict[str, np.ndarray] = {"image": sample_images(pre, sample_images_from), "text": sample_texts(cfg.text.context_length)}
    with torch.no_grad():
        reference: dict[str, np.ndarray] = {
            "image": model.encode_image(torch.from_numpy(samples["image"])).numpy(),
            "text": model.encode_text(torch.from_numpy(samples["text"])).numpy(),
        }
    calibration: dict[str, np.ndarray | None] = {"image": _calibration_pixels(calibration_images, pre), "text": None}
    if calibration["image"] is not None:
        calibration["text"] = calibration_texts(cfg.text.context_length)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = _begin_rewrite(out)
    projection: dict[str, Any] | None = None
    if split_text_projection:
        w, d = model.text_projection.shape
        projection = {"file": projection_file_name(w, d), "shape": [w, d]}

    engines: list[EngineInfo] = []
    with tempfile.TemporaryDirectory(prefix=_WORK_PREFIX, dir=out) as tmp:
        work = Path(tmp)
        if projection is not None:
            np.save(work / projection["file"], model.text_projection.detach().numpy().astype(np.float32))
            projection["sha256"] = file_sha256(work / projection["file"])
        batches = {"image": _batch_list(image_batches), "text": _batch_list(text_batches)}
        for tower in ("image", "text"):
            for batch in batches[tower]:
                engines += _build_engines(
                    model, tower, batch, precisions, split_text_projection and tower == "text",
                    work, out, samples[tower], reference[tower], calibration[tower], verify, say,
                )
        engines.sort(key=lambda e: (e.tower != "image", e.batch is None, e.batch or 0, PRECISIONS.index(e.precision)))
        failed = [e for e in engines if e.parity is not None and not e.parity.passed]
        if projection is not None and not failed:
            _move(work, out, [projection["file"]])

    manifest = Manifest(
        model=model_name or cfg.name,
        pretrained=pretrained,
        architecture=cfg.to_dict(),
        preprocess=pre.to_dict(),
        context_length=cfg.text.context_length,
        logit_scale=float(model.logit_scale.detach().exp()),
        embed_dim=cfg.embed_dim,
        image_size=cfg.vision.image_size,
        engines=engines,
        text_projection=projection,
        tool_versions=_tool_versions(),
        export_seconds=round(time.perf_counter() - started, 2),
    )
    if failed:
        # Straight to the report's name: a manifest.json, even for a moment, would publish engines
        # that failed and never landed as a complete export.
        write_manifest(manifest, out, name=_PARITY_REPORT_FILE)
        raise_on_failures(engines, out)
    write_manifest(manifest, out)
    current = _listed_files(out)
    for stale in sorted(previous - current):  # engines of an earlier export that this one replaced
        (out / stale).unlink(missing_ok=True)
    (out / _PREVIOUS_FILE).unlink(missing_ok=True)
    (out / _PARITY_REPORT_FILE).unlink(missing_ok=True)  # an earlier failed export's: not about this one
    say(f"wrote {out / MANIFEST_FILE} ({len(engines)} engines, {manifest.export_seconds:.1f} s)")
    return manifest


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _openvino_parity(
    path: Path, info: EngineInfo, inputs: np.ndarray, reference: np.ndarray, projection: np.ndarray | None
) -> dict[str, Parity]:
    """The engine measured under OpenVINO on CPU, configured as the openvino backend runs it
    ("openvino"); fp32 engines also computed in bf16 ("openvino-bf16", bound cos >= 0.999)."""
    import openvino as ov

    from ..backends.openvino_backend import OpenVinoEngine, openvino_config

    core = ov.Core()
    runs = {"openvino": info.precision} | ({"openvino-bf16": "bf16"} if info.precision == "fp32" else {})
    result = {}
    for key, precision in runs.items():
        _, config = openvino_config(precision)
        engine = OpenVinoEngine(path, info, core, "CPU", config, projection)
        result[key] = check_parity(engine, inputs, reference, precision)
        del engine
    return result


def _build_engines(
    model: CLIP,
    tower: str,
    batch: int | None,
    precisions: Sequence[str],
    split: bool,
    work: Path,
    out: Path,
    inputs: np.ndarray,
    reference: np.ndarray,
    calibration: np.ndarray | None,
    verify: bool,
    say: Progress,
) -> list[EngineInfo]:
    """Export one tower at one batch size in fp32, derive the other precisions, verify, move in."""
    from ..backends.onnx_backend import OnnxEngine

    fp32 = work / engine_file_name(tower, "fp32", batch)
    label = f"{tower} {'dynamic batch' if batch is None else f'batch {batch}'}"
    t0 = time.perf_counter()
    fp32_data = _export_graph(model, tower, batch, split, fp32)
    say(f"exported {label} in {time.perf_counter() - t0:.1f} s")
    projection_path = work / projection_file_name(*model.text_projection.shape)
    projection = np.load(projection_path) if split else None
    engines = []
    # fp32 last: its file is moved into the folder once verified, and the others are derived from it.
    for precision in sorted(precisions, key=lambda p: p == "fp32"):
        path = work / engine_file_name(tower, precision, batch)
        data, quant = fp32_data, None
        if precision == "fp16":
            data = quantize.convert_fp16(fp32, path)
        elif precision == "int8":
            input_name = "pixels" if tower == "image" else "tokens"
            quant, data = quantize.quantize_int8(
                fp32, path, calibration=calibration, input_name=input_name, batch=batch
            )
        elif precision == "int8w":
            quant, data = quantize.quantize_weights_int8(fp32, path)
        inputs_spec, outputs_spec = _tensor_specs(path)
        info = EngineInfo(
            tower=tower, precision=precision, batch=batch, file=path.name, sha256=file_sha256(path),
            inputs=inputs_spec, outputs=outputs_spec, split_projection=split, quantization=quant,
            external_data=data, external_data_sha256=file_sha256(work / data) if data else None,
        )
        if verify:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            engine = OnnxEngine(path, info, ["CPUExecutionProvider"], options, projection)
            info = replace(info, parity=check_parity(engine, inputs, reference))
            del engine
            p = info.parity
            assert p is not None
            say(f"  {path.name}: max-abs {p.max_abs:.2e}, min cos {p.min_cos:.6f} "
                f"{'ok' if p.passed else 'FAILED'}")
            if p.passed and openvino_installed():
                info = replace(info, runtime_parity=_openvino_parity(path, info, inputs, reference, projection))
                for key, q in info.runtime_parity.items():
                    say(f"  {path.name} under {key}: max-abs {q.max_abs:.2e}, min cos {q.min_cos:.6f} "
                        f"{'ok' if q.passed else 'FAILED (the openvino backend will refuse it)'}")
        if info.parity is None or info.parity.passed:
            _move(work, out, [path.name, data])
        engines.append(info)
    return engines
