"""Public API: clipengine.load + ClipModel (inputs of every kind, embeddings, classify, export dispatch)."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import clipengine
from clipengine.api import ClipModel, load_export
from clipengine.errors import BackendError, DecodeError, InputError
from clipengine.image.decode import decode_image
from clipengine.image.preprocess import PreprocessConfig
from clipengine.models.clip import CLIP


def test_load_returns_model_with_contract_attributes(model: ClipModel, tiny_model: CLIP) -> None:
    assert isinstance(model, ClipModel)
    assert (model.embed_dim, model.image_size, model.context_length) == (32, 32, 77)
    assert model.logit_scale == pytest.approx(float(tiny_model.logit_scale.detach().exp()))
    assert model.backend.name == "torch" and model.name == "tiny-vit"


def test_every_image_input_kind_gives_the_same_embedding(model: ClipModel, clip_png: Path) -> None:
    data = clip_png.read_bytes()
    pil = Image.open(io.BytesIO(data))
    inputs: list[Any] = [clip_png, str(clip_png), data, pil]
    expected = model.encode_images(clip_png)
    assert expected.shape == (1, 32) and expected.dtype == np.float32
    for item in inputs:
        np.testing.assert_allclose(model.encode_images(item), expected, atol=1e-6)
    batch = model.encode_images(inputs, batch_size=2)
    np.testing.assert_allclose(batch, np.repeat(expected, len(inputs), axis=0), atol=1e-6)
    arr = np.asarray(decode_image(clip_png))  # (H, W, 3) uint8
    np.testing.assert_allclose(model.encode_images(arr), model.encode_images(Image.fromarray(arr)), atol=1e-6)
    pre = np.stack([model.preprocess(clip_png)] * 3)
    assert pre.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(model.encode_images(pre), np.repeat(expected, 3, axis=0), atol=1e-6)


def test_preprocessed_batch_of_wrong_size_is_rejected(model: ClipModel) -> None:
    with pytest.raises(BackendError, match=r"\(N, 3, 32, 32\)"):
        model.encode_images(np.zeros((1, 3, 224, 224), np.float32))


def test_encode_texts_is_unit_norm_and_batch_independent(model: ClipModel) -> None:
    texts = ["a dog", "a cat", "a diagram"]
    emb = model.encode_texts(texts)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(model.encode_texts(texts, batch_size=1), emb, atol=1e-6)
    np.testing.assert_allclose(model.encode_texts("a dog"), emb[:1], atol=1e-6)


def test_classify_is_softmax_of_scaled_similarities(model: ClipModel, clip_png: Path) -> None:
    labels = ["a diagram", "a dog", "a cat"]
    (result,) = model.classify(clip_png, labels)
    sims = model.logit_scale * (model.encode_images(clip_png) @ model.encode_texts(labels).T)[0]
    probs = np.exp(sims - sims.max()) / np.exp(sims - sims.max()).sum()
    assert [label for label, _ in result] == [labels[i] for i in np.argsort(-probs)]
    np.testing.assert_allclose([p for _, p in result], np.sort(probs)[::-1], atol=1e-5)
    assert sum(p for _, p in result) == pytest.approx(1.0, abs=1e-5)


def test_classify_top_k_keeps_the_most_probable_labels(model: ClipModel, clip_png: Path) -> None:
    labels = ["a diagram", "a dog", "a cat", "a tree", "a car"]
    (full,) = model.classify(clip_png, labels)
    (top,) = model.classify(clip_png, labels, top_k=2)
    assert top == full[:2]  # probabilities still over all five labels
    with pytest.raises(InputError, match=r"^top_k must be None or an integer >= 1, got 0$"):
        model.classify(clip_png, labels, top_k=0)


def test_classify_with_templates_ensembles_prompts(model: ClipModel, clip_png: Path) -> None:
    labels, templates = ["dog", "diagram"], ["a photo of a {}.", "a drawing of a {}."]
    classifier = model.text_classifier(labels, templates)
    manual = (
        model.encode_texts([t.format(lbl) for lbl in labels for t in templates]).reshape(2, 2, -1).mean(1)
    )
    manual /= np.linalg.norm(manual, axis=1, keepdims=True)
    np.testing.assert_allclose(classifier, manual, atol=1e-6)
    results = model.classify([clip_png, clip_png], labels, templates)
    assert len(results) == 2 and [lbl for lbl, _ in results[0]] == [lbl for lbl, _ in results[1]]
    # Same image twice in one batch: equal up to float rounding (the pruned last block runs the
    # pooled rows as one GEMM whose kernel blocking can differ per row: ~1e-7, not bit-exact).
    np.testing.assert_allclose([p for _, p in results[0]], [p for _, p in results[1]], atol=1e-6)


def test_preprocess_size_must_match_backend(model: ClipModel) -> None:
    with pytest.raises(BackendError, match="224 px images but the backend expects 32 px"):
        ClipModel(model.backend, PreprocessConfig(224), "x", 100.0)


def test_export_folder_goes_to_export_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clipengine.api

    (tmp_path / "manifest.json").write_text("{}")
    calls: list[tuple[Path, str, str]] = []

    def fake_load_export(folder: Path, device: str, precision: str) -> str:
        calls.append((folder, device, precision))
        return "ok"

    monkeypatch.setattr(clipengine.api, "load_export", fake_load_export)
    assert clipengine.load(tmp_path, device="cpu", precision="fp16") == "ok"
    assert calls == [(tmp_path, "cpu", "fp16")]


def test_onnx_backend_needs_an_export_folder(model_dir: Path) -> None:
    with pytest.raises(BackendError, match="create it with `clipengine export`"):
        clipengine.load(model_dir, backend="onnx")


def test_bf16_model_agrees_with_fp32(model: ClipModel, model_dir: Path, clip_png: Path) -> None:
    bf16 = clipengine.load(model_dir, precision="bf16")
    cos = (bf16.encode_images(clip_png) * model.encode_images(clip_png)).sum()
    assert cos > 0.99


_TINY_SYNTH = Path(clipengine.__file__).parent / "weights" / "tiny-synth" / "model.safetensors"


@pytest.mark.skipif(not _TINY_SYNTH.is_file(), reason="tiny-synth weights not built yet")
def test_packaged_tiny_synth_loads_by_name(clip_png: Path) -> None:
    model = clipengine.load("tiny-synth")
    assert model.name == "tiny-synth" and model.image_size == model.preprocess_cfg.image_size
    (ranked,) = model.classify(clip_png, ["a red circle", "a blue square"])
    assert sum(p for _, p in ranked) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def export_dir(vit_b1_export: Path) -> Path:
    return vit_b1_export


def test_pretrained_naming_other_weights_than_an_exports_is_refused(export_dir: Path) -> None:
    """The folder holds the weights it was exported from; pretrained= must not be silently ignored."""
    from clipengine.export.manifest import read_manifest

    recorded = read_manifest(export_dir).pretrained
    with pytest.raises(InputError, match=r"is an export of .*pretrained='laion2b' names other weights"):
        clipengine.load(export_dir, pretrained="laion2b")
    if recorded is not None:  # the tag it holds is fine
        assert clipengine.load(export_dir, pretrained=recorded).embed_dim > 0


@pytest.mark.parametrize(
    "preprocess",
    [
        [1, 2],
        "bicubic",
        None,
        {"image_size": 32, "foo": 1},
        {"size": [32, 64]},
        {"image_size": 32, "std": "abc"},
        {"image_size": 32, "std": 0.5},
        {"image_size": "32"},
    ],
)
def test_damaged_manifest_preprocess_is_a_backend_error(export_dir: Path, tmp_path: Path, preprocess: Any) -> None:
    from export_copies import copy_with_manifest

    folder = copy_with_manifest(export_dir, tmp_path / "copy", preprocess=preprocess)
    with pytest.raises(BackendError, match=r"manifest\.json.*preprocess") as info:
        clipengine.load(folder)
    assert not isinstance(info.value, InputError)  # a broken export folder, not a bad argument


@pytest.mark.parametrize(("key", "value"), [("logit_scale", "abc"), ("logit_scale", None), ("context_length", "77")])
def test_damaged_manifest_numbers_are_a_backend_error(export_dir: Path, tmp_path: Path, key: str, value: Any) -> None:
    from export_copies import copy_with_manifest

    folder = copy_with_manifest(export_dir, tmp_path / "copy", **{key: value})
    with pytest.raises(BackendError, match=f"manifest.*{key}"):
        clipengine.load(folder)


def test_unknown_backend_on_an_export_folder_is_refused(export_dir: Path) -> None:
    with pytest.raises(InputError, match="backend 'weird'"):
        clipengine.load(export_dir, backend="weird")


def test_unknown_backend_is_named_as_unknown(model_dir: Path) -> None:
    # Was "backend 'tensorflow' runs export folders (...)": as if it were onnx or openvino.
    with pytest.raises(InputError, match=r"^unknown backend 'tensorflow'; choose one of torch, onnx, openvino$"):
        clipengine.load(model_dir, backend="tensorflow")


@pytest.mark.parametrize("value", [None, 5, b"tiny-synth", ["tiny-synth"]])
def test_load_refuses_a_name_or_path_that_is_neither_str_nor_path(value: object) -> None:
    # Was a raw TypeError from pathlib ("expected str, bytes or os.PathLike object, not NoneType").
    with pytest.raises(InputError, match=rf"^name_or_path must be a model name or a path \(str or Path\), got {type(value).__name__}"):
        clipengine.load(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
@pytest.mark.parametrize("value", [None, 5, b"/models/x"])
def test_load_export_refuses_a_folder_that_is_neither_str_nor_path(value: object, backend: str) -> None:
    # Was "backend 'onnx': bad options [] (expected str, ...)": the options were fine, the folder was not.
    with pytest.raises(InputError, match=rf"^folder must be an export folder path \(str or Path\), got {type(value).__name__}"):
        load_export(value, backend=backend)  # type: ignore[arg-type]


def test_unknown_export_backend_option_is_a_backend_error(export_dir: Path) -> None:
    with pytest.raises(InputError, match=r"bad options \['warp_speed'\]"):
        clipengine.load(export_dir, warp_speed=True)


def test_an_error_inside_the_export_backend_is_not_called_bad_options(export_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Only options the constructor does not take are 'bad options' (as `create_backend` does): a
    TypeError from inside it was reported as "bad options []", hiding what went wrong."""
    from clipengine.backends import onnx_backend

    def broken(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise TypeError("a bug inside the backend")

    monkeypatch.setattr(onnx_backend.OnnxBackend, "__init__", broken)
    with pytest.raises(TypeError, match=r"^a bug inside the backend$"):
        load_export(export_dir, backend="onnx")


@pytest.mark.parametrize("dtype", [np.uint8, np.bool_, np.complex64, object])
def test_preprocessed_batch_must_be_float(model: ClipModel, dtype: Any) -> None:
    with pytest.raises(InputError, match="float"):
        model.encode_images(np.zeros((1, 3, 32, 32), dtype=dtype))


def test_preprocessed_float64_batch_is_accepted(model: ClipModel) -> None:
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    np.testing.assert_allclose(model.encode_images(pixels), model.encode_images(pixels.astype(np.float32)), atol=1e-6)


def test_non_finite_pixels_are_rejected(model: ClipModel) -> None:
    pixels = np.zeros((2, 3, 32, 32), np.float32)
    pixels[1, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        model.encode_images(pixels)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_encode_texts_batch_size_below_one_is_rejected(model: ClipModel, batch_size: int) -> None:
    with pytest.raises(InputError, match="batch_size must be an integer >= 1"):
        model.encode_texts(["a dog"], batch_size=batch_size)


@pytest.mark.parametrize("batch_size", [2.5, "8", None])
@pytest.mark.parametrize("method", ["encode_texts", "encode_images"])
def test_batch_size_that_is_not_an_integer_is_rejected(model: ClipModel, method: str, batch_size: object) -> None:
    # Was a raw TypeError ("'<' not supported between instances of 'str' and 'int'").
    arg = ["a dog"] if method == "encode_texts" else [np.zeros((8, 8, 3), np.uint8)]
    with pytest.raises(InputError, match=r"batch_size must be an integer >= 1, got"):
        getattr(model, method)(arg, batch_size=batch_size)


def test_numpy_integer_batch_size_is_accepted(model: ClipModel) -> None:
    assert model.encode_texts(["a", "b", "c"], batch_size=np.int64(2)).shape == (3, 32)


def test_classify_refuses_one_string_as_labels(model: ClipModel, clip_png: Path) -> None:
    with pytest.raises(InputError, match="list of labels"):
        model.classify(clip_png, "cat")


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ({"cat": 0, "dog": 1}, "labels must be a list of labels, got dict"),
        (5, "labels must be a list of labels, got int"),
        (None, "labels must be a list of labels, got NoneType"),
        ({"cat", "dog"}, "labels must be a list of labels, got set"),
        (b"cat", "labels must be a list of labels, got bytes"),
        (["cat", 5], r"labels\[1\] is int \(5\), not a str"),
        (np.array("cat"), r"labels must be a list of labels, got a 0-D array"),
        (np.array([["cat", "dog"]]), r"labels must be a list of labels, got a 2-D array"),
    ],
)
def test_text_classifier_and_classify_refuse_labels_that_are_not_a_list_of_str(
    model: ClipModel, clip_png: Path, labels: Any, match: str
) -> None:
    """A dict used to be accepted silently (its keys became the labels); 5 was a raw TypeError."""
    with pytest.raises(InputError, match=match):
        model.text_classifier(labels)
    with pytest.raises(InputError, match=match):
        model.classify(clip_png, labels)


