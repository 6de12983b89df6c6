"""Readers over the exact real on-disk formats: CIFAR pickles, ImageNet val folders, flat label files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipengine.errors import DatasetError
from clipengine.eval import cifar, datasets, folders, labelled, synthetic


def _py2_style_batch(images: np.ndarray, labels: list[int]) -> dict[bytes, object]:
    """What `pickle.load(f, encoding="bytes")` returns for the official (Python 2) CIFAR-10 files."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    return {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": labels,
        b"data": data,
        b"filenames": [b"x.png"] * len(labels),
    }


def test_cifar10_reader_decodes_row_major_rgb_planes(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    img = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    img[0, 0, 1] = (10, 20, 30)  # row 0, column 1 of image 0
    img[1, 31, 31] = (200, 100, 50)
    with (d / "test_batch").open("wb") as f:
        pickle.dump(_py2_style_batch(img, [3, 9]), f, protocol=2)
    with (d / "batches.meta").open("wb") as f:
        names = [
            b"airplane",
            b"automobile",
            b"bird",
            b"cat",
            b"deer",
            b"dog",
            b"frog",
            b"horse",
            b"ship",
            b"truck",
        ]
        pickle.dump({b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    # The raw layout: R plane (1024 values), then G, then B, each row-major.
    raw = pickle.loads((d / "test_batch").read_bytes())[b"data"]
    assert raw[0, 1] == 10 and raw[0, 1024 + 1] == 20 and raw[0, 2048 + 1] == 30

    data = cifar.load_cifar10(tmp_path, "test")
    assert data.classnames[3] == "cat" and data.labels.tolist() == [3, 9]
    assert data.image(0)[0, 1].tolist() == [10, 20, 30]
    assert data.image(1)[31, 31].tolist() == [200, 100, 50]
    assert data.image(0).shape == (32, 32, 3) and data.image(0).dtype == np.uint8


def test_cifar10_str_keyed_pickles_also_read(tmp_path: Path) -> None:
    """Files re-pickled by Python 3 tools carry str keys; both spellings are accepted."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    img = np.full((1, 32, 32, 3), 7, dtype=np.uint8)
    batch = {k.decode(): v for k, v in _py2_style_batch(img, [1]).items()}
    (d / "test_batch").write_bytes(pickle.dumps(batch))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}))
    data = cifar.load_cifar10(d, "test")  # the folder itself works as root too
    assert data.classnames == ["a", "b"] and data.labels.tolist() == [1]


def test_synthetic_cifar10_round_trip(cifar10_root: Path, shape_sets) -> None:  # type: ignore[no-untyped-def]
    train, test = shape_sets
    files = sorted(p.name for p in (cifar10_root / "cifar-10-batches-py").iterdir())
    assert files == ["batches.meta", *[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]
    got_test = cifar.load_cifar10(cifar10_root, "test")
    np.testing.assert_array_equal(got_test.arrays, test.images)
    np.testing.assert_array_equal(got_test.labels, test.labels)
    assert got_test.classnames == list(synthetic.SHAPES)
    got_train = cifar.load_cifar10(cifar10_root, "train")
    np.testing.assert_array_equal(got_train.arrays, train.images)


def test_cifar100_fine_and_coarse_labels(cifar100_root: Path, colour_sets) -> None:  # type: ignore[no-untyped-def]
    _, test = colour_sets
    raw = pickle.loads((cifar100_root / "cifar-100-python" / "test").read_bytes(), encoding="bytes")
    assert set(raw) == {b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}
    meta = pickle.loads((cifar100_root / "cifar-100-python" / "meta").read_bytes())
    assert len(meta[b"fine_label_names"]) == 100 and len(meta[b"coarse_label_names"]) == 10
    fine = cifar.load_cifar100(cifar100_root, "test")
    assert fine.classnames[0] == "red_circle" and len(fine.classnames) == 100
    np.testing.assert_array_equal(fine.labels, test.labels)
    coarse = cifar.load_cifar100(cifar100_root, "test", label="coarse")
    np.testing.assert_array_equal(coarse.labels, test.shapes)


def test_missing_cifar_names_the_layout_and_download_command(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"cifar-100-python.*train, test, meta.*download-data cifar100"):
        cifar.load_cifar100(tmp_path)


def test_missing_batch_file_is_named(tmp_path: Path, cifar10_root: Path) -> None:
    import shutil

    d = shutil.copytree(cifar10_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    (d / "test_batch").unlink()
    with pytest.raises(DatasetError, match="test_batch"):
        cifar.load_cifar10(tmp_path, "test")


def test_corrupt_pickle_is_a_dataset_error(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "batches.meta").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"batches\.meta"):
        cifar.load_cifar10(tmp_path)


class _RunsCode:
    """Unpickling this runs code (builtins.exec): what a hostile "CIFAR" file could do with os.system.
    Not `print`: Ray, imported by other tests of the suite, replaces builtins.print with its own."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, ("print('code from a dataset pickle ran')",))


def test_cifar_pickle_naming_other_code_is_refused_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": _RunsCode()}, protocol=2))
    with pytest.raises(DatasetError, match=r"batches\.meta: not a CIFAR pickle .*builtin_*\.exec"):
        cifar.load_cifar10(tmp_path)
    assert "ran" not in capsys.readouterr().out


def test_cifar_pickle_from_numpy_1_reads(tmp_path: Path) -> None:
    """The official files name numpy.core.multiarray (NumPy < 2), NumPy 2 names numpy._core: both load."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    img = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    blob = pickle.dumps(_py2_style_batch(img, [0, 1]), protocol=2)
    old = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert old != blob or b"numpy.core.multiarray\n" in blob
    (d / "test_batch").write_bytes(old)
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2))
    data = cifar.load_cifar10(tmp_path)
    np.testing.assert_array_equal(np.stack(data.images()), img)


@pytest.mark.parametrize("seed", range(3))
def test_corrupt_cifar_batch_is_always_a_dataset_error(tmp_path: Path, cifar10_root: Path, seed: int) -> None:
    """Bytes flipped in a batch: each corruption fails as a DatasetError naming the file (was a bare
    TypeError, AttributeError, LookupError, ModuleNotFoundError or MemoryError for some)."""
    import random
    import shutil

    d = shutil.copytree(cifar10_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    good = (d / "test_batch").read_bytes()
    rng = random.Random(seed)
    for _ in range(60):
        blob = bytearray(good)
        for _ in range(3):
            blob[rng.randrange(400)] = rng.randrange(256)  # the header: opcodes, globals, sizes
        (d / "test_batch").write_bytes(bytes(blob))
        try:
            cifar.load_cifar10(tmp_path)
        except DatasetError as e:  # a flipped label value or count: the split's own checks
            assert "test_batch" in str(e) or str(e).startswith("cifar10-test: ")


def test_imagefolder_sorted_classes_and_names(imagefolder_root: Path) -> None:
    data = folders.load_imagefolder(imagefolder_root)
    assert data.classnames == sorted(synthetic.SHAPES)  # folder order is alphabetical
    assert len(data) == 200 and isinstance(data.image(0), Path)
    assert all(
        p.parent.name == data.classnames[lab] for p, lab in zip(data.paths or (), data.labels, strict=True)
    )


def test_folder_read_as_dot_is_named_after_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--root .` (or `..`) named the dataset "folder-" / "flat-" (Path(".").name is ""), so its reports
    were zeroshot_folder-.json, whatever folder was read, and overwrote each other's."""
    shapes = tmp_path / "shapes"
    synthetic.write_imagefolder(shapes, synthetic.generate(4, seed=3, task="shape"))
    synthetic.write_flat_folder(tmp_path / "flat", synthetic.generate(4, seed=3, task="shape"))
    monkeypatch.chdir(shapes)
    assert folders.load_imagefolder(".").name == "folder-shapes"
    monkeypatch.chdir(tmp_path / "flat" / "images")
    assert folders.load_flat_folder("..", "labels.txt").name == "flat-flat"


def test_imagefolder_class_map(tmp_path: Path) -> None:
    for folder in ("n001", "n002"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "a.png")
    data = folders.load_imagefolder(tmp_path, {"n001": "cat", "n002": "dog"})
    assert data.classnames == ["cat", "dog"] and data.labels.tolist() == [0, 1]
    with pytest.raises(DatasetError, match="n002"):
        folders.load_imagefolder(tmp_path, {"n001": "cat"})


def test_imagenet_val_wnid_folders_use_standard_order(tmp_path: Path) -> None:
    """1000 wnid folders sorted = the standard class index; names from CLIP's ImageNet list."""
    wnids = [f"n{i:08d}" for i in range(1000)]
    val = tmp_path / "val"
    for w in wnids:
        (val / w).mkdir(parents=True)
    img = Image.new("RGB", (4, 4))
    for idx in (0, 1, 999):
        img.save(val / wnids[idx] / f"ILSVRC2012_val_{idx:08d}.JPEG")
    data = datasets.load_dataset("imagenet", tmp_path, "test")
    assert data.labels.tolist() == [0, 1, 999]
    assert data.classnames[0] == "tench" and data.classnames[999] == "toilet paper"
    assert data.name == "imagenet-val"


def test_imagenet_subset_without_class_map_is_refused(tmp_path: Path) -> None:
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(DatasetError, match="1000 wnid folders"):
        datasets.load_imagenet(tmp_path)


def test_imagenet_subset_error_names_a_way_for_the_linear_probe(tmp_path: Path) -> None:
    """`eval linear-probe` has no --class-map: the error named only that option, so it also says
    that the probe (which needs no class names) reads a subset as `--dataset folder`."""
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"--class-map.*linear probe.*--dataset folder"):
        datasets.load_imagenet(tmp_path)


def test_imagenet_train_split_without_a_train_folder_is_refused(tmp_path: Path) -> None:
    """The probe's train split of a ROOT holding only val/ read ROOT itself, val/ as its one class:
    the error was "1 class folders (0 wnids) ... needs all 1000", not that train/ is missing."""
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "n01440764" / "a.JPEG")
    with pytest.raises(DatasetError, match=r"no train/ folder.*ROOT/train/<wnid>"):
        datasets.load_dataset("imagenet", tmp_path, "train")


def test_flat_folder_with_labels_file(tmp_path: Path) -> None:
    ds = synthetic.generate(12, seed=3, task="shape")
    synthetic.write_flat_folder(tmp_path, ds)
    first = (tmp_path / "labels.txt").read_text().splitlines()[0]
    assert first == f"SYNTH_val_00000001.png {ds.labels[0]}"
    data = folders.load_flat_folder(tmp_path, "labels.txt")
    np.testing.assert_array_equal(data.labels, ds.labels)
    assert data.classnames == list(synthetic.SHAPES)
    assert data.paths is not None and data.paths[0].name == "SYNTH_val_00000001.png"


def test_imagenet_flat_folder_with_an_images_subfolder_is_found_without_labels_option(tmp_path: Path) -> None:
    """`ROOT/images/` + `ROOT/labels.txt` (the flat layout `load_flat_folder` reads, as
    `write_flat_folder` writes it): found like a flat ROOT, not refused as "1 class folders (0 wnids)"."""
    ds = synthetic.generate(6, seed=3, task="shape")
    synthetic.write_flat_folder(tmp_path, ds)
    data = datasets.load_dataset("imagenet", tmp_path, "test")
    np.testing.assert_array_equal(data.labels, ds.labels)
    assert data.classnames[0] == "tench" and len(data.classnames) == 1000


def test_flat_folder_label_only_lines_align_with_sorted_files(tmp_path: Path) -> None:
    for name in ("b.png", "a.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "labels.txt").write_text("1\n0\n")
    data = folders.load_flat_folder(tmp_path, "labels.txt", ["x", "y"])
    assert [p.name for p in data.paths or ()] == ["a.png", "b.png"] and data.labels.tolist() == [1, 0]


def test_flat_folder_errors_name_the_problem(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "labels.txt").write_text("a.png 0\nmissing.png 1\n")
    with pytest.raises(DatasetError, match=r"missing\.png"):
        folders.load_flat_folder(tmp_path, "labels.txt", ["x", "y"])
    (tmp_path / "labels.txt").write_text("a.png 5\n")
    with pytest.raises(DatasetError, match=r"labels must be in \[0, 2\)"):
        folders.load_flat_folder(tmp_path, "labels.txt", ["x", "y"])
    with pytest.raises(DatasetError, match=r"nope\.txt"):
        folders.load_flat_folder(tmp_path, "nope.txt", ["x"])


def test_prompt_sets_from_bundled_and_user_json(tmp_path: Path) -> None:
    names, templates = datasets.prompt_set("cifar10")
    assert names[0] == "airplane" and len(templates) == 18
    assert len(datasets.prompt_set("cifar100")[1]) == 18
    names, templates = datasets.prompt_set("imagenet")
    assert len(names) == 1000 and len(templates) == 80
    user = tmp_path / "p.json"
    user.write_text(json.dumps({"classes": ["x"], "templates": ["a {} here"]}))
    assert datasets.prompt_set("anything", user) == (["x"], ["a {} here"])
    user.write_text(json.dumps({"classes": ["x"], "templates": ["no placeholder"]}))
    with pytest.raises(DatasetError, match="must contain"):
        datasets.prompt_set("x", user)


def test_unknown_dataset_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cifar10, cifar100, imagenet, folder"):
        datasets.load_dataset("mnist", tmp_path)


@pytest.mark.parametrize(
    ("layout", "meta_file", "batch_file", "loader"),
    [
        ("cifar-10-batches-py", "batches.meta", "test_batch", cifar.load_cifar10),
        ("cifar-100-python", "meta", "test", cifar.load_cifar100),
    ],
)
def test_cifar_files_of_the_other_dataset_are_dataset_errors(  # type: ignore[no-untyped-def]
    tmp_path: Path, cifar10_root: Path, cifar100_root: Path, layout, meta_file, batch_file, loader
) -> None:
    """CIFAR-100 pickles under the CIFAR-10 names (and the reverse) name the file and the missing key."""
    other = {
        "cifar-10-batches-py": (cifar100_root / "cifar-100-python", "meta", "test"),
        "cifar-100-python": (cifar10_root / "cifar-10-batches-py", "batches.meta", "test_batch"),
    }[layout]
    d = tmp_path / layout
    d.mkdir()
    (d / meta_file).write_bytes((other[0] / other[1]).read_bytes())
    with pytest.raises(DatasetError, match=rf"{meta_file}: no b'\w+_names' key"):
        loader(tmp_path)
    own = cifar10_root / "cifar-10-batches-py" if layout.startswith("cifar-10-") else cifar100_root / layout
    (d / meta_file).write_bytes((own / meta_file).read_bytes())
    (d / batch_file).write_bytes((other[0] / other[2]).read_bytes())
    with pytest.raises(DatasetError, match=rf"{batch_file}: no b'\w*labels' key"):
        loader(tmp_path)
    (d / batch_file).write_bytes(pickle.dumps({b"labels": [1], b"fine_labels": [1]}))
    with pytest.raises(DatasetError, match=rf"{batch_file}: no b'data' key"):
        loader(tmp_path)
    rows = np.full((1, 3072), 300)  # not uint8 pixel values
    (d / batch_file).write_bytes(pickle.dumps({b"labels": ["x"], b"fine_labels": ["x"], b"data": rows}))
    with pytest.raises(DatasetError, match=batch_file):
        loader(tmp_path)


def test_imagefolder_skips_hidden_files_and_folders_inside_classes(tmp_path: Path) -> None:
    """macOS `._x.jpg` resource forks and `.ipynb_checkpoints/` are not images of the class."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    for rel in ("cat/1.png", "cat/sub/2.png", "dog/3.png", "dog/.ipynb_checkpoints/4.png", ".trash/5.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / rel)
    (tmp_path / "dog" / "._3.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble, not a PNG
    data = folders.load_imagefolder(tmp_path)
    assert data.classnames == ["cat", "dog"]
    assert [p.relative_to(tmp_path).as_posix() for p in data.paths or ()] == [
        "cat/1.png",
        "cat/sub/2.png",
        "dog/3.png",
    ]


def test_imagefolder_lists_a_class_as_embed_lists_a_folder(tmp_path: Path) -> None:
    """One rule for which files are images (`image.files`): `.jfif` and upper-case extensions
    count, as in `clipengine embed`; the order is embed's (by relative path as text)."""
    from clipengine.image.files import walk_images

    for rel in ("cat/a-b.png", "cat/a/b.png", "cat/C.JFIF", "cat/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / rel, format="JPEG" if rel.endswith("JFIF") else "PNG")
    data = folders.load_imagefolder(tmp_path)
    assert list(data.paths or ()) == [path for _, path in walk_images(tmp_path / "cat")]
    assert [p.relative_to(tmp_path / "cat").as_posix() for p in data.paths or ()] == ["C.JFIF", "a-b.png", "a/b.png"]


def test_imagenet_val_ignores_hidden_folders(tmp_path: Path) -> None:
    val = tmp_path / "val"
    for i in range(1000):
        (val / f"n{i:08d}").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(val / "n00000000" / "a.JPEG")
    (val / ".ipynb_checkpoints").mkdir()
    data = datasets.load_dataset("imagenet", tmp_path, "test")
    assert data.labels.tolist() == [0] and data.classnames[0] == "tench"


def test_folder_dataset_test_split_reads_val(tmp_path: Path) -> None:
    """`ROOT/train/` + `ROOT/val/`: the test split is val/, not ROOT with classes 'train' and 'val'."""
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / split / "cat" / f"{split}.png")
    data = datasets.load_dataset("folder", tmp_path, "test")
    assert data.classnames == ["cat"] and [p.name for p in data.paths or ()] == ["val.png"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_folder_dataset_missing_named_split_is_refused(tmp_path: Path, split: str) -> None:
    """Only `test` falls back to ROOT: a named split that is absent would read ROOT's split folders
    (here test/) as the classes and score a one-class problem."""
    (tmp_path / "test" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "cat" / "a.png")
    with pytest.raises(DatasetError, match=rf"no {split}/ folder"):
        datasets.load_dataset("folder", tmp_path, split)


@pytest.mark.parametrize("splits", [("train",), ("train", "validation")])
def test_folder_dataset_root_holding_only_split_folders_is_refused(
    tmp_path: Path, splits: tuple[str, ...]
) -> None:
    """ROOT/train/ without test/ or val/: the test split fell back to ROOT, whose split folders
    became the classes (train/ alone: one class "train", every image a hit, top-1 100 %)."""
    for split in splits:
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / split / cls / "a.png")
    with pytest.raises(DatasetError, match=r"no test/ or val/ folder.*split folders"):
        datasets.load_dataset("folder", tmp_path, "test")


def test_folder_dataset_root_with_a_class_named_train_still_reads(tmp_path: Path) -> None:
    """A class folder that happens to be called "train" (vehicles: bus, train) is not a split folder."""
    for cls in ("bus", "train"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / cls / "a.png")
    assert datasets.load_dataset("folder", tmp_path, "test").classnames == ["bus", "train"]


def test_flat_folder_file_names_with_spaces(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "my photo.png")
    (tmp_path / "labels.txt").write_text("my photo.png 1\n")
    data = folders.load_flat_folder(tmp_path, "labels.txt", ["x", "y"])
    assert data.labels.tolist() == [1]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("labels.json", b"[0, 1]"),
        ("labels.json", b'{"a.png": "cat"}'),
        ("labels.json", b'{"a.png": 1.5}'),  # was read as label 1
        ("labels.json", b'{"a.png": true}'),  # was read as label 1
        ("labels.txt", b"a.png 0\n\xff\xfe.png 1\n"),
    ],
)
def test_flat_folder_bad_labels_file_is_a_dataset_error(tmp_path: Path, name: str, content: bytes) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DatasetError, match=name):
        folders.load_flat_folder(tmp_path, name, ["x", "y"])


