"""Saving and loading an index's files: the faiss structure, meta rows and header, through store's generations.

Separate from index.py so the Index class keeps building and searching, and from store.py so the
folder layout and its atomic commit stay faiss-free (store takes a writer callable). Load retries
once when a concurrent save swept the generation it was reading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import IndexFileError
from . import store
from .ann import IndexParams

if TYPE_CHECKING:
    import faiss

__all__ = ["HEADER_KEYS", "describe_header", "read_files", "read_header", "write_files"]

_T = TypeVar("_T")

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
    """The header, meta rows and faiss structure of the index folder `root`, every file checked
    against the sha256 its header records.

    Raises:
        IndexFileError: missing, incomplete or corrupted index.
    """
    return _retried(root, _read_once)


def read_header(root: Path) -> dict[str, Any]:
    """The header of the index folder `root` alone, its data files checked present at their
    recorded sizes but not read: what `clipengine index info` shows, in milliseconds where
    `read_files` hashes and loads every byte (~7 s for 1M x 512 vectors). Damage that keeps a
    file's size goes unnoticed here; `read_files` (every load) finds it.

    Raises:
        IndexFileError: missing, incomplete or not an index.
    """
    return _retried(root, store.read_header)


def _retried(root: Path, read: Callable[[Path], _T]) -> _T:
    """`read(root)`, once more if it failed because a concurrent save swept the generation it had
    just started reading (the header moved on meanwhile); otherwise the error stands."""
    generation = store.peek_generation(root)
    try:
        return read(root)
    except (IndexFileError, OSError):
        if store.peek_generation(root) == generation:
            raise
        return read(root)


def describe_header(header: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`Index.describe()` of the index `header` heads, its extra fields), without loading it: the
    same fields and values `Index.load(...).describe()` and `.extra` give."""
    params = IndexParams.from_dict({"kind": header.get("kind", "flat"), **header["params"]})
    created = header.get("created")
    described = {
        "kind": params.kind,
        "exact": params.exact,
        "params": params.to_dict(),
        "count": int(header["count"]),
        "dim": int(header["dim"]),
        "model": str(header["model"]),
        "pretrained": header.get("pretrained"),
        "image_roots": [str(r) for r in header.get("image_roots", [])],
        "created": created,
        "updated": header.get("updated", created),
    }
    return described, {k: v for k, v in header.items() if k not in HEADER_KEYS}
