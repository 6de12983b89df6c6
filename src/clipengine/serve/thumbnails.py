"""Serve index images as small JPEG thumbnails, only from inside the index's own image roots."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps

__all__ = ["image_roots", "make_thumbnail", "resolve_image"]


def image_roots(raw: str | Path | Iterable[str | Path] | None) -> list[Path]:
    """Normalise an index's `image_roots` (one folder or several) to resolved absolute paths."""
    if raw is None:
        return []
    items = [raw] if isinstance(raw, (str, Path)) else list(raw)
    return [Path(r).expanduser().resolve() for r in items]


def resolve_image(image_id: str, roots: list[Path]) -> Path | None:
    """The file an index id names, or None if it is not a file strictly inside one of `roots`.

    Ids are paths relative to a root with '/' separators. Absolute paths, '..' parts, backslashes and
    NUL bytes are refused outright; symlinks are resolved first, so a link pointing outside is refused.
    """
    if not image_id or "\x00" in image_id or "\\" in image_id:
        return None
    rel = PurePosixPath(image_id)
    if rel.is_absolute() or ".." in rel.parts or rel.parts[:1] == ("~",):
        return None
    for root in roots:
        candidate = (root / rel).resolve()
        if candidate.is_relative_to(root) and candidate != root and candidate.is_file():
            return candidate
    return None


def make_thumbnail(path: Path, size: int, max_pixels: int) -> bytes:
    """JPEG bytes of the image at `path`, longest side at most `size` pixels, EXIF orientation applied.

    Raises:
        ValueError: the image has more than `max_pixels` pixels (checked before decoding).
        OSError: Pillow cannot read it.
    """
    with Image.open(path) as src:
        if src.width * src.height > max_pixels:
            raise ValueError(f"{src.width}x{src.height} exceeds the limit of {max_pixels} pixels")
        src.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster for big photos
        thumb = ImageOps.exif_transpose(src)
        thumb.thumbnail((size, size))
        out = io.BytesIO()
        thumb.convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()