@pytest.mark.parametrize("content", [["a"], {"X": ["a"]}, {"X": {"classes": ["a"], "templates": []}}])
def test_prompt_json_of_the_wrong_shape_is_a_dataset_error(tmp_path: Path, content: object) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match=r"p\.json"):
        datasets.prompt_set("X", path)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"classes": "cat,dog", "templates": ["a {}"]}, "'classes' must be a JSON list of strings, got str"),
        ({"classes": None, "templates": ["a {}"]}, "'classes' must be a JSON list of strings, got NoneType"),
        (
            {"classes": {"cat": 0}, "templates": ["a {}"]},
            "'classes' must be a JSON list of strings, got dict",
        ),
        ({"classes": ["cat", 2], "templates": ["a {}"]}, r"classes\[1\] is 2, not a string"),
        ({"classes": ["cat"], "templates": [["a {}"]]}, r"templates\[0\] is \['a \{\}'\], not a string"),
        ({"classes": ["cat", " "], "templates": ["a {}"]}, r"empty class names at positions \[1\]"),
    ],
)
def test_prompt_json_classes_and_templates_must_be_lists_of_strings(
    tmp_path: Path, entry: dict[str, object], match: str
) -> None:
    """A string of classes was one class per character, a dict its keys, null a bare TypeError, a
    nested list a template "['a cat']", "" a class prompted as "a ."."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps(entry))
    with pytest.raises(DatasetError, match=match):
        datasets.prompt_set("x", path)


def test_prompt_json_empty_entry_is_found_not_reported_missing(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"CIFAR10": {}, "other": {"templates": ["a {}"]}}))
    assert datasets.prompt_set("cifar10", path) == ([], ["a photo of a {}."])


def test_json_files_with_a_utf8_bom_read(tmp_path: Path) -> None:
    """Windows editors save UTF-8 with a BOM; json.loads refused it ("Unexpected UTF-8 BOM")."""
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"classes": ["caf\u00e9"], "templates": ["a {}"]}).encode())
    assert datasets.prompt_set("x", path) == (["caf\u00e9"], ["a {}"])


@pytest.mark.parametrize(
    ("names", "match"),
    [
        ("ab", "got str"),  # was the class names "a" and "b", one per character
        ({"a": None, "b": "y"}, r"\['a'\] is None"),  # was an AttributeError in the CLI
        ({"a": "", "b": "y"}, r"\['a'\] is ''"),  # was a class prompted as "a photo of a ."
        (["x", " "], r"\[1\] is ' '"),
    ],
)
def test_imagefolder_class_names_must_be_non_empty_strings(tmp_path: Path, names: object, match: str) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "i.png")
    with pytest.raises(DatasetError, match=match):
        folders.load_imagefolder(tmp_path, names)  # type: ignore[arg-type]


@pytest.mark.parametrize("names", [{"0": "cat"}, "cat", ["cat", ""]])
def test_flat_folder_classnames_json_must_be_a_list_of_names(tmp_path: Path, names: object) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "labels.txt").write_text("a.png 0\n")
    (tmp_path / "classnames.json").write_text(json.dumps(names))
    with pytest.raises(DatasetError, match=r"classnames\.json"):
        folders.load_flat_folder(tmp_path, "labels.txt")


@pytest.mark.parametrize("content", [b"\xef\xbb\xbfa.png 0\nb.png 1\n", b"\xef\xbb\xbf0\n1\n"])
def test_flat_labels_file_with_a_utf8_bom_reads(tmp_path: Path, content: bytes) -> None:
    """The BOM was read as part of the first file name ("names 1 files not in") or label (int())."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "labels.txt").write_bytes(content)
    data = folders.load_flat_folder(tmp_path, "labels.txt", ["x", "y"])
    assert [p.name for p in data.paths or ()] == ["a.png", "b.png"] and data.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("name", "content"),
    [("labels.txt", "a.png 0\nb.png 1\na.png 1\n"), ("labels.json", '{"x/a.png": 0, "y/a.png": 1}')],
)
def test_flat_labels_file_listing_an_image_twice_is_refused(tmp_path: Path, name: str, content: str) -> None:
    """The image was scored once per line, under each of its (here contradictory) labels."""
    for image in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / image)
    (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError, match=r"more than once, e\.g\. a\.png \(2 times\)"):
        folders.load_flat_folder(tmp_path, name, ["x", "y"])


