"""`clipengine predict`: zero-shot rank texts for an image or a folder, with per-stage timings."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from ..api import ClipModel

__all__ = ["list_images", "register", "shown_name"]


def _refuse_images_as_texts(extra_args: list[str]) -> None:
    """`predict a.jpg b.jpg --text dog cat` ranked "b.jpg" as one of the texts: an extra argument that
    is an image file is a second image, which predict does not take one by one (a folder it does).

    Raises:
        typer.BadParameter: an extra argument names an existing image file (a usage error, exit 2).
    """
    from ..image.files import is_image_name

    for arg in extra_args:
        if is_image_name(os.path.basename(arg)) and os.path.isfile(arg):
            raise typer.BadParameter(
                f"{arg!r} is an image, not a text: predict takes one IMAGE_OR_FOLDER; "
                "for several images pass their folder (texts go after --text)"
            )


def _refuse_blank_texts(texts: list[str]) -> None:
    """`--text "$LABEL"` with LABEL unset ranked an empty text as a candidate ("Text: , Similarity: 0.16").

    Raises:
        typer.BadParameter: a text is empty or only spaces (a usage error, exit 2), as `search ""` is.
    """
    if any(not text.strip() for text in texts):
        raise typer.BadParameter("a text is empty (an unset shell variable?): give each candidate some words", param_hint="--text")


def list_images(target: Path) -> list[tuple[str, Path]]:
    """(display name, path): the image itself, or a folder's images walked recursively in the
    pipeline's stable order (relative paths as names, hidden files skipped).

    Raises:
        DecodeError: `target` is a named pipe, device or socket (it was "not a folder").
    """
    from ..errors import DecodeError
    from ..image.files import special_file_kind
    from ..pipeline.sources import list_folder

    if target.is_file():
        return [(target.name, target)]
    kind = special_file_kind(target)
    if kind is not None:  # refused unopened: reading a pipe waits for a writer
        raise DecodeError(str(target), f"not a regular file but {kind}; pass an image file or a folder")
    return [(item.id, Path(str(item.source))) for item in list_folder(target)]


@dataclass
class _Timings:
    preprocess_s: list[float] = field(default_factory=list)  # per image
    image_s: float = 0.0  # whole batch
    text_s: float = 0.0  # all texts


Ranked = list[tuple[str, list[tuple[str, float]]]]  # per image: (file name, [(text, probability)])


# Readable images preprocessed before they are encoded and their pixels let go: memory stays one
# batch (1.2 MB per image at 224 px with the stacked copy) whatever the folder's size. A multiple
# of encode_images' batch of 32, so the backend sees the batches it saw with the whole folder at once.
_PREDICT_BATCH = 256


def _predict(
    model: ClipModel, paths: list[tuple[str, Path]], texts: list[str], top_k: int | None = None
) -> tuple[Ranked, list[tuple[str, str]], _Timings]:
    """Preprocess each image (bad ones reported, not fatal), encode, rank texts per image (the
    `top_k` most probable, None: all; probabilities over all the texts either way)."""
    import numpy as np

    from ..errors import DecodeError
    from ..zeroshot import rank_labels

    timings, names, failures = _Timings(), [], []
    model.encode_texts(texts[:1])  # warm-up: first calls pay one-off allocation / kernel selection
    start = time.perf_counter()
    text_emb = model.encode_texts(texts)
    timings.text_s = time.perf_counter() - start
    pixels: list[Any] = []
    image_emb: list[Any] = []
    for i, (name, path) in enumerate(paths):
        start = time.perf_counter()
        try:
            pixels.append(model.preprocess(path))
        except DecodeError as e:
            failures.append((name, e.reason))
        else:
            timings.preprocess_s.append(time.perf_counter() - start)
            names.append(name)
        if pixels and (len(pixels) == _PREDICT_BATCH or i == len(paths) - 1):
            batch = np.stack(pixels)
            pixels.clear()  # only the stacked batch holds them now
            if not image_emb:
                model.encode_images(batch[:1])  # warm-up, as for the texts
            start = time.perf_counter()
            image_emb.append(model.encode_images(batch))
            timings.image_s += time.perf_counter() - start
    if not names:
        return [], failures, timings
    scores = rank_labels(np.concatenate(image_emb), text_emb, model.logit_scale, texts, top_k)
    return list(zip(names, scores, strict=True)), failures, timings


def shown_name(name: str) -> str:
    """`name` with its control characters escaped ("new\\nline.png"): a newline, tab or terminal escape
    in a file name must not break the one-line-per-field output or reach the terminal raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def _ms(total_s: float, count: int) -> str:
    return f"{1000 * total_s / max(count, 1):.1f} ms"


