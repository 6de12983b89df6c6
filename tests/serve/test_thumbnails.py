"""resolve_image confines ids to the image roots; make_thumbnail makes small JPEGs."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from clipengine.serve.thumbnails import image_roots, make_thumbnail, resolve_image


@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (640, 320), "red").save(root / "a" / "x.png")
    (tmp_path / "outside.png").write_bytes((root / "a" / "x.png").read_bytes())
    os.symlink(tmp_path / "outside.png", root / "link.png")
    return image_roots(root)


def test_ids_inside_the_root_resolve(roots: list[Path]) -> None:
    assert resolve_image("a/x.png", roots) == roots[0] / "a" / "x.png"
    assert resolve_image("a/./x.png", roots) == roots[0] / "a" / "x.png"


@pytest.mark.parametrize(
    "image_id",
    [
        "",
        "a",
        "missing.png",
        "../outside.png",
        "a/../../outside.png",
        "/etc/passwd",
        "a\\..\\x.png",
        "a/x.png\x00",
        "~/x.png",
        "link.png",
        ".",
    ],
)
def test_everything_else_is_refused(roots: list[Path], image_id: str) -> None:
    assert resolve_image(image_id, roots) is None


def test_image_roots_accepts_one_path_or_many(tmp_path: Path) -> None:
    assert image_roots(None) == []
    assert image_roots(str(tmp_path)) == [tmp_path.resolve()]
    assert image_roots([tmp_path, str(tmp_path / "b")]) == [tmp_path.resolve(), (tmp_path / "b").resolve()]


def test_thumbnail_is_a_small_jpeg(roots: list[Path]) -> None:
    data = make_thumbnail(roots[0] / "a" / "x.png", 128, 10**8)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG" and img.size == (128, 64)
    with pytest.raises(ValueError, match="exceeds"):
        make_thumbnail(roots[0] / "a" / "x.png", 128, 1000)
