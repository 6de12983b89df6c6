"""`clipengine export`: a model -> verified ONNX engines + manifest.json, with a parity summary table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .output_paths import check_output_folder

if TYPE_CHECKING:
    from ..export.manifest import EngineInfo, Manifest

__all__ = ["format_summary", "parse_batches", "parse_precisions", "register"]


def parse_precisions(value: str) -> list[str]:
    from ..export.manifest import PRECISIONS

    items = [p.strip().lower() for p in value.split(",") if p.strip()]
    bad = [p for p in items if p not in PRECISIONS]
    if bad or not items:
        raise typer.BadParameter(f"{value!r}: use a comma list of {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(items))


def parse_batches(value: str) -> list[int]:
    try:
        items = sorted({int(b) for b in value.split(",") if b.strip()})
    except ValueError as e:
        raise typer.BadParameter(f"{value!r}: use a comma list of positive integers, e.g. 1,8,16,32") from e
    if not items or items[0] < 1:
        raise typer.BadParameter(f"{value!r}: batch sizes must be positive integers")
    return items


def _folder_images(folder: Path | None, option: str) -> list[Path] | None:
    """The images of `folder` as `embed` lists them (recursive, hidden files and non-image files
    skipped), listed before the model loads so a bad folder fails fast."""
    from ..image.files import folder_images

    if folder is None:
        return None
    return folder_images(folder, option, fix=f"point {option} at a folder of images, or leave it out")


def _fmt(value: float) -> str:
    return f"{value:.2e}" if value == value else "nan"  # NaN != NaN


def _runtime_column(engine: EngineInfo) -> str:
    """OpenVINO's min cosine (f32, and bf16 for fp32 engines), '!' after a failed one; '-' if unmeasured."""
    parts = []
    for key, label in (("openvino", ""), ("openvino-bf16", "bf16 ")):
        q = engine.runtime_parity.get(key)
        if q is not None:
            parts.append(f"{label}{q.min_cos:.6f}{'' if q.passed else '!'}")
    return " / ".join(parts) or "-"


