"""Parity of exported engines against the fp32 PyTorch reference: samples, measurements, bounds.

Torch-free: the caller computes the reference embeddings; this module builds the sample inputs,
compares L2-normalised outputs and decides pass/fail per precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportParityError
from ..types import FloatArray, ImageInput, IntArray
from .manifest import MANIFEST_FILE, EngineInfo, Parity, file_sha256, read_manifest

__all__ = [
    "BOUNDS",
    "SAMPLE_TEXTS",
    "calibration_texts",
    "check_parity",
    "image_variants",
    "measure_parity",
    "raise_on_failures",
    "sample_images",
    "sample_texts",
    "verify_folder",
]

# Bounds on L2-normalised embeddings. INT8 0.99: met with a wide margin on random weights (0.9998
# on ViT-B/32, see docs/export.md); real checkpoints with activation outliers sit closer to it.
BOUNDS: dict[str, dict[str, float]] = {
    "fp32": {"max_abs": 1e-4},
    "fp16": {"min_cos": 0.999},
    "int8": {"min_cos": 0.99},
    "int8w": {"min_cos": 0.99},  # int8 weights; OpenVINO quantizes activations per token group
    "bf16": {"min_cos": 0.999},  # fp32 engines computed in bf16 by the runtime (OpenVINO's hint)
}

# Real captions of varied length (3 to ~40 tokens) so EOT pooling is checked at many positions.
SAMPLE_TEXTS = (
    "a photo of a cat",
    "a diagram",
    "a dog",
    "an illustration of a red double-decker bus driving past a crowded market on a rainy afternoon",
    "a close-up photo of a person's hand holding a cup of coffee, shot on film with shallow depth of field",
    "satellite imagery of farmland",
    "CLIP",
    "a black and white photo of the skyline of a large city at night, with many lit windows and a bridge",
)


def sample_texts(context_length: int = 77) -> IntArray:
    """SAMPLE_TEXTS tokenized: (8, L) int64."""
    from ..text.tokenizer import tokenize

    return tokenize(list(SAMPLE_TEXTS), context_length=context_length)


def calibration_texts(context_length: int = 77, n: int = 64) -> IntArray:
    """(n, L) tokens of zero-shot prompts (CIFAR-100 classes x templates), disjoint from SAMPLE_TEXTS."""
    import json
    from importlib import resources

    from ..text.tokenizer import tokenize

    prompts = json.loads(resources.files("clipengine.eval").joinpath("prompts/zeroshot_prompts.json").read_text())
    classes, templates = prompts["CIFAR100"]["classes"], prompts["CIFAR100"]["templates"]
    texts = [templates[i % len(templates)].format(classes[(7 * i) % len(classes)]) for i in range(n)]
    return tokenize(texts, context_length=context_length)


def image_variants(img: Any) -> list[Any]:
    """An image, its mirror, its top-left quarter and its grayscale: four views per sample file."""
    from PIL import ImageOps

    img = img.convert("RGB")
    w, h = img.size
    return [
        img,
        ImageOps.mirror(img),
        img.crop((0, 0, max(1, w // 2), max(1, h // 2))),
        ImageOps.grayscale(img).convert("RGB"),
    ]


def _synthetic(size: int, rng: np.random.Generator) -> list[Any]:
    """Structured images (gradient, checkerboard, blobs) that stress other paths than pure noise."""
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    gradient = np.stack([xx, yy, 1 - xx], axis=-1)
    checker = np.kron((np.indices((8, 8)).sum(0) % 2), np.ones((size // 8 + 1, size // 8 + 1)))[:size, :size]
    blobs = rng.uniform(0, 1, (size // 4 + 1, size // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:size, :size]
    arrays = [gradient, np.repeat(checker[..., None], 3, axis=-1), blobs]
    return [Image.fromarray((a * 255).astype(np.uint8)) for a in arrays]


def sample_images(
    preprocess_cfg: Any,
    images: Sequence[ImageInput] | None = None,
    n_random: int = 4,
    seed: int = 0,
) -> FloatArray:
    """(N, 3, H, W) verification pixels: random normal, synthetic pictures, and views of `images`.

    Args:
        preprocess_cfg: a PreprocessConfig (sets H, mean, std).
        images: image files / bytes / PIL images (e.g. CLIP.png); each adds 4 views.
        n_random: rows of standard-normal pixels (out-of-distribution extremes).
    """
    from ..image.decode import decode_image
    from ..image.preprocess import preprocess_image

    rng = np.random.default_rng(seed)
    size = preprocess_cfg.image_size
    pics = _synthetic(size, rng)
    for source in images or ():
        pics += image_variants(decode_image(source))
    rows = [preprocess_image(p, preprocess_cfg) for p in pics]
    noise = rng.standard_normal((n_random, 3, size, size)).astype(np.float32)
    return np.concatenate([noise, np.stack(rows).astype(np.float32)], axis=0)


def measure_parity(output: FloatArray, reference: FloatArray, precision: str) -> Parity:
    """Compare two (N, D) feature arrays after L2 normalisation against the precision's bound."""
    a = output / np.linalg.norm(output, axis=-1, keepdims=True)
    b = reference / np.linalg.norm(reference, axis=-1, keepdims=True)
    max_abs = float(np.abs(a - b).max())
    min_cos = float((a * b).sum(-1).min())
    bound = BOUNDS[precision]
    finite = bool(np.isfinite(output).all())
    passed = finite and max_abs <= bound.get("max_abs", np.inf) and min_cos >= bound.get("min_cos", -np.inf)
    if not finite:
        max_abs, min_cos = float("nan"), float("nan")
    return Parity(max_abs=max_abs, min_cos=min_cos, bound=dict(bound), passed=passed, samples=len(a))


