"""Copies of a test export folder with a damaged manifest.json (for the clear-error tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def copy_with_manifest(export_dir: Path, dest: Path, **changes: object) -> Path:
    """Copy `export_dir` to `dest` and set `changes` as top-level manifest.json keys; returns `dest`."""
    shutil.copytree(export_dir, dest)
    path = dest / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    return dest