def test_imagefolder_empty_class_folder_stays_a_class_and_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A class folder with no images (or only hidden / non-image files) is still a candidate class;
    the warning says so (it was silent, and torchvision's ImageFolder refuses such a tree)."""
    for folder in ("cat", "dog", "emu"):
        (tmp_path / folder).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "b.png")
    (tmp_path / "emu" / "notes.txt").write_text("no images here")
    Image.new("RGB", (8, 8)).save(tmp_path / "emu" / ".hidden.png")
    with caplog.at_level("WARNING", logger="clipengine.eval.folders"):
        data = folders.load_imagefolder(tmp_path)
    assert data.classnames == ["cat", "dog", "emu"] and data.labels.tolist() == [0, 1]
    assert "1 of 3 class folders hold no images (emu)" in caplog.text


def test_subset_spreads_over_the_split_and_keeps_every_class(tmp_path: Path) -> None:
    """--limit's subset took the first n rows: for a folder (listed class by class) the first 8 of
    4 x 5 images were classes 0 and 1 only, a biased "quick check"; a probe's train split one class."""
    for c in "abcd":
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.new("RGB", (4, 4)).save(tmp_path / c / f"{i}.png")
    data = folders.load_imagefolder(tmp_path)
    sub = data.subset(8)
    assert sub.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and len(sub) == 8
    assert [p.parent.name for p in sub.paths or ()] == list("aabbccdd")
    assert sub.name == f"{data.name}-8of20" and data.subset(20) is data
    arrays = labelled.checked("x", ["a", "b"], np.array([0, 0, 1, 1]), arrays=np.arange(4).reshape(4, 1, 1, 1))
    assert arrays.subset(2).labels.tolist() == [0, 1] and arrays.subset(2).arrays.ravel().tolist() == [0, 2]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("names", "match"),
    [
        ([b"\xff\xfe", b"b"], "class name 0 .* is not UTF-8"),  # was a bare UnicodeDecodeError
        (None, "class names must be a list, got NoneType"),  # was a bare TypeError
        (b"ab", "class names must be a list, got bytes"),  # was the classes "97" and "98"
        ([b"a", None], "class name 1 is None"),  # was the class "None"
        ([b"a", b""], "class name 1 is b''"),
    ],
)
def test_cifar_class_names_must_be_a_list_of_names(tmp_path: Path, names: object, match: str) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    img = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    (d / "test_batch").write_bytes(pickle.dumps(_py2_style_batch(img, [0, 1]), protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    with pytest.raises(DatasetError, match=r"batches\.meta: " + match):
        cifar.load_cifar10(tmp_path)


@pytest.mark.parametrize("labels", [[0, 1.5], [0, "1"], [[0], [1]]])
def test_cifar_labels_must_be_integers(tmp_path: Path, labels: object) -> None:
    """1.5 was read as class 1 and "1" as 1, without a word."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batch = _py2_style_batch(np.zeros((2, 32, 32, 3), dtype=np.uint8), [0, 1])
    batch[b"labels"] = labels
    (d / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2))
    with pytest.raises(DatasetError, match=r"test_batch: labels must be a list of integers"):
        cifar.load_cifar10(tmp_path)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_cifar_files_re_pickled_by_python_3_read_at_every_protocol(tmp_path: Path, protocol: int) -> None:
    """The restricted unpickler must still read what Python 3 tools write: b"" at protocol 2 is
    builtins.bytes(), a NumPy array at protocol 5 numpy._core.numeric._frombuffer."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    img = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    batch = {**_py2_style_batch(img, [1, 0]), b"batch_label": b"", b"filenames": [b"", b"x.png"]}
    (d / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"label_names": [b"a", "b"], b"num_vis": np.int64(3072), b"tags": {1, 2}, b"f": frozenset()}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    data = cifar.load_cifar10(tmp_path)
    assert data.classnames == ["a", "b"] and data.labels.tolist() == [1, 0]
    np.testing.assert_array_equal(np.stack(data.images()), img)


@pytest.mark.parametrize(
    "data",
    [
        np.full((1, 3072), 300, dtype=np.int64),  # was wrapped to 44
        np.full((1, 3072), 0.5, dtype=np.float32),  # 0-1 floats were truncated to a black image
        np.full((1, 3072), -1, dtype=np.int16),
    ],
)
def test_cifar_pixels_that_are_not_bytes_are_refused(tmp_path: Path, data: np.ndarray) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": [0]}, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}, protocol=2))
    with pytest.raises(DatasetError, match=r"test_batch: b'data' must be .* not all integers in \[0, 255\]"):
        cifar.load_cifar10(tmp_path)


def test_cifar_pixels_held_as_wider_integers_in_range_read(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    data = np.arange(3072, dtype=np.int64)[None] % 256
    (d / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": [0]}, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}, protocol=2))
    assert cifar.load_cifar10(tmp_path).image(0)[0, 1].tolist() == [1, 1, 1]


def test_prompt_set_key_matches_a_user_file_in_any_case(tmp_path: Path) -> None:
    """--prompt-set ImageNet (the bundled file's spelling) was "no prompt set" for a file keyed "imagenet"."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"imagenet": {"templates": ["a {}."]}, "cifar": {"templates": ["b {}."]}}))
    assert datasets.prompt_set("ImageNet", path) == ([], ["a {}."])
    assert datasets.prompt_set("CIFAR", path) == ([], ["b {}."])
    path.write_text(json.dumps({"x": {"templates": ["a {}."]}, "X": {"templates": ["b {}."]}}))
    assert datasets.prompt_set("X", path) == ([], ["b {}."])
    with pytest.raises(DatasetError, match="no prompt set 'x2'"):
        datasets.prompt_set("x2", path)


def test_imagenet_flat_folder_refuses_a_folder_class_map(tmp_path: Path) -> None:
    """A {folder: name} map names no folder of a flat layout: it was ignored without a word."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "labels.txt").write_text("a.png 0\n")
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"n01440764": "tench"}))
    with pytest.raises(DatasetError, match=r"map\.json: a flat folder with labels\.txt takes --class-map as a JSON list"):
        datasets.load_imagenet(tmp_path, class_map=class_map)
    class_map.write_text(json.dumps(["tench"]))
    assert datasets.load_imagenet(tmp_path, class_map=class_map).classnames == ["tench"]


def test_flat_folder_class_map_is_used_not_ignored(tmp_path: Path) -> None:
    """With --labels, --class-map was ignored: imagenet took CLIP's 1000 names, folder classnames.json."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "labels.txt").write_text("a.png 0\nb.png 1\n")
    class_map = tmp_path / "names.json"
    class_map.write_text(json.dumps(["tench", "goldfish"]))
    for key in ("imagenet", "folder"):
        data = datasets.load_dataset(key, tmp_path, class_map=class_map, labels_file="labels.txt")
        assert data.classnames == ["tench", "goldfish"]
    class_map.write_text(json.dumps({"n01440764": "tench"}))
    with pytest.raises(DatasetError, match="takes --class-map as a JSON list"):
        datasets.load_dataset("folder", tmp_path, class_map=class_map, labels_file="labels.txt")


@pytest.mark.parametrize("option", ["class_map", "labels_file"])
def test_cifar_refuses_folder_options_instead_of_ignoring_them(
    tmp_path: Path, cifar10_root: Path, option: str
) -> None:
    with pytest.raises(DatasetError, match="--class-map and --labels are for imagenet and folder"):
        datasets.load_dataset("cifar10", cifar10_root, **{option: tmp_path / "x.json"})  # type: ignore[arg-type]