def check_parity(
    engine: Any, inputs: np.ndarray, reference: FloatArray, precision: str | None = None
) -> Parity:
    """Run a folder engine (any batch: chunked and padded) and measure it against `reference`
    with the bound of `precision` (default: the engine's own)."""
    return measure_parity(engine.run_padded(inputs), reference, precision or engine.info.precision)


def _describe(info: EngineInfo) -> str:
    p = info.parity
    assert p is not None
    measured = f"max-abs {p.max_abs:.3g}, min cosine {p.min_cos:.6f}"
    wanted = " and ".join(f"{'max-abs <=' if k == 'max_abs' else 'cosine >='} {v:g}" for k, v in p.bound.items())
    return f"{info.file}: {measured} (needs {wanted})"


def raise_on_failures(engines: Sequence[EngineInfo], folder: Path) -> None:
    """Raise ExportParityError naming every engine that missed its bound, with the measured values."""
    failed = [e for e in engines if e.parity is not None and not e.parity.passed]
    if failed:
        lines = "; ".join(_describe(e) for e in failed)
        raise ExportParityError(
            f"{len(failed)} engine(s) in {folder} miss their parity bound: {lines}. "
            f"The report is in {folder / 'parity_report.json'}; no manifest.json was written and the "
            "folder's previous export, if any, is unchanged."
        )


def _file_problem(folder: Path, name: object, sha256: object, what: str) -> str | None:
    """Why `folder/name` is not the file the manifest recorded (None: it is)."""
    if not isinstance(name, str) or not name or Path(name).name != name:
        return f"{what} {name!r}: not a plain file name"
    path = folder / name
    if not path.is_file():
        return f"{path}: {what} listed in the manifest is missing"
    if file_sha256(path) != sha256:
        return f"{path}: SHA-256 differs from the manifest (the {what} was changed or is corrupt)"
    return None


def verify_folder(folder: str | Path) -> tuple[int, list[str]]:
    """Re-check an export folder against its manifest, without the PyTorch model.

    Every file the manifest lists (engines, their external weights, the split text projection) must
    be there with the SHA-256 recorded when its parity was measured, and every engine must have
    passed that check. Parity itself is not re-run: that needs the model (re-export to re-measure);
    matching checksums mean the engines are the bytes that passed it.

    Returns:
        (files checked, problems: one line each naming the file; empty when the folder is intact).

    Raises:
        BackendError: no manifest, or one that cannot be read (see read_manifest).
    """
    root = Path(folder)
    manifest = read_manifest(root)
    root = root if root.is_dir() else root.parent
    checked, problems = 0, []
    for e in manifest.engines:
        files: list[tuple[str, object, str]] = [(e.file, e.sha256, "engine")]
        if e.external_data:
            files.append((e.external_data, e.external_data_sha256, "engine's external data"))
        for name, sha, what in files:
            checked += 1
            if (problem := _file_problem(root, name, sha, what)) is not None:
                problems.append(problem)
        if e.parity is not None and not e.parity.passed:
            problems.append(f"{root}/{_describe(e)}: missed its parity bound at export")
    if manifest.text_projection:
        spec = manifest.text_projection
        checked += 1
        spec = spec if isinstance(spec, dict) else {"file": spec}
        problem = _file_problem(root, spec.get("file"), spec.get("sha256"), "text projection")
        if problem is not None:
            problems.append(problem)
    if not manifest.engines:
        problems.append(f"{root / MANIFEST_FILE}: lists no engines")
    return checked, problems
