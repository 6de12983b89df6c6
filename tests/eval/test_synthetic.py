"""The synthetic captioned-shapes generator: deterministic, balanced, captions that name the class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipengine.eval import synthetic


def test_same_seed_same_bytes_other_seed_differs() -> None:
    a = synthetic.generate(20, seed=1, task="colour")
    b = synthetic.generate(20, seed=1, task="colour")
    c = synthetic.generate(20, seed=2, task="colour")
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions and a.labels.tolist() == b.labels.tolist()
    assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize(("task", "num_classes"), [("shape", 10), ("colour", 100)])
def test_classes_are_balanced(task: str, num_classes: int) -> None:
    ds = synthetic.generate(2 * num_classes, seed=0, task=task, image_size=24)
    assert ds.images.shape == (2 * num_classes, 24, 24, 3) and ds.images.dtype == np.uint8
    assert np.bincount(ds.labels, minlength=num_classes).tolist() == [2] * num_classes
    assert len(ds.classnames) == num_classes and len(ds) == 2 * num_classes


def test_labels_agree_with_attributes_and_captions() -> None:
    ds = synthetic.generate(50, seed=4, task="colour")
    colours = list(synthetic.COLOURS)
    for i in range(len(ds)):
        colour, shape = ds.classnames[ds.labels[i]].split()
        assert shape == synthetic.SHAPES[ds.shapes[i]] and colour == colours[ds.colours[i]]
        assert ds.attributes[i]["shape"] == shape and shape in ds.captions[i]


def test_shape_is_visible_against_background() -> None:
    """The shape's pixels differ from the background corners: images are not blank."""
    ds = synthetic.generate(10, seed=5, task="shape")
    spread = ds.images.reshape(10, -1, 3).astype(np.float32).std(axis=1).mean(axis=1)
    assert (spread > 8).all()


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match="shape"):
        synthetic.classnames("animals")


def test_writers_leave_no_torn_file_when_killed_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that dies in the middle of an image leaves the earlier ones whole, that one absent
    and no temp file: a later evaluation never reads a truncated image or label list."""
    from PIL import Image

    ds = synthetic.generate(6, seed=3, task="shape")
    real_save, calls = Image.Image.save, []

    def dies_on_third(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(fp)
        if len(calls) == 3:
            Path(fp).write_bytes(b"\x89PNG half")  # part of the file, then the crash
            raise KeyboardInterrupt
        real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_flat_folder(tmp_path, ds)
    monkeypatch.undo()
    written = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert written == ["SYNTH_val_00000001.png", "SYNTH_val_00000002.png"]
    for name in written:
        with Image.open(tmp_path / "images" / name) as img:
            img.load()
    assert not (tmp_path / "labels.txt").exists()
    synthetic.write_flat_folder(tmp_path, ds)  # the rerun completes it
    assert len(list((tmp_path / "images").iterdir())) == 6
    assert len((tmp_path / "labels.txt").read_text().splitlines()) == 6
