"""Where images come from: a folder walk or a file list -> stable, sorted ImageItems, cut into partitions."""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from ..image.files import (  # the first two re-exported
    IMAGE_EXTENSIONS,
    is_image_name,
    special_file_kind,
    walk_image_paths,
)
from ..types import ImageItem

__all__ = [
    "IMAGE_EXTENSIONS",
    "Partition",
    "check_unique_ids",
    "is_image_name",
    "iter_items",
    "list_folder",
    "list_items",
    "num_partitions",
    "partition_items",
    "partitions",
    "read_file_list",
]

@dataclass(frozen=True)
class Partition:
    """A fixed slice of the sorted item list; its id names its output shard (part-<id>)."""

    id: int  # 0-based; partition i holds items [i * size, (i + 1) * size)
    items: tuple[ImageItem, ...]


def list_folder(root: str | Path) -> list[ImageItem]:
    """All images under `root`, recursively, hidden files and folders skipped (`image.files.walk_images`).

    Symlinked folders are followed, except links back to an ancestor (which would loop forever) and
    links to a folder under `root` that is listed anyway (its images would be listed twice).

    Ids are POSIX relative paths (``"cats/01.jpg"``), sorted so every run sees the same order.

    Raises:
        DatasetError: `root` is not a folder.
    """
    return [ImageItem(id=rel, source=path) for rel, path in walk_image_paths(root)]  # source: str(path)


def read_file_list(list_file: str | Path) -> list[ImageItem]:
    """Images named in a text file, one path per line, in file order (blank and `#` lines skipped).

    Relative paths are resolved against the list file's folder; the id is the line as written, so a
    missing or unreadable file still gets a stable id (it becomes a Failure later, not an error here).

    Raises:
        DatasetError: the list file cannot be read, is binary (NUL bytes), or names the same path twice.
    """
    list_file = Path(list_file)
    try:
        with open(list_file, "rb") as f:
            head = f.read(1 << 16)
            if b"\0" in head:  # no path holds one: a video or archive passed as the source, not read whole
                raise DatasetError(
                    f"{list_file}: not a file list (it holds NUL bytes: a binary file?); pass a folder, "
                    "or a text file with one path per line"
                )
            data = head + f.read()
    except OSError as e:
        raise DatasetError(f"{list_file}: cannot read file list ({e.strerror or e})") from e
    # A byte order mark (Notepad) is dropped, or the first file is not found. Bytes that are not
    # UTF-8 are a file name's own bytes (`find > list.txt` over Latin-1 names): decoded as Python
    # decodes file names (surrogateescape), so they open the same file and get the id a folder walk
    # gives it, where a strict decode refused the whole list.
    text = data.removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
    lines = text.split("\n")  # not splitlines(): names may hold U+2028
    items: list[ImageItem] = []
    seen: set[str] = set()
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry in seen:
            raise DatasetError(f"{list_file}: {entry!r} is listed twice; ids must be unique")
        seen.add(entry)
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = list_file.parent / path
        items.append(ImageItem(id=entry, source=str(path)))
    return items


def list_items(source: str | Path) -> list[ImageItem]:
    """A folder (walked recursively) or a file list (`.txt`, one path per line) -> sorted items.

    Raises:
        DatasetError: `source` does not exist, or is an image itself.
        TypeError: `source` is not a str or Path.
    """
    if not isinstance(source, str | Path):  # else pathlib's TypeError, naming no argument
        raise TypeError(f"source must be a folder or file list (str or Path), got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        return list_folder(path)
    if path.is_file() and is_image_name(path.name):  # read as a list, it fails on undecodable bytes
        raise DatasetError(f"{source}: an image, not a folder or file list: pass its folder, or a .txt file that names it")
    if path.is_file():
        return read_file_list(path)
    kind = special_file_kind(path)
    if kind is not None:  # it exists: "no such" misled; refused unopened, as reading a pipe waits for a writer
        raise DatasetError(f"{source}: not a folder or file list but {kind}; pass a folder or a regular file")
    raise DatasetError(f"{source}: no such folder or file list")


def check_unique_ids(items: Sequence[ImageItem]) -> None:
    """Refuse an id listed twice: each names one output row (and routes it to its shard).

    Raises:
        DatasetError: naming the first repeated id.
    """
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DatasetError(f"{item.id!r} is listed twice; ids must be unique (each names one output row)")
        seen.add(item.id)


def iter_items(source: str | Path) -> Iterator[ImageItem]:
    """Iterate the items of `source` (see `list_items`)."""
    yield from list_items(source)


def num_partitions(n_items: int, size: int) -> int:
    """How many partitions of at most `size` items cover `n_items`."""
    _check_size(size)
    return -(-n_items // size)


def partition_items(items: Sequence[ImageItem], partition_id: int, size: int) -> tuple[ImageItem, ...]:
    """The items of partition `partition_id`: ``items[id * size:(id + 1) * size]``."""
    _check_size(size)
    if partition_id < 0:
        raise ValueError(f"partition id must be >= 0, got {partition_id}")
    return tuple(items[partition_id * size : (partition_id + 1) * size])


def partitions(items: Sequence[ImageItem], size: int) -> list[Partition]:
    """Cut `items` into consecutive partitions of `size` items (the last may be shorter)."""
    return [
        Partition(id=i, items=partition_items(items, i, size))
        for i in range(num_partitions(len(items), size))
    ]


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not hasattr(size, "__index__"):  # "2" was a bare '<' TypeError
        raise TypeError(f"partition size must be an integer >= 1, got {size!r}")
    if size < 1:
        raise ValueError(f"partition size must be >= 1, got {size}")