@pytest.mark.parametrize(
    ("templates", "match"),
    [
        ({"a photo of a {}.": 1}, "templates must be a list of templates, got dict"),
        (5, "templates must be a list of templates, got int"),
        (["a {}", 5], r"templates\[1\] is int \(5\), not a str"),
    ],
)
def test_text_classifier_refuses_templates_that_are_not_a_list_of_str(
    model: ClipModel, templates: Any, match: str
) -> None:
    with pytest.raises(InputError, match=match):
        model.text_classifier(["cat", "dog"], templates=templates)


def test_classify_accepts_a_tuple_or_numpy_array_of_labels(model: ClipModel, clip_png: Path) -> None:
    expected = model.classify(clip_png, ["a cat", "a dog"])
    assert model.classify(clip_png, ("a cat", "a dog")) == expected
    assert model.classify(clip_png, np.array(["a cat", "a dog"])) == expected  # type: ignore[arg-type]


def test_classify_refuses_templates_without_a_label_slot(model: ClipModel, clip_png: Path) -> None:
    """A template without "{}" would give every label the same prompt (uniform probabilities)."""
    with pytest.raises(InputError, match=r"templates need '\{\}'.*a photo"):
        model.classify(clip_png, ["cat", "dog"], templates=["a photo of a {}.", "a photo"])
    with pytest.raises(BackendError, match="list of templates"):
        model.text_classifier(["cat", "dog"], templates="a photo of a {}.")
    assert model.text_classifier(["cat", "dog"], templates=["{} {style}"]).shape[0] == 2  # other braces are fine
    with pytest.raises(InputError, match=r"templates is empty; pass templates=None"):
        model.classify(clip_png, ["cat", "dog"], templates=[])  # not silently the bare labels


