"""Folder walking, file lists and partitioning."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipengine.errors import DatasetError
from clipengine.pipeline.sources import list_items, num_partitions, partition_items, partitions
from clipengine.types import ImageItem


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_folder_walk_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "b.jpg", "a.PNG", "c.JPEG", "sub/z.webp", "sub/deeper/y.bmp",
        "notes.txt", ".hidden.jpg", ".cache/x.jpg", "sub/.git/obj.png", "noext",
    )  # fmt: skip
    items = list_items(tmp_path)
    assert [i.id for i in items] == ["a.PNG", "b.jpg", "c.JPEG", "sub/deeper/y.bmp", "sub/z.webp"]
    assert all(Path(str(i.source)).is_file() for i in items)
    assert list_items(tmp_path) == items  # stable across calls


def test_file_list_keeps_order_resolves_relative_paths_and_skips_comments(tmp_path: Path) -> None:
    _touch(tmp_path, "imgs/a.jpg", "imgs/b.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my images\nimgs/b.jpg\n\n{tmp_path / 'imgs/a.jpg'}\nmissing.jpg\n")
    items = list_items(listing)
    assert [i.id for i in items] == ["imgs/b.jpg", str(tmp_path / "imgs/a.jpg"), "missing.jpg"]
    assert items[0].source == str(tmp_path / "imgs/b.jpg")
    assert items[2].source == str(tmp_path / "missing.jpg")  # a Failure later, not an error now


def test_file_list_with_duplicate_is_refused(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\na.jpg\n")
    with pytest.raises(DatasetError, match="listed twice"):
        list_items(listing)


def test_missing_source_names_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope"):
        list_items(tmp_path / "nope")


def test_an_image_given_as_source_is_named_not_read_as_a_file_list(tmp_path: Path) -> None:
    image = tmp_path / "photo.JPG"
    image.write_bytes(b"\xff\xd8\xff\xe0")  # was read as UTF-8 text: "cannot read file list ('utf-8' codec ...)"
    with pytest.raises(DatasetError) as raised:
        list_items(image)
    assert str(raised.value) == (
        f"{image}: an image, not a folder or file list: pass its folder, or a .txt file that names it"
    )


def test_partitions_are_fixed_slices_of_the_sorted_list() -> None:
    items = [ImageItem(f"{i:03d}.jpg", f"/x/{i:03d}.jpg") for i in range(23)]
    parts = partitions(items, 10)
    assert [p.id for p in parts] == [0, 1, 2]
    assert [len(p.items) for p in parts] == [10, 10, 3]
    assert parts[1].items == tuple(items[10:20]) == partition_items(items, 1, 10)
    assert num_partitions(0, 10) == 0 and num_partitions(20, 10) == 2
    with pytest.raises(ValueError, match=">= 1"):
        partitions(items, 0)


def test_symlinked_folders_are_followed_without_looping(tmp_path: Path) -> None:
    _touch(tmp_path, "real/a.jpg")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real" / "loop").symlink_to(tmp_path, target_is_directory=True)  # back to the root
    _touch(tmp_path, "x/b.png", "y/c.png")
    (tmp_path / "x" / "to_y").symlink_to(tmp_path / "y", target_is_directory=True)
    (tmp_path / "y" / "to_x").symlink_to(tmp_path / "x", target_is_directory=True)  # mutual loop
    ids = [i.id for i in list_items(tmp_path)]
    assert ids == sorted(set(ids))
    assert {"link/a.jpg", "real/a.jpg", "x/b.png", "x/to_y/c.png", "y/c.png", "y/to_x/b.png"} <= set(ids)
    assert len(ids) < 20


def test_file_list_lines_are_split_at_newlines_only(tmp_path: Path) -> None:
    odd = "odd\u2028name\x85\x0c.jpg"  # str.splitlines() would cut this one name into three
    _touch(tmp_path, odd, "b.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{odd}\r\nb.jpg\n", encoding="utf-8")
    items = list_items(listing)
    assert [i.id for i in items] == [odd, "b.jpg"]
    assert all(Path(str(i.source)).is_file() for i in items)


def test_image_name_rule_is_the_image_package_s() -> None:
    """`embed` and `export` share one rule: sources re-exports it from clipengine.image.files."""
    from clipengine.image import files
    from clipengine.pipeline import sources

    assert sources.IMAGE_EXTENSIONS is files.IMAGE_EXTENSIONS
    assert sources.is_image_name is files.is_image_name
    assert not sources.is_image_name("._x.jpg") and not sources.is_image_name("README.txt")
    assert sources.is_image_name("PHOTO.JPG")
