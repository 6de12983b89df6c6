"""Prompt filling, prompt ensembling and softmax ranking shared by the API, server and eval."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from clipengine.errors import InputError
from clipengine.zeroshot import class_embeddings, fill_template, label_prompts, mean_unit, rank_labels


def _fake_encoder(dim: int = 8):  # type: ignore[no-untyped-def]
    """Deterministic text -> unit vector, so expected values can be computed by hand."""

    def encode(texts: list[str]) -> np.ndarray:
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=dim) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    return encode


def test_fill_template_leaves_other_braces_alone() -> None:
    assert fill_template("a {style} photo of a {}.", "dog") == "a {style} photo of a dog."


def test_label_prompts_without_templates_is_the_bare_label() -> None:
    assert label_prompts(["cat", "dog"], None) == [["cat"], ["dog"]]
    assert label_prompts(["cat"], ["a {}", "the {}!"]) == [["a cat", "the cat!"]]


def test_class_embeddings_equal_manual_prompt_ensemble_across_label_batches() -> None:
    encode = _fake_encoder()
    labels = [f"class{i}" for i in range(5)]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    got = class_embeddings(encode, labels, templates, batch_labels=2)  # 3 encoder calls
    for i, label in enumerate(labels):
        mean = encode([t.replace("{}", label) for t in templates]).mean(axis=0)
        np.testing.assert_allclose(got[i], mean / np.linalg.norm(mean), atol=1e-6)


def test_mean_unit_renormalises_each_prompt_first() -> None:
    vectors = np.array([[[3.0, 0.0], [0.0, 1.0]]], dtype=np.float32)  # (C=1, T=2, D=2)
    np.testing.assert_allclose(mean_unit(vectors), [[2**-0.5, 2**-0.5]], atol=1e-6)


def test_rank_labels_sorts_by_probability_and_sums_to_one() -> None:
    classes = np.eye(3, dtype=np.float32)
    images = np.array([[0.1, 0.9, 0.0], [0.0, 0.2, 0.8]], dtype=np.float32)
    ranked = rank_labels(images, classes, 100.0, ["a", "b", "c"])
    assert [label for label, _ in ranked[0]] == ["b", "a", "c"]
    assert [label for label, _ in ranked[1]] == ["c", "b", "a"]
    for row in ranked:
        assert abs(sum(p for _, p in row) - 1.0) < 1e-9
        assert [p for _, p in row] == sorted((p for _, p in row), reverse=True)


def test_rank_labels_top_k_is_the_head_of_the_full_ranking_ties_and_nan_included() -> None:
    """top_k partitions instead of sorting all C labels: the k it keeps, their order (equal
    probabilities by label order, NaN last) and their probabilities are the full ranking's first k."""
    rng = np.random.default_rng(0)
    labels = [f"l{i}" for i in range(300)]
    classes = rng.integers(-2, 3, (300, 8)).astype(np.float32)  # small integers: exact dot products, ties
    classes[100:200] = classes[5]  # 100 labels tied with label 5 (and with each other)
    classes[250:] = classes[40]
    classes[[7, 60, 299]] = -classes[2]  # ties with one another, in the middle of the ranking
    images = np.concatenate([classes[[5, 40, 2, 7]], rng.integers(-2, 3, (4, 8))]).astype(np.float32)
    full = rank_labels(images, classes, 100.0, labels)
    for k in (1, 2, 3, 5, 50, 101, 150, 299, 300, 1000):
        assert rank_labels(images, classes, 100.0, labels, top_k=k) == [row[:k] for row in full]
    assert rank_labels(images, classes, 100.0, labels, top_k=np.int64(3)) == [row[:3] for row in full]
    assert [label for label, _ in full[0][:4]] == ["l5", "l100", "l101", "l102"]  # ties: label order
    # A NaN row (a NaN image vector): every probability NaN, ranked as the full sort ranks NaN.
    nan_images = images.copy()
    nan_images[0, 0] = np.nan
    full_nan = rank_labels(nan_images, classes, 100.0, labels)
    got = rank_labels(nan_images, classes, 100.0, labels, top_k=3)
    assert [[lbl for lbl, _ in row] for row in got] == [[lbl for lbl, _ in row[:3]] for row in full_nan]


@pytest.mark.parametrize("top_k", [0, -1, 2.0, True, "3", [1]])
def test_rank_labels_refuses_a_top_k_that_is_not_a_count(top_k: Any) -> None:
    with pytest.raises(InputError, match=r"^top_k must be None or an integer >= 1, got "):
        rank_labels(np.ones((1, 4)), np.ones((2, 4)), 100.0, ["a", "b"], top_k=top_k)


@pytest.mark.parametrize(
    ("images", "classes", "labels", "scale", "match"),
    [
        # Each was a bare numpy or Python error naming nothing (or NaN probabilities, for inf).
        (np.ones((1, 4)), np.ones((2, 4)), ["a"], 100.0, r"^1 labels for 2 class vectors$"),
        (
            np.ones(4),
            np.ones((2, 4)),
            ["a", "b"],
            100.0,
            r"\(N, D\) and \(C, D\) matrices of one D; got \(4,\)",
        ),
        (np.ones((1, 3)), np.ones((2, 4)), ["a", "b"], 100.0, r"got \(1, 3\) and \(2, 4\)$"),
        (
            np.ones((1, 4)),
            np.ones((2, 4)),
            ["a", "b"],
            float("inf"),
            r"^logit_scale must be a finite .* inf$",
        ),
        (
            np.ones((1, 4)),
            np.ones((2, 4)),
            ["a", "b"],
            "100",
            r"^logit_scale must be a finite number, got '100'$",
        ),
    ],
)
def test_rank_labels_refuses_inputs_that_do_not_fit(
    images: np.ndarray, classes: np.ndarray, labels: list[str], scale: Any, match: str
) -> None:
    with pytest.raises(InputError, match=match):
        rank_labels(images, classes, scale, labels)


def test_class_embeddings_refuses_one_string_and_a_batch_below_one() -> None:
    with pytest.raises(InputError, match=r"^labels must be a list of labels, not one string \('cat'\)$"):
        class_embeddings(_fake_encoder(), "cat", None)  # was three labels: "c", "a", "t"
    with pytest.raises(InputError, match=r"^batch_labels must be an integer >= 1, got 0$"):
        class_embeddings(_fake_encoder(), ["cat"], None, batch_labels=0)  # was range()'s ValueError
    assert class_embeddings(_fake_encoder(), ["cat", "dog"], None, batch_labels=np.int64(1)).shape == (2, 8)