def test_classify_single_and_duplicate_labels(model: ClipModel, clip_png: Path) -> None:
    ((only,),) = model.classify(clip_png, ["a cat"])
    assert only == ("a cat", pytest.approx(1.0))
    (ranked,) = model.classify(clip_png, ["a cat", "a cat"])
    assert [p for _, p in ranked] == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize(
    ("texts", "match"),
    [(None, "got NoneType"), (7, "got int"), ({"a dog": 1}, "got dict"), (["a dog", None], r"texts\[1\]")],
)
def test_encode_texts_refuses_what_is_not_text(model: ClipModel, texts: Any, match: str) -> None:
    with pytest.raises(InputError, match=match):
        model.encode_texts(texts)


@pytest.mark.parametrize(
    "texts", [b"caf\xe9".decode("utf-8", "surrogateescape"), ["a dog", b"caf\xe9".decode("utf-8", "surrogateescape")]]
)
def test_encode_texts_refuses_bytes_that_were_not_utf8(model: ClipModel, texts: Any) -> None:
    """A Latin-1 file name or argument reaches Python as "caf\\udce9"; the tokenizer's cleanup made it
    U+FFFD without a word. The CLI and the server refused it, the Python API did not."""
    with pytest.raises(InputError, match=r"is not UTF-8 text: byte 0xE9 at character 3"):
        model.encode_texts(texts)
    assert model.encode_texts(["café"]).shape == (1, model.embed_dim)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (None, "images is NoneType"),
        (7, "images is int"),
        ({"a": "b.png"}, "images is dict"),
        (3.5, "images is float"),
        ([None], r"images\[0\] is NoneType"),
    ],
)
def test_encode_images_refuses_what_is_not_an_image(model: ClipModel, images: Any, match: str) -> None:
    with pytest.raises(InputError, match=match):
        model.encode_images(images)


