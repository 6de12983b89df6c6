"""Folder walking, file lists and partitioning."""

from __future__ import annotations

import os
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
    root, outside = tmp_path / "root", tmp_path / "outside"
    _touch(outside, "real/a.jpg", "x/b.png", "y/c.png")
    (root / "link").parent.mkdir()
    (root / "link").symlink_to(outside / "real", target_is_directory=True)
    (outside / "real" / "loop").symlink_to(root, target_is_directory=True)  # back to the root
    (root / "x").symlink_to(outside / "x", target_is_directory=True)
    (outside / "x" / "to_y").symlink_to(outside / "y", target_is_directory=True)
    (outside / "y" / "to_x").symlink_to(outside / "x", target_is_directory=True)  # mutual loop
    ids = [i.id for i in list_items(root)]
    assert ids == sorted(set(ids))
    assert {"link/a.jpg", "x/b.png", "x/to_y/c.png"} <= set(ids)
    assert len(ids) < 20


def test_a_symlinked_folder_listed_anyway_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """cat/more -> dog listed dog's images twice, once under cat/ (eval: under both labels)."""
    _touch(tmp_path, "cat/1.jpg", "dog/2.jpg", "dog/deep/3.jpg", ".store/4.jpg")
    (tmp_path / "cat" / "more").symlink_to(tmp_path / "dog", target_is_directory=True)
    (tmp_path / "cat" / "deep").symlink_to(tmp_path / "dog" / "deep", target_is_directory=True)
    (tmp_path / "cat" / "kept").symlink_to(tmp_path / ".store", target_is_directory=True)  # not listed otherwise
    with caplog.at_level("WARNING", logger="clipengine.image.files"):
        ids = [i.id for i in list_items(tmp_path)]
    assert ids == ["cat/1.jpg", "cat/kept/4.jpg", "dog/2.jpg", "dog/deep/3.jpg"]
    warned = sorted(r.getMessage() for r in caplog.records)
    assert len(warned) == 2
    assert "symlinked folder cat/deep: it points to" in warned[0] and "dog/deep" in warned[0]
    assert "symlinked folder cat/more: it points to" in warned[1]
    assert warned[1].endswith(f"{(tmp_path / 'dog').resolve()}, whose images are listed from there")


def test_imagefolder_class_with_a_link_to_another_class_counts_its_images_once(tmp_path: Path) -> None:
    """The ImageFolder reader walks one class folder at a time: the link points outside that folder
    but inside the dataset, whose walk lists those images under their own class."""
    from clipengine.eval.folders import load_imagefolder

    _touch(tmp_path, "cat/1.jpg", "dog/2.jpg", "dog/3.jpg")
    (tmp_path / "cat" / "dogs").symlink_to(tmp_path / "dog", target_is_directory=True)
    data = load_imagefolder(tmp_path)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in data.paths or ()] == ["cat/1.jpg", "dog/2.jpg", "dog/3.jpg"]
    assert list(data.labels) == [0, 1, 1]


def test_file_list_lines_are_split_at_newlines_only(tmp_path: Path) -> None:
    odd = "odd\u2028name\x85\x0c.jpg"  # str.splitlines() would cut this one name into three
    _touch(tmp_path, odd, "b.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{odd}\r\nb.jpg\n", encoding="utf-8")
    items = list_items(listing)
    assert [i.id for i in items] == [odd, "b.jpg"]
    assert all(Path(str(i.source)).is_file() for i in items)


def test_file_list_saved_with_a_byte_order_mark_names_its_first_file(tmp_path: Path) -> None:
    """Notepad saves UTF-8 with a BOM: the first path read "\ufeffa.jpg", which is no file, so the
    first image failed as "file not found"."""
    _touch(tmp_path, "a.jpg", "b.jpg")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbfa.jpg\r\nb.jpg\r\n")
    items = list_items(listing)
    assert [i.id for i in items] == ["a.jpg", "b.jpg"]
    assert all(Path(str(i.source)).is_file() for i in items)


def test_file_list_naming_files_by_bytes_that_are_not_utf8_lists_them_as_a_folder_walk_does(
    tmp_path: Path,
) -> None:
    """`find . > list.txt` over Latin-1 file names writes their bytes as they are: the list was refused
    whole ("'utf-8' codec can't decode byte 0xe9"), while a walk of the same folder embeds them."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # "caf\udce9.jpg", the name Python gives that file
    _touch(folder, latin1, "ok.jpg")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"imgs/caf\xe9.jpg\nimgs/ok.jpg\n")
    listed = list_items(listing)
    assert [Path(str(i.source)) for i in listed] == [folder / latin1, folder / "ok.jpg"]
    assert all(Path(str(i.source)).is_file() for i in listed)
    assert [i.id for i in list_items(folder)] == [latin1, "ok.jpg"]


def test_a_binary_file_given_as_a_file_list_is_refused_unread(tmp_path: Path) -> None:
    """A video passed as the source was decoded as a list of garbage paths (or, strictly, refused
    with a codec error after being read whole)."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 100)
    with pytest.raises(DatasetError) as raised:
        list_items(video)
    assert str(raised.value) == (
        f"{video}: not a file list (it holds NUL bytes: a binary file?); pass a folder, "
        "or a text file with one path per line"
    )


def test_image_name_rule_is_the_image_package_s() -> None:
    """`embed` and `export` share one rule: sources re-exports it from clipengine.image.files."""
    from clipengine.image import files
    from clipengine.pipeline import sources

    assert sources.IMAGE_EXTENSIONS is files.IMAGE_EXTENSIONS
    assert sources.is_image_name is files.is_image_name
    assert not sources.is_image_name("._x.jpg") and not sources.is_image_name("README.txt")
    assert sources.is_image_name("PHOTO.JPG")
