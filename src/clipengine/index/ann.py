"""Faiss index structures for inner-product search: exact below a size threshold, IVF or HNSW above it."""

from __future__ import annotations

import logging
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
    "search",
    "search_parameters",
]

log = logging.getLogger(__name__)

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
    # ~4 dimensions per sub-quantizer (128 bytes per vector at D=512, 16x smaller than float32): the
    # divisor of dim nearest D/4 by ratio. Counting down from D/4 gave pq_m=1 for a prime dim such
    # as 97 (one 97-d codebook of 256 codes: 1 byte per vector, recall near chance); 97 is nearer.
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(math.log(m / (dim / 4))), -m))


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
        nlist_in_use = params.nlist
        assert nlist_in_use is not None  # set above
        if "nprobe" not in explicit:  # from the nlist in use: nlist=64 kept N=1M's nprobe 256 (> nlist)
            params = replace(params, nprobe=_default_nprobe(nlist_in_use))
        if n < nlist_in_use:
            raise ValueError(
                f"{kind} needs at least nlist={nlist_in_use} vectors to train, got {n}; "
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
        sample = _training_sample(train_vectors, nlist, params.kind == "ivfpq")
        _quiet_kmeans(index, len(sample), nlist)
        index.train(sample)
        index.nprobe = params.nprobe or 1
    else:
        raise ValueError(f"unknown index kind {params.kind!r}")
    return index


def _training_sample(vectors: FloatArray, nlist: int, pq: bool = False) -> FloatArray:
    """A deterministic random subset of at most nlist * _TRAIN_POINTS_PER_CENTROID rows.

    IVF-PQ keeps at least _MIN_POINTS_PER_CENTROID * 256 rows: each sub-quantizer trains 256
    centroids on the same sample, and a small nlist (nlist=1: 64 rows) made faiss abort
    ("Number of training points (64) should be at least as large as number of clusters (256)").
    """
    cap = nlist * _TRAIN_POINTS_PER_CENTROID
    if pq:
        cap = max(cap, _MIN_POINTS_PER_CENTROID * 2**_PQ_BITS)
    if len(vectors) > cap:
        rows = np.sort(np.random.default_rng(0).choice(len(vectors), cap, replace=False))
        vectors = vectors[rows]
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _quiet_kmeans(index: Any, n_train: int, nlist: int) -> None:
    """Log, instead of faiss' own stderr line, when k-means gets fewer than ~39 points per centroid."""
    # faiss prints "WARNING clustering N points to K centroids" from C++ (library code never prints);
    # min_points_per_centroid only decides whether it warns, not how it clusters.
    index.cp.min_points_per_centroid = 1
    if n_train < _MIN_POINTS_PER_CENTROID * nlist:  # info: the index works, only its lists are coarse
        log.info(
            "IVF trained on %d vectors for nlist=%d lists (< %d per list): the lists are coarse; "
            "use a smaller nlist, or kind='flat' for a small collection",
            n_train, nlist, _MIN_POINTS_PER_CENTROID,
        )  # fmt: skip
    pq = getattr(index, "pq", None)
    if pq is not None:
        pq.cp.min_points_per_centroid = 1
        if n_train < _MIN_POINTS_PER_CENTROID * 2**_PQ_BITS:
            log.warning(
                "ivfpq codebooks trained on %d vectors (< %d): recall will be low; "
                "kind='ivf' or 'flat' suits a collection this small",
                n_train, _MIN_POINTS_PER_CENTROID * 2**_PQ_BITS,
            )  # fmt: skip


def search(
    index: faiss.Index, params: IndexParams, queries: FloatArray, k: int,
    nprobe: int | None = None, ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """faiss search of unit `queries` for min(k, ntotal) hits per row on every kind: (scores, labels).

    IVF fills the rows it leaves short (label -1: the `nprobe` lists visited held fewer than k
    vectors, e.g. k=1000 over 16 of 51 lists) by visiting every list for those rows; HNSW (whose
    graph may not reach every vector) by an exact search of its stored vectors.
    """
    k = min(k, index.ntotal)
    if params.kind == "hnsw" and (ef_search is None or ef_search >= 1):
        ef_search = max(ef_search or params.ef_search or 64, k)  # HNSW returns at most efSearch hits
    scores, labels = index.search(queries, k, params=search_parameters(params, nprobe, ef_search))
    short = np.flatnonzero((labels < 0).any(axis=1))
    if len(short) and params.kind in ("ivf", "ivfpq"):
        every = search_parameters(params, nprobe=int(index.nlist))  # type: ignore[attr-defined]
        scores[short], labels[short] = index.search(queries[short], k, params=every)
    elif len(short) and params.kind == "hnsw":
        # HNSW can leave vectors unreachable however large efSearch is: many copies of one image
        # (equal vectors) made k=N return 75 of 3000. Those rows get an exact search of its vectors.
        import faiss

        storage = faiss.downcast_index(index.storage)  # type: ignore[attr-defined]
        scores[short], labels[short] = storage.search(queries[short], k)
    return scores, labels


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
