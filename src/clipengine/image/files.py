"""Which files are images, and the images of a folder: one rule for `embed`, `predict` and `export`.

Low in the import layers (no torch, no pipeline), so the exporter lists a calibration or sample
folder exactly as `clipengine embed` lists the folder it embeds: a macOS ``._x.jpg`` (AppleDouble
metadata, not a JPEG) or a README beside the pictures is skipped, not decoded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "folder_images", "is_image_name", "walk_images"]

_log = logging.getLogger(__name__)

# Compared lower-cased, so "PHOTO.JPG" counts. Files with other extensions are ignored, not failures.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
)


def is_image_name(name: str) -> bool:
    """True when a file name has an image extension (case-insensitive) and is not hidden."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(root: str | Path, *, within: str | Path | None = None) -> list[tuple[str, Path]]:
    """All images under `root`, recursively, as (POSIX path relative to `root`, path) sorted by the former.

    Hidden files and folders are skipped, and so are files whose names are not image names
    (`is_image_name`). Symlinked folders are followed, except links back to an ancestor (which would
    loop forever) and links to a folder that is listed anyway: one inside `within` reached through
    folders that are neither hidden nor links (``cat/more -> ../dog``). Followed, its images were
    listed twice, under two paths (for eval, under two labels); it is skipped with a warning naming
    it. A link to a folder outside `within`, or inside a hidden folder of it, is followed.

    Args:
        root: the folder to list.
        within: the folder whose images are listed anyway (default `root`); eval's ImageFolder
            reader walks one class folder at a time and passes the dataset folder.

    Raises:
        DatasetError: `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    found: list[tuple[str, Path]] = []
    real_root = root.resolve()
    real_within = real_root if within is None else Path(within).resolve()
    # Resolved folders from the root down to each walked folder: a symlink into that chain is a loop.
    chains: dict[str, frozenset[Path]] = {os.fspath(root): frozenset({real_root})}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain = chains.pop(dirpath)
        kept = []
        for d in dirnames:
            link = Path(dirpath) / d
            target = link.resolve()
            if d.startswith(".") or target in chain:  # skip hidden folders and loops
                continue
            if link.is_symlink() and _listed_anyway(target, real_within):
                _log.warning(
                    "%s: skipping the symlinked folder %s: it points to %s, whose images are listed from there",
                    root, link.relative_to(root).as_posix(), target,
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


def _listed_anyway(target: Path, real_within: Path) -> bool:
    """True when the resolved folder `target` is one a walk of the resolved `real_within` reaches
    without a link: inside it, no hidden folder on the way (a resolved path holds no link)."""
    if not target.is_relative_to(real_within):
        return False
    return not any(part.startswith(".") for part in target.relative_to(real_within).parts)


def folder_images(folder: str | Path, what: str = "image folder", fix: str = "") -> list[Path]:
    """The image files of `folder` as `walk_images` lists them (sorted, recursive), never none.

    Args:
        folder: the folder to list.
        what: names the folder in errors, e.g. ``"--calibration-dir"`` or ``"calibration_images"``.
        fix: appended to the no-images error, e.g. how to point the option elsewhere.

    Raises:
        DatasetError: `folder` is not a folder, or holds no images; the message names `what`, the
            folder and the extensions looked for.
    """
    if not Path(folder).is_dir():
        raise DatasetError(f"{what} {folder}: not a folder")
    images = [path for _, path in walk_images(folder)]
    if not images:
        raise DatasetError(
            f"{what} {folder}: no images found (files ending in {', '.join(sorted(IMAGE_EXTENSIONS))}, "
            f"subfolders walked, hidden files skipped and hidden folders not entered)" + (f"; {fix}" if fix else "")
        )
    return images
