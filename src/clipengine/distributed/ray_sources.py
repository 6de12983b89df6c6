"""The Ray engine's sources: folders, .txt lists, Parquet path columns and WebDataset .tar shards.

`list_source` lists the items on the driver. A tar member's source is encoded as
`tar://<tar path>::<member name>` (plain text, sent to the actors in the job's rows), and an actor
reads the members back as bytes with `_materialise`, one open per tar.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import DatasetError
from ..pipeline.sources import is_image_name, list_folder, list_items
from ..types import ImageItem

__all__ = ["list_source"]

_TAR_SCHEME = "tar://"  # private source encoding of a WebDataset member: tar://<tar path>::<member name>


def _tar_items(tars: Sequence[Path]) -> list[ImageItem]:
    """Image members of WebDataset tar shards, ids ``<shard name>/<member>``, in shard then tar order."""
    items: list[ImageItem] = []
    for tar in sorted(tars):
        try:
            with tarfile.open(tar) as tf:
                names = [m.name for m in tf.getmembers() if m.isfile() and is_image_name(Path(m.name).name)]
        except (OSError, tarfile.TarError) as e:
            raise DatasetError(f"{tar}: not a readable tar shard ({' '.join(str(e).split())})") from e
        items.extend(ImageItem(f"{tar.name}/{n}", f"{_TAR_SCHEME}{tar.resolve()}::{n}") for n in names)
    return items


def _parquet_items(path: Path, column: str) -> list[ImageItem]:
    """Paths from a Parquet column; relative paths resolve against the Parquet file's folder."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if column not in names:
            raise DatasetError(f"{path}: no column {column!r} (its columns: {', '.join(names)})")
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) for a bad file
        raise DatasetError(f"{path}: cannot read column {column!r} ({e})") from e
    missing = [row for row, v in enumerate(values) if v is None or str(v) == ""]
    if missing:  # no id to list them under in failures.jsonl: refused, never skipped
        rows = ("row " if len(missing) == 1 else "rows ") + ", ".join(map(str, missing[:10]))
        raise DatasetError(
            f"{path}: column {column!r} is empty (null) in {rows}{', ...' if len(missing) > 10 else ''} "
            "(counting from 0); give every row a path or drop those rows"
        )
    entries = [str(v) for v in values]
    if len(set(entries)) != len(entries):
        raise DatasetError(f"{path}: column {column!r} lists a path twice; ids must be unique")
    return [
        ImageItem(e, str(p if (p := Path(e).expanduser()).is_absolute() else path.parent / p))
        for e in entries
    ]


def list_source(
    source: str | Path | Sequence[ImageItem | str | Path], path_column: str = "path"
) -> list[ImageItem]:
    """Items of a folder, a file list (.txt), a Parquet file with a path column, or WebDataset .tar shards.

    Args:
        source: a folder of images (or of .tar shards), a .txt list, a .parquet file, a .tar shard,
            a list of .tar shards, or ready ImageItems.
        path_column: the Parquet column holding image paths.

    Raises:
        DatasetError: the source does not exist or cannot be read.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir() and not list_folder(path):  # no image it would list (hidden folders are skipped)
            tars = sorted(path.glob("*.tar"))
            if tars:
                return _tar_items(tars)
        if path.suffix == ".tar" and path.is_file():
            return _tar_items([path])
        if path.suffix == ".parquet" and path.is_file():
            return _parquet_items(path, path_column)
        return list_items(path)
    entries = list(source)
    if entries and all(isinstance(e, (str, Path)) and str(e).endswith(".tar") for e in entries):
        return _tar_items([Path(e) for e in entries])  # type: ignore[arg-type]
    if not all(isinstance(e, ImageItem) for e in entries):
        raise DatasetError("a source list must hold ImageItems or .tar shard paths")
    return entries  # type: ignore[return-value]


def _materialise(pairs: list[list[str]]) -> list[ImageItem]:
    """Turn encoded (id, source) pairs back into ImageItems, reading tar members as bytes (one open per tar)."""
    by_tar: dict[str, list[str]] = {}
    for _, src in pairs:
        if src.startswith(_TAR_SCHEME):
            tar, member = src[len(_TAR_SCHEME) :].split("::", 1)
            by_tar.setdefault(tar, []).append(member)
    blobs: dict[str, bytes] = {}
    for tar, members in by_tar.items():
        with tarfile.open(tar) as tf:
            for m in members:
                f = tf.extractfile(m)
                blobs[f"{_TAR_SCHEME}{tar}::{m}"] = f.read() if f is not None else b""
    return [ImageItem(i, blobs[s] if s.startswith(_TAR_SCHEME) else s) for i, s in pairs]


def _encode(item: ImageItem) -> str:
    if isinstance(item.source, bytes):
        raise DatasetError(
            f"{item.id}: in-memory bytes cannot be sent to Ray actors; pass a path or tar shard"
        )
    return str(item.source)
