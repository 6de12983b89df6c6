"""Zero-shot building blocks shared by the API, the server and eval (NumPy only).

Prompts come from templates with "{}" for the label; a label's embedding is the renormalised mean of
its unit prompt embeddings (CLIP's prompt ensembling); probabilities are softmax(logit_scale * cos).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import numpy as np

from .backends.base import l2_normalize
from .errors import InputError
from .types import FloatArray

__all__ = ["class_embeddings", "fill_template", "label_prompts", "mean_unit", "rank_labels"]


def fill_template(template: str, label: str) -> str:
    """"a photo of a {}." + "dog" -> "a photo of a dog.".

    str.replace, not str.format: user templates may contain other braces ("{style} {}").
    """
    return template.replace("{}", label)


def label_prompts(labels: Sequence[str], templates: Sequence[str] | None) -> list[list[str]]:
    """Per label its prompts: one per template, or just the label itself without templates."""
    if not templates:
        return [[label] for label in labels]
    return [[fill_template(t, label) for t in templates] for label in labels]


def mean_unit(vectors: FloatArray) -> FloatArray:
    """(C, T, D) prompt embeddings -> (C, D): unit rows, averaged over T, renormalised."""
    return l2_normalize(l2_normalize(vectors).mean(axis=1))


def class_embeddings(
    encode_texts: Callable[[list[str]], FloatArray],
    labels: Sequence[str],
    templates: Sequence[str] | None,
    batch_labels: int = 64,
) -> FloatArray:
    """(C, D) unit class embeddings, prompt-ensembled over `templates`.

    Args:
        encode_texts: texts -> (N, D) embeddings, e.g. `ClipModel.encode_texts`.
        labels: C class names.
        templates: T templates with "{}" for the label, or None to embed the bare labels.
        batch_labels: labels encoded per call (T * batch_labels texts at a time).

    Raises:
        InputError: `labels` is one str (it would be one label per character), or `batch_labels`
            is not an integer >= 1.
    """
    if isinstance(labels, str):
        raise InputError(f"labels must be a list of labels, not one string ({labels!r:.60})")
    try:  # else range()'s "arg 3 must not be zero" or a '<' TypeError
        batch_labels = operator.index(batch_labels)
    except TypeError:
        batch_labels = 0
    if batch_labels < 1:
        raise InputError(f"batch_labels must be an integer >= 1, got {batch_labels!r}")
    per_label = label_prompts(labels, templates)
    n_prompts = len(per_label[0]) if per_label else 0
    rows = []
    for start in range(0, len(per_label), batch_labels):
        chunk = per_label[start : start + batch_labels]
        emb = np.asarray(encode_texts([p for ps in chunk for p in ps]), dtype=np.float32)
        rows.append(mean_unit(emb.reshape(len(chunk), n_prompts, -1)))
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, 0), dtype=np.float32)


def rank_labels(
    image_vectors: FloatArray, class_vectors: FloatArray, logit_scale: float, labels: Sequence[str]
) -> list[list[tuple[str, float]]]:
    """Per image (row of (N, D)), (label, probability) pairs sorted by probability, highest first.

    Raises:
        InputError: not (N, D) and (C, D) matrices of one D with C labels, or a `logit_scale` that is
            not a finite number (inf made every probability NaN); numpy's own errors named neither.
    """
    image_vectors, class_vectors = np.asarray(image_vectors), np.asarray(class_vectors)
    if image_vectors.ndim != 2 or class_vectors.ndim != 2 or image_vectors.shape[1] != class_vectors.shape[1]:
        raise InputError(
            f"image_vectors and class_vectors must be (N, D) and (C, D) matrices of one D; "
            f"got {image_vectors.shape} and {class_vectors.shape}"
        )
    if len(labels) != len(class_vectors):  # else an IndexError, or labels silently left out
        raise InputError(f"{len(labels)} labels for {len(class_vectors)} class vectors")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, int | float | np.number):
        raise InputError(f"logit_scale must be a finite number, got {logit_scale!r}")
    if not math.isfinite(float(logit_scale)):
        raise InputError(f"logit_scale must be a finite number, got {logit_scale!r}")
    logits = float(logit_scale) * (image_vectors @ class_vectors.T).astype(np.float64)  # (N, C)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    ranked = []
    for row in probs:
        order = np.argsort(-row, kind="stable")
        ranked.append([(labels[i], float(row[i])) for i in order])
    return ranked
