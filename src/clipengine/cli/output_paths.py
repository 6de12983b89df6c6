"""The check every command that writes a folder makes of it first: a file there is a usage error."""

from __future__ import annotations

from pathlib import Path

import typer

from ..files import check_writable_folder

__all__ = ["check_output_folder"]


def check_output_folder(folder: Path, option: str) -> None:
    """Refuse an output folder that is a file, or that a file on its path keeps from being made.

    A usage error (exit 2, naming `option`), as typer's `file_okay=False` already made of a file
    given as the folder itself: the same mistake under one level more (`-o photo.png/out`) was an
    error (exit 1), and in `index build` it was found only by the save, after embedding every image.
    A folder that is not writable stays an error (exit 1): the path is right, its permissions are not.

    Raises:
        typer.BadParameter: a file where the folder (or one above it) would go.
        PermissionError: the nearest existing folder is not writable.
    """
    if folder.exists() and not folder.is_dir():
        raise typer.BadParameter(f"{folder} is a file; name a folder (made if missing)", param_hint=option)
    try:
        check_writable_folder(folder)
    except NotADirectoryError as e:
        raise typer.BadParameter(f"{e.filename}: {e.strerror}", param_hint=option) from e
