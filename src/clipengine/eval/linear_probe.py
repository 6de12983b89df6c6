"""Linear probe: frozen image features + scikit-learn logistic regression (C=0.316, max_iter=1000).

Features are cached under `$CLIPENGINE_HOME/features/` keyed by model, engine, dataset and split,
so a second run skips the image tower entirely, and an interrupted run resumes (`eval.features`).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatasetError
from .features import (
    ResumeCallback,
    cached_features,
    checkpointed_features,
    feature_cache_path,
    model_fingerprint,
)
from .zeroshot import accuracy_metrics

if TYPE_CHECKING:
    from ..api import ClipModel
    from .labelled import LabelledImages

__all__ = [
    "C_DEFAULT",
    "LinearProbeResult",
    "cached_features",
    "evaluate_linear_probe",
    "feature_cache_path",
    "model_fingerprint",
]

log = logging.getLogger(__name__)

C_DEFAULT = 0.316  # the seed's C, from CLIP's README example (the paper sweeps C per dataset on a validation split)
MAX_ITER = 1000


@dataclass
class LinearProbeResult:
    model: str
    dataset: str  # test split name
    n_train: int
    n_test: int
    num_classes: int
    top1: float
    top5: float
    mean_per_class_recall: float
    chance: float
    per_class: dict[str, float]
    C: float
    cache_hits: int  # 0, 1 or 2 (train/test features read from cache)
    feature_seconds: float
    fit_seconds: float
    engine: str = ""
    # Images that could not be decoded (train and test): left out of the fit and the metrics.
    unreadable: list[dict[str, str]] = field(default_factory=list)
    resumed: int = 0  # images whose features came from the checkpoints of an interrupted run
    converged: bool = True  # False: L-BFGS stopped at max_iter (as CLIP's recipe allows), logged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_splits(train: LabelledImages, test: LabelledImages) -> None:
    """Refuse splits a probe cannot be fitted on or would score wrongly, before any encoding."""
    if train.classnames != test.classnames:
        raise DatasetError(
            f"{train.name} and {test.name} have different class lists ({len(train.classnames)} vs "
            f"{len(test.classnames)} classes, or another order): label indices would not match"
        )
    present = np.unique(train.labels)
    if present.size < 2:
        names = [train.classnames[int(c)] for c in present]
        raise DatasetError(
            f"{train.name}: a linear probe needs at least 2 classes in the training split, got {names}"
        )
    same_paths = train.paths is not None and train.paths == test.paths
    same_arrays = train.arrays is not None and test.arrays is not None and train.arrays is test.arrays
    if same_paths or same_arrays:
        raise DatasetError(
            f"{train.name} and {test.name} are the same {len(train)} images; a linear probe needs "
            "separate train and test splits (for folders: ROOT/train/ and ROOT/test/ or ROOT/val/)"
        )


def evaluate_linear_probe(
    model: ClipModel,
    train: LabelledImages,
    test: LabelledImages,
    C: float = C_DEFAULT,
    batch_size: int = 64,
    engine: str = "",
    *,
    cache: bool = True,
    on_resume: ResumeCallback | None = None,
) -> LinearProbeResult:
    """Fit logistic regression on train features, report test top-1 / top-5 / per-class recall.

    Features come from `checkpointed_features`: cached, and resumed after an interrupted run
    (`on_resume` is told); `cache=False` encodes afresh and writes nothing.
    """
    from sklearn.linear_model import LogisticRegression

    _check_splits(train, test)
    t0 = time.perf_counter()
    runs = [checkpointed_features(model, split, batch_size, engine, cache=cache, on_resume=on_resume)
            for split in (train, test)]  # fmt: skip
    train_split, test_split = runs[0].split, runs[1].split
    t1 = time.perf_counter()
    fit_rows, test_rows = train_split.readable, test_split.readable  # unreadable images are left out
    y_train, y_test = train.labels[fit_rows], test.labels[test_rows]
    if np.unique(y_train).size < 2:
        raise DatasetError(f"{train.name}: its readable images cover fewer than 2 classes; a linear probe needs 2")
    _warn_unseen_classes(train, y_train, test.classnames, y_test)
    clf = LogisticRegression(C=C, max_iter=MAX_ITER, random_state=0)
    converged = _fit(clf, train_split.features[fit_rows], y_train)
    decision = clf.decision_function(test_split.features[test_rows])
    if decision.ndim == 1:  # two classes: one column, the score of classes_[1]
        decision = np.stack([-decision, decision], axis=1)
    scores = np.full((len(y_test), len(test.classnames)), -np.inf)  # classes absent from train never win
    scores[:, clf.classes_] = decision
    m = accuracy_metrics(scores, y_test, test.classnames)
    t2 = time.perf_counter()
    return LinearProbeResult(
        model=model.name,
        dataset=test.name,
        n_train=len(y_train),
        n_test=len(y_test),
        num_classes=len(test.classnames),
        top1=m["top1"],
        top5=m["top5"],
        mean_per_class_recall=m["mean_per_class_recall"],
        chance=1.0 / len(test.classnames),
        per_class=m["per_class"],
        C=C,
        cache_hits=sum(r.hit for r in runs),
        resumed=sum(r.resumed for r in runs),
        feature_seconds=round(t1 - t0, 3),
        fit_seconds=round(t2 - t1, 3),
        engine=engine,
        converged=converged,
        unreadable=train_split.unreadable() + test_split.unreadable(),
    )


def _warn_unseen_classes(
    train: LabelledImages, y_train: np.ndarray, classnames: list[str], y_test: np.ndarray
) -> None:
    """Name the classes that have test images but no readable train image (an empty or all-corrupt
    train folder): the fit never predicts them, so each of their test images is a miss, which a
    per-class recall of 0 alone would pass off as the model's failure."""
    unseen = np.setdiff1d(np.unique(y_test), y_train)
    if unseen.size:
        shown = ", ".join(f"{classnames[int(c)]!r} ({int((y_test == c).sum())} test)" for c in unseen[:5])
        log.warning(
            "%d class(es) with test images have no readable image in %s: %s%s; the probe never predicts "
            "them, so all %d of their test images count as misses",
            unseen.size, train.name, shown, ", ..." if unseen.size > 5 else "", int(np.isin(y_test, unseen).sum()),
        )  # fmt: skip


def _fit(clf: Any, x: np.ndarray, y: np.ndarray) -> bool:
    """Fit `clf`; False when L-BFGS stopped at `max_iter` without converging. sklearn warns then (a
    line on stderr from a library, or an error under strict warning filters): a log line instead,
    and the result says so. Other warnings pass through as they are."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf.fit(x, y)
    converged = True
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not converged:
        log.warning("the logistic regression stopped after %d iterations without converging (the "
                    "CLIP recipe's limit): a converged fit may score a little higher", clf.max_iter)  # fmt: skip
    return converged
