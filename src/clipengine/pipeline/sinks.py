"""Embedding shards on disk: atomic writes, completeness checks for resume, and reading them back.

Layout of an output folder OUT::

    OUT/run.json                            model, embed_dim, dtype, shard_size, counts, timings
    OUT/failures.jsonl                      {"path", "reason"} per unreadable input (merged at the end)
    OUT/shards/part-00000.npy               (n, D) float16|float32, unit-norm rows
    OUT/shards/part-00000.jsonl             {"path", "index", "width", "height"} per row; index = row in .npy
    OUT/shards/part-00000.failures.jsonl    this partition's failures (so a rerun never duplicates them)
    OUT/.clipengine.lock                    held by the run writing OUT (`run_lock`): one at a time

Stored as float16 (the default), each row loses precision: `ShardSink.write` measures, per shard, the
worst cosine of a row as written to the float32 row it came from (`float16_min_cos`), and
`ShardSink.min_cos_written` gives the worst over the shards it wrote (`RunStats.storage_min_cos`).

Every file is written to a hidden temp file in the same folder and moved into place with os.replace
(`clipengine.files`), so a reader (or a killed run) never sees a partial file. A shard's `.jsonl` is
written last: it is the commit marker, and `ShardSink.is_complete` re-checks row counts and ids
before a resume trusts it.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import files
from ..errors import DatasetError
from ..types import Failure, FloatArray

__all__ = [
    "DTYPES",
    "FAILURES_FILE",
    "RUN_FILE",
    "SHARDS_DIR",
    "ShardSink",
    "atomic_write_bytes",
    "atomic_write_json",
    "float16_min_cos",
    "read_embeddings",
    "read_failures",
    "read_run_info",
    "shard_stem",
    "shard_stems",
]

_log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
FAILURES_FILE = "failures.jsonl"
RUN_FILE = "run.json"
DTYPES = ("float16", "float32")
# The files a sink writes, by folder: what its leftover sweep may remove the temp files of.
_OUT_FILES = re.compile(f"{re.escape(RUN_FILE)}|{re.escape(FAILURES_FILE)}")
_SHARD_FILE = re.compile(r"part-\d+\.(npy|jsonl|failures\.jsonl)")
# Why `ShardSink.is_complete` refuses a finished shard whose ids are not its partition's.
SHARD_MISMATCH = "does not match its partition"
# `ShardSink._problem` of a shard never finished (its .jsonl, written last, is missing): no warning.
_UNFINISHED = "was never finished"


def shard_stem(partition_id: int) -> str:
    """``part-00042`` for partition 42: names sort in partition order."""
    return f"part-{partition_id:05d}"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`files.atomic_write_bytes`, creating the folder first (the first shard makes ``OUT/shards``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_bytes(path, data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _json_line(row: dict[str, Any]) -> str:
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (lone surrogates from os.fsdecode)
        line = json.dumps(row)  # escaped as \udcff: valid UTF-8 that reads back to the same str
    return line + "\n"


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(_json_line(r) for r in rows).encode("utf-8")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a .jsonl file. Raises ValueError (and OSError) for a damaged one."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not all(isinstance(row, dict) for row in rows):  # valid JSON of another kind is damage too
        raise ValueError(f"{path.name}: a line is not a JSON object")
    return rows


def float16_min_cos(vectors: FloatArray, stored: npt.NDArray[np.float16]) -> float | None:
    """The worst cosine of a row of `stored` (float16, as written) to its row of `vectors` (float32).

    Unit rows lose ~1e-8 of cosine in float16, below float32's resolution of a cosine near 1, so
    the loss is computed from the difference d = stored - vectors (exact in float32):
    1 - cos = sin^2 / (1 + cos), sin^2 = (|x|^2 |d|^2 - (x.d)^2) / (|x|^2 |y|^2); within ~1e-14 of
    the float64 cosine. 1000 x 768 on a 2-core CPU: 2.2 ms (the float64 cosine: 12 ms; the cast
    and np.save: 2.6 ms).
    Rows with a non-finite float32 value have no direction to lose and are left out; a row whose
    float16 copy overflowed (|x| > 65504) or underflowed to zero counts as cosine 0 (nothing of its
    direction kept). Two zero rows count as 1.

    Returns:
        None when no row was measured (no rows, or none finite).
    """
    x, y = np.asarray(vectors, dtype=np.float32), np.asarray(stored, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # inf / NaN rows: measured apart, below
        d = y - x
        xx, dd, xd = (np.einsum("nd,nd->n", a, b) for a, b in ((x, x), (d, d), (x, d)))
        yy = xx + 2 * xd + dd
    easy = np.isfinite(xx) & np.isfinite(dd) & (xx > 0) & (yy > 0) & (xx + xd > 0)  # x.y > 0
    worst = []
    if easy.any():
        xx, dd, xd, yy = xx[easy], dd[easy], xd[easy], yy[easy]
        sin2 = np.clip((xx * dd - xd * xd) / (xx * yy), 0.0, 1.0)
        worst.append(1.0 - float((sin2 / (1.0 + np.sqrt(1.0 - sin2))).max()))
    if not easy.all():  # the odd rows, in float64
        hard = _min_cos_float64(x[~easy], y[~easy])
        if hard is not None:
            worst.append(hard)
    return min(worst) if worst else None


def _min_cos_float64(vectors: FloatArray, stored: FloatArray) -> float | None:
    """`float16_min_cos` of rows with a zero, non-finite or opposite row (no shortcut there)."""
    x = np.asarray(vectors, dtype=np.float64)
    finite = np.isfinite(x).all(axis=1)
    if not finite.any():
        return None
    x, y = x[finite], np.asarray(stored, dtype=np.float64)[finite]
    kept = np.asarray(np.isfinite(y).all(axis=1))
    y = np.where(kept[:, None], y, 0.0)  # overflowed rows: cosine 0 below
    x_norm, y_norm = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    both = x_norm * y_norm
    cos = np.einsum("nd,nd->n", x, y) / np.where(both > 0, both, 1.0)
    cos = np.where(both > 0, cos, np.where((x_norm == 0) & kept, 1.0, 0.0))
    return float(np.clip(cos, -1.0, 1.0).min())


class ShardSink:
    """Writes one shard per partition under ``OUT/shards`` and tells which ones are already complete.

    A float16 sink measures what each shard it writes loses to float16 (`min_cos_written`).
    """

    def __init__(self, out_dir: str | Path, dtype: str = "float16") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.out_dir = Path(out_dir)
        self.shards_dir = self.out_dir / SHARDS_DIR
        self.dtype = dtype
        self._min_cos: dict[int, float] = {}  # partition id -> its last write's `float16_min_cos`

    def min_cos_written(self, partition_ids: Iterable[int] | None = None) -> float | None:
        """The worst cosine of a float16 row to its float32 row over the shards this sink wrote
        (all of them, or those of `partition_ids`; a rewritten shard counts as last written).

        Returns:
            None for a float32 sink, or when no row of those shards was written by this sink (a
            shard kept by a resume is not read back to be measured).
        """
        wanted = self._min_cos.keys() if partition_ids is None else partition_ids
        found = [self._min_cos[pid] for pid in wanted if pid in self._min_cos]
        return min(found) if found else None

    def paths(self, partition_id: int) -> tuple[Path, Path, Path]:
        """(vectors .npy, rows .jsonl, failures .jsonl) of a partition."""
        stem = self.shards_dir / shard_stem(partition_id)
        return stem.with_suffix(".npy"), stem.with_suffix(".jsonl"), Path(f"{stem}.failures.jsonl")

    def clean_temp_files(self) -> int:
        """Delete temp files a killed run left behind; returns how many.

        Only those of files this sink writes: the output folder may hold the user's own files.
        """
        n = 0
        for folder, ours in ((self.out_dir, _OUT_FILES), (self.shards_dir, _SHARD_FILE)):
            if folder.is_dir():
                for tmp in folder.iterdir():
                    target = files.temp_target(tmp.name)
                    if target is not None and ours.fullmatch(target) and tmp.is_file():
                        tmp.unlink(missing_ok=True)
                        n += 1
        return n

    def has_failures(self, partition_id: int) -> bool:
        """True when the partition's shard lists inputs that could not be read."""
        fail_path = self.paths(partition_id)[2]
        return fail_path.is_file() and fail_path.stat().st_size > 0

    def is_complete(
        self,
        partition_id: int,
        expected_ids: Sequence[str],
        embed_dim: int | None = None,
        *,
        stale: list[tuple[int, str]] | None = None,
    ) -> bool:
        """True when the partition's shard exists and accounts for exactly `expected_ids`, in order.

        Rows + failures must cover the expected ids once each; the .npy row count must equal the
        .jsonl row count (and its width `embed_dim`, when given) and its dtype this sink's dtype.

        A finished shard that fails the check is logged, or, given `stale`, appended to it as
        (partition id, why) for the caller to report once: a source changed since the run (one file
        added at the top of a folder) shifts every later partition, and a warning per shard flooded
        the terminal (200 lines for 200,000 files).
        """
        problem = self._problem(partition_id, expected_ids, embed_dim)
        if problem is None or problem is _UNFINISHED:
            return problem is None
        if stale is not None:
            stale.append((partition_id, problem))
        else:
            _log.warning("shard %s %s, recomputing it", shard_stem(partition_id), problem)
        return False

    def _problem(self, partition_id: int, expected_ids: Sequence[str], embed_dim: int | None) -> str | None:
        """None for a complete shard, `_UNFINISHED` for one never finished, else why it is stale."""
        npy, rows_path, fail_path = self.paths(partition_id)
        if not (npy.is_file() and rows_path.is_file() and fail_path.is_file()):
            return _UNFINISHED
        try:
            rows = _read_jsonl(rows_path)
            failed = {r["path"] for r in _read_jsonl(fail_path)}
            vectors = np.load(npy, mmap_mode="r")
        except (OSError, ValueError, KeyError) as e:
            return f"is unreadable ({e})"
        kept = [i for i in expected_ids if i not in failed]
        ok = (
            [r.get("path") for r in rows] == kept
            and len(failed) + len(kept) == len(expected_ids)
            and vectors.ndim == 2
            and vectors.shape[0] == len(rows)
            and str(vectors.dtype) == self.dtype
            and (embed_dim is None or vectors.shape[1] == embed_dim)
        )
        return None if ok else SHARD_MISMATCH

    def write(
        self,
        partition_id: int,
        ids: Sequence[str],
        vectors: FloatArray,
        sizes: Sequence[tuple[int, int]],
        failures: Sequence[Failure],
    ) -> float:
        """Atomically write a partition's shard; returns the seconds it took.

        Args:
            ids: row ids, aligned with `vectors` (N, D) and `sizes` (width, height).
            failures: the partition's bad inputs.
        """
        if not (len(ids) == len(vectors) == len(sizes)):
            raise ValueError(f"{len(ids)} ids, {len(vectors)} vectors and {len(sizes)} sizes must match")
        t0 = time.perf_counter()
        npy, rows_path, fail_path = self.paths(partition_id)
        atomic_write_bytes(fail_path, _jsonl({"path": f.id, "reason": f.reason} for f in failures))
        buf = io.BytesIO()
        stored = np.ascontiguousarray(vectors, dtype=self.dtype)
        np.save(buf, stored, allow_pickle=False)
        atomic_write_bytes(npy, buf.getvalue())
        self._min_cos.pop(partition_id, None)
        if self.dtype == "float16":
            worst = float16_min_cos(vectors, stored)
            if worst is not None:
                self._min_cos[partition_id] = worst
        rows = (
            {"path": i, "index": k, "width": w, "height": h}
            for k, (i, (w, h)) in enumerate(zip(ids, sizes, strict=True))
        )
        atomic_write_bytes(rows_path, _jsonl(rows))  # last: its presence marks the shard complete
        return time.perf_counter() - t0

    def write_failures(self, n_partitions: int) -> int:
        """Merge the per-partition failure files into ``OUT/failures.jsonl``; returns the count."""
        merged: list[dict[str, Any]] = []
        for pid in range(n_partitions):
            fail_path = self.paths(pid)[2]
            if fail_path.is_file():
                merged.extend(_read_jsonl(fail_path))
        atomic_write_bytes(self.out_dir / FAILURES_FILE, _jsonl(merged))
        return len(merged)


