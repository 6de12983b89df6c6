"""`clipengine eval zeroshot|linear-probe` and `clipengine download-data`: accuracy on local datasets."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .output_paths import check_output_folder

if TYPE_CHECKING:
    from ..api import ClipModel
    from ..eval.datasets import LabelledImages

__all__ = ["register"]

_MODEL = typer.Option(
    "--model", "-m", help="Model name (e.g. tiny-synth, ViT-B-32), checkpoint, or export folder."
)
_DATASET = typer.Option("--dataset", "-d", help="cifar10 | cifar100 | imagenet | folder (any ImageFolder).")
_ROOT = typer.Option("--root", help="Dataset location (the folder holding cifar-10-batches-py/, val/, ...).")
_OUT = typer.Option(
    "--out", "-o", file_okay=False, help="Report folder: <name>.json, <name>.md, <name>_per_class.png."
)


_NO_CACHE = typer.Option(
    "--no-cache",
    help="Encode every image afresh: neither read nor write the feature cache in $CLIPENGINE_HOME/features "
    "(no resume of an interrupted run either).",
)


def _echo_resume(done: int, total: int, partial: Path) -> None:
    """Tell the user that the features of a killed or interrupted run are reused (stderr)."""
    from .predict import shown_name

    typer.echo(f"resuming: {done:,} of {total:,} images from a previous run ({shown_name(str(partial))})", err=True)


_BACKEND = typer.Option(
    "--backend", help="torch (checkpoints), or onnx / openvino (export folders; an export folder defaults to onnx)."
)


def _load(model: str, backend: str, precision: str, device: str, download: bool) -> ClipModel:
    from ..report import fidelity, fidelity_line
    from . import model_options as mo

    clip = mo.load_clip(mo.parse_model_options(model, None, None, backend, precision, device, download))
    note = fidelity_line(fidelity(clip.backend))  # a lower precision states its deviation from fp32
    if note:
        typer.echo(note, err=True)
    return clip


def _prompts(
    dataset: str, data: LabelledImages, prompts: Path | None, prompt_set: str | None
) -> tuple[list[str], list[str]]:
    """Class names and templates.

    The default entry (bundled, picked by --dataset; CIFAR10's for a folder) lends only its
    templates: the class names are the dataset's own ("_" read as space). An entry the user chose
    (--prompt-set, or one from a --prompts file) brings its class names too, one per dataset class
    in class order; a count that differs is refused. An entry without "classes" lends templates only.
    """
    from ..errors import DatasetError
    from ..eval.datasets import prompt_set as read_prompt_set

    key = prompt_set or {"folder": "CIFAR10"}.get(dataset.lower(), dataset)
    names, templates = read_prompt_set(key, prompts)
    own = [n.replace("_", " ") for n in data.classnames]
    if (prompt_set is None and prompts is None) or not names:
        if all(re.fullmatch(r"n\d{8}", n) for n in own):  # "a photo of a n01440764.": chance, not a result
            raise DatasetError(
                f"the class names of {data.name} are WordNet ids ({', '.join(own[:3])}, ...), which the model "
                "cannot read: pass --class-map JSON {folder: class name}, --prompts FILE.json with "
                '{"classes": [...]}, or --dataset imagenet for all 1000 ImageNet classes'
            )
        return own, templates
    if len(names) != len(own):
        where = prompts or "bundled zeroshot_prompts.json"
        raise DatasetError(
            f"prompt set {key!r} ({where}) has {len(names)} class names but the dataset has {len(own)} classes; "
            f"pick a prompt set with {len(own)}, or pass --prompts FILE.json with your own "
            '{"classes": [...], "templates": [...]} (or only "templates", to use the dataset\'s class names)'
        )
    return names, templates


def _refuse_torch_precisions(model: str, backend: str, device: str, engines: list[str]) -> None:
    """A precision the torch load would refuse (fp16 on CPU, no CUDA), refused before the first engine
    loads: `--compare fp32,fp16` on a CPU read and built the whole fp32 model first. Export folders
    (ONNX Runtime / OpenVINO engines, whatever --backend says) are left to their loads."""
    from ..export.manifest import unfinished_export  # torch-free

    folder = Path(model).expanduser()
    if backend != "torch" or len(engines) < 2 or (folder / "manifest.json").is_file() or unfinished_export(folder):
        return
    try:
        from ..backends.torch_backend import check_device_precision
    except ModuleNotFoundError:  # no torch: the first load says which extra to install
        return
    for precision in engines:
        check_device_precision(device, precision)


def _compare_list(compare: str) -> list[str]:
    """`--compare fp32,fp16,int8` -> ["fp32", "fp16", "int8"]; an empty or repeated entry is a typo."""
    engines = [p.strip() for p in compare.split(",")]
    if "" in engines or len(set(engines)) != len(engines):
        raise typer.BadParameter(
            f"{compare!r}: give distinct precisions separated by commas, e.g. fp32,fp16,int8",
            param_hint="--compare",
        )
    from .model_options import ANY_BACKEND_PRECISIONS

    unknown = [engine for engine in engines if engine not in ANY_BACKEND_PRECISIONS]
    if unknown:  # named here, not as --precision when its turn to load comes
        raise typer.BadParameter(
            f"{unknown[0]!r} is no precision; use {', '.join(ANY_BACKEND_PRECISIONS)}", param_hint="--compare"
        )
    return engines


def _dataset(
    dataset: str, root: Path, split: str, class_map: Path | None, labels: Path | None, limit: int | None
) -> LabelledImages:
    from ..eval.datasets import load_dataset

    data = load_dataset(dataset, root, split, class_map=class_map, labels_file=labels)
    return data.subset(limit) if limit else data


def register(app: typer.Typer) -> None:
    eval_app = typer.Typer(
        help="Accuracy: zero-shot classification and linear probes on local datasets.", no_args_is_help=True
    )
    app.add_typer(eval_app, name="eval")

    def _echo_unreadable(unreadable: list[dict[str, str]]) -> None:
        from .predict import shown_name  # a newline or terminal escape in a file name stays one line

        if unreadable:
            first = unreadable[0]
            typer.echo(f"  left out: {len(unreadable)} unreadable image(s), listed in the report; "
                       f"e.g. {shown_name(first['path'])}: {first['reason']}", err=True)  # fmt: skip

    @eval_app.command("zeroshot")
    def zeroshot(
        dataset: Annotated[str, _DATASET],
        root: Annotated[Path, _ROOT],
        model: Annotated[str, _MODEL] = "ViT-B-32",
        split: Annotated[
            str,
            typer.Option(
                help="test | train (CIFAR); ImageNet's test is val/; a folder's is ROOT/<split>/ (test: else val/, else ROOT)."
            ),
        ] = "test",
        prompts: Annotated[
            Path | None, typer.Option(help="JSON with classes/templates (default: CLIP's).")
        ] = None,
        prompt_set: Annotated[
            str | None, typer.Option(
                help="Key in the prompt JSON; its class names replace the dataset's (as many, or refused). "
                "Default: from --dataset, templates only."
            )
        ] = None,
        class_map: Annotated[
            Path | None,
            typer.Option(
                help="JSON {folder: class name} for folder / imagenet datasets; with --labels, a JSON list of "
                "class names by label index."
            ),
        ] = None,
        labels: Annotated[Path | None, typer.Option(help="Labels file for a flat image folder.")] = None,
        compare: Annotated[
            str | None,
            typer.Option(
                help="Precisions to compare, e.g. fp32,fp16,int8; the first is "
                "the reference. An export folder's engines (run by --backend) when --model is one."
            ),
        ] = None,
        backend: Annotated[str, _BACKEND] = "torch",
        precision: Annotated[
            str, typer.Option(help="fp32 | fp16 | bf16 | int8 | int8w (what the backend supports).")
        ] = "fp32",
        device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N.")] = "cpu",
        batch: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
        limit: Annotated[
            int | None,
            typer.Option(min=1, help="Evaluate only N images, every k-th of the split (all its classes)."),
        ] = None,
        out: Annotated[Path, _OUT] = Path("eval_reports"),
        download: Annotated[bool, typer.Option("--download", help="Download missing weights.")] = False,
        no_cache: Annotated[bool, _NO_CACHE] = False,
    ) -> None:
        """Zero-shot top-1 / top-5 / mean per-class recall with prompt-ensembled class weights."""
        from ..eval.report import compare_table, comparison_rows, write_report
        from ..eval.zeroshot import evaluate_zeroshot

        engines = _compare_list(compare) if compare else [precision]
        check_output_folder(out, "--out")  # not after the evaluation, whose result would then be lost
        data = _dataset(dataset, root, split, class_map, labels, limit)
        names, templates = _prompts(dataset, data, prompts, prompt_set)
        # Every engine loaded before any is evaluated: a precision the model lacks is refused at
        # once, not after a long evaluation of the ones before it whose results it would then lose.
        _refuse_torch_precisions(model, backend, device, engines)  # and before the first load
        clips = [_load(model, backend, prec, device, download) for prec in engines]
        results = []
        while clips:
            clip = clips.pop(0)  # released once evaluated
            label = f"{clip.backend.name} {clip.backend.precision}"
            results.append(evaluate_zeroshot(clip, data, templates, names, batch_size=batch, engine=label,
                                             cache=not no_cache, on_resume=_echo_resume))  # fmt: skip
            r = results[-1]
            typer.echo(
                f"{label}: top-1 {100 * r.top1:.2f}%  top-5 {100 * r.top5:.2f}%  mean per-class recall "
                f"{100 * r.mean_per_class_recall:.2f}%  (chance {100 * r.chance:.2f}%, {r.n} images, {r.seconds:.1f}s)"
            )
            _echo_unreadable(r.unreadable)
        dicts = [r.to_dict() for r in results]
        extra = {}
        if len(results) > 1:
            extra["comparison"] = comparison_rows(dicts, [r.predictions for r in results])
            typer.echo("\n" + compare_table(extra["comparison"]))
        paths = write_report(
            out, f"zeroshot_{data.name}", dicts, f"Zero-shot {results[0].model} on {data.name}", extra
        )
        typer.echo("report: " + ", ".join(str(p) for p in paths.values()))

    @eval_app.command("linear-probe")
    def linear_probe(
        dataset: Annotated[str, _DATASET],
        root: Annotated[Path, _ROOT],
        model: Annotated[str, _MODEL] = "ViT-B-32",
        c: Annotated[
            float, typer.Option("--C", help="Inverse L2 regularisation of the logistic regression.")
        ] = 0.316,
        backend: Annotated[str, _BACKEND] = "torch",
        precision: Annotated[str, typer.Option(help="fp32 | fp16 | bf16 | int8 | int8w (what the backend supports).")] = "fp32",
        device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N.")] = "cpu",
        batch: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
        limit: Annotated[
            int | None,
            typer.Option(min=1, help="Use only N train and N test images, every k-th of each split."),
        ] = None,
        out: Annotated[Path, _OUT] = Path("eval_reports"),
        download: Annotated[bool, typer.Option("--download", help="Download missing weights.")] = False,
        no_cache: Annotated[bool, _NO_CACHE] = False,
    ) -> None:
        """Logistic regression on frozen image features (cached: a second run skips the encoder)."""
        from ..eval.linear_probe import evaluate_linear_probe
        from ..eval.report import write_report

        if not 0 < c < math.inf:  # inf: the JSON report would hold "C": Infinity, which parsers refuse
            raise typer.BadParameter(
                f"must be a finite positive number, got {c} (for almost no regularisation: a large C, e.g. 1e6)",
                param_hint="--C",
            )
        check_output_folder(out, "--out")  # not after the features and the fit, whose result would be lost
        train = _dataset(dataset, root, "train", None, None, limit)
        test = _dataset(dataset, root, "test", None, None, limit)
        clip = _load(model, backend, precision, device, download)
        label = f"{clip.backend.name} {clip.backend.precision}"
        r = evaluate_linear_probe(
            clip, train, test, C=c, batch_size=batch, engine=label, cache=not no_cache, on_resume=_echo_resume
        )
        typer.echo(
            f"{label}: linear-probe top-1 {100 * r.top1:.2f}%  top-5 {100 * r.top5:.2f}%  (chance "
            f"{100 * r.chance:.2f}%, train {r.n_train}, test {r.n_test}, features {r.feature_seconds:.1f}s, "
            f"cached {r.cache_hits}/2, fit {r.fit_seconds:.1f}s)"
        )
        _echo_unreadable(r.unreadable)
        paths = write_report(
            out, f"linear_probe_{test.name}", [r.to_dict()], f"Linear probe {r.model} on {test.name}"
        )
        typer.echo("report: " + ", ".join(str(p) for p in paths.values()))

    @app.command("download-data")
    def download_data(
        name: Annotated[str, typer.Argument(help="cifar10 | cifar100")],
        root: Annotated[
            Path | None, typer.Option(file_okay=False, help="Target folder (default: $CLIPENGINE_HOME/data).")
        ] = None,
    ) -> None:
        """Fetch an official dataset archive (md5-checked, resumable) and extract it."""
        from tqdm import tqdm

        from ..errors import DatasetError
        from ..eval.download import ARCHIVES, download_dataset

        if name not in ARCHIVES:  # before the bar is drawn: the error is then the only output
            raise DatasetError(f"unknown dataset {name!r}; downloadable: {', '.join(ARCHIVES)}")
        if root is not None:
            check_output_folder(root, "--root")
        # Drawn on the first chunk: offline, the one error line is then all a terminal shows.
        bars: list[tqdm[Any]] = []

        def progress(done: int, total: int) -> None:
            if not bars:
                bars.append(
                    tqdm(total=ARCHIVES[name].size, unit="B", unit_scale=True, desc=name, disable=None)
                )
            bars[0].update(done - bars[0].n)

        try:
            folder = download_dataset(name, root, progress=progress)
        finally:
            for bar in bars:
                bar.close()
        typer.echo(f"{name}: {folder}")
