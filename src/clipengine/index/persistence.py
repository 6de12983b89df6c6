"""Saving and loading an index's files: the faiss structure, meta rows and header, through store's generations.

Separate from index.py so the Index class keeps building and searching, and from store.py so the
folder layout and its atomic commit stay faiss-free (store takes a writer callable). Load retries
once when a concurrent save swept the generation it was reading.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IndexFileError
from . import store

if TYPE_CHECKING:
    import faiss

__all__ = ["HEADER_KEYS", "read_files", "write_files"]

# Header fields the Index itself owns; any other header field is kept in Index.extra.
HEADER_KEYS = frozenset(
    {
        "format",
        "version",
        "generation",
        "files",
        "sizes",
        "sha256",
        "kind",
        "exact",
        "params",
        "count",
        "dim",
        "model",
        "pretrained",
        "image_roots",
        "created",
        "updated",
    }
)


def write_files(
    path: Path,
    faiss_index: faiss.Index,
    header: dict[str, Any],
    rows: Iterator[dict[str, Any]],
    loaded_generation: int | None = None,
) -> int:
    """Write a new generation of the index folder at `path` (atomically, see clipengine.index.store);
    return its number. `loaded_generation`: see store.write_generation."""
    import faiss

    written = store.write_generation(
        path, header, lambda tmp: faiss.write_index(faiss_index, str(tmp)), rows, loaded_generation
    )
    return int(written["generation"])


def _read_once(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]], faiss.Index]:
    import faiss

    header = store.read_header(root)
    rows = store.read_meta(root, header)
    vec_path = root / header["files"]["vectors"]
    store.check_digest(root, header, "vectors")
    try:
        index = faiss.read_index(str(vec_path))
    except RuntimeError as e:
        raise IndexFileError(f"{vec_path} is not a readable faiss index ({e}); rebuild the index") from e
    if index.ntotal != header["count"] or index.d != header["dim"]:
        raise IndexFileError(
            f"{vec_path} holds {index.ntotal} vectors of dim {index.d}, header says "
            f"{header['count']} of dim {header['dim']}; rebuild the index"
        )
    return header, rows, index


def read_files(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]], faiss.Index]:
    """The header, meta rows and faiss structure of the index folder `root`.

    Raises:
        IndexFileError: missing, incomplete or corrupted index.
    """
    generation = store.peek_generation(root)
    try:
        return _read_once(root)
    except (IndexFileError, OSError):
        # A concurrent save may have swept the generation we had just started reading: if the
        # header moved on, read the new generation once; otherwise the error stands.
        if store.peek_generation(root) == generation:
            raise
        return _read_once(root)
