"""Input rows for the index: (N, D) vectors checked and made unit length, ids and sizes checked, size rows.

Separate from index.py because these are plain numpy/data checks shared by `Index.build`, `Index.add`
and `search_vectors` (and `sizes_from_rows` by the CLI); the Index class keeps only its faiss state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DuplicateIdError, IndexMismatchError, InputError
from ..text.tokenizer import as_str_list

if TYPE_CHECKING:
    from ..types import FloatArray

__all__ = ["as_id_list", "as_unit_matrix", "check_rows", "no_vectors", "size_row", "sizes_from_rows"]


def as_id_list(ids: object) -> list[str]:
    """`ids` as a list of str: one str would be read as one id per character, and an int id would
    be saved and come back as a str, so neither is taken.

    Raises:
        ValueError (InputError): one str, or anything but a list, tuple or 1-D array of str.
    """
    if isinstance(ids, str):
        raise InputError(f"ids must be a list of ids, not one string ({ids!r:.60}); wrap it in a list")
    return as_str_list(ids, "ids", "a list of str", "pass a list of str ids (e.g. image paths)")


def as_unit_matrix(vectors: Any, dim: int | None, what: str) -> FloatArray:
    """`vectors` as a C-contiguous (N, D) float32 matrix of unit rows (a (D,) vector becomes (1, D)).

    Raises:
        ValueError: not 1-d/2-d, or NaN / infinite values. IndexMismatchError: D is not `dim`.
    """
    raw = np.asarray(vectors)  # a ragged list raises here: say which argument
    if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_):
        # else numpy's "could not convert string to float: 'a dog'", naming neither argument nor fix
        raise ValueError(f"{what} must be a numeric (N, D) matrix, got dtype {raw.dtype}")
    x = raw.astype(np.float32, copy=False)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what} must be a (N, D) matrix, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise IndexMismatchError(
            f"{what} have dimension {x.shape[1]} but the index holds {dim}-d embeddings; "
            "use the model the index was built with"
        )
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # Inner product equals cosine only on unit vectors; re-normalise defensively (zero rows stay zero).
    return np.ascontiguousarray(np.divide(x, norms, out=np.zeros_like(x), where=norms > 0))


def no_vectors(vectors: Any, dim: int) -> FloatArray:
    """The (0, D) matrix for an empty id list; vectors without ids are an error, not dropped."""
    n = len(np.atleast_2d(np.asarray(vectors))) if np.size(vectors) else 0
    if n:
        raise ValueError(f"0 ids but {n} vectors")
    return np.zeros((0, dim), np.float32)


def check_rows(ids: Sequence[str], x: FloatArray, sizes: Sequence[Any] | None) -> None:
    """Raise unless there is one vector (and one size, if given) per id and the ids are unique."""
    if len(ids) != len(x):
        raise ValueError(f"{len(ids)} ids but {len(x)} vectors")
    if sizes is not None and len(sizes) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(sizes)} sizes")
    for i, size in enumerate(sizes or ()):  # else save() fails on int("a") after the build succeeded
        if size is not None and not _is_size(size):
            raise ValueError(f"sizes[{i}] is {size!r:.40}; expected (width, height) integers >= 1, or None")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise DuplicateIdError(f"id {dup!r} appears more than once in the input")


def _is_size(size: object) -> bool:
    return (
        isinstance(size, tuple | list)
        and len(size) == 2
        and all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1 for v in size)
    )


def size_row(id_: str, size: tuple[int, int] | None) -> dict[str, Any]:
    """One meta-file row: {"id": ...} plus "width"/"height" when the size is known."""
    row: dict[str, Any] = {"id": id_}
    if size is not None:
        row["width"], row["height"] = int(size[0]), int(size[1])
    return row


def sizes_from_rows(rows: Iterable[dict[str, Any]]) -> list[tuple[int, int] | None]:
    """(width, height) per metadata row, None where unknown (rows as in an embed shard's .jsonl)."""
    out: list[tuple[int, int] | None] = []
    for r in rows:
        w, h = r.get("width"), r.get("height")
        out.append((int(w), int(h)) if w is not None and h is not None else None)
    return out
