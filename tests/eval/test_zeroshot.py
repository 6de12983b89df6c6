"""Zero-shot classifier math on a fake encoder, metrics, and the tiny-synth end-to-end accuracy."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from clipengine.errors import BackendError, DatasetError
from clipengine.eval import cifar, datasets, folders, labelled
from clipengine.eval.zeroshot import (
    accuracy_metrics,
    build_classifier,
    encode_dataset,
    evaluate_zeroshot,
    tied_classes,
)

# Measured with the committed checkpoint on these held-out sets: shape 91.75%, colour x shape 95.4%,
# 64 px folder 94.5% (docs/eval.md). Thresholds keep a wide margin and sit far above chance (10% / 1%).
MIN_SHAPE_TOP1 = 0.80
MIN_COLOUR_TOP1 = 0.80
CLIP_PROMPTS_SHA256 = "10ede69f0325839d7e3d812bd9a90c1dfa699eca787baf39d621ad6eea753354"  # ../shared/data's


def _fake_encoder(texts: list[str]) -> np.ndarray:
    """Deterministic text 'embedding': a per-word random vector summed (no model needed)."""
    out = np.zeros((len(texts), 8), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.split():
            out[i] += np.random.default_rng(zlib.crc32(w.encode())).standard_normal(8)
    return out * 3.0  # unnormalised on purpose


def test_classifier_is_renormalised_mean_of_unit_prompt_embeddings() -> None:
    names, templates = ["cat", "dog", "fish"], ["a {}", "the {} here", "{}"]
    w = build_classifier(_fake_encoder, names, templates, batch_classes=2)  # batching must not matter
    assert w.shape == (8, 3) and w.dtype == np.float32
    for c, name in enumerate(names):
        emb = _fake_encoder([t.format(name) for t in templates])
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        mean = emb.mean(0)
        np.testing.assert_allclose(w[:, c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_classifier_needs_names_and_templates() -> None:
    with pytest.raises(DatasetError):
        build_classifier(_fake_encoder, [], ["{}"])


def test_accuracy_metrics_top1_top5_and_per_class_recall() -> None:
    logits = np.array(
        [[9, 1, 0, 0, 0, 0], [0, 9, 1, 0, 0, 0], [9, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 9]], np.float32
    )
    labels = np.array([0, 2, 5, 5])
    m = accuracy_metrics(logits, labels, list("abcdef"))
    assert m["top1"] == 0.5  # rows 0 and 3
    assert m["top5"] == 1.0  # every label within the top 5 of 6
    assert m["per_class"] == {"a": 1.0, "c": 0.0, "f": 0.5}
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    assert m["predictions"].tolist() == [0, 1, 0, 5]


def test_tiny_synth_zero_shot_shapes_far_above_chance(tiny_synth, cifar10_root) -> None:  # type: ignore[no-untyped-def]
    data = cifar.load_cifar10(cifar10_root, "test")
    _, templates = datasets.prompt_set("cifar10")
    r = evaluate_zeroshot(tiny_synth, data, templates)
    assert r.chance == pytest.approx(0.1) and r.n == 400 and r.templates == 18
    assert r.top1 >= MIN_SHAPE_TOP1, r.per_class
    assert r.top5 >= r.top1 and len(r.per_class) == 10


def test_tiny_synth_zero_shot_colour_shapes_far_above_chance(tiny_synth, cifar100_root) -> None:  # type: ignore[no-untyped-def]
    data = cifar.load_cifar100(cifar100_root, "test")
    names = [n.replace("_", " ") for n in data.classnames]
    r = evaluate_zeroshot(tiny_synth, data, datasets.prompt_set("cifar100")[1], names)
    assert r.chance == pytest.approx(0.01)
    assert r.top1 >= MIN_COLOUR_TOP1


def test_tiny_synth_on_64px_imagefolder(tiny_synth, imagefolder_root) -> None:  # type: ignore[no-untyped-def]
    """Files on disk at another size go through decode + resize: accuracy holds."""
    data = folders.load_imagefolder(imagefolder_root)
    r = evaluate_zeroshot(tiny_synth, data, ["a photo of a {}."])
    assert r.top1 >= MIN_SHAPE_TOP1 - 0.05


def test_prompt_names_must_match_class_count(tiny_synth, cifar10_root) -> None:  # type: ignore[no-untyped-def]
    data = cifar.load_cifar10(cifar10_root, "test").subset(10)
    with pytest.raises(DatasetError, match="3 prompt class names"):
        evaluate_zeroshot(tiny_synth, data, ["{}"], ["a", "b", "c"])


def test_top5_never_counts_classes_scored_minus_inf() -> None:
    """Linear-probe scores are -inf for classes absent from train: ties among them are no top-5 hit."""
    logits = np.full((8, 8), -np.inf)
    logits[:, :2] = [2.0, 1.0]
    m = accuracy_metrics(logits, np.arange(8), list("abcdefgh"))  # one image of each class
    assert m["top1"] == pytest.approx(1 / 8) and m["top5"] == pytest.approx(2 / 8)


def test_duplicate_class_names_keep_their_own_per_class_recall() -> None:
    """CLIP's ImageNet list names two classes 'missile' (and two 'sunglasses'): no recall is dropped."""
    assert len(set(datasets.prompt_set("imagenet")[0])) == 998
    logits = np.eye(3, dtype=np.float32)[[0, 1, 1, 2]]
    m = accuracy_metrics(logits, np.array([0, 1, 0, 2]), ["missile", "missile", "b"])
    assert len(m["per_class"]) == 3 and sorted(m["per_class"].values()) == [0.5, 1.0, 1.0]
    assert m["per_class"]["b"] == 1.0


