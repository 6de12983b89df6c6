"""The Ray engine's sources: folders, .txt lists, Parquet path columns and WebDataset .tar shards.

`list_source` lists the items on the driver. A tar member's source is a `tar_members.MemberRef`
as plain text (sent to the actors in the job's rows); the actors' decode process reads it
(`tar_members.TarMemberPool`), a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import DatasetError
from ..pipeline.sources import list_folder, list_items
from ..types import ImageItem
from .tar_members import tar_items

__all__ = ["list_source"]


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
                return tar_items(tars)
        if path.suffix == ".tar" and path.is_file():
            return tar_items([path])
        if path.suffix == ".parquet" and path.is_file():
            return _parquet_items(path, path_column)
        return list_items(path)
    entries = list(source)
    if entries and all(isinstance(e, (str, Path)) and str(e).endswith(".tar") for e in entries):
        return tar_items([Path(e) for e in entries])  # type: ignore[arg-type]
    if not all(isinstance(e, ImageItem) for e in entries):
        raise DatasetError("a source list must hold ImageItems or .tar shard paths")
    return entries  # type: ignore[return-value]


def _encode(item: ImageItem) -> str:
    if isinstance(item.source, bytes):
        raise DatasetError(
            f"{item.id}: in-memory bytes cannot be sent to Ray actors; pass a path or tar shard"
        )
    return str(item.source)
