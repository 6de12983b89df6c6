"""Zero-shot classification: prompt-ensembled classifier weights, batched image scoring, accuracy metrics.

Backend-agnostic: works with any `clipengine.api.ClipModel` (torch, ONNX fp32/fp16/int8), numpy only.
Recipe as in CLIP / open_clip `zero_shot_classifier`: for each class, embed every template filled
with its name, L2-normalise, average, renormalise; predict argmax of image . weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backends.base import l2_normalize
from ..errors import BackendError, DatasetError, DecodeError
from ..types import Failure
from ..zeroshot import class_embeddings

if TYPE_CHECKING:
    from ..api import ClipModel
    from .features import ResumeCallback
    from .labelled import LabelledImages

__all__ = [
    "EncodedSplit",
    "ZeroShotResult",
    "accuracy_metrics",
    "build_classifier",
    "encode_dataset",
    "encode_rows",
    "evaluate_zeroshot",
    "report_failures",
    "tied_classes",
]

log = logging.getLogger(__name__)


@dataclass
class ZeroShotResult:
    """Metrics of one model on one dataset; `predictions` keep per-image top-1 for agreement checks."""

    model: str
    dataset: str
    n: int
    num_classes: int
    top1: float  # fraction in [0, 1]
    top5: float
    mean_per_class_recall: float
    chance: float  # 1 / num_classes
    per_class: dict[str, float]  # class name -> recall
    templates: int
    seconds: float
    engine: str = ""  # e.g. "torch fp32", "onnx int8"
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    # Images that could not be decoded: left out of `n` and of every metric, listed here.
    unreadable: list[dict[str, str]] = field(default_factory=list)
    resumed: int = 0  # images whose features came from the checkpoints of an interrupted run

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("predictions")
        return d


def build_classifier(
    encode_texts: Callable[[list[str]], np.ndarray],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_classes: int = 64,
) -> np.ndarray:
    """(D, C) float32 zero-shot weights: per class the renormalised mean of its unit prompt embeddings.

    Args:
        encode_texts: texts -> (N, D) embeddings (e.g. `ClipModel.encode_texts`); normalised here anyway.
        classnames: C class names, substituted for "{}" in every template.
        templates: T prompt templates.
        batch_classes: classes encoded per call (T * batch_classes texts at a time).
    """
    if not classnames or not templates:
        raise DatasetError("zero-shot needs at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise DatasetError(f"prompt templates must contain '{{}}' for the class name: {bad[:3]}")

    def checked(texts: list[str]) -> np.ndarray:
        emb = np.asarray(encode_texts(texts), dtype=np.float32)
        bad = _degenerate_rows(emb)
        if bad.size:
            raise BackendError(
                f"the text encoder gave {bad.size} of {len(texts)} prompt embeddings that are NaN, "
                f"inf or all zero, e.g. for {texts[int(bad[0])]!r}"
            )
        return emb

    weights = class_embeddings(checked, classnames, templates, batch_labels=batch_classes)
    tied = tied_classes(weights)
    if tied:
        first = tied[0]
        log.warning(
            "%d group(s) of classes get the same class weights, e.g. %s: their prompts tokenize alike (names "
            "equal once CLIP's tokenizer lowercases them and collapses spacing, or cut at the same point "
            "by the context length), so their scores tie and the first of each group wins top-1 (the "
            "others are never predicted)",
            len(tied), ", ".join(f"{classnames[c]!r} (class {c})" for c in first[:4]),
        )  # fmt: skip
    return weights.T.copy()  # (D, C)


def tied_classes(weights: np.ndarray, tol: float = 1e-5) -> list[list[int]]:
    """Groups (ascending class indices) of rows of (C, D) unit `weights` that are equal within `tol`.

    Such classes ("Heart" and "heart", or CLIP's two ImageNet "missile"s) always score the same.
    Sorted by a projection, so only rows whose projections are within `tol` are compared: O(C log C)
    for the 20k classes of ImageNet-21k, not the C x C similarity matrix.
    """
    if len(weights) < 2:
        return []
    w = np.asarray(weights, dtype=np.float64)
    direction = np.random.default_rng(0).standard_normal(w.shape[1])
    proj = w @ direction
    window = tol * np.abs(direction).sum()  # rows within `tol` everywhere project within this
    order = np.argsort(proj, kind="stable")
    parent = list(range(len(w)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            i, j = int(order[a]), int(order[b])
            if proj[j] - proj[i] > window:
                break
            if np.abs(w[i] - w[j]).max() <= tol:
                parent[max(root(i), root(j))] = min(root(i), root(j))
    groups: dict[int, list[int]] = {}
    for i in range(len(w)):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _degenerate_rows(x: np.ndarray) -> np.ndarray:
    """Indices of rows with a NaN/inf, or all zero (what normalising a NaN row gives): no embedding."""
    return np.flatnonzero(~np.isfinite(x).all(axis=1) | ~(x != 0).any(axis=1))


@dataclass
class EncodedSplit:
    """Image embeddings of a split, row i for image i; the rows of images that could not be decoded
    are NaN, and `failures` says why (`Failure(path, reason)`, in row order)."""

    features: np.ndarray  # (N, D) float32
    failures: list[Failure]

    @property
    def readable(self) -> np.ndarray:
        """(N,) bool: rows with an embedding."""
        return np.asarray(np.isfinite(self.features).all(axis=1))

    def unreadable(self) -> list[dict[str, str]]:
        """The failures as report rows."""
        return [{"path": f.id, "reason": f.reason} for f in self.failures]


def encode_dataset(
    model: ClipModel,
    data: LabelledImages,
    batch_size: int = 64,
    workers: int | None = None,
    *,
    normalize: bool = True,
) -> EncodedSplit:
    """Unit image embeddings of every image in `data`, `batch_size` at a time (`normalize=False`:
    the image tower's output as it is, for the linear probe).

    Decoding + preprocessing runs on a thread pool (PIL releases the GIL) one batch ahead of the
    model, so the backend is not left waiting on JPEG decoding. An image that cannot be decoded
    (truncated, empty, not an image) does not end the run: its row is NaN, it is listed in
    `failures`, and the metrics leave it out (a warning names the first ones).

    Raises:
        DatasetError: no image of `data` could be decoded.
        BackendError: the model gave NaN, inf or all-zero embeddings for a decoded image.
    """
    split = encode_rows(model, data, 0, len(data), batch_size, workers, normalize=normalize)
    report_failures(data, split.failures)
    return split


def encode_rows(
    model: ClipModel,
    data: LabelledImages,
    start: int,
    stop: int,
    batch_size: int = 64,
    workers: int | None = None,
    *,
    normalize: bool = True,
) -> EncodedSplit:
    """`encode_dataset` of images [start, stop) only (row 0 is image `start`), without the checks
    of the whole split (`report_failures`): a chunk of a checkpointed run may be all unreadable.

    Raises:
        BackendError: the model gave NaN, inf or all-zero embeddings for a decoded image.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    out = np.full((stop - start, model.embed_dim), np.nan, dtype=np.float32)
    decoded = np.zeros(stop - start, dtype=bool)
    failures: list[Failure] = []
    starts = list(range(start, stop, batch_size))
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def submit(first: int) -> list[Future[np.ndarray]]:
            last = min(first + batch_size, stop)
            return [pool.submit(model.preprocess, img) for img in data.images(first, last)]

        pending = submit(starts[0]) if starts else []
        for k, first in enumerate(starts):
            rows, pixels = [], []
            for i, fut in enumerate(pending, first):
                try:
                    pixels.append(fut.result())  # (3, H, W)
                    rows.append(i - start)
                except DecodeError as e:  # this image's failure, never the run's
                    failures.append(Failure(str(data.paths[i]) if data.paths else f"image {i}", e.reason))
            if k + 1 < len(starts):
                pending = submit(starts[k + 1])
            if rows:
                out[rows] = model.encode_images(np.stack(pixels), batch_size=batch_size, normalize=normalize)
                decoded[rows] = True
    bad = _degenerate_rows(out[decoded])
    if bad.size:  # such rows would all "predict" class 0 and fake an accuracy
        i = start + int(np.flatnonzero(decoded)[bad[0]])
        raise BackendError(
            f"{data.name}: {bad.size} of {stop - start} image embeddings"
            + (f" (images {start}-{stop - 1})" if (start, stop) != (0, len(data)) else "")
            + " are NaN, inf or all zero, "
            f"e.g. image {i}" + (f" ({data.paths[i]})" if data.paths else "")
        )
    return EncodedSplit(out, failures)


def report_failures(data: LabelledImages, failures: Sequence[Failure]) -> None:
    """Warn about the images of `data` that could not be decoded (count and the first ones).

    Raises:
        DatasetError: none of them could be decoded.
    """
    if not failures:
        return
    if len(failures) == len(data):
        raise DatasetError(f"{data.name}: none of its {len(data)} images could be decoded, e.g. "
                           f"{failures[0].id}: {failures[0].reason}")  # fmt: skip
    log.warning("%s: %d of %d images could not be decoded and are left out of the metrics, e.g. %s",
                data.name, len(failures), len(data),
                "; ".join(f"{f.id}: {f.reason}" for f in failures[:3]))  # fmt: skip


def accuracy_metrics(logits: np.ndarray, labels: np.ndarray, classnames: Sequence[str]) -> dict[str, Any]:
    """top1, top5, mean per-class recall and per-class recall from (N, C) scores and (N,) labels."""
    labels = np.asarray(labels, dtype=np.int64)
    k = min(5, logits.shape[1])
    # The label's rank, ties going to the lower class index as in argmax: a top-1 hit is then always
    # a top-5 hit. (argpartition broke ties at random, so a tied top-1 hit could miss the top 5; CLIP's
    # ImageNet list has two "missile" and two "sunglasses" classes whose scores can tie exactly.)
    own = np.take_along_axis(logits, labels[:, None], axis=1)
    lower = np.arange(logits.shape[1])[None, :] < labels[:, None]
    rank = (logits > own).sum(axis=1) + ((logits == own) & lower).sum(axis=1)
    # A class scored -inf (absent from a linear probe's train split) is never a hit, even when it
    # fills a top-5 slot because fewer than 5 classes have finite scores.
    hits = (rank < k) & (own[:, 0] > -np.inf)
    pred = logits.argmax(axis=1)
    correct = pred == labels
    per_class = {}
    recalls = []
    # CLIP's ImageNet list names two classes "missile" (and two "sunglasses"): keep both recalls.
    repeated = {n for n, count in Counter(classnames).items() if count > 1}
    for c, name in enumerate(classnames):
        mask = labels == c
        if mask.any():
            r = float(correct[mask].mean())
            per_class[f"{name} (class {c})" if name in repeated else name] = r
            recalls.append(r)
    return {
        "top1": float(correct.mean()),
        "top5": float(hits.mean()),
        "mean_per_class_recall": float(np.mean(recalls)) if recalls else 0.0,
        "per_class": per_class,
        "predictions": pred.astype(np.int64),
    }


def evaluate_zeroshot(
    model: ClipModel,
    data: LabelledImages,
    templates: Sequence[str],
    classnames: Sequence[str] | None = None,
    batch_size: int = 64,
    engine: str = "",
    *,
    cache: bool = True,
    on_resume: ResumeCallback | None = None,
) -> ZeroShotResult:
    """Zero-shot top-1 / top-5 / mean per-class recall of `model` on `data`.

    The image features come from `eval.features.checkpointed_features` (raw, normalised here, which
    gives the logits of unit embeddings): cached, so another prompt set skips the image tower, and
    resumed after an interrupted run (`on_resume` is told). `cache=False` encodes afresh, writes nothing.

    Args:
        classnames: names to prompt with (default: the dataset's own); must match its class count.
    """
    from .features import checkpointed_features  # it builds on this module
    names = list(classnames) if classnames else list(data.classnames)
    if len(names) != len(data.classnames):
        raise DatasetError(
            f"{len(names)} prompt class names for a dataset with {len(data.classnames)} classes"
        )
    t0 = time.perf_counter()
    weights = build_classifier(lambda texts: model.encode_texts(texts), names, templates)
    run = checkpointed_features(model, data, batch_size, engine, cache=cache, on_resume=on_resume)
    split = run.split
    readable = split.readable
    m = accuracy_metrics(l2_normalize(split.features[readable]) @ weights, data.labels[readable], names)
    seconds = time.perf_counter() - t0
    n = int(readable.sum())
    log.info("zero-shot %s on %s: top1 %.4f (%d images, %.1fs)", model.name, data.name, m["top1"], n, seconds)
    return ZeroShotResult(
        model=model.name,
        dataset=data.name,
        n=n,
        num_classes=len(names),
        top1=m["top1"],
        top5=m["top5"],
        mean_per_class_recall=m["mean_per_class_recall"],
        chance=1.0 / len(names),
        per_class=m["per_class"],
        templates=len(templates),
        seconds=round(seconds, 3),
        engine=engine,
        predictions=m["predictions"],
        unreadable=split.unreadable(),
        resumed=run.resumed,
    )