def test_templates_without_placeholder_are_refused() -> None:
    """A template without "{}" gives every class the same prompt: refused, not silently averaged in."""
    with pytest.raises(DatasetError, match=r"'a photo\.'"):
        build_classifier(_fake_encoder, ["cat", "dog"], ["a {}", "a photo."])


def test_non_finite_text_embeddings_are_refused() -> None:
    def nan_for_dog(texts: list[str]) -> np.ndarray:
        out = _fake_encoder(texts)
        out[["dog" in t for t in texts]] = np.nan
        return out

    with pytest.raises(BackendError, match="'a dog'"):
        build_classifier(nan_for_dog, ["cat", "dog"], ["a {}"])


@pytest.mark.parametrize("value", [np.nan, 0.0])  # 0: an L2-normalised NaN row of the ONNX backend
def test_non_finite_image_embeddings_are_refused(value: float) -> None:
    """An engine that overflows (fp16) must not score as 'class 0 predicted' for every NaN row."""
    from clipengine.api import ClipModel
    from clipengine.image.preprocess import PreprocessConfig

    class NanImages:
        name, device, precision, embed_dim, image_size, context_length = "fake", "cpu", "fp16", 8, 32, 77

        def encode_images(self, pixels: np.ndarray) -> np.ndarray:
            out = np.ones((len(pixels), 8), dtype=np.float32)
            out[pixels.reshape(len(pixels), -1).mean(axis=1) > 0] = value  # the white image overflows
            return out

    images = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    images[1] = 255
    data = labelled.LabelledImages("nan", ["a", "b"], np.array([0, 0, 1]), images)
    model = ClipModel(NanImages(), PreprocessConfig(image_size=32), "fake", 100.0)  # type: ignore[arg-type]
    with pytest.raises(BackendError, match=r"nan: 1 of 3 image embeddings .*image 1"):
        encode_dataset(model, data, batch_size=2, workers=1)


def _damaged_copy(src, dst, *damaged: str):  # type: ignore[no-untyped-def]
    """A copy of an ImageFolder with the files at `damaged` (relative paths) made undecodable."""
    import shutil

    shutil.copytree(src, dst)
    (dst / damaged[0]).write_bytes(b"")  # empty
    for rel in damaged[1:]:
        (dst / rel).write_bytes((dst / rel).read_bytes()[:40])  # cut short
    return dst


