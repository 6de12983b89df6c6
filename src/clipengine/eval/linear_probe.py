"""Linear probe: frozen image features + scikit-learn logistic regression (C=0.316, max_iter=1000).

Features are cached under `$CLIPENGINE_HOME/features/` keyed by model, engine, dataset and split,
so a second run skips the image tower entirely.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatasetError
from ..files import atomic_path
from ..paths import cache_dir
from .zeroshot import accuracy_metrics, encode_dataset

if TYPE_CHECKING:
    from ..api import ClipModel
    from .datasets import LabelledImages

__all__ = [
    "C_DEFAULT",
    "LinearProbeResult",
    "cached_features",
    "evaluate_linear_probe",
    "feature_cache_path",
    "model_fingerprint",
]

log = logging.getLogger(__name__)

C_DEFAULT = 0.316  # the seed's (and CLIP paper's sweep-found) inverse regularisation strength
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

    The fingerprint covers the weights (`model_fingerprint`), the engine, and the split's size,
    labels and first item, so a retrained model or a changed dataset never reads stale features.
    """
    b = model.backend
    engine = engine or f"{b.name}-{b.precision}"
    if data.paths:
        first: object = str(data.paths[0].resolve())
    else:
        first = data.arrays[:4].tobytes() if data.arrays is not None else b""
    key = (model.name, model_fingerprint(model), engine, data.name, len(data), data.labels.tobytes(), first)
    fp = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model.name}__{engine}__{data.name}")
    return cache_dir() / "features" / f"{safe}__{fp}.npy"


def cached_features(
    model: ClipModel, data: LabelledImages, batch_size: int = 64, engine: str = ""
) -> tuple[np.ndarray, bool]:
    """(N, D) image features of `data`, read from the cache when present; returns (features, hit)."""
    path = feature_cache_path(model, data, engine)
    if path.is_file():
        try:
            feats = np.load(path)
        except (OSError, ValueError, EOFError) as e:  # cut short or foreign: a miss, rewritten below
            log.warning("ignoring unreadable feature cache %s (%s)", path, e)
        else:
            if feats.shape == (len(data), model.embed_dim):
                log.info("features from cache %s", path)
                return feats, True
    feats = encode_dataset(model, data, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp file beside the cache file, then os.replace: two runs at once never share a temp
    # name, and a failed save leaves neither a truncated cache file nor a temp file behind.
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, feats)  # a file object: np.save would add ".npy" to a temp name without it
    return feats, False


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
    x_train, hit_train = cached_features(model, train, batch_size, engine)
    x_test, hit_test = cached_features(model, test, batch_size, engine)
    t1 = time.perf_counter()
    clf = LogisticRegression(C=C, max_iter=MAX_ITER, random_state=0)
    clf.fit(x_train, train.labels)
    decision = clf.decision_function(x_test)
    if decision.ndim == 1:  # two classes: one column, the score of classes_[1]
        decision = np.stack([-decision, decision], axis=1)
    scores = np.full((len(test), len(test.classnames)), -np.inf)  # classes absent from train never win
    scores[:, clf.classes_] = decision
    m = accuracy_metrics(scores, test.labels, test.classnames)
    t2 = time.perf_counter()
    return LinearProbeResult(
        model=model.name,
        dataset=test.name,
        n_train=len(train),
        n_test=len(test),
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
    )
