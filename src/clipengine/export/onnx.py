"""Export a CLIP module to ONNX engines (per tower, precision and batch size), verified against PyTorch.

The graph of each tower and the exporter call live in `export.graphs`; how the folder is rewritten
safely (work folder, names that change no published file, the manifest as the commit, stale engines)
in `export.rewrite`.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..image.files import folder_images
from ..types import ImageInput
from . import quantize, rewrite
from .graphs import OPSET, export_graph, tensor_specs
from .manifest import (
    MANIFEST_FILE,
    PRECISIONS,
    EngineInfo,
    Manifest,
    Parity,
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
Progress = Callable[[str], None]


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
        return _checked_pixels(images, cfg.image_size)
    from ..image.preprocess import preprocess

    if isinstance(images, (str, Path)):
        images = folder_images(images, "calibration_images")
    pixels = [preprocess(source, cfg) for source in images]
    if not pixels:  # np.stack's "need at least one array to stack" named nothing
        raise ValueError("calibration_images: no images given; give some, or None for dynamic INT8")
    return np.stack(pixels).astype(np.float32)


def _checked_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """Calibration pixels as given: (N >= 1, 3, size, size), float, finite. Zero rows calibrated the
    int8 engine on zero pixels (fixed batch) or failed inside ORT (dynamic); another shape failed
    in ORT's calibration run after the fp32 graph was exported; uint8 0-255 gave scales for
    pixels the engine never sees."""
    expected = f"(N, 3, {size}, {size}) float pixels, as the model's preprocessing gives them"
    if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size) or len(pixels) == 0:
        raise ValueError(f"calibration_images: shape {pixels.shape}; expected {expected} (N >= 1), or images")
    if not np.issubdtype(pixels.dtype, np.floating):
        raise ValueError(f"calibration_images: dtype {pixels.dtype}; expected {expected}, or images")
    if not np.isfinite(pixels).all():
        rows = sorted({int(r) for r in np.nonzero(~np.isfinite(pixels))[0]})
        raise ValueError(f"calibration_images: rows {rows[:10]} hold NaN or infinity")
    return pixels.astype(np.float32)


def _batch_list(batches: Sequence[int] | None, name: str) -> list[int | None]:
    """Fixed batch sizes (ascending, each once), or [None] for one dynamic-batch engine.

    An empty list used to mean dynamic and a repeated size exported the same engine twice; 0, -1
    or 1.5 failed deep inside torch.export (or was truncated).
    """
    if batches is None:
        return [None]
    if (
        isinstance(batches, (str, bytes))
        or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in batches)
        or not batches
    ):
        raise ValueError(f"{name}={batches!r}: give positive integer batch sizes, or None for dynamic")
    sizes: list[int | None] = [int(b) for b in sorted(set(batches))]
    return sizes


def require_tools(precisions: Sequence[str], verify: bool) -> None:
    """Raise ModuleNotFoundError (the CLI names the extra to install) for a tool this export needs
    and lacks, before the folder is made: onnxruntime was found missing only after the first
    graph's torch.export (minutes for a large model). The CLI calls it before the model loads too."""
    needed = ["onnx", "onnxscript"]  # every graph: torch.onnx.export(dynamo=True), then onnx to read it
    needed += ["onnxruntime"] if verify or "int8" in precisions else []  # the parity runs; its quantizer
    needed += ["onnxconverter_common"] if "fp16" in precisions else []
    for name in needed:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r} (needed to export {', '.join(precisions)})", name=name)