def read_run_info(out_dir: str | Path) -> dict[str, Any] | None:
    """The parsed ``OUT/run.json``, or None when there is none."""
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable run file ({e})") from e
    if not isinstance(info, dict):  # valid JSON of another kind: every reader calls .get on it
        raise DatasetError(f"{path}: unreadable run file (not a JSON object)")
    return info


def read_failures(out_dir: str | Path) -> list[Failure]:
    """The failures of a finished run (``OUT/failures.jsonl``); [] when it had none.

    Raises:
        DatasetError: `out_dir` is not a folder (a mistyped path read as "no failures" before).
    """
    if not isinstance(out_dir, str | Path):
        raise TypeError(f"out_dir must be a folder path (str or Path), got {type(out_dir).__name__}")
    if not Path(out_dir).is_dir():
        raise DatasetError(f"{out_dir}: no such embed output folder (run `clipengine embed` first)")
    path = Path(out_dir) / FAILURES_FILE
    if not path.is_file():
        return []
    return [Failure(r["path"], r["reason"]) for r in _read_jsonl(path)]


def shard_stems(out_dir: str | Path, meta: dict[str, Any] | None = None) -> list[str]:
    """The shards of the run in `out_dir`, in partition order: the partitions its run.json counts
    (`meta`, read when None). A rerun over fewer files leaves the older run's shards past them,
    which are not this run's; without a run.json, every shard in the folder."""
    if meta is None:
        meta = read_run_info(out_dir) or {}
    if "partitions" in meta:
        return [shard_stem(i) for i in range(int(meta["partitions"]))]
    shards_dir = Path(out_dir) / SHARDS_DIR
    return sorted(p.stem for p in shards_dir.glob("part-*.jsonl") if not p.name.endswith(".failures.jsonl"))


