"""Prompt filling, prompt ensembling and softmax ranking shared by the API, server and eval."""

from __future__ import annotations

import numpy as np

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
