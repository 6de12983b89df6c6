"""Where clipengine keeps downloaded weights and caches; resolved on each call, never at import."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir", "weights_dir"]

CACHE_ENV = "CLIPENGINE_HOME"


def cache_dir() -> Path:
    """Return `$CLIPENGINE_HOME`, else `$XDG_CACHE_HOME/clipengine`, else `~/.cache/clipengine`."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "clipengine"


def weights_dir() -> Path:
    """Folder holding downloaded (or hand-placed) checkpoint files."""
    return cache_dir() / "weights"
