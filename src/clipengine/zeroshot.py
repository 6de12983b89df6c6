"""Zero-shot building blocks shared by the API, the server and eval (NumPy only).

Prompts come from templates with "{}" for the label; a label's embedding is the renormalised mean of
its unit prompt embeddings (CLIP's prompt ensembling); probabilities are softmax(logit_scale * cos).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from .arguments import positive_int
from .backends.base import l2_normalize
from .errors import InputError
from .types import FloatArray

__all__ = [
    "check_top_k",
    "check_utf8_texts",
    "class_embeddings",
    "fill_template",
    "label_prompts",
    "mean_unit",
    "rank_labels",
]

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_utf8_texts(texts: Sequence[str], what: str) -> None:
    """Refuse a text holding a lone surrogate: bytes that were not UTF-8, as Python carries them in
    a str ("surrogateescape": command-line arguments, file and folder names; b"caf\\xe9" ->
    "caf\\udce9"). The tokenizer's cleanup (ftfy) made each one U+FFFD without a word, so the
    model ranked "caf\\ufffd", not "café", and the user saw only worse results.

    Raises:
        InputError: naming `what`, the text, and the byte (or surrogate) at fault, with the fix.
    """
    for i, text in enumerate(texts):
        found = _SURROGATE.search(text) if isinstance(text, str) else None
        if found is None:
            continue
        code, at = ord(found.group()), found.start()
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte itself
            why = f"byte 0x{code - 0xDC00:02X} at character {at} (text in another encoding, Latin-1 / cp1252?)"
            fix = "save the file, script or folder name it came from as UTF-8"
        else:  # e.g. a JSON "\ud83d" escape without the other half of its pair
            why = f"lone surrogate U+{code:04X} at character {at} (half of a UTF-16 pair)"
            fix = "write the whole character"
        raise InputError(f"{what} [{i}] {text!r:.80} is not UTF-8 text: {why}; {fix}")


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
        InputError: `labels` is one str (it would be one label per character), a label or
            template is not UTF-8 text (`check_utf8_texts`), or `batch_labels` is not an integer >= 1.
    """
    if isinstance(labels, str):
        raise InputError(f"labels must be a list of labels, not one string ({labels!r:.60})")
    try:  # else range()'s "arg 3 must not be zero" or a '<' TypeError
        batch_labels = operator.index(batch_labels)
    except TypeError:
        batch_labels = 0
    if batch_labels < 1:
        raise InputError(f"batch_labels must be an integer >= 1, got {batch_labels!r}")
    check_utf8_texts(labels, "label")
    check_utf8_texts(templates or (), "template")
    per_label = label_prompts(labels, templates)
    n_prompts = len(per_label[0]) if per_label else 0
    rows = []
    for start in range(0, len(per_label), batch_labels):
        chunk = per_label[start : start + batch_labels]
        emb = np.asarray(encode_texts([p for ps in chunk for p in ps]), dtype=np.float32)
        rows.append(mean_unit(emb.reshape(len(chunk), n_prompts, -1)))
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, 0), dtype=np.float32)


def rank_labels(
    image_vectors: FloatArray,
    class_vectors: FloatArray,
    logit_scale: float,
    labels: Sequence[str],
    top_k: int | None = None,
) -> list[list[tuple[str, float]]]:
    """Per image (row of (N, D)), (label, probability) pairs sorted by probability, highest first.

    Probabilities are the softmax over all C labels, whatever `top_k`. Equal probabilities keep the
    labels' order.

    Args:
        top_k: keep only the `top_k` most probable labels per image (None, or more than C: all C).
            Exactly the first `top_k` pairs of the full ranking (ties at the cut ordered as there),
            without sorting all C labels (a partition per image, then a sort of the k best).

    Raises:
        InputError: not (N, D) and (C, D) matrices of one D with C labels, a `logit_scale` that is
            not a finite number (inf made every probability NaN; numpy's own errors named neither),
            or a `top_k` that is not None or an integer >= 1.
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
    k = len(labels) if top_k is None else check_top_k(top_k)
    logits = float(logit_scale) * (image_vectors @ class_vectors.T).astype(np.float64)  # (N, C)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return [[(labels[i], float(row[i])) for i in _top_order(row, k)] for row in probs]


def check_top_k(top_k: object) -> int:
    """`top_k` as an int >= 1 (NumPy integers too), else an InputError naming it."""
    return positive_int(top_k, "top_k", "None or an integer >= 1")


def _top_order(row: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.intp]:
    """Indices of the `k` highest values of `row` (C,), in the order of the first `k` of
    ``np.argsort(-row, kind="stable")``: highest first, equal values by index, NaN last."""
    neg = -row
    if k >= len(row):
        return np.argsort(neg, kind="stable")
    kth = np.partition(neg, k - 1)[k - 1]  # minus the k-th highest value (NaN sorts last, as in argsort)
    candidates = np.flatnonzero(neg <= kth)  # every value tied with the k-th too, in index order
    if len(candidates) < k:  # NaN among the k best (kth is NaN): nothing compares; sort them all
        return np.argsort(neg, kind="stable")[:k]
    return candidates[np.argsort(neg[candidates], kind="stable")[:k]]
