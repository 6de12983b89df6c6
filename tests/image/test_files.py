"""The folder walk (`image.files.walk_images` / `walk_image_paths`) against the os.walk + pathlib walk
it replaced: same list, order, paths, warnings and errors on trees with every case the rules name."""

from __future__ import annotations

import logging
import os
import pathlib
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from clipengine.errors import DatasetError
from clipengine.image import files
from clipengine.image.files import is_image_name, walk_image_paths, walk_images
from clipengine.pipeline.sources import list_folder, list_items
from clipengine.types import ImageItem


def reference_walk(root: str | Path, *, within: str | Path | None = None) -> list[tuple[str, Path]]:
    """walk_images as it was before the scandir walk (commit 6432b1d), kept verbatim as the reference."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    found: list[tuple[str, Path]] = []
    real_root = root.resolve()
    real_within = real_root if within is None else Path(within).resolve()
    chains: dict[str, frozenset[Path]] = {os.fspath(root): frozenset({real_root})}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain = chains.pop(dirpath)
        kept = []
        for d in dirnames:
            link = Path(dirpath) / d
            target = link.resolve()
            if d.startswith(".") or target in chain:
                continue
            if link.is_symlink() and files._listed_anyway(target, real_within):
                files._log.warning(
                    "%s: skipping the symlinked folder %s: it points to %s, whose images are listed from there",
                    root,
                    link.relative_to(root).as_posix(),
                    target,
                )
                continue
            kept.append(d)
            chains[os.path.join(dirpath, d)] = chain | {target}
        dirnames[:] = kept
        base = Path(dirpath)
        for name in filenames:
            if is_image_name(name):
                path = base / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda pair: pair[0])
    return found


NAMES = [  # file names: images, non-images, hidden, odd
    "a.jpg", "B.JPG", "c.jpeg", "d.Png", "e.webp", "f.bmp", "g.gif", "h.tif", "i.TIFF", "j.ppm",
    "k.pgm", "l.jfif", "notes.txt", "noext", "jpg", "a.", "a.jpg.txt", "a.tar.jpg", ".hidden.jpg",
    "._a.jpg", "..jpg", ".jpg", "with space.png", "ümlaut é.jpg", "odd\u2028name\x85.jpg", "z" * 200 + ".png",
    "01.jpg", "1.jpg", "10.jpg", "a-b.jpg", "a_b.jpg", "A.jpg", "~x.jpg", "#1.jpg", "a\\b.jpg",
]  # fmt: skip


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def _make_tree(tmp_path: Path, seed: int) -> tuple[Path, Path]:
    """A dataset-like tree under tmp_path/"root" (and a folder outside it): nested and hidden folders,
    folders named like images, links to files and to folders inside, outside and up (loops), broken
    links, non-UTF-8 names where the file system takes them."""
    rng = random.Random(seed)
    root, outside = tmp_path / "root", tmp_path / "outside"
    folders = [root, root / "sub", root / "sub" / "deeper", root / "x.jpg", root / ".cache",
               root / "sub" / ".git" / "obj", root / "cat", root / "dog" / "deep", outside / "real" / "in",
               outside / "y", root / "é"]  # fmt: skip
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for name in rng.sample(NAMES, rng.randint(3, 12)):
            _touch(folder / name)
    for i in range(rng.randint(5, 30)):  # random depth
        parts = [rng.choice(["p", "q", "r.png", ".h", "s t"]) for _ in range(rng.randint(1, 4))]
        _touch(root.joinpath(*parts, f"{i}.{rng.choice(['jpg', 'PNG', 'txt'])}"))
    links = {  # link (under root) -> target
        "cat/more": root / "dog",  # listed anyway: skipped with a warning
        "cat/deep": root / "dog" / "deep",
        "cat/hidden_store": root / ".cache",  # into a hidden folder: followed
        "out": outside / "real",  # outside: followed
        "out2": outside / "real",  # twice, under two names: both followed (outside `root`)
        "sub/deeper/up": root,  # loop to the root
        "sub/deeper/parent": root / "sub",  # loop to an ancestor
        "link.jpg": root / "a.jpg",  # a link to a file is a file
        "broken.jpg": tmp_path / "missing.jpg",  # a broken link is listed (a Failure later)
        "outfile.png": outside / "y" / "a.jpg",
        "selfloop.jpg": root / "selfloop.jpg",  # ELOOP: a file to the walk, and listed
        "é/ü": outside / "y",
    }
    for link, target in links.items():
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        (root / link).symlink_to(target, target_is_directory=target.is_dir())
    (outside / "real" / "back").symlink_to(root, target_is_directory=True)  # loop through outside
    (outside / "real" / "in" / "to_y").symlink_to(outside / "y", target_is_directory=True)
    (outside / "y" / "to_real").symlink_to(outside / "real", target_is_directory=True)  # mutual loop
    # inside root, reached through outside: skipped with a warning
    (outside / "y" / "to_root_sub").symlink_to(root / "sub", target_is_directory=True)
    # a loop closed by a folder that is no link: deep_in/up/y/z is deep_in
    _touch(outside / "s" / "y" / "z" / "1.jpg")
    (root / "deep_in").symlink_to(outside / "s" / "y" / "z", target_is_directory=True)
    (outside / "s" / "y" / "z" / "up").symlink_to(outside / "s", target_is_directory=True)
    raw = os.fsencode(root)
    try:  # Linux names are bytes: os.fsdecode makes b"\xff" the lone surrogate "\udcff"
        open(os.fsdecode(raw + b"/caf\xe9 1.jpg"), "wb").close()
        os.mkdir(os.fsdecode(raw + b"/dir\xff"))
        open(os.fsdecode(raw + b"/dir\xff/bad\xff.png"), "wb").close()
    except (OSError, UnicodeError):
        pass  # this file system only takes UTF-8 names
    return root, outside


def _both(
    caplog: pytest.LogCaptureFixture, root: str | Path, within: Path | None = None
) -> tuple[list[tuple[str, Path]], list[str]]:
    """Walk `root` and run the reference on it; assert the same results and the same warnings, in order."""
    with caplog.at_level(logging.WARNING, logger="clipengine.image.files"):
        caplog.clear()
        expected = reference_walk(root, within=within)
        expected_warnings = [r.getMessage() for r in caplog.records]
        caplog.clear()
        got = walk_images(root, within=within)
        got_warnings = [r.getMessage() for r in caplog.records]
    assert got == expected
    assert [str(p) for _, p in got] == [str(p) for _, p in expected]
    assert got_warnings == expected_warnings
    return got, got_warnings


@pytest.mark.parametrize("seed", range(4))
def test_walk_matches_the_os_walk_reference(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    root, outside = _make_tree(tmp_path, seed)
    got, warnings = _both(caplog, root)
    rels = [rel for rel, _ in got]
    assert rels == sorted(rels) and len(set(rels)) == len(rels)
    # links to files are files, broken or looping ones too (Failures later)
    assert {"link.jpg", "broken.jpg", "selfloop.jpg", "outfile.png", "deep_in/1.jpg"} <= set(rels)
    assert not any(rel.startswith("deep_in/up/y/z/") for rel in rels)
    assert "x.jpg" not in rels  # a folder, walked
    assert not any(part.startswith(".") for rel in rels for part in rel.split("/"))
    assert not any(
        rel.startswith(("sub/deeper/up/", "sub/deeper/parent/", "cat/more/", "cat/deep/")) for rel in rels
    )
    assert sorted(w.split(" folder ")[1].split(":")[0] for w in warnings) == [
        "cat/deep", "cat/more", "out/in/to_y/to_root_sub", "out2/in/to_y/to_root_sub", "é/ü/to_root_sub",
    ]  # fmt: skip
    assert walk_image_paths(root) == [(rel, str(path)) for rel, path in got]
    assert list_folder(root) == [ImageItem(id=rel, source=str(path)) for rel, path in got]
    # eval's per-class walks: within= the dataset folder
    for sub in ("cat", "sub", "é"):
        _both(caplog, root / sub, within=root)
    _both(caplog, outside, within=root)


@pytest.mark.parametrize("form", [".", "", "root", "./root", "root/", "root//sub/..", "ABS/", "LINK"])
def test_walk_matches_the_reference_for_every_spelling_of_the_root(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """Paths as str(Path(root) / rel) gives them: "." is dropped, trailing and double slashes are not kept."""
    root, _ = _make_tree(tmp_path, 7)
    (tmp_path / "rootlink").symlink_to(root, target_is_directory=True)
    monkeypatch.chdir(root if form in (".", "") else tmp_path)
    spelled = {"ABS/": f"{root}/", "LINK": "rootlink"}.get(form, form)
    for as_path in (False, True):
        arg: str | Path = Path(spelled) if as_path else spelled
        got, _ = _both(caplog, arg)
        assert got and [item.source for item in list_folder(arg)] == [str(p) for _, p in got]


def test_unreadable_and_missing_folders_as_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that cannot be listed, or fails part-way (an I/O error), is skipped whole, as os.walk
    skips it (os.walk calls os.scandir, so both walks see the same failures), with a warning that
    names it and the reason (os.walk said nothing)."""
    _touch(tmp_path / "a.jpg")
    _touch(tmp_path / "locked" / "b.jpg")
    for i in range(5):
        _touch(tmp_path / "flaky" / f"{i}.jpg")
    scandir = os.scandir

    class Failing:
        def __init__(self, folder: str) -> None:
            self.scan = scandir(folder)

        def __enter__(self) -> Failing:
            return self

        def __exit__(self, *exc: object) -> None:
            self.scan.close()

        def __iter__(self) -> Failing:
            return self

        def __next__(self) -> os.DirEntry[str]:
            entry = next(self.scan)
            if entry.name == "3.jpg":
                raise OSError(5, "Input/output error")
            return entry

    def failing_scandir(folder: str) -> object:
        name = os.path.basename(os.fspath(folder).rstrip("/"))
        if name == "locked":
            raise PermissionError(13, "Permission denied", folder)
        return Failing(folder) if name == "flaky" else scandir(folder)

    monkeypatch.setattr(os, "scandir", failing_scandir)
    with caplog.at_level(logging.WARNING, logger="clipengine.image.files"):
        caplog.clear()
        got = walk_images(tmp_path)
        warnings = sorted(r.getMessage() for r in caplog.records)
    assert got == reference_walk(tmp_path)
    assert [rel for rel, _ in got] == ["a.jpg"]
    # The same list as os.walk, but not without a word: the images in those folders are lost.
    assert warnings == [
        f"{tmp_path}: cannot list the folder flaky (Input/output error); the images in it are left out",
        f"{tmp_path}: cannot list the folder locked (Permission denied); the images in it are left out",
    ]
    monkeypatch.undo()
    for bad in (tmp_path / "nope", tmp_path / "a.jpg"):
        with pytest.raises(DatasetError) as raised:
            walk_image_paths(bad)
        assert str(raised.value) == f"{bad}: not a folder"
        with pytest.raises(DatasetError, match=r"no such folder or file list|an image"):
            list_items(bad)


