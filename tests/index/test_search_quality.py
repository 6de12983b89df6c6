"""Retrieval quality with the project's self-trained tiny CLIP on held-out synthetic captioned images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipengine.index import Index

pytestmark = pytest.mark.slow  # a real (tiny) model: ~30-60 s for the module on 2 busy cores

N_IMAGES = 400  # 40 per shape class
N_QUERIES = 100


@pytest.fixture(scope="module")
def tiny_synth():  # type: ignore[no-untyped-def]
    import clipengine
    from clipengine.errors import ClipEngineError

    try:
        return clipengine.load("tiny-synth")
    except ClipEngineError as e:
        pytest.skip(f"tiny-synth weights not available yet: {e}")


@pytest.fixture(scope="module")
def gallery(tiny_synth):  # type: ignore[no-untyped-def]
    from clipengine.eval.synthetic import generate

    # Seeds far from the training script's, so gallery and queries are unseen images and captions.
    ds = generate(N_IMAGES, seed=31_337, task="shape", image_size=tiny_synth.image_size)
    vectors = tiny_synth.encode_images(list(ds.images), batch_size=128)
    ids = [f"{i:04d}.png" for i in range(len(ds))]
    return ds, Index.build(ids, vectors, model=tiny_synth.name), vectors


def _precision_and_hits(index: Index, query_vectors: np.ndarray, query_shapes: np.ndarray, gallery_shapes: np.ndarray,
                        k: int = 10) -> tuple[float, float]:  # fmt: skip
    hits = index.search_vectors(query_vectors, k)
    rel = np.array(
        [[gallery_shapes[int(i[:4])] == s for i, _ in row] for row, s in zip(hits, query_shapes, strict=True)]
    )
    return float(rel.mean()), float(rel.any(axis=1).mean())


def test_caption_queries_retrieve_their_shape(tiny_synth, gallery) -> None:  # type: ignore[no-untyped-def]
    from clipengine.eval.synthetic import generate

    ds, index, _ = gallery
    queries = generate(N_QUERIES, seed=4_242, task="shape", image_size=tiny_synth.image_size)
    q = tiny_synth.encode_texts(queries.captions)
    precision, hit_rate = _precision_and_hits(index, q, queries.shapes, ds.shapes)
    print(
        f"tiny-synth caption->image: precision@10={precision:.3f} hit@10={hit_rate:.3f} (chance 0.10 / 0.65)"
    )
    assert precision >= PRECISION_MIN
    assert hit_rate >= HIT_MIN


def test_search_texts_api_and_ann_agree_with_exact(tiny_synth, gallery) -> None:  # type: ignore[no-untyped-def]
    ds, exact, vectors = gallery
    texts = [f"a {s}" for s in ds.classnames]
    by_api = exact.search_texts(tiny_synth, texts, k=10)
    assert by_api == exact.search_vectors(tiny_synth.encode_texts(texts), 10)
    hnsw = Index.build(exact.ids, vectors, model=tiny_synth.name, kind="hnsw")
    approx = hnsw.search_texts(tiny_synth, texts, k=10)
    agree = np.mean(
        [len({i for i, _ in a} & {i for i, _ in e}) / 10 for a, e in zip(approx, by_api, strict=True)]
    )
    assert agree >= 0.9


def test_cli_builds_from_a_folder_and_searches_with_the_header_model(
    tiny_synth, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    from clipengine.cli.app import main
    from clipengine.eval.synthetic import SHAPES, generate, write_imagefolder

    ds = generate(200, seed=777, task="shape", image_size=tiny_synth.image_size)
    root = write_imagefolder(tmp_path / "imgs", ds)
    idx = tmp_path / "shapes.index"
    assert main(["index", "build", str(root), "-o", str(idx), "--model", "tiny-synth", "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["search", str(idx), "a photo of a star", "-k", "10"]) == 0
    paths = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    stars = sum(Path(p).parent.name == "star" for p in paths)
    print(f"tiny-synth CLI 'a photo of a star': {stars}/10 stars")
    assert len(paths) == 10 and stars >= STAR_MIN, paths
    assert "star" in SHAPES


# Thresholds: measured values minus a wide margin (retraining tiny-synth moves them a little).
# Measured: precision@10 0.73-0.78, hit@10 1.00, CLI "a photo of a star" 8/10 stars; chance 0.10 / 0.65 / 1.
PRECISION_MIN = 0.5
HIT_MIN = 0.9
STAR_MIN = 5
