"""The image index: faiss inner-product search over unit vectors, with ids, sizes and model identity beside it."""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import DuplicateIdError, IndexFileError, IndexMismatchError
from ..text.tokenizer import as_str_list
from .ann import AUTO_EXACT_MAX, IndexParams, choose_params, create_faiss_index, search
from .persistence import HEADER_KEYS, read_files, write_files
from .rows import as_id_list, as_unit_matrix, check_rows, no_vectors, size_row
from .store import generation_of

if TYPE_CHECKING:
    import faiss

    from ..types import FloatArray, ImageInput

__all__ = ["Hit", "Index", "QueryModel", "same_model"]

log = logging.getLogger(__name__)

Hit = tuple[str, float]  # (id, cosine similarity)


class QueryModel(Protocol):
    """What searching by text or image needs from a model (clipengine.api.ClipModel satisfies it)."""

    # Read-only properties: as plain `embed_dim: int` members mypy refused ClipModel, whose
    # embed_dim is a property ("expected settable variable, got read-only attribute").
    @property
    def name(self) -> str: ...

    @property
    def embed_dim(self) -> int: ...

    def encode_texts(self, texts: Sequence[str]) -> FloatArray: ...

    def encode_images(self, images: Any, batch_size: int = 32) -> FloatArray: ...