def test_the_inlined_name_rule_is_is_image_name(tmp_path: Path) -> None:
    """The walk tests names inline: it must agree with is_image_name on every name."""
    for name in NAMES:
        _touch(tmp_path / name)
    assert sorted(rel for rel, _ in walk_image_paths(tmp_path)) == sorted(
        n for n in NAMES if is_image_name(n)
    )


def test_listing_makes_no_pathlib_call_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """65,000 files took 1-2 s in pathlib (a Path, relative_to and as_posix per file) before the
    scandir walk (0.13-0.16 s for list_items); its strings are what ImageItem.source holds."""
    for folder in ("a", "b/c", "d"):
        for i in range(100):
            _touch(tmp_path / folder / f"{i}.jpg")
    calls = {"n": 0}
    for cls, name in [(pathlib.PurePath, "__truediv__"), (pathlib.PurePath, "relative_to"),
                      (pathlib.PurePath, "as_posix"), (pathlib.PurePath, "__str__"), (pathlib.PurePath, "joinpath"),
                      (pathlib.Path, "resolve"), (pathlib.Path, "is_symlink")]:  # fmt: skip
        original = getattr(cls, name)

        def counted(*args: object, _original: Callable[..., object] = original, **kwargs: object) -> object:
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)
    items = list_folder(tmp_path)
    n = calls["n"]
    monkeypatch.undo()
    assert len(items) == 300
    assert n < 10, f"{n} pathlib calls to list 300 files"