def format_summary(manifest: Manifest) -> str:
    """One row per engine: file, tower, precision, batch, size, parity numbers and verdict."""
    rows = [("engine", "tower", "prec", "batch", "max-abs", "min-cos", "bound", "openvino min-cos", "ok")]
    for e in manifest.engines:
        p = e.parity
        bound = ", ".join(f"{'abs<=' if k == 'max_abs' else 'cos>='}{v:g}" for k, v in (p.bound if p else {}).items())
        rows.append((
            e.file, e.tower, e.precision + (f"/{e.quantization}" if e.quantization else ""),
            "dyn" if e.batch is None else str(e.batch),
            _fmt(p.max_abs) if p else "-", f"{p.min_cos:.6f}" if p else "-", bound or "-",
            _runtime_column(e),
            ("yes" if p.passed else "NO") if p else "unverified",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


_OUTPUT = typer.Option(None, "--output", "-o", file_okay=False, help="Export folder, e.g. models/ViT-B-32/.")
_VERIFY = typer.Option(
    None,
    "--verify",
    metavar="FOLDER",
    exists=True,
    file_okay=False,
    help="Re-check an export folder instead (no MODEL): every file's SHA-256 and recorded parity.",
)
_PRETRAINED = typer.Option(None, "--pretrained", help="Weights tag, e.g. openai.")
_CHECKPOINT = typer.Option(None, "--checkpoint", help="Checkpoint file instead of MODEL's weights.")
_PRECISION = typer.Option("fp32", "--precision", help="Comma list of fp32, fp16, int8, int8w (int8 weights only).")
_IMAGE_BATCH = typer.Option("1,8,16,32", "--image-batch", help="Fixed image engine batch sizes.")
_TEXT_BATCH = typer.Option("4", "--text-batch", help="Fixed text engine batch sizes.")
_DYNAMIC = typer.Option(False, "--dynamic", help="One dynamic-batch engine per tower instead.")
_SPLIT = typer.Option(
    False, "--split-text-projection", help="Text graph outputs token states; projection saved as .npy."
)
_CALIBRATION = typer.Option(None, "--calibration-dir", help="Images for static INT8 (default: dynamic INT8).")
_SAMPLES = typer.Option(None, "--sample-dir", exists=True, file_okay=False, help="Extra images to verify parity on.")
_NO_VERIFY = typer.Option(False, "--no-verify", help="Skip parity checks (not recommended).")
_DOWNLOAD = typer.Option(False, "--download", help="Allow downloading missing weights.")


def _verify_folder(folder: Path) -> None:
    """`--verify FOLDER`: one line if intact; else a BackendError listing each problem (exit 1)."""
    from ..errors import BackendError
    from ..export.manifest import read_manifest
    from ..export.verify import verify_folder

    checked, problems = verify_folder(folder)
    if problems:
        raise BackendError(f"{folder}: {len(problems)} problem(s): " + "; ".join(problems))
    unverified = [e.file for e in read_manifest(folder).engines if e.parity is None]
    parity = f"unverified: {', '.join(unverified)}" if unverified else "every engine passed parity"
    typer.echo(f"{folder}: ok ({checked} files match their SHA-256; {parity})")


# The options that shape an export, by parameter name: `--verify FOLDER` builds nothing, so each one
# given beside it would be ignored.
_EXPORT_OPTIONS = {
    "pretrained": "--pretrained", "checkpoint": "--checkpoint", "precision": "--precision",
    "image_batch": "--image-batch", "text_batch": "--text-batch", "dynamic": "--dynamic",
    "split_text_projection": "--split-text-projection", "calibration_dir": "--calibration-dir",
    "sample_dir": "--sample-dir", "no_verify": "--no-verify", "download": "--download",
}


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option `name` (command line or environment), not left it at its default:
    --image-batch's default must not count as a request for fixed batches beside --dynamic."""
    source = ctx.get_parameter_source(name)
    # By name: typer runs on its own copy of click, whose ParameterSource is not click's.
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _refuse_ignored_options(ctx: typer.Context, *, dynamic: bool, precisions: list[str], verify: bool) -> None:
    """A usage error for each option this export would ignore without a word: the user would believe
    they got fixed-batch engines, a static INT8 calibration, or parity checked on their images."""
    for name in ("image_batch", "text_batch"):
        if dynamic and _given(ctx, name):
            flag = _EXPORT_OPTIONS[name]
            raise typer.BadParameter(
                f"{flag} gives fixed batch sizes and --dynamic one dynamic-batch engine per tower instead; "
                f"give one or the other"
            )
    if _given(ctx, "calibration_dir") and "int8" not in precisions:
        raise typer.BadParameter(
            f"--calibration-dir calibrates int8 engines (static INT8), and --precision {','.join(precisions)} "
            "builds none; add int8 to --precision or leave --calibration-dir out"
        )
    if _given(ctx, "sample_dir") and not verify:
        raise typer.BadParameter(
            "--sample-dir adds images to the parity check, which --no-verify skips; give one or the other"
        )


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        ctx: typer.Context,
        model: str | None = typer.Argument(
            None, help="Model name (ViT-B-32, RN50@openai, ...), checkpoint or folder."
        ),
        output: Path | None = _OUTPUT,
        pretrained: str | None = _PRETRAINED,
        checkpoint: Path | None = _CHECKPOINT,
        precision: str = _PRECISION,
        image_batch: str = _IMAGE_BATCH,
        text_batch: str = _TEXT_BATCH,
        dynamic: bool = _DYNAMIC,
        split_text_projection: bool = _SPLIT,
        calibration_dir: Path | None = _CALIBRATION,
        sample_dir: Path | None = _SAMPLES,
        no_verify: bool = _NO_VERIFY,
        download: bool = _DOWNLOAD,
        verify: Path | None = _VERIFY,
    ) -> None:
        """Export MODEL to ONNX engines, verify each against PyTorch, and write manifest.json."""
        if verify is not None:
            if model is not None or output is not None:
                raise typer.BadParameter("--verify FOLDER checks an export; give no MODEL or --output")
            if given := [flag for name, flag in _EXPORT_OPTIONS.items() if _given(ctx, name)]:
                raise typer.BadParameter(
                    f"--verify FOLDER checks an export and builds none; drop {', '.join(given)}"
                )
            _verify_folder(verify)
            return
        if model is None or output is None:
            raise typer.BadParameter("give MODEL and --output FOLDER (or --verify FOLDER to check an export)")
        precisions = parse_precisions(precision)
        _refuse_ignored_options(ctx, dynamic=dynamic, precisions=precisions, verify=not no_verify)
        image_batches = None if dynamic else parse_batches(image_batch)
        text_batches = None if dynamic else parse_batches(text_batch)
        samples = _folder_images(sample_dir, "--sample-dir")
        calibration = _folder_images(calibration_dir, "--calibration-dir")
        check_output_folder(output, "--output")  # before a download and a model load that the first write would waste
        # Imported once the options are checked: torch and torch.export, 1.3 s before a usage error.
        from ..export.onnx import export_model, require_tools
        from ..models.load import load_model
        from .downloads import fetch_with_progress

        require_tools(precisions, not no_verify)  # a missing onnx / onnxruntime: before the download and load
        typer.echo(f"loading {checkpoint or model}" + (f" @ {pretrained}" if pretrained else ""))
        if download:  # the bar `clipengine download` draws; the load then finds the file cached
            fetch_with_progress(str(checkpoint or model), pretrained)
        loaded = load_model(checkpoint or model, pretrained, allow_download=download,
                            arch=model if checkpoint else None)
        manifest = export_model(
            loaded.module, output, precisions=precisions, image_batches=image_batches,
            text_batches=text_batches, split_text_projection=split_text_projection,
            calibration_images=calibration, sample_images_from=samples, model_name=loaded.name,
            pretrained=loaded.pretrained, preprocess_cfg=loaded.preprocess, verify=not no_verify,
            progress=typer.echo,
        )
        typer.echo("")
        typer.echo(format_summary(manifest))
