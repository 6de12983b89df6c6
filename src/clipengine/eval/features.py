"""Image features of an eval split, cached on disk and checkpointed while they are computed.

Shared by zero-shot and the linear probe. The complete features of a split live in
`$CLIPENGINE_HOME/features/<key>.npy` (raw, unnormalised rows; NaN for images that could not be
decoded), their failures with the reasons in `<key>.failures.json` beside it. While a split is
encoded, each finished chunk of `CHUNK_ROWS` images is written atomically into `<key>.partial/`,
so a run that is killed, interrupted or loses its machine is resumed by the next run with the same
key: the finished chunks are read back and only the rest is encoded. The key (`feature_cache_path`)
covers the weights, preprocessing, engine, labels and every image, so a changed dataset or model
never reuses a chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..files import atomic_path
from ..paths import cache_dir
from ..types import Failure
from .zeroshot import EncodedSplit, encode_dataset, encode_rows, report_failures

if TYPE_CHECKING:
    from ..api import ClipModel
    from .labelled import LabelledImages

__all__ = [
    "CHUNK_ROWS",
    "FeatureRun",
    "ResumeCallback",
    "cached_features",
    "checkpointed_features",
    "feature_cache_path",
    "model_fingerprint",
    "partial_folder",
]

log = logging.getLogger(__name__)

# Images per checkpoint: ~1 min of ViT-B/32 on a 2-core CPU, ~4 MB of features; a kill loses at most this.
CHUNK_ROWS = 2048

# Called once when a run resumes: (rows read back from the partial folder, rows in the split, the folder).
ResumeCallback = Callable[[int, int, Path], None]


@dataclass
class FeatureRun:
    """Features of a split and where they came from."""

    split: EncodedSplit
    hit: bool  # all read from the complete cache file
    resumed: int = 0  # rows read back from the chunks of an interrupted run


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


def partial_folder(cache_path: Path) -> Path:
    """Where the finished chunks of an unfinished run for `cache_path` are kept: `<key>.partial/`."""
    return cache_path.with_suffix(".partial")


def _failures_path(cache_path: Path) -> Path:
    return cache_path.with_suffix(".failures.json")


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

    `checkpointed_features` without its resume details.
    """
    run = checkpointed_features(model, data, batch_size, engine)
    return run.split, run.hit


def checkpointed_features(
    model: ClipModel,
    data: LabelledImages,
    batch_size: int = 64,
    engine: str = "",
    *,
    chunk_rows: int | None = None,
    on_resume: ResumeCallback | None = None,
    cache: bool = True,
) -> FeatureRun:
    """Raw (unnormalised) image features of `data`: from the cache file when complete, else encoded
    chunk by chunk, resuming from the chunks an interrupted run left in `partial_folder`.

    Rows of images that could not be decoded are NaN, and their failures keep their reasons, also
    when read back from the cache or from a chunk. `on_resume` is called before encoding when
    chunks are read back (the CLI tells the user; this module never prints).

    Raises:
        DatasetError: no image of `data` could be decoded.
        BackendError: the model gave NaN, inf or all-zero embeddings for a decoded image.
    """
    if not cache:
        return FeatureRun(encode_dataset(model, data, batch_size, normalize=False), hit=False)
    path = feature_cache_path(model, data, engine)
    cached = _read_complete(path, data, model.embed_dim)
    if cached is not None:
        log.info("features from cache %s", path)
        return FeatureRun(cached, hit=True)
    chunk_rows = chunk_rows or CHUNK_ROWS
    partial = partial_folder(path)
    starts = range(0, len(data), chunk_rows)
    chunks = _finished_chunks(partial, data, chunk_rows, model.embed_dim)
    resumed = sum(len(c.features) for c in chunks.values())
    if resumed:
        log.info("resuming: %d of %d images of %s from a previous run (%s)", resumed, len(data), data.name, partial)
        if on_resume is not None:
            on_resume(resumed, len(data), partial)
    checkpoints = True
    for start in starts:
        if start in chunks:
            continue
        stop = min(start + chunk_rows, len(data))
        # Not unit-normalised: CLIP's README fits its C = 0.316 on `encode_image` as it is (ViT-B/32's
        # image features have norms near 10); zero-shot normalises at use.
        chunks[start] = encode_rows(model, data, start, stop, batch_size, normalize=False)
        if checkpoints and stop < len(data):  # the last chunk goes straight into the complete file
            checkpoints = _saved(_write_chunk, partial / _chunk_name(start, stop), chunks[start], data)
    empty = np.zeros((0, model.embed_dim), dtype=np.float32)  # np.concatenate refuses an empty list
    split = EncodedSplit(
        np.concatenate([empty] + [chunks[s].features for s in starts]), [f for s in starts for f in chunks[s].failures]
    )
    report_failures(data, split.failures)
    if _saved(_write_complete, path, split, data):
        shutil.rmtree(partial, ignore_errors=True)  # its chunks are all in the complete file now
    return FeatureRun(split, hit=False, resumed=resumed)


def _saved(write: Callable[[Path, EncodedSplit, LabelledImages], None], path: Path, split: EncodedSplit,
           data: LabelledImages) -> bool:  # fmt: skip
    """Whether `write` saved `path`. A cache that cannot be written (disk full, read-only home)
    costs the next run its head start, not this run its result: a warning, and the eval goes on."""
    try:
        write(path, split, data)
    except OSError as e:
        log.warning("the eval goes on without saving its features to %s (%s): a later run cannot "
                    "reuse or resume them", path, e.strerror or e)  # fmt: skip
        return False
    return True