def read_embeddings(out_dir: str | Path) -> tuple[list[str], FloatArray, dict[str, Any]]:
    """Read every shard of an output folder back, in partition order.

    Returns:
        (ids, vectors (N, D) float32, meta): meta is ``run.json`` ({} if absent).

    Raises:
        DatasetError: an unfinished run, no shards, a missing shard, a shard whose .npy and .jsonl
            disagree, or shards of different widths.
    """
    if not isinstance(out_dir, str | Path):  # else pathlib's TypeError, naming no argument
        raise TypeError(f"out_dir must be a folder path (str or Path), got {type(out_dir).__name__}")
    out_dir = Path(out_dir)
    meta = read_run_info(out_dir) or {}
    if meta.get("status") == "running":  # its shards may mix this run's and an older run's partitions
        raise DatasetError(
            f"{out_dir}: the embed run has not finished; rerun `clipengine embed` to finish it"
        )
    shards_dir = out_dir / SHARDS_DIR
    stems = shard_stems(out_dir, meta)
    if not stems:
        raise DatasetError(f"{out_dir}: no embedding shards found (run `clipengine embed` first)")
    ids: list[str] = []
    # Two passes: the shards' shapes first, then one float32 array that each shard, memory-mapped, is
    # copied into. A float32 copy per shard joined by np.concatenate held every vector twice at the
    # end (6 GB for 1,000,000 768-d rows); keeping every shard mapped until the copy would hold a file
    # descriptor each (1,000 shards can exceed the common 1,024 limit).
    sizes: list[tuple[Path, int]] = []
    dim = 0  # the first shard's width (run.json's embed_dim may be null or damaged: not read here)
    for stem in stems:
        npy, rows_path = shards_dir / f"{stem}.npy", shards_dir / f"{stem}.jsonl"
        if not (npy.is_file() and rows_path.is_file()):
            raise DatasetError(f"{out_dir}: shard {stem} is missing; rerun `clipengine embed` to finish it")
        try:
            rows = _read_jsonl(rows_path)
            shard_ids = [r["path"] for r in rows]
            mapped = _mapped_shard(out_dir, stem, npy)
            shape, dtype = mapped.shape, mapped.dtype
            del mapped  # unmapped now: one shard mapped at a time (file descriptors)
        except (OSError, KeyError, ValueError) as e:  # damaged since the run: a rerun recomputes it
            raise _unreadable(out_dir, stem, e) from e
        if len(shape) != 2 or dtype.kind != "f":  # else a bare ValueError or TypeError from the copy below
            raise _unreadable(out_dir, stem, f"{npy.name} holds a {dtype} array of shape {shape}, not vectors")
        if shape[0] != len(rows):
            raise DatasetError(f"{npy}: {shape[0]} vectors but {len(rows)} rows in {rows_path.name}")
        if sizes and shape[1] != dim:  # was np.concatenate's bare ValueError
            raise DatasetError(
                f"{npy}: {shape[1]}-d vectors, but {dim}-d in {stems[0]}.npy; "
                "rerun `clipengine embed` into a new folder"
            )
        dim = shape[1]
        ids.extend(shard_ids)
        sizes.append((npy, shape[0]))
    vectors = np.empty((len(ids), dim), dtype=np.float32)
    start = 0
    for npy, count in sizes:
        block = _mapped_shard(out_dir, npy.stem, npy)
        if block.shape != (count, dim):  # rewritten since the first pass
            raise _unreadable(out_dir, npy.stem, f"it changed while being read: {block.shape}")
        vectors[start : start + count] = block  # float16 -> float32 in place; unmapped when dropped
        start += count
    return ids, vectors, meta


def _mapped_shard(out_dir: Path, stem: str, npy: Path) -> npt.NDArray[Any]:
    """`npy` memory-mapped (it holds a file descriptor until dropped), or read whole where the file
    system cannot map it (some FUSE and network mounts), or the shard's DatasetError."""
    try:
        try:
            mapped: npt.NDArray[Any] = np.load(npy, mmap_mode="r", allow_pickle=False)
        except OSError:  # a damaged or missing file fails the same way again, below
            mapped = np.load(npy, allow_pickle=False)
        return mapped
    except (OSError, ValueError) as e:
        raise _unreadable(out_dir, stem, e) from e


def _unreadable(out_dir: Path, stem: str, reason: object) -> DatasetError:
    return DatasetError(f"{out_dir}: shard {stem} is unreadable ({reason}); rerun `clipengine embed` to recompute it")
