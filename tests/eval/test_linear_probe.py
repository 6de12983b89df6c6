"""Linear probe: fits on frozen features, beats chance by far, and caches features on disk."""

from __future__ import annotations

import pytest

from clipengine.eval import cifar, datasets, features, folders, labelled, linear_probe, synthetic

MIN_PROBE_TOP1 = 0.80  # 100-class colour x shape, 1000 train / 500 test: measured 93.0%, chance 1%


def test_linear_probe_accuracy_and_cache(tiny_synth, cifar100_root, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    train = cifar.load_cifar100(cifar100_root, "train")
    test = cifar.load_cifar100(cifar100_root, "test")
    first = linear_probe.evaluate_linear_probe(tiny_synth, train, test)
    assert first.cache_hits == 0 and first.C == pytest.approx(0.316)
    assert first.top1 >= MIN_PROBE_TOP1 and first.chance == pytest.approx(0.01)
    assert linear_probe.feature_cache_path(tiny_synth, train).is_file()

    def no_encoding(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(features, "encode_rows", no_encoding)
    second = linear_probe.evaluate_linear_probe(tiny_synth, train, test)
    assert second.cache_hits == 2 and second.top1 == first.top1


def test_cache_key_separates_splits_and_engines(tiny_synth, cifar100_root) -> None:  # type: ignore[no-untyped-def]
    train = cifar.load_cifar100(cifar100_root, "train")
    test = cifar.load_cifar100(cifar100_root, "test")
    paths = {
        linear_probe.feature_cache_path(tiny_synth, train),
        linear_probe.feature_cache_path(tiny_synth, test),
        linear_probe.feature_cache_path(tiny_synth, test, engine="onnx-int8"),
        linear_probe.feature_cache_path(tiny_synth, test.subset(10)),
    }
    assert len(paths) == 4


def test_two_classes_and_classes_missing_from_train(tiny_synth, shape_sets) -> None:  # type: ignore[no-untyped-def]
    """Binary logistic regression has one decision column; test classes unseen in train never win."""
    import numpy as np

    train_ds, test_ds = shape_sets
    keep_train = np.isin(train_ds.labels, [0, 1])
    train = labelled.LabelledImages(
        "two-train", list(train_ds.classnames), train_ds.labels[keep_train], train_ds.images[keep_train]
    )
    test = labelled.LabelledImages("two-test", list(test_ds.classnames), test_ds.labels, test_ds.images)
    r = linear_probe.evaluate_linear_probe(tiny_synth, train, test)
    # Only circles (0) and squares (1) can be predicted; they are ~20% of the test set.
    assert r.per_class["circle"] >= 0.8 and r.per_class["square"] >= 0.8
    assert r.per_class["triangle"] == 0.0 and r.top1 <= 0.25


class _FakeBackend:
    """A Backend whose embeddings depend on `seed`: stands in for two checkpoints with one name."""

    name, device, precision, embed_dim, image_size, context_length = "fake", "cpu", "fp32", 8, 32, 77

    def __init__(self, seed: int) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        self.w_img = rng.standard_normal((3 * 32 * 32, 8)).astype(np.float32)
        self.w_txt = rng.standard_normal((77, 8)).astype(np.float32)

    def encode_images(self, pixels, *, normalize=True):  # type: ignore[no-untyped-def]
        from clipengine.backends.base import l2_normalize

        features = pixels.reshape(len(pixels), -1) @ self.w_img
        return l2_normalize(features) if normalize else features

    def encode_texts(self, tokens):  # type: ignore[no-untyped-def]
        from clipengine.backends.base import l2_normalize

        return l2_normalize(tokens.astype("float32") @ self.w_txt)


def test_retrained_weights_with_the_same_name_miss_the_cache(shape_sets) -> None:  # type: ignore[no-untyped-def]
    from clipengine.api import ClipModel
    from clipengine.image.preprocess import PreprocessConfig

    _, test_ds = shape_sets
    data = labelled.LabelledImages("t", list(test_ds.classnames), test_ds.labels, test_ds.images)
    cfg = PreprocessConfig(image_size=32)
    old, new, same = (ClipModel(_FakeBackend(s), cfg, "tiny-synth", 100.0) for s in (1, 2, 1))
    assert linear_probe.feature_cache_path(old, data) != linear_probe.feature_cache_path(new, data)
    assert linear_probe.feature_cache_path(old, data) == linear_probe.feature_cache_path(same, data)


def _fake_model():  # type: ignore[no-untyped-def]
    from clipengine.api import ClipModel
    from clipengine.image.preprocess import PreprocessConfig

    return ClipModel(_FakeBackend(1), PreprocessConfig(image_size=32), "fake", 100.0)


def _split(ds, name: str, rows, classnames=None):  # type: ignore[no-untyped-def]
    return labelled.LabelledImages(name, list(classnames or ds.classnames), ds.labels[rows], ds.images[rows])


def test_train_split_with_one_class_is_a_dataset_error(shape_sets) -> None:  # type: ignore[no-untyped-def]
    from clipengine.errors import DatasetError

    train_ds, test_ds = shape_sets
    train = _split(train_ds, "one-class-train", train_ds.labels == 0)
    with pytest.raises(DatasetError, match=r"one-class-train.*at least 2 classes.*'circle'"):
        linear_probe.evaluate_linear_probe(_fake_model(), train, _split(test_ds, "t", slice(0, 20)))


def test_test_classes_without_train_images_are_named_in_a_warning(shape_sets, caplog) -> None:  # type: ignore[no-untyped-def]
    """A class with test images but no readable train image is never predicted, so every one of its
    test images is a miss; that was silent (a recall of 0 read as the model's failure)."""
    train_ds, test_ds = shape_sets
    test = _split(test_ds, "t", slice(0, 100))
    hearts = int((test.labels == synthetic.SHAPES.index("heart")).sum())
    assert hearts > 0
    with caplog.at_level("WARNING", logger="clipengine.eval.linear_probe"):
        linear_probe.evaluate_linear_probe(_fake_model(), _split(train_ds, "all-train", slice(None)), test)
        assert "no readable image in" not in caplog.text
        no_hearts = _split(train_ds, "no-hearts-train", train_ds.labels != synthetic.SHAPES.index("heart"))
        r = linear_probe.evaluate_linear_probe(_fake_model(), no_hearts, test)
    assert r.per_class["heart"] == 0.0
    assert (
        f"1 class(es) with test images have no readable image in no-hearts-train: 'heart' ({hearts} test"
        in caplog.text
    )


def test_cache_key_of_file_names_that_are_not_valid_utf8(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A file or class folder named in Latin-1 (b"caf\\xe9" -> "caf\\udce9"): hashing its path raised
    UnicodeEncodeError, so such a dataset's linear probe ended with a traceback."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / b"caf\xe9".decode("utf-8", "surrogateescape")
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(folder / "a.png")
    data = labelled.LabelledImages("latin1", ["x"], np.zeros(1, dtype=np.int64), paths=(folder / "a.png",))
    renamed = tmp_path / "cafe"
    folder.rename(renamed)
    moved = labelled.LabelledImages("latin1", ["x"], np.zeros(1, dtype=np.int64), paths=(renamed / "a.png",))
    model = _fake_model()
    assert linear_probe.feature_cache_path(model, data) != linear_probe.feature_cache_path(model, moved)


def test_train_and_test_with_other_class_lists_are_refused(shape_sets) -> None:  # type: ignore[no-untyped-def]
    """ImageFolder train/ and test/ with different class folders: label 3 would mean two classes."""
    from clipengine.errors import DatasetError

    train_ds, test_ds = shape_sets
    train = _split(train_ds, "tr", slice(0, 50))
    test = _split(test_ds, "te", slice(0, 20), classnames=list(reversed(test_ds.classnames)))
    with pytest.raises(DatasetError, match="class"):
        linear_probe.evaluate_linear_probe(_fake_model(), train, test)


def test_train_and_test_that_are_the_same_images_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No silent self-test: a `folder` without ROOT/train is refused when loaded (it used to read ROOT
    for both splits), and two splits that are the same images are refused by the probe itself."""
    from clipengine.errors import DatasetError
    from clipengine.eval import synthetic

    synthetic.write_imagefolder(tmp_path, synthetic.generate(20, seed=5))
    test = datasets.load_dataset("folder", tmp_path, "test")  # no test/ or val/: ROOT itself
    with pytest.raises(DatasetError, match="no train/ folder"):
        datasets.load_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match="same"):
        linear_probe.evaluate_linear_probe(_fake_model(), test, test)


def _failing_save(file, arr, *args, **kwargs):  # type: ignore[no-untyped-def]
    """np.save dying halfway (disk full): part of a file, then the error."""
    if hasattr(file, "write"):
        file.write(b"\x93NUMPY half")
    else:
        with open(file, "wb") as f:
            f.write(b"\x93NUMPY half")
    raise OSError(28, "No space left on device")


def test_failed_feature_save_leaves_no_cache_or_temp_file(shape_sets, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """The eval keeps its result (a warning says the features were not saved): losing an hour of
    encoding to a full disk at the very end would be worse than a next run without the cache."""
    import numpy as np

    _, test_ds = shape_sets
    data = _split(test_ds, "t", slice(0, 8))
    model = _fake_model()
    path = linear_probe.feature_cache_path(model, data)
    real_save = np.save
    monkeypatch.setattr(np, "save", _failing_save)
    split, hit = linear_probe.cached_features(model, data)
    assert not hit and split.features.shape == (8, 8)
    assert any("without saving its features" in r.getMessage() and "No space left" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # no temp file left behind
    monkeypatch.setattr(np, "save", real_save)  # not undo(): that would also drop the isolated home
    split, hit = linear_probe.cached_features(model, data)  # the next run writes the cache normally
    assert not hit and np.array_equal(np.load(path), split.features)


@pytest.mark.parametrize("damage", [b"", b"\x93NUMPY half", b"not a numpy file"])
def test_damaged_cache_file_is_recomputed_and_replaced(shape_sets, damage: bytes) -> None:  # type: ignore[no-untyped-def]
    """A cache file cut short (a crash under an older clipengine, a full disk) is a miss, not a traceback."""
    import numpy as np

    _, test_ds = shape_sets
    data = _split(test_ds, "t", slice(0, 8))
    model = _fake_model()
    path = linear_probe.feature_cache_path(model, data)
    path.parent.mkdir(parents=True)
    path.write_bytes(damage)
    split, hit = linear_probe.cached_features(model, data)
    assert not hit and np.array_equal(np.load(path), split.features)


def test_two_runs_caching_the_same_features_at_once_do_not_collide(shape_sets, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Both runs write their own temp file: neither replaces (or loses) the other's."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    _, test_ds = shape_sets
    data = _split(test_ds, "t", slice(0, 8))
    model = _fake_model()
    path = linear_probe.feature_cache_path(model, data)
    both_saved = threading.Barrier(2, timeout=30)
    real_save = np.save

    def save_then_wait(file, arr, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_save(file, arr, *args, **kwargs)
        both_saved.wait()  # both temp files written before either is moved into place

    monkeypatch.setattr(np, "save", save_then_wait)
    with ThreadPoolExecutor(2) as pool:
        runs = [f.result() for f in [pool.submit(linear_probe.cached_features, model, data) for _ in range(2)]]
    assert all(not hit for _, hit in runs)
    assert np.array_equal(np.load(path), runs[0][0].features)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_unreadable_images_are_left_out_of_the_fit_and_the_score(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A broken file in each split: fitted and scored on the rest, both listed; a second run reads
    the features from the cache (NaN rows there) and lists them again, with the same scores."""
    from clipengine.eval import synthetic

    roots = {split: synthetic.write_imagefolder(tmp_path / split, synthetic.generate(60, seed=seed, task="shape",
                                                                                     image_size=32))
             for split, seed in (("train", 31), ("test", 32))}  # fmt: skip
    broken = [sorted((tmp_path / split).rglob("*.png"))[5] for split in ("train", "test")]
    for path in broken:
        path.write_bytes(path.read_bytes()[:30])
    train, test = (folders.load_imagefolder(roots[s], name=s) for s in ("train", "test"))
    first = linear_probe.evaluate_linear_probe(_fake_model(), train, test)
    assert (first.n_train, first.n_test, first.cache_hits) == (59, 59, 0)
    assert [u["path"] for u in first.unreadable] == [str(p) for p in broken]
    second = linear_probe.evaluate_linear_probe(_fake_model(), train, test)
    assert second.cache_hits == 2 and (second.top1, second.n_train, second.n_test) == (first.top1, 59, 59)
    assert [u["path"] for u in second.unreadable] == [str(p) for p in broken]
    assert second.unreadable == first.unreadable  # with their reasons, kept beside the cache


def test_probe_equals_sklearn_on_encode_images_features(tiny_synth, shape_sets) -> None:  # type: ignore[no-untyped-def]
    """The probe's score is an independent sklearn fit on the features `encode_images(normalize=False)`
    gives (CLIP's README fits `encode_image` as it is), with the documented recipe (C, max_iter; the
    test split plays no part in the fit)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    train_ds, test_ds = shape_sets
    train, test = _split(train_ds, "ref-train", slice(0, 200)), _split(test_ds, "ref-test", slice(0, 200))
    r = linear_probe.evaluate_linear_probe(tiny_synth, train, test)
    features = {split.name: tiny_synth.encode_images(split.images(), normalize=False) for split in (train, test)}
    assert not np.allclose(np.linalg.norm(features["ref-train"], axis=1), 1.0)  # not unit rows
    for split in (train, test):  # the cached features are those, row for row
        cached = np.load(linear_probe.feature_cache_path(tiny_synth, split))
        np.testing.assert_allclose(cached, features[split.name], atol=1e-5)
    clf = LogisticRegression(C=0.316, max_iter=1000).fit(features["ref-train"], train.labels)
    pred = clf.predict(features["ref-test"])
    top5 = np.argsort(-clf.predict_proba(features["ref-test"]), axis=1, kind="stable")[:, :5]
    assert (r.n_train, r.n_test) == (200, 200)
    assert r.top1 == np.mean(pred == test.labels)
    assert r.top5 == np.mean((top5 == test.labels[:, None]).any(axis=1))
    assert r.mean_per_class_recall == pytest.approx(balanced_accuracy_score(test.labels, pred))


def test_changed_images_or_preprocessing_miss_the_cache(shape_sets, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The key covers every image, not only the first: an array changed past row 4, a file replaced
    (or repaired) under the same name, and other preprocessing all miss a cache of stale features."""
    import dataclasses
    import os

    from clipengine.eval import synthetic

    _, test_ds = shape_sets
    model = _fake_model()
    data = _split(test_ds, "t", slice(0, 20))
    changed = data.arrays.copy()
    changed[10] = 255 - changed[10]
    edited = labelled.LabelledImages("t", data.classnames, data.labels, changed)
    assert linear_probe.feature_cache_path(model, edited) != linear_probe.feature_cache_path(model, data)
    other = _fake_model()
    other.preprocess_cfg = dataclasses.replace(other.preprocess_cfg, interpolation="bilinear")
    assert linear_probe.feature_cache_path(other, data) != linear_probe.feature_cache_path(model, data)

    synthetic.write_imagefolder(tmp_path, synthetic.generate(20, seed=3))
    folder = folders.load_imagefolder(tmp_path)
    before = linear_probe.feature_cache_path(model, folder)
    assert linear_probe.feature_cache_path(model, folders.load_imagefolder(tmp_path)) == before
    last = folder.paths[-1]
    last.write_bytes(folder.paths[0].read_bytes())  # another image under the same name
    os.utime(last, ns=(last.stat().st_atime_ns, last.stat().st_mtime_ns + 1_000_000_000))
    assert linear_probe.feature_cache_path(model, folders.load_imagefolder(tmp_path)) != before


def test_a_fit_stopped_at_max_iter_is_said_not_to_have_converged(
    shape_sets, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """sklearn's ConvergenceWarning was a line on stderr from a library (an error under -W error)."""
    train_ds, test_ds = shape_sets
    train, test = _split(train_ds, "mi-train", slice(0, 40)), _split(test_ds, "mi-test", slice(0, 20))
    monkeypatch.setattr(linear_probe, "MAX_ITER", 1)
    r = linear_probe.evaluate_linear_probe(_fake_model(), train, test)
    assert r.converged is False and r.to_dict()["converged"] is False
    assert any("without converging" in rec.getMessage() for rec in caplog.records)
