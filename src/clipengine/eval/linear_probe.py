"""Linear probe: frozen image features + scikit-learn logistic regression (C=0.316, max_iter=1000).

Features are cached under `$CLIPENGINE_HOME/features/` keyed by model, engine, dataset and split,
so a second run skips the image tower entirely.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatasetError
from ..files import atomic_path
from ..paths import cache_dir
from ..types import Failure
from .zeroshot import EncodedSplit, accuracy_metrics, encode_dataset

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
    converged: bool = True  # False: L-BFGS stopped at max_iter (as CLIP's recipe allows), logged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_fingerprint(model: ClipModel) -> str:
    """12 hex digits that change with the weights: embeddings of two fixed inputs, rounded.

    Names alone are not enough (a retrained checkpoint keeps its name); this works for any backend.
    """
    size = model.image_size
    pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    probe = np.concatenate([model.encode_images(pixels), model.encode_texts(["a photo of a cat."])])
    return hashlib.sha256(np.round(probe, 3).tobytes()).hexdigest()[:12]


def feature_cache_path(model: ClipModel, data: LabelledImages, engine: str = "") -> Path:
    """`<cache>/features/<model>__<engine>__<dataset>__<fingerprint>.npy` for this model and split.

    The fingerprint covers the weights (`model_fingerprint`), the preprocessing, the engine, the
    labels and every image (`_images_digest`), so a retrained model, other preprocessing or a changed
    dataset never reads stale features.
    """
    b = model.backend
    engine = engine or f"{b.name}-{b.precision}"
    images = _images_digest(data)
    weights, preprocessing = model_fingerprint(model), repr(model.preprocess_cfg)
    labels = data.labels.tobytes()
    # "raw": unnormalised features (caches of unit rows, from before, are never read)
    key = (model.name, weights, preprocessing, engine, data.name, len(data), labels, images, "raw")
    fp = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model.name}__{engine}__{data.name}")
    return cache_dir() / "features" / f"{safe}__{fp}.npy"


def _images_digest(data: LabelledImages) -> str:
    """A digest of the split's images: every pixel of in-memory arrays (CIFAR's 50 000 train images:
    0.2 s), or every file's path, size and modification time (a file replaced or repaired since, e.g.
    one that could not be decoded before, is read again). The first item alone missed both."""
    h = hashlib.sha256()
    if data.arrays is not None:
        h.update(repr((data.arrays.shape, data.arrays.dtype.str)).encode())
        h.update(np.ascontiguousarray(data.arrays).data)
    for path in data.paths or ():
        try:
            st = path.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError as e:  # unreadable: encoding lists it as a failure; a later fix changes this
            stamp = type(e).__name__
        # os.fsencode: the name's own bytes; str.encode() raised on one that is not UTF-8 ("caf\udce9").
        h.update(os.fsencode(path.absolute()) + f"\0{stamp}\n".encode())
    return h.hexdigest()


def cached_features(
    model: ClipModel, data: LabelledImages, batch_size: int = 64, engine: str = ""
) -> tuple[EncodedSplit, bool]:
    """Image features of `data`, read from the cache when present; returns (features, hit).

    Rows of images that could not be decoded are NaN (`encode_dataset`), in the cache too; read
    back from it, they are listed without their original reason.
    """
    path = feature_cache_path(model, data, engine)
    if path.is_file():
        try:
            feats = np.load(path)
        except (OSError, ValueError, EOFError) as e:  # cut short or foreign: a miss, rewritten below
            log.warning("ignoring unreadable feature cache %s (%s)", path, e)
        else:
            if feats.shape == (len(data), model.embed_dim):
                log.info("features from cache %s", path)
                return _from_cache(feats, data), True
    # Not unit-normalised: CLIP's README fits its C = 0.316 on `encode_image` as it is (ViT-B/32's
    # image features have norms near 10), and unit rows would make that C ~100x stronger.
    split = encode_dataset(model, data, batch_size, normalize=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp file beside the cache file, then os.replace: two runs at once never share a temp
    # name, and a failed save leaves neither a truncated cache file nor a temp file behind.
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, split.features)  # a file object: np.save would add ".npy" to a temp name without it
    return split, False


def _from_cache(features: np.ndarray, data: LabelledImages) -> EncodedSplit:
    missing = np.flatnonzero(~np.isfinite(features).all(axis=1))
    reason = "could not be decoded when the feature cache was written"
    return EncodedSplit(features, [Failure(str(data.paths[i]) if data.paths else f"image {i}", reason) for i in missing])


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
) -> LinearProbeResult:
    """Fit logistic regression on train features, report test top-1 / top-5 / per-class recall."""
    from sklearn.linear_model import LogisticRegression

    _check_splits(train, test)
    t0 = time.perf_counter()
    train_split, hit_train = cached_features(model, train, batch_size, engine)
    test_split, hit_test = cached_features(model, test, batch_size, engine)
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
        cache_hits=int(hit_train) + int(hit_test),
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