def _refuse_unused_images(precisions: Sequence[str], verify: bool, calibration: object, samples: object) -> None:
    """ValueError for images this export would not use: they were dropped without a word, so a
    caller believed its int8 engines were calibrated on them, or its engines checked on them."""
    if calibration is not None and "int8" not in precisions:
        raise ValueError(
            f"calibration_images calibrate int8 engines (static INT8), and precisions {', '.join(precisions)} "
            "hold none: add 'int8' or leave calibration_images out"
        )
    if samples is not None and not verify:
        raise ValueError(
            "sample_images_from adds images to the parity check, which verify=False skips: "
            "leave one of them out"
        )


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
        out_dir: the export folder (created). An export published there stays so, whole, until the
            new manifest replaces it; an engine whose bytes differ from the published one of the
            same name gets a content-tagged name (`image_fp32_dyn.3f2a9c1b.onnx`): read file
            names from the manifest.
        precisions: any of "fp32", "fp16", "int8", "int8w".
        image_batches / text_batches: fixed batch sizes, or None for one dynamic-batch engine.
        split_text_projection: the text graph returns (N, L, W) token states and the (W, D)
            projection is saved as `text_projection_<W>_<D>.npy` (the seed's layout).
        calibration_images: a folder, image inputs or (N, 3, H, W) pixels: INT8 image engines are
            then quantized statically (QDQ) with these; otherwise dynamically. Only with "int8".
        sample_images_from: a folder or image inputs: extra verification images (each adds 4 views:
            as is, mirrored, cropped, grayscale) beside random and synthetic ones. Only with verify.
            A folder (either argument) is listed as `clipengine embed` lists one
            (`image.files.walk_images`: recursive, sorted, hidden files and non-images skipped).
        model_name / pretrained / preprocess_cfg: recorded in the manifest (preprocess_cfg's image
            size must be the model's).
        verify: compare every engine with the fp32 PyTorch reference (strongly recommended).
        progress: called with one line per step (the CLI prints them).

    Returns:
        The manifest written to `out_dir/manifest.json`.

    Raises:
        ExportParityError: an engine misses its precision's bound (see verify.BOUNDS); the message
            names each engine and its measured error; `parity_report.json` holds the details.
        DatasetError: a calibration or sample folder is not a folder or holds no images.
        ValueError: an unknown precision or bad batch sizes; calibration images without "int8", or
            sample images with verify=False (they would go unused); calibration pixels not shaped
            (N, 3, S, S) float; a preprocess_cfg for another image size.
        ModuleNotFoundError: a tool this export needs (onnxruntime, onnxscript, ...) is not
            installed; raised before anything is exported or the folder is made.
    """
    from ..image.preprocess import PreprocessConfig

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    precisions = list(dict.fromkeys(precisions))  # ("fp32", "fp32") built and listed each engine twice
    _refuse_unused_images(precisions, verify, calibration_images, sample_images_from)
    require_tools(precisions, verify)
    batches = {
        "image": _batch_list(image_batches, "image_batches"),
        "text": _batch_list(text_batches, "text_batches"),
    }
    started = time.perf_counter()
    say = progress or (lambda line: log.info("%s", line))
    model = copy.deepcopy(module).float().eval()
    cfg = model.config
    pre = preprocess_cfg or PreprocessConfig(image_size=cfg.vision.image_size)
    if pre.image_size != cfg.vision.image_size:  # was torch's "size of tensor a (65) must match ... (17)"
        raise ValueError(
            f"preprocess_cfg.image_size={pre.image_size}, but the model takes {cfg.vision.image_size} px images: "
            "give the model's preprocessing, or None for its default"
        )
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
    rewrite.remove_stale_work(out)
    placement = rewrite.Placement(out)  # names under which moving the new files in changes no file there
    projection: dict[str, Any] | None = None
    if split_text_projection:
        w, d = model.text_projection.shape
        projection = {"file": projection_file_name(w, d), "shape": [w, d]}

    engines: list[EngineInfo] = []
    previous: set[str] = set()  # the files of the export this one replaces (rewrite.begin_rewrite)
    with tempfile.TemporaryDirectory(prefix=rewrite.WORK_PREFIX, dir=out) as tmp:
        work = Path(tmp)
        if projection is not None:
            np.save(work / projection["file"], model.text_projection.detach().numpy().astype(np.float32))
            projection["file"], _ = placement.place(work, projection["file"], None, "text_projection")
            projection["sha256"] = file_sha256(work / projection["file"])
        for tower in ("image", "text"):
            for batch in batches[tower]:
                engines += _build_engines(
                    model, tower, batch, precisions, projection["file"] if projection and tower == "text" else None,
                    work, placement, samples[tower], reference[tower], calibration[tower], verify, say,
                )
        engines.sort(key=lambda e: (e.tower != "image", e.batch is None, e.batch or 0, PRECISIONS.index(e.precision)))
        failed = [e for e in engines if e.parity is not None and not e.parity.passed]
        if not failed:
            # Only now does the folder change: a failed export leaves the previous one published.
            names = [n for e in engines for n in (e.file, e.external_data)]
            names.append(projection["file"] if projection else None)
            previous = rewrite.begin_rewrite(out, work, names)
            rewrite.move_files(work, out, names)

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
        # that failed and never landed. The previous export's manifest and engines stay as they were.
        write_manifest(manifest, out, name=rewrite.PARITY_REPORT_FILE)
        raise_on_failures(engines, out)
    write_manifest(manifest, out)
    rewrite.finish_rewrite(out, previous)
    say(f"wrote {out / MANIFEST_FILE} ({len(engines)} engines, {manifest.export_seconds:.1f} s)")
    return manifest


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _openvino_parity(
    path: Path,
    info: EngineInfo,
    inputs: np.ndarray,
    reference: np.ndarray,
    projection: np.ndarray | None,
    say: Progress,
) -> dict[str, Parity]:
    """The engine measured under OpenVINO on CPU, configured as the openvino backend runs it
    ("openvino"); fp32 engines also computed in bf16 ("openvino-bf16", bound cos >= 0.999) where
    this CPU computes bf16."""
    import openvino as ov

    from ..backends.openvino_backend import OpenVinoEngine, openvino_config

    core = ov.Core()
    runs = {"openvino": info.precision} | ({"openvino-bf16": "bf16"} if info.precision == "fp32" else {})
    result = {}
    for key, precision in runs.items():
        _, config = openvino_config(precision)
        engine = OpenVinoEngine(path, info, core, "CPU", config, projection)
        computed = engine.inference_precision
        if key == "openvino-bf16" and computed != "bf16":
            # OpenVINO ignores the bf16 hint on a CPU without bf16 (x86 without AVX-512, ARM) and
            # computes in f32: recorded as bf16's deviation, a bf16 CPU would trust an f32 figure.
            say(f"  {path.name} under {key}: not measured (OpenVINO computes {computed} on this CPU)")
            continue
        result[key] = check_parity(engine, inputs, reference, precision)
        del engine
    return result


def _build_engines(
    model: CLIP,
    tower: str,
    batch: int | None,
    precisions: Sequence[str],
    projection_file: str | None,
    work: Path,
    placement: rewrite.Placement,
    inputs: np.ndarray,
    reference: np.ndarray,
    calibration: np.ndarray | None,
    verify: bool,
    say: Progress,
) -> list[EngineInfo]:
    """Export one tower at one batch size in fp32, derive the other precisions and verify them, in
    `work`, each under the name `placement` gives it (`projection_file`: split text tower's projection)."""
    from ..backends.onnx_backend import OnnxEngine

    split = projection_file is not None
    fp32 = work / engine_file_name(tower, "fp32", batch)
    label = f"{tower} {'dynamic batch' if batch is None else f'batch {batch}'}"
    t0 = time.perf_counter()
    fp32_data = export_graph(model, tower, batch, split, fp32)
    say(f"exported {label} in {time.perf_counter() - t0:.1f} s")
    projection = np.load(work / projection_file) if projection_file is not None else None
    engines = []
    # fp32 last: the others are derived from its file.
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
        # Its name in the folder (fp32 comes last: the others were derived from it by its own name).
        name, data = placement.place(work, path.name, data, (tower, precision, batch))
        path = work / name
        inputs_spec, outputs_spec = tensor_specs(path)
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
                info = replace(info, runtime_parity=_openvino_parity(path, info, inputs, reference, projection, say))
                for key, q in info.runtime_parity.items():
                    say(f"  {path.name} under {key}: max-abs {q.max_abs:.2e}, min cos {q.min_cos:.6f} "
                        f"{'ok' if q.passed else 'FAILED (the openvino backend will refuse it)'}")
        engines.append(info)
    return engines