def same_model(a: str, b: str) -> bool:
    """Whether two model names denote the same weights: equal, or equal names where one omits the @tag.

    "ViT-B-32@openai" matches "ViT-B-32" (ClipModel.name carries no tag) but not "ViT-B-32@laion2b_s34b_b79k".
    """
    if a == b:
        return True
    name_a, _, tag_a = a.partition("@")
    name_b, _, tag_b = b.partition("@")
    return name_a == name_b and not (tag_a and tag_b)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Index:
    """A searchable set of image embeddings tied to the model that produced them.

    Rows are positional: faiss label i is ids[i]. Ids are unique; `add` refuses (or skips) ids
    already present instead of updating them, because approximate faiss structures cannot replace
    a vector in place. Build with `Index.build`, extend with `add`, persist with `save`/`load`.

    Example:
        >>> import numpy as np
        >>> ids = ["a.jpg", "b.jpg", "c.jpg"]
        >>> vectors = np.eye(3, 4, dtype=np.float32)  # (N, D) embeddings, e.g. from encode_images
        >>> idx = Index.build(ids, vectors, model="tiny-synth")
        >>> idx.search_vectors(vectors[:1], k=2)[0][0]
        ('a.jpg', 1.0)
    """

    def __init__(
        self,
        faiss_index: faiss.Index,
        ids: list[str],
        sizes: list[tuple[int, int] | None],
        *,
        model: str,
        dim: int,
        params: IndexParams,
        pretrained: str | None = None,
        image_roots: Sequence[str] = (),
        created: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if faiss_index.ntotal != len(ids) or len(ids) != len(sizes):
            raise IndexFileError(
                f"index holds {faiss_index.ntotal} vectors but {len(ids)} ids / {len(sizes)} size rows"
            )
        self._faiss = faiss_index
        self._ids = list(ids)
        self._sizes = list(sizes)
        self._pos = {id_: i for i, id_ in enumerate(self._ids)}
        if len(self._pos) != len(self._ids):
            raise DuplicateIdError("index ids are not unique")
        self.model = model
        self.pretrained = pretrained
        self.dim = int(dim)
        self.params = params
        self.image_roots = [str(r) for r in image_roots]
        self.created = created or _now()
        self.updated = self.created
        self.extra = dict(extra or {})  # free-form header fields (e.g. precision) kept across save/load
        # The folder this index was loaded from or last saved to, and that generation: a save there
        # is refused once another process has saved a newer one (its changes would be dropped).
        self._origin: tuple[Path, int] | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        ids: Sequence[str],
        vectors: Any,
        *,
        model: str,
        pretrained: str | None = None,
        sizes: Sequence[tuple[int, int] | None] | None = None,
        image_roots: Sequence[str | Path] = (),
        kind: str = "auto",
        dim: int | None = None,
        extra: dict[str, Any] | None = None,
        **params: int | None,
    ) -> Index:
        """Build an index from (N, D) embeddings.

        Args:
            ids: N unique ids (usually image paths relative to one of `image_roots`).
            vectors: (N, D) float32 embeddings (re-normalised to unit length here).
            model: name of the model that produced them (ClipModel.name); queries must use the same.
            pretrained: optional weights tag, recorded in the header.
            sizes: optional original (width, height) per id.
            image_roots: folders the ids are relative to (used by `resolve` and the server).
            kind: "auto" (exact IndexFlatIP up to ann.AUTO_EXACT_MAX vectors, IVF-Flat above),
                "flat", "ivf", "ivfpq" or "hnsw".
            dim: expected D (required when N == 0).
            extra: free-form header fields to keep.
            **params: ann.IndexParams overrides (nlist, nprobe, pq_m, hnsw_m, ef_construction, ef_search).

        Raises:
            DuplicateIdError: repeated ids. IndexMismatchError: vectors of the wrong dim.
            ValueError: ids not a list of str, `model` not a non-empty str, vectors not a numeric
                (N, D) matrix, sizes not (width, height) pairs, or counts that differ.
        """
        ids = as_id_list(ids)
        if not isinstance(model, str) or not model:  # None was saved, then failed every later query
            raise ValueError(f"model must be the name of the model that made the vectors, got {model!r}")
        if isinstance(image_roots, str | Path):  # one folder, not one root per character
            image_roots = [image_roots]
        if dim is None:
            arr = np.asarray(vectors)
            if arr.ndim != 2:
                raise ValueError(
                    f"vectors must be a (N, D) matrix, got shape {arr.shape}; pass dim= for N == 0"
                )
            dim = int(arr.shape[1])
        x = as_unit_matrix(vectors, dim, "vectors") if len(ids) else no_vectors(vectors, dim)
        check_rows(ids, x, sizes)
        t0 = time.perf_counter()
        chosen = choose_params(len(x), dim, kind, **params)
        index = create_faiss_index(
            dim, chosen, train_vectors=x if not chosen.exact and chosen.kind != "hnsw" else None
        )
        if len(x):
            index.add(x)
        log.info(
            "built %s index of %d vectors (D=%d) in %.2fs", chosen.kind, len(x), dim, time.perf_counter() - t0
        )
        return cls(
            index,
            ids,
            list(sizes) if sizes is not None else [None] * len(ids),
            model=model,
            dim=dim,
            params=chosen,
            pretrained=pretrained,
            image_roots=[str(r) for r in image_roots],
            extra=extra,
        )

    def add(
        self,
        ids: Sequence[str],
        vectors: Any,
        *,
        sizes: Sequence[tuple[int, int] | None] | None = None,
        on_duplicate: str = "error",
    ) -> int:
        """Append embeddings without rebuilding (IVF keeps its trained centroids); return how many were added.

        Args:
            ids, vectors, sizes: as in `build`.
            on_duplicate: "error" (raise DuplicateIdError naming the first id already present) or
                "skip" (ignore rows whose id is already indexed, e.g. re-adding a grown embed folder).

        Raises:
            IndexMismatchError: vectors of another dimension. DuplicateIdError: see on_duplicate.
        """
        if on_duplicate not in ("error", "skip"):
            raise ValueError(f"on_duplicate must be 'error' or 'skip', got {on_duplicate!r}")
        ids = as_id_list(ids)
        x = as_unit_matrix(vectors, self.dim, "vectors") if len(ids) else no_vectors(vectors, self.dim)
        check_rows(ids, x, sizes)
        size_list = list(sizes) if sizes is not None else [None] * len(ids)
        keep = [i for i, id_ in enumerate(ids) if id_ not in self._pos]
        if len(keep) != len(ids) and on_duplicate == "error":
            dup = next(id_ for id_ in ids if id_ in self._pos)
            raise DuplicateIdError(
                f"id {dup!r} is already in the index ({len(ids) - len(keep)} of {len(ids)} ids are); "
                "pass on_duplicate='skip' to add only new ids"
            )
        if not keep:
            return 0
        self._faiss.add(np.ascontiguousarray(x[keep]))
        for i in keep:
            self._pos[ids[i]] = len(self._ids)
            self._ids.append(ids[i])
            self._sizes.append(size_list[i])
        self.updated = _now()
        if self.params.exact and len(self._ids) > AUTO_EXACT_MAX >= len(self._ids) - len(keep):
            log.info("index grew past %d vectors; rebuild with kind='auto' to switch to IVF", AUTO_EXACT_MAX)
        return len(keep)

    # ------------------------------------------------------------------ identity
    def check_model(self, model: str, dim: int | None = None) -> None:
        """Raise IndexMismatchError unless `model` (and `dim`) are the ones the index was built with."""
        if not same_model(model, self.model):
            raise IndexMismatchError(
                f"index was built with model {self.model!r} but {model!r} is in use; query with "
                f"--model {self.model} (or rebuild the index with {model!r})"
            )
        if dim is not None and int(dim) != self.dim:
            raise IndexMismatchError(f"index holds {self.dim}-d embeddings but the model produces {dim}-d")

    # ------------------------------------------------------------------ searching
    def search_vectors(
        self, queries: Any, k: int = 10, *, nprobe: int | None = None, ef_search: int | None = None
    ) -> list[list[Hit]]:
        """Top-k (id, cosine) per query row of a (M, D) matrix (or one (D,) vector), best first.

        On an ivfpq index the scores are the cosines with its compressed vectors: approximate
        (off by up to ~0.15 at D=64), where the other kinds give the cosine itself.

        Args:
            queries: (M, D) query embeddings from the index's model.
            k: hits per query (fewer if the index is smaller).
            nprobe / ef_search: per-call recall/speed override for IVF / HNSW indexes.

        Raises:
            IndexMismatchError: queries of another dimension. ValueError: k, nprobe or ef_search
                below 1, or a query row that is all zeros or holds NaN / infinity.
        """
        try:
            if isinstance(k, bool):  # operator.index(True) is 1: a flag passed where k goes
                raise TypeError
            k = operator.index(k)  # numpy integers too; faiss' bindings take only a Python int
        except TypeError:
            raise TypeError(f"k must be an integer, got {k!r}") from None
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = as_unit_matrix(queries, self.dim, "queries")
        zero = np.flatnonzero(~q.any(axis=1))
        if len(zero):
            raise ValueError(f"query row {zero[0]} is all zeros: it has no direction to search by")
        if not len(self._ids) or not len(q):
            return [[] for _ in range(len(q))]
        scores, labels = search(self._faiss, self.params, q, k, nprobe, ef_search)
        return [
            [(self._ids[j], float(s)) for s, j in zip(srow, lrow, strict=True) if j >= 0]
            for srow, lrow in zip(scores, labels, strict=True)
        ]

    def search_texts(self, model: QueryModel, texts: str | Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Embed `texts` with `model` (must be the index's model) and search; one hit list per text."""
        self.check_model(model.name, model.embed_dim)
        # as_str_list: None or 5 was a bare "'NoneType' object is not iterable" TypeError
        expected = "a str or a list of str"
        texts = [texts] if isinstance(texts, str) else as_str_list(texts, "texts", expected, "e.g. 'a dog'")
        return self.search_vectors(model.encode_texts(texts), k)

    def search_images(
        self, model: QueryModel, images: ImageInput | Sequence[ImageInput], k: int = 10
    ) -> list[list[Hit]]:
        """Embed query images with `model` (must be the index's model) and search; one hit list per image."""
        self.check_model(model.name, model.embed_dim)
        batch: Any = list(images) if isinstance(images, (list, tuple)) else [images]
        if isinstance(images, np.ndarray) and images.ndim == 4:  # preprocessed (N, 3, S, S): one batch
            batch = images
        return self.search_vectors(model.encode_images(batch), k)

    # ------------------------------------------------------------------ metadata
    @property
    def kind(self) -> str:
        return self.params.kind

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._pos

    def size_of(self, id_: str) -> tuple[int, int] | None:
        """Original (width, height) of an indexed image, if the embed run recorded it."""
        return self._sizes[self._pos[id_]]

    def resolve(self, id_: str) -> Path | None:
        """The image file for an id: the id itself if it is an existing path, else the first root holding it."""
        p = Path(id_)
        if p.is_absolute():
            return p if p.exists() else None
        for root in self.image_roots:
            candidate = Path(root) / p
            if candidate.exists():
                return candidate
        return p if p.exists() else None

    def describe(self) -> dict[str, Any]:
        """Plain-data summary: kind (and whether exact), params, count, dim, model, roots, timestamps."""
        return {
            "kind": self.kind,
            "exact": self.params.exact,
            "params": self.params.to_dict(),
            "count": len(self),
            "dim": self.dim,
            "model": self.model,
            "pretrained": self.pretrained,
            "image_roots": list(self.image_roots),
            "created": self.created,
            "updated": self.updated,
        }

    def __repr__(self) -> str:
        return f"Index(kind={self.kind!r}, count={len(self)}, dim={self.dim}, model={self.model!r})"

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the index folder atomically (see clipengine.index.store); return its path.

        Raises:
            IndexFileError: `path` holds something else than an index, or another process saved
                the index at `path` since this one was loaded from it (or last saved there).
        """
        _check_path(path)
        header = {**self.extra, **self.describe()}
        header.pop("exact")
        folder = Path(path).resolve()
        loaded = self._origin[1] if self._origin is not None and self._origin[0] == folder else None
        generation = write_files(
            Path(path),
            self._faiss,
            header,
            (size_row(i, s) for i, s in zip(self._ids, self._sizes, strict=True)),
            loaded_generation=loaded,
        )
        self._origin = (folder, generation)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, model: str | None = None, dim: int | None = None) -> Index:
        """Open an index folder; with `model`/`dim`, refuse (IndexMismatchError) one built differently.

        Raises:
            IndexFileError: missing, incomplete or corrupted index. IndexMismatchError: see above.
        """
        _check_path(path)
        header, rows, index = read_files(Path(path))
        obj = cls(
            index,
            [str(r["id"]) for r in rows],
            [(int(r["width"]), int(r["height"])) if "width" in r and "height" in r else None for r in rows],
            model=str(header["model"]),
            dim=int(header["dim"]),
            params=IndexParams.from_dict({"kind": header.get("kind", "flat"), **header["params"]}),
            pretrained=header.get("pretrained"),
            image_roots=header.get("image_roots", []),
            created=header.get("created"),
            extra={k: v for k, v in header.items() if k not in HEADER_KEYS},
        )
        obj.updated = header.get("updated", obj.created)
        obj._origin = (Path(path).resolve(), generation_of(header))
        if model is not None:
            obj.check_model(model, dim)
        elif dim is not None and dim != obj.dim:
            raise IndexMismatchError(f"index holds {obj.dim}-d embeddings but {dim}-d were expected")
        return obj


def _check_path(path: object) -> None:
    if not isinstance(path, str | Path):  # else pathlib's TypeError, naming no argument
        raise TypeError(f"path must be an index folder path (str or Path), got {type(path).__name__}")