def _as_json(
    model: str,
    top_k: int | None,
    measured: dict[str, Any] | None,
    ranked: Ranked,
    failures: list[tuple[str, str]],
    timings: _Timings,
    n_texts: int,
) -> str:
    """The --json document: names and texts as they are (JSON escapes them), timings in ms."""
    n = len(ranked)
    doc = {
        "model": model,
        "top_k": top_k,
        "fidelity": measured,
        "results": [
            {"name": name, "labels": [{"label": label, "probability": p} for label, p in scores]}
            for name, scores in ranked
        ],
        "skipped": [{"name": name, "reason": reason} for name, reason in failures],
        "timings_ms": {
            "preprocess_per_image": 1000 * sum(timings.preprocess_s) / max(n, 1),
            "image_encode_per_image": 1000 * timings.image_s / max(n, 1),
            "text_encode_per_text": 1000 * timings.text_s / max(n_texts, 1),
        },
    }
    return json.dumps(doc, indent=2)


def register(app: typer.Typer) -> None:
    @app.command(
        context_settings={"allow_extra_args": True},
        epilog='Example: clipengine predict photo.jpg --text "a diagram" "a dog" "a cat"',
    )
    def predict(
        ctx: typer.Context,
        target: Annotated[
            Path, typer.Argument(metavar="IMAGE_OR_FOLDER", exists=True, help="An image file or a folder.")
        ],
        text: Annotated[
            list[str],
            typer.Option("--text", "-t", help="Candidate texts: --text A B C, or --text A --text B."),
        ],
        model: Annotated[
            str, typer.Option("--model", "-m", help="Model name, checkpoint file or ONNX export folder.")
        ] = "ViT-B-32",
        pretrained: Annotated[
            str | None, typer.Option(help="Weights tag, e.g. openai (default: the model's default tag).")
        ] = None,
        checkpoint: Annotated[
            Path | None, typer.Option(help="Checkpoint file or model folder (overrides --model).")
        ] = None,
        backend: Annotated[str, typer.Option(help="torch | onnx | openvino (onnx, openvino: an export folder).")] = "torch",
        precision: Annotated[
            str, typer.Option(help="torch: fp32 | bf16 | fp16 (CUDA) | fp8 (FP8 GPUs); onnx / openvino: the export's fp32 | fp16 | int8 | int8w (openvino also bf16).")
        ] = "fp32",
        device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N.")] = "cpu",
        download: Annotated[bool, typer.Option("--download", help="Download missing weights.")] = False,
        top_k: Annotated[
            int | None,
            typer.Option(
                "--top-k",
                min=1,
                help="Show only the K most probable texts per image (default: all). Probabilities stay "
                "the softmax over all the texts, not renormalised over the K shown.",
            ),
        ] = None,
        as_json: Annotated[
            bool,
            typer.Option(
                "--json",
                help='Print JSON: {"model", "top_k", "fidelity", "results": [{"name", "labels": [{"label", '
                '"probability"}]}], "skipped": [{"name", "reason"}], "timings_ms"}.',
            ),
        ] = False,
    ) -> None:
        """Rank TEXTS by how well they describe each image (softmax over CLIP similarities)."""
        from ..errors import DecodeError
        from ..report import fidelity, fidelity_line
        from ..zeroshot import check_utf8_texts
        from . import model_options as mo

        _refuse_images_as_texts(ctx.args)
        texts = [*text, *ctx.args]  # values after a single --text arrive as extra arguments
        _refuse_blank_texts(texts)
        check_utf8_texts(texts, "--text")  # `--text $(cat classes.txt)` of a Latin-1 file: refused, not U+FFFD
        paths = list_images(target)
        if not paths:
            raise DecodeError(str(target), "no image files (jpg, png, webp, bmp, gif, tiff) found")
        opts = mo.parse_model_options(model, pretrained, checkpoint, backend, precision, device, download)
        clip = mo.load_clip(opts)
        measured = fidelity(clip.backend)  # a lower precision states its measured deviation from fp32
        note = fidelity_line(measured)
        if note:
            typer.echo(note, err=True)
        ranked, failures, timings = _predict(clip, paths, texts, top_k)
        for name, reason in failures:
            typer.echo(f"Skipped: {shown_name(name)}: {reason}", err=True)
        if not ranked:  # before the timing lines: averages over no image would read 0.0 ms
            raise DecodeError(str(target), "no readable images")
        if as_json:
            typer.echo(_as_json(opts.label, top_k, measured, ranked, failures, timings, len(texts)))
            return
        for name, scores in ranked:
            typer.echo(f"Filename: {shown_name(name)}")
            for label, prob in scores:
                typer.echo(f"Text: {shown_name(label)}, Similarity: {prob:.4f}")
            typer.echo("")
        n = len(ranked)
        typer.echo(f"Average preprocess time: {_ms(sum(timings.preprocess_s), n)} per image")
        typer.echo(f"Average image-encode time: {_ms(timings.image_s, n)} per image")
        typer.echo(f"Average text-encode time: {_ms(timings.text_s, len(texts))} per text")