def test_encode_images_checks_every_item_before_decoding_any(
    model: ClipModel, clip_png: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[Any] = []
    real = model.preprocess
    monkeypatch.setattr(model, "preprocess", lambda item: decoded.append(item) or real(item))
    with pytest.raises(BackendError, match=r"images\[2\] is int"):
        model.encode_images([clip_png, clip_png, 3], batch_size=1)
    assert decoded == []  # a bad last item fails fast, not after decoding and encoding the rest


@pytest.mark.parametrize("size", [(0, 0), (5, 0), (0, 5)])
def test_a_pil_image_without_pixels_is_a_decode_error(model: ClipModel, clip_png: Path, size: tuple[int, int]) -> None:
    # What an empty crop box gives (`im.crop((10, 10, 10, 50))`); it was a ZeroDivisionError from the resize.
    empty = Image.new("RGB", size)
    with pytest.raises(DecodeError, match=rf"^<PIL image RGB {size[0]}x{size[1]}>: .*no pixels"):
        model.encode_images([clip_png, empty])
    with pytest.raises(DecodeError, match="no pixels"):
        model.preprocess(empty)


@pytest.mark.parametrize("backend", ["torch", "onnx", "openvino"])
@pytest.mark.parametrize("which", ["manifest.json", "an engine"])
def test_a_file_inside_an_export_folder_points_to_the_folder(export_dir: Path, backend: str, which: str) -> None:
    # Was 'not a readable checkpoint (not a tensor pickle)', or for onnx: 'is not one: create it with
    # `clipengine export`', though it came from one.
    inner = export_dir / "manifest.json" if which == "manifest.json" else sorted(export_dir.glob("*.onnx"))[0]
    with pytest.raises(InputError, match=rf"^{re.escape(str(inner))} is a file of the export folder "
                       rf"{re.escape(str(export_dir))}; pass the folder itself"):  # fmt: skip
        clipengine.load(inner, backend=backend)


@pytest.mark.parametrize(("images", "where"), [("", "images"), ([Path("x.png"), ""], r"images\[1\]")])
def test_an_empty_path_is_named_as_such(model: ClipModel, images: Any, where: str) -> None:
    # Path("") is the working folder: this was a DecodeError ': is a directory, not an image file'.
    with pytest.raises(InputError, match=rf"^{where} is an empty path"):
        model.encode_images(images)
    with pytest.raises(InputError, match=r"^image is an empty path"):
        model.preprocess("")


def test_load_logs_where_its_seconds_go(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`embed -v` shows this line: which step of a load grows on a GPU machine (performance.md)."""
    with caplog.at_level(logging.INFO, logger="clipengine.api"):
        clipengine.load(model_dir)
    lines = [r.getMessage() for r in caplog.records if r.name == "clipengine.api"]
    assert len(lines) == 1, lines
    step = r"\d+\.\d\d s"
    assert re.fullmatch(
        rf"load \S+: torch import {step}, checkpoint read and model built {step}, cpu fp32 engine {step}", lines[0]
    ), lines[0]
