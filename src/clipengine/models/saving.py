"""Write a CLIP module as a clipengine model folder (`save_model`), atomically.

The folder is config.json (CLIPConfig.to_dict() + "preprocess") + model.safetensors; `models.load`
reads it back. Separate from loading because the save is its own small protocol: a temp folder
beside the target, fsync, a swap of two renames, and recovery from a save killed midway.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

from ..errors import CheckpointError
from ..files import fsync_dir, fsync_file, replace_durably
from ..image.preprocess import PreprocessConfig
from .clip import CLIP

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "save_model"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # ours (CLIPConfig.to_dict() + "preprocess") or transformers'
WEIGHTS_FILE = "model.safetensors"


def save_model(module: CLIP, folder: str | Path, preprocess: PreprocessConfig | None = None) -> Path:
    """Write `module` as a clipengine model folder: config.json (+ "preprocess") + model.safetensors.

    The folder loads back with `load_model(folder)` (and is the format of packaged weights). The
    save is atomic: both files are written into a hidden temp folder beside `folder`, which then
    takes its place. If writing fails, a previous save in `folder` is left as it was and the temp
    folder is removed; readers never see new config.json beside old or half-written weights.

    Raises:
        CheckpointError: `folder` is a file, or a folder holding anything besides a saved model
            (a save replaces the folder as a whole).
    """
    from safetensors.torch import save_file

    target = Path(folder).resolve()  # a symlinked folder: replace what it points to, not the link
    _recover_interrupted_save(target)
    _check_replaceable(target)
    cfg = module.config
    preprocess = preprocess or PreprocessConfig(image_size=cfg.vision.image_size)
    config = {**cfg.to_dict(), "preprocess": preprocess.to_dict()}
    tensors = {
        k: (v.detach().float() if v.is_floating_point() else v).contiguous().cpu()
        for k, v in module.state_dict().items()
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it 0700) so the saved folder gets the usual permissions.
    work = target.parent / f".{target.name}.{secrets.token_hex(4)}.saving"
    work.mkdir()
    try:
        (work / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(work / WEIGHTS_FILE))
        for name in _SAVED_FILES:  # data and names on disk before the rename publishes them
            fsync_file(work / name)
        fsync_dir(work)
        _swap_in(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # already moved into place after a successful save
    return Path(folder)


_SAVED_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def _recover_interrupted_save(target: Path) -> None:
    """Undo what a killed `save_model` into `target` left: its half-written `.NAME.<hex>.saving`
    folders go, and a previous save renamed aside as `.NAME.<hex>.old` goes back to `target` when
    `target` is missing (killed between `_swap_in`'s two renames), else goes too. Only folders
    named exactly as a save names them are touched."""
    if not target.parent.is_dir():
        return
    ours = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{8}}\.(saving|old)")
    leftovers = [p for p in target.parent.iterdir() if ours.fullmatch(p.name) and p.is_dir()]
    for p in leftovers:
        if p.name.endswith(".saving"):
            shutil.rmtree(p, ignore_errors=True)
    previous = sorted((p for p in leftovers if p.name.endswith(".old")), key=lambda p: p.stat().st_mtime)
    if previous and not target.exists():
        log.info("restoring %s from an interrupted save (%s)", target, previous[-1].name)
        replace_durably(previous.pop(), target)
    for p in previous:
        shutil.rmtree(p, ignore_errors=True)


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a file, or a folder with content other than a previous save (it would be lost)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder; save the model to a new folder")
    other = sorted(p.name for p in folder.iterdir() if p.name not in _SAVED_FILES)
    if other:
        raise CheckpointError(
            f"{folder}: holds {', '.join(other[:5])}{' ...' if len(other) > 5 else ''} besides a saved "
            "model, and a save replaces the whole folder; save to a new or empty folder"
        )


def _swap_in(work: Path, folder: Path) -> None:
    """Put the finished `work` folder at `folder`, replacing a previous save.

    rename(2) cannot replace a non-empty folder, so a previous save is first renamed aside, and
    removed only once the new one is in place (renamed back if that fails). A crash between the
    two renames leaves no `folder`, and the previous save intact beside it as `.NAME.*.old`.
    The parent folder is fsynced before the previous save is removed: else a power loss could undo
    the renames but not the removal, putting a half-deleted save back under `folder`.
    """
    if not folder.exists():
        replace_durably(work, folder)
        return
    old = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.old"
    os.replace(folder, old)
    try:
        replace_durably(work, folder)
    except BaseException:
        replace_durably(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