def _finished_chunks(partial: Path, data: LabelledImages, chunk_rows: int, dim: int) -> dict[int, EncodedSplit]:
    """{first row: chunk} of the whole chunks an interrupted run left in `partial`."""
    chunks = {}
    for start in range(0, len(data), chunk_rows):
        stop = min(start + chunk_rows, len(data))
        done = _read_chunk(partial / _chunk_name(start, stop), data, start, stop, dim)
        if done is not None:
            chunks[start] = done
    return chunks


def _chunk_name(start: int, stop: int) -> str:
    # Both ends in the name: a run with another chunk size never reads a chunk of other rows.
    return f"rows-{start:09d}-{stop:09d}.npz"


def _failure_rows(split: EncodedSplit, data: LabelledImages) -> tuple[np.ndarray, np.ndarray]:
    """(rows of `split`, reasons) of the split's failures, in row order."""
    nan_rows = np.flatnonzero(~np.isfinite(split.features).all(axis=1))
    reasons = np.array([f.reason for f in split.failures], dtype=str)
    if len(reasons) != len(nan_rows):  # cannot happen: encode_rows fails exactly the NaN rows
        raise AssertionError(f"{data.name}: {len(nan_rows)} NaN rows but {len(reasons)} failures")
    return nan_rows, reasons


def _write_chunk(path: Path, split: EncodedSplit, data: LabelledImages) -> None:
    rows, reasons = _failure_rows(split, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    # sync=False: a chunk is cheap to make again; a kill still leaves no torn file.
    with atomic_path(path, sync=False) as tmp, tmp.open("wb") as f:
        np.savez(f, features=split.features, failed_rows=rows, reasons=reasons)


def _read_chunk(path: Path, data: LabelledImages, start: int, stop: int, dim: int) -> EncodedSplit | None:
    """The chunk at `path` when it is whole and fits rows [start, stop); None when absent or damaged
    (a warning then: it is encoded again, never trusted)."""
    if not path.is_file():
        return None
    try:
        # Our own handle: np.load left it open when the zip was cut short (an unraisable warning).
        with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
            features, rows, reasons = z["features"], z["failed_rows"], z["reasons"]
        _check_rows(features, rows, reasons, stop - start, dim)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # cut short, or foreign
        log.warning("encoding again the damaged checkpoint %s (%s)", path, e)
        return None
    return EncodedSplit(features, [_failure(data, start + int(r), str(why)) for r, why in zip(rows, reasons, strict=True)])


def _check_rows(features: np.ndarray, rows: np.ndarray, reasons: np.ndarray, n: int, dim: int) -> None:
    """Raise ValueError unless `features` are (n, dim) float32 whose NaN rows are exactly `rows`
    (one reason each) and whose other rows are finite and not all zero."""
    if features.shape != (n, dim) or features.dtype != np.float32:
        raise ValueError(f"features of shape {features.shape} {features.dtype}, expected ({n}, {dim}) float32")
    nan = np.isnan(features).all(axis=1)
    if rows.shape != reasons.shape or not np.array_equal(np.flatnonzero(nan), rows):
        raise ValueError("its failed rows do not match its NaN rows")
    good = features[~nan]
    if not (np.isfinite(good).all() and (good != 0).any(axis=1).all()):
        raise ValueError("rows with inf, NaN or all zeros")


def _failure(data: LabelledImages, row: int, reason: str) -> Failure:
    return Failure(str(data.paths[row]) if data.paths else f"image {row}", reason)


def _read_complete(path: Path, data: LabelledImages, dim: int) -> EncodedSplit | None:
    """The complete cache file's features with their failures; None when absent or unusable."""
    if not path.is_file():
        return None
    try:
        feats = np.load(path)
    except (OSError, ValueError, EOFError) as e:  # cut short or foreign: a miss, rewritten
        log.warning("ignoring unreadable feature cache %s (%s)", path, e)
        return None
    if feats.shape != (len(data), dim):
        return None
    missing = np.flatnonzero(~np.isfinite(feats).all(axis=1))
    reasons = _read_reasons(_failures_path(path), missing)
    return EncodedSplit(feats, [_failure(data, int(i), reasons.get(int(i), _NO_REASON)) for i in missing])


_NO_REASON = "could not be decoded when the feature cache was written"


def _read_reasons(path: Path, rows: np.ndarray) -> dict[int, str]:
    """{row: reason} from the failures file beside a cache file; empty when it is missing or does
    not list exactly `rows` (a cache written before the reasons were kept)."""
    if not rows.size:
        return {}
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
        reasons = {int(r): str(why) for r, why in zip(listed["rows"], listed["reasons"], strict=True)}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("no failure reasons from %s (%s)", path, e)
        return {}
    return reasons if sorted(reasons) == rows.tolist() else {}


def _write_complete(path: Path, split: EncodedSplit, data: LabelledImages) -> None:
    """The features file, and before it the failures file, each written atomically."""
    rows, reasons = _failure_rows(split, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rows.size:  # first: a features file is never there without the reasons of its NaN rows
        listed = {"rows": rows.tolist(), "reasons": reasons.tolist()}
        with atomic_path(_failures_path(path)) as tmp:
            tmp.write_text(json.dumps(listed), encoding="utf-8")
    # A unique temp file beside the cache file, then os.replace: two runs at once never share a temp
    # name, and a failed save leaves neither a truncated cache file nor a temp file behind.
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, split.features)  # a file object: np.save would add ".npy" to a temp name without it
