"""Choosing the faiss structure and its defaults."""

from __future__ import annotations

import pytest

from clipengine.index.ann import AUTO_EXACT_MAX, IndexParams, choose_params


def test_auto_is_exact_up_to_threshold_then_ivf() -> None:
    assert choose_params(AUTO_EXACT_MAX, 512).kind == "flat"
    big = choose_params(1_000_000, 512)
    assert big.kind == "ivf"
    assert big.nlist == 4000  # 4 * sqrt(N)
    assert big.nprobe == 256  # ~nlist / 8, capped


def test_nlist_never_starves_kmeans() -> None:
    p = choose_params(2000, 64, "ivf")
    assert p.nlist is not None and 2000 // p.nlist >= 39


def test_overrides_win_and_unknown_ones_are_refused() -> None:
    assert choose_params(50_000, 64, "ivf", nprobe=7).nprobe == 7
    assert choose_params(10, 64, "hnsw", ef_search=200).ef_search == 200
    with pytest.raises(ValueError, match="unknown index parameter"):
        choose_params(10, 64, "flat", nprob=3)
    with pytest.raises(ValueError, match="unknown index kind 'annoy'"):
        choose_params(10, 64, "annoy")


def test_ivf_with_too_few_vectors_is_refused() -> None:
    with pytest.raises(ValueError, match="kind='flat'"):
        choose_params(10, 64, "ivf", nlist=100)


def test_ivfpq_sub_quantizers_divide_dim() -> None:
    assert choose_params(20_000, 512, "ivfpq").pq_m == 128
    assert 100 % choose_params(20_000, 100, "ivfpq").pq_m == 0  # type: ignore[operator]


def test_params_round_trip_through_dict() -> None:
    p = choose_params(50_000, 64, "hnsw")
    assert IndexParams.from_dict(p.to_dict()) == p


def test_ivfpq_with_fewer_vectors_than_pq_centroids_is_refused() -> None:
    # Each PQ sub-quantizer trains 256 centroids: faiss aborts with a RuntimeError below that.
    with pytest.raises(ValueError, match="ivfpq needs at least 256 vectors"):
        choose_params(100, 64, "ivfpq")
    assert choose_params(256, 64, "ivfpq", nlist=4).pq_m == 16


@pytest.mark.parametrize("name", ["nlist", "nprobe", "pq_m", "hnsw_m", "ef_construction", "ef_search"])
def test_parameters_below_one_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got -1"):
        choose_params(50_000, 64, "ivf", **{name: -1})


def test_default_nprobe_follows_an_explicit_nlist() -> None:
    # nlist=64 on 1M vectors kept the default nlist's nprobe (256 > 64 lists) in the header
    assert choose_params(1_000_000, 512, "ivf", nlist=64).nprobe == 16
    assert choose_params(1_000_000, 512, "ivf", nlist=1024).nprobe == 128  # nlist / 8
    assert choose_params(1_000_000, 512, "ivf", nlist=8).nprobe == 8  # never more than nlist
    assert choose_params(1_000_000, 512, "ivf", nlist=64, nprobe=3).nprobe == 3


@pytest.mark.parametrize(("dim", "pq_m"), [(512, 128), (768, 192), (100, 25), (90, 18), (97, 97)])
def test_default_pq_m_is_the_divisor_nearest_a_quarter_of_dim(dim: int, pq_m: int) -> None:
    # A prime dim has no divisor near D/4: 97 sub-quantizers of 1 dim, not one 97-d codebook (pq_m=1)
    assert choose_params(20_000, dim, "ivfpq").pq_m == pq_m
