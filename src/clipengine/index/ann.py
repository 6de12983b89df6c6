"""Faiss index structures for inner-product search: exact below a size threshold, IVF or HNSW above it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import faiss

    from ..types import FloatArray

__all__ = [
    "AUTO_EXACT_MAX",
    "KINDS",
    "IndexParams",
    "choose_params",
    "create_faiss_index",
    "search_parameters",
]

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
# Up to this many vectors an exact IndexFlatIP is both exact and fast enough (~10 ms per query at
# D=512 on one core); above it `auto` switches to IVF-Flat.
AUTO_EXACT_MAX = 100_000
_MIN_POINTS_PER_CENTROID = 39  # faiss k-means warns (and clusters badly) below this
_PQ_BITS = 8  # bits per PQ sub-code
# k-means trains on at most this many points per list (faiss' own cap is 256): 4x less training time
# at N >= 64 * nlist, for a recall loss too small to measure on clustered data.
_TRAIN_POINTS_PER_CENTROID = 64


@dataclass(frozen=True)
class IndexParams:
    """How the faiss structure is built and searched; stored in the index header."""

    kind: str  # one of KINDS
    nlist: int | None = None  # IVF: number of inverted lists (k-means centroids)
    nprobe: int | None = None  # IVF: lists visited per query (recall/speed knob)
    pq_m: int | None = None  # IVF-PQ: sub-quantizers per vector (dim must be divisible by it)
    hnsw_m: int | None = None  # HNSW: graph neighbours per node
    ef_construction: int | None = None  # HNSW: candidate list size while building
    ef_search: int | None = None  # HNSW: candidate list size per query (recall/speed knob)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexParams:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def exact(self) -> bool:
        return self.kind == "flat"


def _default_nlist(n: int) -> int:
    # 4*sqrt(N) lists, but never fewer than ~39 training points per list.
    return max(1, min(round(4 * math.sqrt(max(n, 1))), n // _MIN_POINTS_PER_CENTROID))


def _default_nprobe(nlist: int) -> int:
    # Visit ~1/8 of the lists (16..256): recall@10 ~0.96 on clustered 20k x 64 test data.
    return min(nlist, max(16, min(256, nlist // 8)))


def _default_pq_m(dim: int) -> int:
    # ~4 dimensions per sub-quantizer (128 bytes per vector at D=512, 16x smaller than float32), a divisor of dim.
    target = max(1, dim // 4)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


def choose_params(n: int, dim: int, kind: str = "auto", **overrides: int | None) -> IndexParams:
    """Pick the faiss structure and its defaults for `n` vectors of size `dim`.

    Args:
        n: number of vectors the index is built from (IVF is trained on them).
        dim: embedding size D.
        kind: "auto" (exact below AUTO_EXACT_MAX vectors, IVF-Flat above), or one of KINDS.
        **overrides: IndexParams fields to set explicitly (e.g. nlist=1024, nprobe=32, ef_search=128).

    Returns:
        IndexParams with every field the chosen kind uses filled in.

    Raises:
        ValueError: unknown kind or override name, or IVF asked for with too few vectors to train.
    """
    known = {f.name for f in fields(IndexParams)} - {"kind"}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown index parameter(s) {sorted(unknown)}; valid: {sorted(known)}")
    if kind == "auto":
        kind = "flat" if n <= AUTO_EXACT_MAX else "ivf"
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose 'auto' or one of {', '.join(KINDS)}")
    params = IndexParams(kind=kind)
    if kind in ("ivf", "ivfpq"):
        nlist = _default_nlist(n)
        params = replace(params, nlist=nlist, nprobe=_default_nprobe(nlist))
        if kind == "ivfpq":
            params = replace(params, pq_m=_default_pq_m(dim))
    elif kind == "hnsw":
        params = replace(params, hnsw_m=32, ef_construction=80, ef_search=64)
    explicit: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    for name, value in explicit.items():
        _check_positive(name, value)
    params = replace(params, **explicit)
    if kind in ("ivf", "ivfpq"):
        assert params.nlist is not None  # set above
        if n < params.nlist:
            raise ValueError(
                f"{kind} needs at least nlist={params.nlist} vectors to train, got {n}; "
                "use kind='flat' (or 'auto') for small collections, or a smaller nlist"
            )
        if kind == "ivfpq" and params.pq_m is not None and dim % params.pq_m != 0:
            raise ValueError(f"pq_m={params.pq_m} must divide the embedding dim {dim}")
        if kind == "ivfpq" and n < 2**_PQ_BITS:  # each sub-quantizer trains 2**_PQ_BITS centroids
            raise ValueError(
                f"ivfpq needs at least {2**_PQ_BITS} vectors to train its product quantizer, got {n}; "
                "use kind='ivf' or 'flat' for small collections"
            )
    return params


def _check_positive(name: str, value: Any) -> None:
    # isinstance first: nlist="4" was a bare "'<' not supported between 'str' and 'int'" TypeError.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def create_faiss_index(dim: int, params: IndexParams, train_vectors: FloatArray | None = None) -> faiss.Index:
    """An empty inner-product faiss index for `params`; IVF kinds are trained on `train_vectors`.

    Args:
        dim: embedding size D.
        params: from choose_params.
        train_vectors: (N, D) float32 unit vectors; required for IVF kinds.
    """
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT
    index: faiss.Index
    if params.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m or 32, metric)
        index.hnsw.efConstruction = params.ef_construction or 80
        index.hnsw.efSearch = params.ef_search or 64
    elif params.kind in ("ivf", "ivfpq"):
        if train_vectors is None:
            raise ValueError(f"{params.kind} index needs training vectors")
        quantizer = faiss.IndexFlatIP(dim)
        nlist = params.nlist or _default_nlist(len(train_vectors))
        if params.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
        else:
            index = faiss.IndexIVFPQ(
                quantizer, dim, nlist, params.pq_m or _default_pq_m(dim), _PQ_BITS, metric
            )
        index.train(_training_sample(train_vectors, nlist))
        index.nprobe = params.nprobe or 1
    else:
        raise ValueError(f"unknown index kind {params.kind!r}")
    return index


def _training_sample(vectors: FloatArray, nlist: int) -> FloatArray:
    """A deterministic random subset of at most nlist * _TRAIN_POINTS_PER_CENTROID rows."""
    cap = nlist * _TRAIN_POINTS_PER_CENTROID
    if len(vectors) > cap:
        rows = np.sort(np.random.default_rng(0).choice(len(vectors), cap, replace=False))
        vectors = vectors[rows]
    return np.ascontiguousarray(vectors, dtype=np.float32)


def search_parameters(params: IndexParams, nprobe: int | None = None, ef_search: int | None = None) -> Any:
    """Per-call faiss SearchParameters (thread-safe: no mutation of the shared index), or None."""
    import faiss

    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None:
            _check_positive(name, value)
    if params.kind in ("ivf", "ivfpq"):
        return faiss.SearchParametersIVF(nprobe=int(nprobe or params.nprobe or 1))  # type: ignore[call-arg]
    if params.kind == "hnsw":
        hnsw_params = faiss.SearchParametersHNSW  # type: ignore[attr-defined]  # missing from faiss stubs
        return hnsw_params(efSearch=int(ef_search or params.ef_search or 64))
    return None