def test_unreadable_images_are_left_out_and_listed(tiny_synth, imagefolder_root, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two broken files in a 200-image folder: the run ends, scores the other 198 exactly as a folder
    without them, and names both with a reason."""
    files = sorted(p.relative_to(imagefolder_root).as_posix() for p in imagefolder_root.rglob("*.png"))
    broken = (files[3], files[150])
    damaged = folders.load_imagefolder(_damaged_copy(imagefolder_root, tmp_path / "damaged", *broken))
    templates = ["a photo of a {}."]
    result = evaluate_zeroshot(tiny_synth, damaged, templates)
    assert result.n == len(damaged) - 2
    assert [(u["path"].endswith(b), bool(u["reason"])) for u, b in zip(result.unreadable, broken, strict=True)] == [
        (True, True), (True, True)
    ]
    for rel in broken:
        (tmp_path / "damaged" / rel).unlink()
    clean = evaluate_zeroshot(tiny_synth, folders.load_imagefolder(tmp_path / "damaged"), templates)
    assert (clean.n, clean.top1, clean.per_class, clean.unreadable) == (result.n, result.top1, result.per_class, [])
    assert np.array_equal(clean.predictions, result.predictions)


def test_a_split_with_no_readable_image_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from clipengine.api import ClipModel
    from clipengine.image.preprocess import PreprocessConfig

    for name in ("a/x.png", "b/y.png"):
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).write_bytes(b"not an image")
    class NeverCalled:
        name, device, precision, embed_dim, image_size, context_length = "fake", "cpu", "fp32", 8, 32, 77

        def encode_images(self, pixels: np.ndarray) -> np.ndarray:
            raise AssertionError("nothing decoded, nothing to encode")

    model = ClipModel(NeverCalled(), PreprocessConfig(image_size=32), "fake", 100.0)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match=r"none of its 2 images could be decoded, e.g. .*x.png"):
        encode_dataset(model, folders.load_imagefolder(tmp_path), workers=1)


def test_top5_breaks_ties_as_top1_does() -> None:
    """Tied scores (CLIP's two "missile" classes share their prompts, so they can tie): the rank goes
    to the lower class index, as argmax gives top-1, so a top-1 hit is always a top-5 hit. Reference:
    a stable sort."""
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 3, (2000, 40)).astype(np.float32)  # few values: ties everywhere
    labels = rng.integers(0, 40, 2000)
    m = accuracy_metrics(logits, labels, [str(c) for c in range(40)])
    ranked = np.argsort(-logits, axis=1, kind="stable")
    assert m["top1"] == np.mean(ranked[:, 0] == labels)
    assert m["top5"] == np.mean((ranked[:, :5] == labels[:, None]).any(axis=1))
    tied = np.zeros((2, 10), np.float32)  # all ten classes tied: class 0 wins, classes 0-4 are the top 5
    assert accuracy_metrics(tied, np.array([0, 7]), list("abcdefghij"))["top5"] == 0.5


def test_zero_shot_equals_open_clip_recipe(tiny_synth, cifar10_root) -> None:  # type: ignore[no-untyped-def]
    """Same model, same images, computed independently as open_clip does: per class all templates
    encoded, each L2-normalised, averaged, renormalised; `accuracy` from torch topk. Exact match."""
    import torch
    import torch.nn.functional as F

    data = cifar.load_cifar10(cifar10_root, "test").subset(200)
    _, templates = datasets.prompt_set("cifar10")
    r = evaluate_zeroshot(tiny_synth, data, templates, batch_size=32)
    with torch.no_grad():
        columns = []
        for name in data.classnames:
            prompts = [t.format(name) for t in templates]
            emb = F.normalize(torch.from_numpy(tiny_synth.encode_texts(prompts)), dim=-1)
            columns.append(emb.mean(dim=0) / emb.mean(dim=0).norm())
        images = F.normalize(torch.from_numpy(tiny_synth.encode_images(data.images())), dim=-1)
        logits = 100.0 * images @ torch.stack(columns, dim=1)
        target = torch.from_numpy(data.labels)
        correct = logits.topk(5, 1, True, True)[1].t().eq(target.view(1, -1))
    assert r.n == 200
    assert r.top1 == correct[:1].sum().item() / 200 and r.top5 == correct[:5].sum().item() / 200
    pred = logits.argmax(dim=1).numpy()
    per_class = {n: float(np.mean(pred[data.labels == c] == c)) for c, n in enumerate(data.classnames)}
    assert r.per_class == per_class
    assert r.mean_per_class_recall == pytest.approx(np.mean(list(per_class.values())))


def test_bundled_prompts_are_clips_and_match_the_official_cifar_names() -> None:
    """The bundled file is byte for byte CLIP's (openai/CLIP's prompt sets, as in ../shared/data). The
    default prompts use the dataset's own class names ("_" read as space): for the official CIFAR
    metadata (CIFAR-100's fine names are alphabetical with "_") these are exactly CLIP's names."""
    import hashlib
    from importlib import resources

    data = (resources.files("clipengine.eval") / "prompts" / "zeroshot_prompts.json").read_bytes()
    assert hashlib.sha256(data).hexdigest() == CLIP_PROMPTS_SHA256
    cifar10_meta = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert datasets.prompt_set("cifar10")[0] == cifar10_meta
    clip100 = datasets.prompt_set("cifar100")[0]
    official = sorted(name.replace(" ", "_") for name in clip100)  # e.g. aquarium_fish, maple_tree
    assert [name.replace("_", " ") for name in official] == clip100 and "aquarium fish" in clip100


def test_tied_classes_finds_equal_rows_only() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 16))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    w[7] = w[250]
    w[40] = w[250] + 1e-7  # the same text encoded at another batch position
    w[9] = w[2]
    w[11] = w[12] + 1e-3  # close, but two classes
    assert tied_classes(w) == [[2, 9], [7, 40, 250]]
    assert tied_classes(w[:1]) == [] and tied_classes(w[100:200]) == []


def test_classes_equal_after_tokenizer_cleanup_are_named_in_a_warning(
    tiny_synth, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """Folders "Heart" and "heart" tokenize alike: their scores always tie and "heart" is never
    predicted (per-class recall 0, as if the model failed on it). This was silent."""
    with caplog.at_level("WARNING", logger="clipengine.eval.zeroshot"):
        w = build_classifier(tiny_synth.encode_texts, ["Heart", "ring", "heart", "star"], ["a {}.", "{}"])
    np.testing.assert_allclose(w[:, 0], w[:, 2], atol=1e-5)
    assert "1 group(s) of classes get the same class weights, e.g. 'Heart' (class 0), 'heart' (class 2)" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipengine.eval.zeroshot"):
        build_classifier(tiny_synth.encode_texts, ["heart", "ring", "star"], ["a {}.", "{}"])
    assert "same class weights" not in caplog.text
